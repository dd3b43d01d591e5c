"""MoLORA: a mixture of LoRA experts, and LoRA itself, added to a frozen model's linear layers from outside.

Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit" (arXiv 2309.05444), section 2; the original code is
for-ai/parameter-efficient-moe `src/molora.py`, `src/lora.py`, `configs/{molora,lora}.gin`, and the `lora` branch of
its Flaxformer fork. This file needs only torch: copy it into another project as it is. For an adapted linear
y = W x (E = experts, r = rank):

    p = softmax(x @ W_r)                            router on the layer's INPUT, W_r [d_in, E], N(0, 0.02), no bias,
                                                    logits and softmax in float32
    y = W x + (alpha / r) * sum_e p_e B_e (A_e x)   A_e [d_in, r] ~ N(0, 0.02), B_e [r, d_out] = 0 (unchanged at step 0)

A weighted sum of expert outputs (not (sum p A)(sum p B)). LoRA is the baseline with one expert and no router:
y = W x + (alpha / r) B (A x). Targets: q, k, v, o of every attention, the FFN's wi_0 and wo (not wi_1). Defaults:
rank 4, alpha 16 (scale 4); the released MoLORA config uses 10 experts, the paper's main table 15.

Usage:
    model = molora.add_molora(t5_model, num_experts=15)   # wraps q, k, v, o, wi_0, wo in place; freezes the base
    optimizer = Adafactor([p for p in model.parameters() if p.requires_grad])

The layer's contract, as mov.py's: `num_experts` (None for LoRA), `rank`, `alpha`; `router`, a submodule without
parameters, `router(x, kernel, bias) -> (probs, softmax)` ([..., E] each; `Router` below is the paper's, top_k the
original's `Router.top_k` without renormalisation; routing.py holds the original's options, the load-balancing loss
and the monitor); parameters `lora_A` ([E, d_in, r]; LoRA [d_in, r]), `lora_B` ([E, r, d_out]; LoRA [r, d_out]),
`lora_router` ([d_in, E], the original's `router/.../kernel`) and `lora_router_bias`, in `adapter_param_names`.
Freezing and stacking as mov.py's: a target that is itself a wrapper (in_features and out_features, e.g. mov.py's
MoVLinear) is wrapped whole.
Deliberate deviation: A x is formed for all experts at once [b, L, E, r], weighted by p in float32, then contracted
over (e, r) with B in the activation's dtype; the original forms every expert's output [b, L, E, d_out] and sums
them weighted in float32. The sum is the same; under bf16 autocast the rounding differs (README: deviations).
Adapter parameters are float32 on the base weight's device.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_router", "lora_router_bias")
TARGETS = ("q", "k", "v", "o", "wi_0", "wo")  # T5's attention projections and FFN input/output (not wi_1)


def is_adapter_param(name):
    """True for the parameters add_molora / add_lora create (the trainable ones), by their last name component."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAM_NAMES


def freeze_base(model):
    """requires_grad=False for every parameter no adapter layer claims (its module's `adapter_param_names`)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name not in getattr(module, "adapter_param_names", ()):
                p.requires_grad_(False)
    return model


class Router(nn.Module):
    """The paper's router, as mov.py's `Router` (this file stands alone): softmax(x @ kernel (+ bias)) in float32,
    top_k keeps the k most probable experts without renormalising. Returns (probs, softmax)."""
    input_dim, bias = None, False

    def __init__(self, *, top_k=None):
        super().__init__()
        self.top_k = top_k

    def forward(self, x, kernel, bias=None):
        with torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else \
                contextlib.nullcontext():  # float32 under bf16 autocast
            logits = x.float() @ kernel.float()  # [..., E]
            full = torch.softmax(logits if bias is None else logits + bias.float(), dim=-1)
        if self.top_k is None:
            return full, full
        return full * torch.zeros_like(full).scatter(-1, full.topk(self.top_k, dim=-1).indices, 1.0), full


class MoLoRALinear(nn.Module):
    """y = W x + (alpha/r) sum_e p_e B_e A_e x. It owns a wrapped nn.Linear's `weight` and `bias` (names unchanged);
    another wrapper (e.g. mov.py's MoVLinear) is kept whole as `base`, and y = base(x) + the update. num_experts=None
    is plain LoRA. `router`: this site's own (default: the paper's `Router()`)."""
    adapter_param_names = ADAPTER_PARAM_NAMES

    def __init__(self, linear, *, rank=4, alpha=16, num_experts=None, router=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.num_experts = rank, alpha, num_experts
        if isinstance(linear, nn.Linear):
            self.weight = linear.weight  # the same Parameter object: `...q.weight` keeps its name
            self.register_parameter("bias", linear.bias)
        else:
            self.base = linear
        device = next(linear.parameters()).device
        experts = () if num_experts is None else (num_experts,)
        self.lora_A = nn.Parameter(torch.empty(*experts, self.in_features, rank, device=device))
        nn.init.normal_(self.lora_A, std=0.02)
        self.lora_B = nn.Parameter(torch.zeros(*experts, rank, self.out_features, device=device))
        if num_experts is not None:
            self.router = router if router is not None else Router()
            if self.router.input_dim is not None:
                raise ValueError("MoLORA routes on its layer's input: a router reading another input (sentence_dim) "
                                 "is for MoV layers; drop sentence_dim")
            self.lora_router = nn.Parameter(torch.empty(self.in_features, num_experts, device=device))
            nn.init.normal_(self.lora_router, std=0.02)
            bias = nn.Parameter(torch.zeros(num_experts, device=device)) if self.router.bias else None
            self.register_parameter("lora_router_bias", bias)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if hasattr(self, "weight") else self.base(x)  # [b, L, d_out]
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.num_experts is None:
            return y + ((x @ A) @ B * (self.alpha / self.rank)).to(y.dtype)  # [b, L, r] -> [b, L, d_out]
        probs, _ = self.router(x, self.lora_router, self.lora_router_bias)  # [b, L, E] float32
        # the original's einsums 'bsd,edr->bser', 'bser,erd->bsed', '...e,...ed->...d' as two plain matmuls over the
        # experts' stacked ranks (E*r columns), never forming the [b, L, E, d_out] expert outputs
        ax = (x @ A.transpose(0, 1).reshape(self.in_features, -1)).unflatten(-1, (self.num_experts, self.rank))
        ax = ax.float() * probs.unsqueeze(-1)  # A_e x weighted by p_e in float32, as the original's: [b, L, E, r]
        delta = ax.flatten(-2) @ self.lora_B.float().reshape(-1, self.out_features)  # sum over (e, r): [b, L, d_out]
        return y + (delta * (self.alpha / self.rank)).to(y.dtype)

    def extra_repr(self):
        experts = "lora" if self.num_experts is None else f"experts={self.num_experts}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, {experts}"


def add_molora(model, num_experts, *, rank=4, alpha=16, top_k=None, router=None, targets=TARGETS,
               freeze_base=True):
    """Wrap every Linear named by `targets` with MoLORA; the new parameters train, and with freeze_base the base
    model's weights are frozen; return the model. A target matches a module whose dotted name equals it or ends
    with "." + target. router: a function making each site's router (default `lambda: Router(top_k=top_k)`)."""
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(router, nn.Module) or (router is not None and not callable(router)):
        raise ValueError("add_molora(router=...) takes a function that makes each site's router, e.g. "
                         "router=lambda: routing.Router(...), not a router")
    if router is not None and top_k is not None:
        raise ValueError("pass top_k to the router you make (router=...), not to add_molora as well")
    make = router if router is not None else (lambda: Router(top_k=top_k))
    k = getattr(make(), "top_k", None)
    if k is not None and not (isinstance(k, int) and 1 <= k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}] or None, got {k!r}")
    return _inject(model, targets, freeze_base, rank=rank, alpha=alpha, num_experts=num_experts, router=make)


def add_lora(model, *, rank=4, alpha=16, targets=TARGETS, freeze_base=True):
    """Wrap the same Linears with plain LoRA (one expert, no router); as add_molora for freezing."""
    return _inject(model, targets, freeze_base, rank=rank, alpha=alpha)


def _inject(model, targets, freeze, **layer):
    """Replace every matched Linear by its wrapper (setattr on the parent); new parameters train, base ones freeze."""
    if not isinstance(layer["rank"], int) or layer["rank"] <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {layer['rank']!r}")
    if any(is_adapter_param(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already has LoRA/MoLORA parameters; apply add_lora/add_molora once, to a "
                         "fresh model")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # one string is one name
    if not targets:
        raise ValueError("targets is empty; name at least one Linear to adapt")
    hits = {t: 0 for t in targets}
    # remove_duplicate=False: a module reachable by two paths is wrapped at each (each wrapper shares its weight)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        target = next((t for t in hits if name == t or name.endswith("." + t)), None)
        if target is None:
            continue
        if not all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features")):
            raise ValueError(f"target {name} is a {type(module).__name__}, expected nn.Linear (or a wrapper with "
                             "in_features and out_features); pass targets= naming this model's Linear layers")
        hits[target] += 1
        parent_name, _, leaf = name.rpartition(".")
        own = {k: v() if k == "router" else v for k, v in layer.items()}  # a router of its own per site
        setattr(model.get_submodule(parent_name), leaf, MoLoRALinear(module, **own))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}; pass targets= with this "
                         "model's Linear names (see model.named_modules())")
    return freeze_base(model) if freeze else model
