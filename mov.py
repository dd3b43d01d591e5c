"""MoV: a mixture of (IA)3 vectors, and (IA)3 itself, added to a frozen model from outside.

Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit" (arXiv 2309.05444), section 2; the original code is
for-ai/parameter-efficient-moe `src/mov.py`, `src/ia3.py`, `src/routing.py`, `configs/{mov,ia3}.gin`.
This file imports only torch: copy it into another project as it is. For every rescaled activation h:

    p  = softmax(h @ W_r)          router kernel W_r [d, E], N(0, 0.02), no bias; logits and softmax in float32
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

Router options of the original's `src/routing.py` `Router`, all off in its released configs (and by default here):
  - router_jitter=eps: in training only, h is multiplied by noise ~ U[1-eps, 1+eps] per element before the router
    (`Router._compute_router_probabilities`; off in eval as flaxformer's MoeLayer passes apply_jitter=enable_dropout).
  - router_bias=True: p = softmax(h @ W_r + b_r), b_r [E] starts at zero (`RouterWeights.use_bias`), `mov_router_bias`.
  - aux_loss (layer attribute): each forward keeps Switch Transformer's load-balancing loss in `last_aux_loss`
    (see `balance_loss`); `load_balance_loss(model)` averages it over the routed layers, as T5X's MoE models do.
  - record_stats (layer attribute): each forward keeps on-device routing statistics in `last_stats` (`routing_stats`).
Options beyond the released config (both are ablations in the paper):
  - top_k: softmax over all experts, then zero all but the k largest, without renormalising (the original's
    `Router.top_k`; so at init s = kept probability mass < 1, not the identity); `renormalize=True` divides the
    kept ones by their sum instead (identity at init).
  - router_input="sentence": the router reads one embedding per example (the paper used Sentence-T5), passed for a
    batch with `with mov.sentence_routing(model, embeddings):`; every token of an example then shares one routing.
    At attention sites the same probabilities serve every head (there is no per-head activation to read).
Shapes follow the original: (IA)3's attention vector is [H, d_kv] (`IA3Attention`), its FFN vector [d_ff], so
MoV with one expert equals (IA)3. Parameter names: `mov_router` ([d, E], the original's `router/.../kernel`),
`mov_router_bias`, `mov_experts` (the original's `mov_scaling`), `ia3_scale` (`ia3_scaling`); `is_adapter_param`
recognises them.
Freezing: `add_mov(..., freeze_base=True)` (the default) freezes the base model's weights and only those: a
parameter that its module lists in `adapter_param_names` (this file's layers, molora.py's) keeps its state, so
adapters stack (`add_lora` then `add_mov`, or the reverse, leaves both trainable). `freeze_base(model)` does the
same alone. A target that is itself a wrapped layer (anything with `out_features`) is wrapped as a whole.
Deliberate deviations from the original:
  - Expert mixing runs in float32 and the rescale multiplies in the activation's dtype (the original's MoV kept
    dtype float32 and let JAX promote the product to float32). Restore it by running the model in float32.
  - Adapter parameters are created in float32 on the base weight's device (meta included), whatever its dtype.
  - router_jitter acts in training only: the original's MoV calls its Router with apply_jitter left at True, so a
    nonzero jitter_noise would perturb evaluation too (its released train and eval configs set 0).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAM_NAMES = ("mov_router", "mov_router_bias", "mov_experts", "ia3_scale")
ROUTER_INPUTS = ("token", "sentence")
ATTENTION_TARGETS = ("k", "v")  # T5's key and value projections (q, k, v, o of every attention)
FFN_TARGETS = ("act",)  # T5's FFN activation module, between wi_0 and the product with wi_1


def is_adapter_param(name):
    """True for the parameters add_mov / add_ia3 create (the trainable ones), by their last name component."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAM_NAMES


def _fp32(device):
    """A context with autocast off on `device`, so router math stays float32 under bf16 autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta and other devices without autocast


def jitter_noise(x, jitter, rows=(0, 1)):
    """u ~ U[1 - jitter, 1 + jitter] of x's shape. rows = (rank, world_size) when the batch (x's first dim) is split
    over data-parallel processes: each draws the whole batch's noise from the RNG stream they share and keeps its
    rows, so N processes draw what one process with the whole batch draws."""
    (rank, world), b = rows, x.shape[0]
    u = x.new_empty((b * world, *x.shape[1:])).uniform_(1.0 - jitter, 1.0 + jitter)
    return u if world == 1 else u[rank * b:(rank + 1) * b].clone()


def route(x, kernel, top_k=None, renormalize=False, bias=None, jitter=0.0, rows=(0, 1)):
    """(probs, full), [..., d] x [d, E] -> [..., E] each: full = softmax((x * u) @ kernel + bias) in float32, with
    u ~ U[1 - jitter, 1 + jitter] per element (none at jitter 0; `rows`: see jitter_noise); probs = full, or with
    top_k all but the k largest zeroed (and with renormalize rescaled to sum 1)."""
    with _fp32(x.device):
        x = x.float()
        if jitter:
            x = x * jitter_noise(x, jitter, rows)
        logits = x @ kernel.float()
        if bias is not None:
            logits = logits + bias.float()
        full = probs = torch.softmax(logits, dim=-1)
    if top_k is not None:
        # one-hot mask of the k largest (static shapes: topk + scatter, no boolean indexing)
        keep = torch.zeros_like(probs).scatter(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        probs = probs * keep
        if renormalize:
            probs = probs / probs.sum(-1, keepdim=True)
    return probs, full


def balance_loss(full, top_k=None):
    """Switch Transformer's load-balancing loss of one router site (Fedus et al. 2021, eq. 4-6), as the original's
    `routing._load_balancing_loss` with an expert mask (and flaxformer's, which it copies): E^2 * the mean over
    example rows b and experts e of f_be * P_be, i.e. E * sum_e f_e P_e per row, averaged over rows (1 when
    balanced). full: [b, L, (H,) E] router softmax; P_be = its mean over row b's tokens (x heads); f_be = the
    fraction of those routed to e: e in its top_k set, its argmax (top 1) for soft routing. The original defines
    this but never calls it (without a mask its formula is the constant E for a softmax, hence the top-1 mask)."""
    E = full.shape[-1]
    p = full.float().reshape(full.shape[0] if full.dim() > 2 else 1, -1, E)  # [rows, tokens (x heads), E]
    routed = torch.zeros_like(p).scatter(-1, p.topk(top_k or 1, dim=-1).indices, 1.0)  # no gradient
    return (routed.mean(1) * p.mean(1)).mean() * E ** 2


def routing_stats(full, mask=None):
    """One site's routing health, detached and on the device, [2 + E] float32: the sum of the routing entropies in
    nats, the number of routing distributions, and each expert's summed probability, over the tokens (x heads at
    attention sites) that `mask` (full's leading shape, 1 = real token) marks; every token when mask is None."""
    p = full.detach().float()
    if mask is None:
        mask = torch.ones(p.shape[:-1], device=p.device)
    elif tuple(p.shape[:mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"routing-statistics mask {list(mask.shape)} does not lead the routing {list(p.shape)}")
    p = p.reshape(*mask.shape, -1, p.shape[-1])  # [..., H or 1, E]
    w = mask.to(p.device, torch.float32).unsqueeze(-1).expand(p.shape[:-1])  # [..., H or 1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [..., H or 1]
    return torch.cat([(entropy * w).sum().view(1), w.sum().view(1), (p * w.unsqueeze(-1)).flatten(0, -2).sum(0)])


def observe(layer, full):
    """What a routed layer keeps of a forward's router softmax `full`: its load-balancing loss (with its graph) when
    `layer.aux_loss`, its routing statistics (masked by `layer.stats_mask` when set) when `layer.record_stats`."""
    if layer.aux_loss:
        layer.last_aux_loss = balance_loss(full, layer.top_k)
    if layer.record_stats:
        layer.last_stats = routing_stats(full, layer.stats_mask)


def load_balance_loss(model):
    """The mean of `last_aux_loss` over the layers of `model` with aux_loss on (None if there are none): T5X's MoE
    models average the per-layer auxiliary losses (t5x/contrib/moe/models.py `_extract_diversity_metrics`)."""
    losses = [m.last_aux_loss for m in model.modules()
              if getattr(m, "aux_loss", False) and getattr(m, "last_aux_loss", None) is not None]
    return torch.stack(losses).mean() if losses else None


def freeze_base(model):
    """requires_grad=False for every parameter no adapter layer claims (its module's `adapter_param_names`)."""
    for module in model.modules():
        claimed = getattr(module, "adapter_param_names", ())
        for name, p in module.named_parameters(recurse=False):
            if name not in claimed:
                p.requires_grad_(False)
    return model


class _Rescale(nn.Module):
    """The rescaling shared by both sites: (IA)3 when num_experts is None, MoV otherwise.

    heads=None is the FFN site (h [..., d], vectors [E, d]); heads=H an attention site (h [..., H, d],
    vectors [H, E, d]). Set `record_routing = True` to keep the last probabilities in `last_routing`
    ([..., (H,) E], detached) for analysis; `aux_loss` / `record_stats`: see `observe`.
    """

    adapter_param_names = ADAPTER_PARAM_NAMES
    rows = (0, 1)  # (rank, world_size) of the router jitter's noise under data parallelism (jitter_noise)

    def __init__(self, dim, heads, num_experts, top_k, renormalize, router_input, sentence_dim, device,
                 router_jitter=0.0, router_bias=False):
        super().__init__()
        self.dim, self.heads, self.num_experts = dim, heads, num_experts
        self.top_k, self.renormalize, self.router_jitter = top_k, renormalize, router_jitter
        self.router_input = router_input if num_experts is not None else None
        head_shape = () if heads is None else (heads,)
        if num_experts is None:
            self.ia3_scale = nn.Parameter(torch.ones(*head_shape, dim, device=device))
        else:
            router_dim = dim if router_input == "token" else sentence_dim
            self.mov_router = nn.Parameter(torch.empty(router_dim, num_experts, device=device))
            nn.init.normal_(self.mov_router, std=0.02)
            bias = nn.Parameter(torch.zeros(num_experts, device=device)) if router_bias else None
            self.register_parameter("mov_router_bias", bias)
            self.mov_experts = nn.Parameter(torch.ones(*head_shape, num_experts, dim, device=device))
        self.record_routing, self.aux_loss, self.record_stats = False, False, False
        self.last_routing = self.last_aux_loss = self.last_stats = self.stats_mask = None
        self.sentence_embedding = None  # [b, D], set only inside `sentence_routing`

    def rescale(self, h):
        """h' = h * sum_e p_e v_e (or h * v for (IA)3); h [..., H, d] or [..., d]; returns h's shape and dtype."""
        if self.num_experts is None:
            return h * self.ia3_scale.to(h.dtype)
        jitter = self.router_jitter if self.training else 0.0
        if self.router_input == "token":  # [..., (H,) E] each
            probs, full = route(h, self.mov_router, self.top_k, self.renormalize, self.mov_router_bias, jitter,
                                self.rows)
        else:
            probs, full = self._sentence_probs(h, jitter)  # equal along every axis but the batch
        if self.record_routing:
            self.last_routing = probs.detach()
        observe(self, full)
        with _fp32(h.device):
            scale = self._mix(probs, self.mov_experts.float())  # [..., (H,) d]
        return h * scale.to(h.dtype)

    def _mix(self, probs, experts):
        """sum_e p_e v_e as matmuls (einsum's generic path was ~2x slower on CPU, forward + backward).

        N = batch x length, E = experts, H = heads, d = features. FFN: [N, E] @ [E, d]. Attention: one batched
        matmul over heads, [H, N, E] @ [H, E, d] -> [H, N, d], i.e. einsum('nhe,hed->nhd').
        """
        if self.heads is None:
            return probs @ experts  # [..., d]
        lead = probs.shape[:-2]
        p = probs.reshape(-1, self.heads, self.num_experts).transpose(0, 1)  # [H, N, E]
        return torch.bmm(p, experts).transpose(0, 1).reshape(*lead, self.heads, self.dim)  # [..., H, d]

    def _sentence_probs(self, h, jitter):
        """Routing (probs, full) from the per-example embedding, broadcast to every token (and head): [..., (H,) E]."""
        emb = self.sentence_embedding
        if emb is None:
            raise RuntimeError(
                "this MoV layer routes on sentence embeddings but none was given; run the model inside "
                "`with mov.sentence_routing(model, embeddings):` with embeddings [batch, sentence_dim]")
        if emb.shape[0] != h.shape[0]:
            raise ValueError(f"sentence embeddings have batch {emb.shape[0]} but the activation has batch "
                             f"{h.shape[0]}; pass one embedding per example of this forward")
        routed = route(emb, self.mov_router, self.top_k, self.renormalize, self.mov_router_bias, jitter,
                       self.rows)  # [b, E]
        shape = (emb.shape[0], *([1] * (h.dim() - 2)), self.num_experts)  # [b, 1, .., E]
        return tuple(p.view(shape).expand(*h.shape[:-1], self.num_experts) for p in routed)

    def extra_repr(self):
        kind = "ia3" if self.num_experts is None else f"experts={self.num_experts}, router_input={self.router_input}"
        top = f", top_k={self.top_k}, renormalize={self.renormalize}" if self.top_k is not None else ""
        jitter = f", router_jitter={self.router_jitter}" if self.router_jitter else ""
        return f"dim={self.dim}, heads={self.heads}, {kind}{top}{jitter}"


class MoVLinear(_Rescale):
    """A key/value projection followed by per-head MoV (or (IA)3). It owns a wrapped nn.Linear's `weight` and
    `bias` (so `...k.weight` keeps its name); another wrapper (e.g. a LoRA layer) is kept whole as `base`."""

    def __init__(self, linear, num_heads, num_experts=None, top_k=None, renormalize=False, router_input="token",
                 sentence_dim=None, router_jitter=0.0, router_bias=False):
        device = next(linear.parameters()).device
        super().__init__(linear.out_features // num_heads, num_heads, num_experts, top_k, renormalize,
                         router_input, sentence_dim, device, router_jitter, router_bias)
        self.in_features, self.out_features = getattr(linear, "in_features", None), linear.out_features
        if isinstance(linear, nn.Linear):
            self.weight = linear.weight  # the same Parameter object
            self.register_parameter("bias", linear.bias)
        else:
            self.base = linear

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if hasattr(self, "weight") else self.base(x)  # [b, L, H*d]
        h = y.unflatten(-1, (self.heads, self.dim))  # [b, L, H, d]
        return self.rescale(h).flatten(-2)  # [b, L, H*d]


class MoVActivation(_Rescale):
    """The FFN activation followed by MoV (or (IA)3): gelu(wi_0 x) is rescaled before the product with wi_1 x."""

    def __init__(self, act, dim, num_experts=None, top_k=None, renormalize=False, router_input="token",
                 sentence_dim=None, device=None, router_jitter=0.0, router_bias=False):
        super().__init__(dim, None, num_experts, top_k, renormalize, router_input, sentence_dim, device,
                         router_jitter, router_bias)
        self.fn = act  # the original activation module (no parameters in T5)

    def forward(self, x):
        return self.rescale(self.fn(x))  # [b, L, d_ff]


@contextlib.contextmanager
def sentence_routing(model, embeddings):
    """Within the block, every sentence-routed MoV layer of `model` routes row i by embeddings[i] ([batch, D])."""
    layers = [m for m in model.modules() if isinstance(m, _Rescale) and m.router_input == "sentence"]
    if not layers:
        raise ValueError("the model has no sentence-routed MoV layers; build it with "
                         "add_mov(model, num_experts, router_input='sentence', sentence_dim=D)")
    if embeddings.dim() != 2 or embeddings.shape[1] != layers[0].mov_router.shape[0]:
        raise ValueError(f"sentence embeddings must be [batch, {layers[0].mov_router.shape[0]}], "
                         f"got {list(embeddings.shape)}")
    for m in layers:
        m.sentence_embedding = embeddings
    try:
        yield model
    finally:
        for m in layers:
            m.sentence_embedding = None


def add_mov(model, num_experts, top_k=None, renormalize=False, router_input="token", sentence_dim=None,
            attention_targets=ATTENTION_TARGETS, ffn_targets=FFN_TARGETS, num_heads=None, head_dim=None,
            ffn_dim=None, freeze_base=True, router_jitter=0.0, router_bias=False):
    """Wrap the attention key/value projections and FFN activations of `model` with MoV; the new parameters are
    trainable, and with freeze_base the base model's weights are frozen (see `freeze_base`).

    Targets match a module whose dotted name equals the target or ends with "." + target. Attention sites must be
    nn.Linear; heads come from num_heads / head_dim or model.config.num_heads / d_kv. The FFN width comes from
    ffn_dim or the sibling `wi_0` / `wi` Linear. router_jitter, router_bias: see the module docstring. Returns the
    model.
    """
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}] or None, got {top_k!r}")
    if router_input not in ROUTER_INPUTS:
        raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {router_input!r}")
    if router_input == "sentence" and not (isinstance(sentence_dim, int) and sentence_dim > 0):
        raise ValueError(f"router_input='sentence' needs sentence_dim= (the embedding size), got {sentence_dim!r}")
    if not 0 <= router_jitter < 1:
        raise ValueError(f"router_jitter must be in [0, 1) (noise U[1 - eps, 1 + eps]), got {router_jitter!r}")
    site = dict(num_experts=num_experts, top_k=top_k, renormalize=renormalize, router_input=router_input,
                sentence_dim=sentence_dim, router_jitter=router_jitter, router_bias=bool(router_bias))
    return _inject(model, site, attention_targets, ffn_targets, num_heads, head_dim, ffn_dim, freeze_base)


def add_ia3(model, attention_targets=ATTENTION_TARGETS, ffn_targets=FFN_TARGETS, num_heads=None, head_dim=None,
            ffn_dim=None, freeze_base=True):
    """Wrap the same sites as add_mov with one (IA)3 vector each (ones, no router); as add_mov for freezing."""
    return _inject(model, dict(num_experts=None), attention_targets, ffn_targets, num_heads, head_dim, ffn_dim,
                   freeze_base)


def _inject(model, site, attention_targets, ffn_targets, num_heads, head_dim, ffn_dim, freeze):
    """Replace every matched module by its wrapper (setattr on the parent); new parameters train, base ones freeze."""
    if any(is_adapter_param(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already has MoV/(IA)3 parameters; apply add_mov/add_ia3 once, to a fresh model")
    attention_targets, ffn_targets = _names(attention_targets), _names(ffn_targets)
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
        if target in attention_targets:
            wrapper = MoVLinear(module, _heads_of(name, module, heads, d_kv), **site)
        else:
            dim, device = _ffn_dim_of(name, parent, ffn_dim)
            wrapper = MoVActivation(module, dim, device=device, **site)
        setattr(parent, leaf, wrapper)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}; pass attention_targets= / "
                         "ffn_targets= with this model's module names (see model.named_modules())")
    if freeze:
        freeze_base(model)
    return model


def _names(targets):
    """A tuple of target names; a single string is one name (not its characters)."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _heads_of(name, module, heads, d_kv):
    """Number of heads of the projection `module`, checking heads * d_kv == out_features."""
    if not isinstance(getattr(module, "out_features", None), int):
        raise ValueError(f"attention target {name} is a {type(module).__name__}, expected nn.Linear (or a wrapper "
                         "with out_features)")
    out = module.out_features
    if heads is None and d_kv is None:
        raise ValueError(f"cannot tell the heads of {name}: the model has no config.num_heads / config.d_kv; "
                         "pass num_heads= (and/or head_dim=)")
    heads = heads if heads is not None else out // d_kv
    d_kv = d_kv if d_kv is not None else out // heads
    if heads * d_kv != out:
        raise ValueError(f"{name} has {out} outputs, not num_heads {heads} x head_dim {d_kv}; pass the right "
                         "num_heads= / head_dim=")
    return heads


def _ffn_dim_of(name, parent, ffn_dim):
    """Width and device of the FFN activation `name`: ffn_dim, else the sibling wi_0 / wi Linear's out_features."""
    sibling = next((getattr(parent, s) for s in ("wi_0", "wi") if hasattr(parent, s)), None)
    if ffn_dim is None:
        if sibling is None:
            raise ValueError(f"cannot tell the width of FFN activation {name}: no sibling wi_0/wi; pass ffn_dim=")
        ffn_dim = sibling.out_features
    first = next(iter(parent.parameters()), None)
    return ffn_dim, (first.device if first is not None else None)
