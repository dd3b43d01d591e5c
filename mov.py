"""MoV: a mixture of (IA)3 vectors, and (IA)3 itself, added to a frozen model from outside.

Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit" (arXiv 2309.05444), section 2; the
original code is for-ai/parameter-efficient-moe `src/mov.py` (`MoV`, `MoVAttention`), `src/ia3.py` and
`configs/{mov,ia3}.gin`. This file needs only torch: copy it into another project as it is. For every rescaled
activation h (E = experts, d = features, H = heads):

    p  = softmax(h @ W_r)          the router: kernel W_r [d, E], N(0, 0.02), no bias; logits and softmax in float32
    s  = sum_e p_e * v_e           expert vectors v_e start at ones, so the model is unchanged at step 0
    h' = h * s                     (IA)3 is the dense baseline: h' = h * v with one vector and no router

Sites (the original's `k_conv`, `v_conv` and `intermediate_conv` slots):
  - keys and values of every attention (encoder self, decoder self, decoder cross), routed per head: h is the
    projected key/value viewed as [b, L, H, d_kv]; W_r [d_kv, E] is shared by the heads; vectors [H, E, d_kv].
  - the FFN's activation: h = gelu(wi_0 x) is rescaled before it multiplies wi_1 x; W_r [d_ff, E]; vectors [E, d_ff].
The router reads the activation it rescales; padding is routed like text (the original's ignore_padding_tokens=False).

Usage:
    model = mov.add_mov(t5_model, num_experts=10)       # wraps k, v and act in place; freezes the base weights
    optimizer = Adafactor([p for p in model.parameters() if p.requires_grad])
    logits = model(input_ids, decoder_input_ids)

The layer's contract, all that other code reads or sets on it:
  - `num_experts` (None for (IA)3), `heads` (None at the FFN site), `dim`;
  - `router`, a submodule without parameters: `router(x, kernel, bias) -> (probs, softmax)`, each [..., E]; its
    `input_dim` (None: the activation's width) shapes the kernel, its `bias` (bool) asks the layer for a logit bias.
    `Router` below is the paper's (top_k: the original's `Router.top_k`, no renormalisation; an ablation);
    routing.py holds the original's options (jitter, bias, renormalisation, sentence input), the load-balancing loss
    and the monitor, which reads the router's outputs through forward hooks;
  - parameters `mov_router` ([d, E], the original's `router/.../kernel`), `mov_router_bias`, `mov_experts` (the
    original's `mov_scaling`), `ia3_scale` (`ia3_scaling`), listed in `adapter_param_names`.
Freezing: `add_mov(..., freeze_base=True)` (the default) freezes every parameter that no module lists in its
`adapter_param_names` (this file's layers, molora.py's), so adapters stack; `freeze_base(model)` does it alone.
Deliberate deviation: the expert mixing runs in float32 and the product h * s in the activation's dtype (the original
kept MoV's dtype float32, so JAX promoted the product and what follows to float32). Running the model in float32
restores it. Adapter parameters are float32 on the base weight's device (meta included), whatever its dtype.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAM_NAMES = ("mov_router", "mov_router_bias", "mov_experts", "ia3_scale")
ATTENTION_TARGETS = ("k", "v")  # T5's key and value projections (q, k, v, o of every attention)
FFN_TARGETS = ("act",)  # T5's FFN activation module, between wi_0 and the product with wi_1


def is_adapter_param(name):
    """True for the parameters add_mov / add_ia3 create (the trainable ones), by their last name component."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAM_NAMES


def freeze_base(model):
    """requires_grad=False for every parameter no adapter layer claims (its module's `adapter_param_names`)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name not in getattr(module, "adapter_param_names", ()):
                p.requires_grad_(False)
    return model


def _fp32(device):
    """A context with autocast off on `device`, so router math stays float32 under bf16 autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta and other devices without autocast


class Router(nn.Module):
    """The paper's router: softmax(x @ kernel (+ bias)) in float32, as the original's `Router` ("selective
    precision"); top_k keeps the k most probable experts and zeroes the rest without renormalising (its
    `_top_k_mask`),
    so a top-k site starts at the kept probability mass, not the identity. Returns (probs, softmax)."""
    input_dim, bias = None, False  # the kernel reads the activation; no logit bias

    def __init__(self, *, top_k=None):
        super().__init__()
        self.top_k = top_k

    def forward(self, x, kernel, bias=None):
        with _fp32(x.device):
            logits = x.float() @ kernel.float()  # [..., E]
            full = torch.softmax(logits if bias is None else logits + bias.float(), dim=-1)
        if self.top_k is None:
            return full, full
        keep = torch.zeros_like(full).scatter(-1, full.topk(self.top_k, dim=-1).indices, 1.0)  # static shapes
        return full * keep, full

    def extra_repr(self):
        return f"top_k={self.top_k}"


class MoV(nn.Module):
    """The vectors of one site: MoV with `router` (this site's own; default: the paper's `Router()`), or (IA)3 when
    num_experts is None. heads=None is the FFN site (h [..., d], vectors [E, d]); heads=H an attention site
    (h [..., H, d], vectors [H, E, d])."""
    adapter_param_names = ADAPTER_PARAM_NAMES

    def __init__(self, *, dim, heads=None, num_experts=None, router=None, device=None):
        super().__init__()
        self.dim, self.heads, self.num_experts = dim, heads, num_experts
        head_shape = () if heads is None else (heads,)
        if num_experts is None:
            self.ia3_scale = nn.Parameter(torch.ones(*head_shape, dim, device=device))
            return
        self.router = router if router is not None else Router()
        self.mov_router = nn.Parameter(torch.empty(self.router.input_dim or dim, num_experts, device=device))
        nn.init.normal_(self.mov_router, std=0.02)
        bias = nn.Parameter(torch.zeros(num_experts, device=device)) if self.router.bias else None
        self.register_parameter("mov_router_bias", bias)
        self.mov_experts = nn.Parameter(torch.ones(*head_shape, num_experts, dim, device=device))

    def scale(self, h):
        """h' = h * sum_e p_e v_e (or h * v for (IA)3); h [..., (H,) d]; returns h's shape and dtype."""
        if self.num_experts is None:
            return h * self.ia3_scale.to(h.dtype)
        probs, _ = self.router(h, self.mov_router, self.mov_router_bias)  # [..., (H,) E] float32
        with _fp32(h.device):  # the original's mixing: [..., (H,) E] x [(H,) E, d] -> [..., (H,) d]
            s = torch.einsum("...e,...ed->...d", probs.float(), self.mov_experts.float())
        return h * s.to(h.dtype)

    def extra_repr(self):
        return f"dim={self.dim}, heads={self.heads}, " + ("ia3" if self.num_experts is None else
                                                          f"experts={self.num_experts}")


class MoVLinear(MoV):
    """A key/value projection followed by per-head MoV (or (IA)3). It owns a wrapped nn.Linear's `weight` and
    `bias` (so `...k.weight` keeps its name); another wrapper (e.g. a LoRA layer) is kept whole as `base`."""

    def __init__(self, linear, *, heads, num_experts=None, router=None):
        super().__init__(dim=linear.out_features // heads, heads=heads, num_experts=num_experts, router=router,
                         device=next(linear.parameters()).device)
        self.in_features, self.out_features = getattr(linear, "in_features", None), linear.out_features
        if isinstance(linear, nn.Linear):
            self.weight = linear.weight  # the same Parameter object
            self.register_parameter("bias", linear.bias)
        else:
            self.base = linear

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if hasattr(self, "weight") else self.base(x)  # [b, L, H*d]
        return self.scale(y.unflatten(-1, (self.heads, self.dim))).flatten(-2)  # per head [b, L, H, d] -> [b, L, H*d]


class MoVActivation(MoV):
    """The FFN activation followed by MoV (or (IA)3): gelu(wi_0 x) is rescaled before the product with wi_1 x."""

    def __init__(self, act, *, dim, num_experts=None, router=None, device=None):
        super().__init__(dim=dim, num_experts=num_experts, router=router, device=device)
        self.fn = act  # the original activation module (no parameters in T5)

    def forward(self, x):
        return self.scale(self.fn(x))  # [b, L, d_ff]


def add_mov(model, num_experts, *, top_k=None, router=None, attention_targets=ATTENTION_TARGETS,
            ffn_targets=FFN_TARGETS, num_heads=None, head_dim=None, ffn_dim=None, freeze_base=True):
    """Wrap the attention key/value projections and FFN activations of `model` with MoV; the new parameters train,
    and with freeze_base the base model's weights are frozen. Returns the model.

    router: a function that makes each site's router (default: `lambda: Router(top_k=top_k)`, the paper's; e.g.
    `lambda: routing.Router(Router(), jitter=0.01)` for the original's options). Targets match a module whose
    dotted name equals the target or ends with "." + target. Attention sites must be nn.Linear (or a wrapper with
    out_features); heads come from num_heads / head_dim or model.config.num_heads / d_kv. The FFN width comes from
    ffn_dim or the sibling `wi_0` / `wi` Linear.
    """
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(router, nn.Module) or (router is not None and not callable(router)):
        raise ValueError("add_mov(router=...) takes a function that makes each site's router, e.g. "
                         "router=lambda: routing.Router(...), not a router")
    if router is not None and top_k is not None:
        raise ValueError("pass top_k to the router you make (router=...), not to add_mov as well")
    make = router if router is not None else (lambda: Router(top_k=top_k))
    k = getattr(make(), "top_k", None)
    if k is not None and not (isinstance(k, int) and 1 <= k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}] or None, got {k!r}")
    return _inject(model, dict(num_experts=num_experts, router=make), attention_targets, ffn_targets, num_heads,
                   head_dim, ffn_dim, freeze_base)


def add_ia3(model, *, attention_targets=ATTENTION_TARGETS, ffn_targets=FFN_TARGETS, num_heads=None, head_dim=None,
            ffn_dim=None, freeze_base=True):
    """Wrap the same sites as add_mov with one (IA)3 vector each (ones, no router); as add_mov for freezing."""
    return _inject(model, {}, attention_targets, ffn_targets, num_heads, head_dim, ffn_dim, freeze_base)


def _inject(model, site, attention_targets, ffn_targets, num_heads, head_dim, ffn_dim, freeze):
    """Replace every matched module by its wrapper (setattr on the parent); new parameters train, base ones freeze."""
    if any(is_adapter_param(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already has MoV/(IA)3 parameters; apply add_mov/add_ia3 once, to a fresh model")
    names = lambda t: (t,) if isinstance(t, str) else tuple(t)  # noqa: E731  (one string is one name)
    attention_targets, ffn_targets = names(attention_targets), names(ffn_targets)
    if not attention_targets + ffn_targets:
        raise ValueError("attention_targets and ffn_targets are both empty; name at least one module to adapt")
    if set(attention_targets) & set(ffn_targets):
        raise ValueError(f"a target is both an attention and an FFN site: {set(attention_targets) & set(ffn_targets)}")
    config = getattr(model, "config", None)
    heads = num_heads if num_heads is not None else getattr(config, "num_heads", None)
    d_kv = head_dim if head_dim is not None else getattr(config, "d_kv", None)
    hits = {t: 0 for t in attention_targets + ffn_targets}
    # remove_duplicate=False: a module reachable by two paths (one shared activation) is wrapped at each
    for name, module in list(model.named_modules(remove_duplicate=False)):
        target = next((t for t in hits if name == t or name.endswith("." + t)), None)
        if target is None:
            continue
        hits[target] += 1
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = {k: v() if k == "router" else v for k, v in site.items()}  # a router of its own per site
        if target in attention_targets:
            wrapper = MoVLinear(module, heads=_heads_of(name, module, heads, d_kv), **layer)
        else:
            sibling = next((getattr(parent, s) for s in ("wi_0", "wi") if hasattr(parent, s)), None)
            if ffn_dim is None and sibling is None:
                raise ValueError(f"cannot tell the width of FFN activation {name}: no sibling wi_0/wi; pass ffn_dim=")
            first = next(iter(parent.parameters()), None)
            wrapper = MoVActivation(module, dim=ffn_dim or sibling.out_features,
                                    device=first.device if first is not None else None, **layer)
        setattr(parent, leaf, wrapper)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}; pass attention_targets= / "
                         "ffn_targets= with this model's module names (see model.named_modules())")
    return freeze_base(model) if freeze else model


def _heads_of(name, module, heads, d_kv):
    """Number of heads of the projection `module`, checking heads * d_kv == out_features."""
    out = getattr(module, "out_features", None)
    if not isinstance(out, int):
        raise ValueError(f"attention target {name} is a {type(module).__name__}, expected nn.Linear (or a wrapper "
                         "with out_features)")
    if heads is None and d_kv is None:
        raise ValueError(f"cannot tell the heads of {name}: the model has no config.num_heads / config.d_kv; "
                         "pass num_heads= (and/or head_dim=)")
    heads = heads if heads is not None else out // d_kv
    if heads * (d_kv if d_kv is not None else out // heads) != out:
        raise ValueError(f"{name} has {out} outputs, not num_heads {heads} x head_dim {d_kv}; pass the right "
                         "num_heads= / head_dim=")
    return heads
