"""MoLORA: a mixture of LoRA experts, and LoRA itself, added to a frozen model's linear layers from outside.

Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit" (arXiv 2309.05444), section 2; the original code is
for-ai/parameter-efficient-moe `src/molora.py`, `src/lora.py`, `src/routing.py`, `configs/{molora,lora}.gin`,
and the `lora` branch of its Flaxformer fork. This file imports only torch: copy it into another project as it is.
For an adapted linear y = W x:

    p = softmax(x @ W_r)                            router on the layer's INPUT, W_r [d_in, E], N(0, 0.02), no bias,
                                                    logits and softmax in float32
    y = W x + (alpha / r) * sum_e p_e B_e (A_e x)   A_e [d_in, r] ~ N(0, 0.02), B_e [r, d_out] = 0 (unchanged at step 0)

A weighted sum of expert outputs (not (sum p A)(sum p B)). LoRA is the baseline with one expert and no router:
y = W x + (alpha / r) B (A x). Targets: q, k, v, o of every attention, the FFN's wi_0 and wo (not wi_1).
Defaults: rank 4, alpha 16 (scale 4); the released MoLORA config uses 10 experts, the paper's main table 15.
Shapes and names as the original: MoLORA `lora_A` [E, d_in, r], `lora_B` [E, r, d_out], `lora_router` [d_in, E]
(the original's `router/.../kernel`); LoRA `lora_A` [d_in, r], `lora_B` [r, d_out]. Set `record_routing = True` on
a layer to keep its last routing probabilities (float32, detached) in `last_routing` [..., E].
Router options of the original's `src/routing.py` `Router`, all off in its released configs (and by default here),
the same as mov.py's (whose docstring has the details and citations):
  - top_k: softmax over all experts, keep the k largest, no renormalisation (`Router.top_k`, `_top_k_mask`).
  - router_jitter=eps: training only, x * U[1-eps, 1+eps] per element before the router (jitter_noise).
  - router_bias=True: p = softmax(x @ W_r + b_r), b_r [E] zero-initialised (`RouterWeights.use_bias`),
    `lora_router_bias`.
  - aux_loss / record_stats (layer attributes): the forward keeps Switch Transformer's load-balancing loss in
    `last_aux_loss` (`load_balance_loss(model)` averages them) / on-device routing statistics in `last_stats`.
Freezing: `add_molora(..., freeze_base=True)` (the default) freezes the base model's weights and only those: a
parameter that its module lists in `adapter_param_names` (this file's layers, mov.py's) keeps its state, so adapters
stack. `freeze_base(model)` does the same alone. A target that is itself a wrapped layer (anything with
`in_features` and `out_features`, e.g. mov.py's MoVLinear) is wrapped as a whole.

Usage:
    model = molora.add_molora(t5_model, num_experts=15)   # wraps q, k, v, o, wi_0, wo in place; freezes the base
    optimizer = Adafactor([p for p in model.parameters() if p.requires_grad])
    logits = model(input_ids, decoder_input_ids)

Deliberate deviations from the original:
  - Order of computation: A x for all experts at once [b, L, E, r], weighted by p, then one contraction over (e, r)
    with B. The original forms every expert's output [b, L, E, d_out] and then mixes; the sum is the same, only
    rounding differs. No option restores it (it only costs memory).
  - Adapter parameters are created in float32 on the base weight's device (meta included), whatever its dtype;
    A x and B(.) run in the activation's dtype (the original's bf16 `dtype`), the router in float32 as there.
  - router_jitter acts in training only (flaxformer's MoeLayer: apply_jitter=enable_dropout); the original's MoLoRa
    leaves apply_jitter at True, so a nonzero jitter_noise would perturb evaluation too (its configs set 0).
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


def route(x, kernel, top_k=None, bias=None, jitter=0.0, rows=(0, 1)):
    """(probs, full), [..., d] x [d, E] -> [..., E] each: full = softmax((x * u) @ kernel + bias) in float32, with
    u ~ U[1 - jitter, 1 + jitter] per element (none at jitter 0; `rows`: see jitter_noise); probs = full, or with
    top_k all but the k largest zeroed, not renormalised (the original's `Router._compute_router_probabilities`)."""
    with _fp32(x.device):
        x = x.float()
        if jitter:
            x = x * jitter_noise(x, jitter, rows)
        logits = x @ kernel.float()
        if bias is not None:
            logits = logits + bias.float()
        full = probs = torch.softmax(logits, dim=-1)
    if top_k is not None:  # one-hot mask of the k largest (static shapes: topk + scatter)
        probs = probs * torch.zeros_like(probs).scatter(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    return probs, full


def balance_loss(full, top_k=None):
    """Switch Transformer's load-balancing loss of one router site: E^2 * mean over rows b and experts e of
    f_be * P_be, with P_be the mean router probability of e over row b's tokens and f_be the fraction of them
    routed to e (in the top_k set; the argmax for soft routing). As mov.py's `balance_loss` (see there)."""
    E = full.shape[-1]
    p = full.float().reshape(full.shape[0] if full.dim() > 2 else 1, -1, E)  # [rows, tokens, E]
    routed = torch.zeros_like(p).scatter(-1, p.topk(top_k or 1, dim=-1).indices, 1.0)  # no gradient
    return (routed.mean(1) * p.mean(1)).mean() * E ** 2


def routing_stats(full, mask=None):
    """[2 + E] float32, detached: the sum of the routing entropies in nats, the number of tokens, each expert's summed
    probability, over the tokens `mask` (full's leading shape, 1 = real) marks; every token when mask is None."""
    p = full.detach().float()
    if mask is None:
        mask = torch.ones(p.shape[:-1], device=p.device)
    elif tuple(p.shape[:mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"routing-statistics mask {list(mask.shape)} does not lead the routing {list(p.shape)}")
    p = p.reshape(*mask.shape, -1, p.shape[-1])  # [..., 1, E]
    w = mask.to(p.device, torch.float32).unsqueeze(-1).expand(p.shape[:-1])
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return torch.cat([(entropy * w).sum().view(1), w.sum().view(1), (p * w.unsqueeze(-1)).flatten(0, -2).sum(0)])


def load_balance_loss(model):
    """The mean of `last_aux_loss` over the layers of `model` with aux_loss on (None if there are none), as T5X's
    MoE models average per-layer auxiliary losses (t5x/contrib/moe/models.py `_extract_diversity_metrics`)."""
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


class MoLoRALinear(nn.Module):
    """y = W x + (alpha/r) sum_e p_e B_e A_e x. It owns a wrapped nn.Linear's `weight` and `bias` (names unchanged);
    another wrapper (e.g. mov.py's MoVLinear) is kept whole as `base`, and y = base(x) + the update.

    num_experts=None is plain LoRA with the original's shapes: lora_A [d_in, r], lora_B [r, d_out], no router.
    Otherwise lora_A [E, d_in, r], lora_B [E, r, d_out], lora_router [d_in, E] (and lora_router_bias [E]).
    """
    adapter_param_names = ADAPTER_PARAM_NAMES
    rows = (0, 1)  # (rank, world_size) of the router jitter's noise under data parallelism (jitter_noise)

    def __init__(self, linear, rank=4, alpha=16, num_experts=None, top_k=None, router_jitter=0.0, router_bias=False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.num_experts = rank, alpha, num_experts
        self.top_k, self.router_jitter = top_k, router_jitter
        if isinstance(linear, nn.Linear):
            self.weight = linear.weight  # the same Parameter object: `...q.weight` keeps its name
            self.register_parameter("bias", linear.bias)
        else:
            self.base = linear
        device = next(linear.parameters()).device
        expert_shape = () if num_experts is None else (num_experts,)
        self.lora_A = nn.Parameter(torch.empty(*expert_shape, self.in_features, rank, device=device))
        nn.init.normal_(self.lora_A, std=0.02)
        self.lora_B = nn.Parameter(torch.zeros(*expert_shape, rank, self.out_features, device=device))
        if num_experts is not None:
            self.lora_router = nn.Parameter(torch.empty(self.in_features, num_experts, device=device))
            nn.init.normal_(self.lora_router, std=0.02)
            bias = nn.Parameter(torch.zeros(num_experts, device=device)) if router_bias else None
            self.register_parameter("lora_router_bias", bias)
        self.record_routing, self.aux_loss, self.record_stats = False, False, False
        self.last_routing = self.last_aux_loss = self.last_stats = self.stats_mask = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if hasattr(self, "weight") else self.base(x)  # [b, L, d_out]
        if self.num_experts is None:
            delta = (x @ self.lora_A.to(x.dtype)) @ self.lora_B.to(x.dtype)  # [b, L, r] -> [b, L, d_out]
        else:
            probs, full = route(x, self.lora_router, self.top_k, self.lora_router_bias,
                                self.router_jitter if self.training else 0.0, self.rows)  # [b, L, E] each
            if self.record_routing:
                self.last_routing = probs.detach()
            if self.aux_loss:
                self.last_aux_loss = balance_loss(full, self.top_k)
            if self.record_stats:
                self.last_stats = routing_stats(full, self.stats_mask)
            # Two plain matmuls over the experts' ranks stacked (E*r columns): einsum's generic path was ~2x slower
            # on CPU, forward + backward. A as [d_in, E*r], B as [E*r, d_out].
            a = self.lora_A.to(x.dtype).transpose(0, 1).reshape(self.in_features, -1)  # [d_in, E*r]
            ax = (x @ a).unflatten(-1, (self.num_experts, self.rank))  # A_e x for every expert: [b, L, E, r]
            ax = ax * probs.to(ax.dtype).unsqueeze(-1)  # weight each expert's A x by p_e: [b, L, E, r]
            # contract experts and rank together: never forms the [b, L, E, d_out] expert outputs
            delta = ax.flatten(-2) @ self.lora_B.to(ax.dtype).reshape(-1, self.out_features)  # [b, L, d_out]
        return y + (delta * (self.alpha / self.rank)).to(y.dtype)

    def extra_repr(self):
        experts = "lora" if self.num_experts is None else f"experts={self.num_experts}"
        experts += f", top_k={self.top_k}" if self.top_k is not None else ""
        experts += f", router_jitter={self.router_jitter}" if self.router_jitter else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, {experts}"


def add_molora(model, num_experts, rank=4, alpha=16, targets=TARGETS, freeze_base=True, top_k=None,
               router_jitter=0.0, router_bias=False):
    """Wrap every Linear named by `targets` with MoLORA; the new parameters train, and with freeze_base the base
    model's weights are frozen (see `freeze_base`); return the model.

    A target matches a module whose dotted name equals it or ends with "." + target (T5: q, k, v, o, wi_0, wo).
    top_k, router_jitter, router_bias: see the module docstring.
    """
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}] or None, got {top_k!r}")
    if not 0 <= router_jitter < 1:
        raise ValueError(f"router_jitter must be in [0, 1) (noise U[1 - eps, 1 + eps]), got {router_jitter!r}")
    router = dict(top_k=top_k, router_jitter=router_jitter, router_bias=bool(router_bias))
    return _inject(model, targets, rank, alpha, num_experts, freeze_base, router)


def add_lora(model, rank=4, alpha=16, targets=TARGETS, freeze_base=True):
    """Wrap the same Linears with plain LoRA (one expert, no router); as add_molora for freezing."""
    return _inject(model, targets, rank, alpha, None, freeze_base, {})


def _inject(model, targets, rank, alpha, num_experts, freeze, router):
    """Replace every matched Linear by its wrapper (setattr on the parent); new parameters train, base ones freeze."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
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
        setattr(model.get_submodule(parent_name), leaf, MoLoRALinear(module, rank, alpha, num_experts, **router))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}; pass targets= with this "
                         "model's Linear names (see model.named_modules())")
    if freeze:
        freeze_base(model)
    return model
