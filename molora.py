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
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_router")
TARGETS = ("q", "k", "v", "o", "wi_0", "wo")  # T5's attention projections and FFN input/output (not wi_1)


def is_adapter_param(name):
    """True for the parameters add_molora / add_lora create (the trainable ones), by their last name component."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAM_NAMES


def _fp32(device):
    """A context with autocast off on `device`, so router math stays float32 under bf16 autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta and other devices without autocast


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
    Otherwise lora_A [E, d_in, r], lora_B [E, r, d_out], lora_router [d_in, E].
    """
    adapter_param_names = ("lora_A", "lora_B", "lora_router")

    def __init__(self, linear, rank=4, alpha=16, num_experts=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.num_experts = rank, alpha, num_experts
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
        self.record_routing = False
        self.last_routing = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if hasattr(self, "weight") else self.base(x)  # [b, L, d_out]
        if self.num_experts is None:
            delta = (x @ self.lora_A.to(x.dtype)) @ self.lora_B.to(x.dtype)  # [b, L, r] -> [b, L, d_out]
        else:
            with _fp32(x.device):
                probs = torch.softmax(x.float() @ self.lora_router.float(), dim=-1)  # [b, L, E]
            if self.record_routing:
                self.last_routing = probs.detach()
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
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, {experts}"


def add_molora(model, num_experts, rank=4, alpha=16, targets=TARGETS, freeze_base=True):
    """Wrap every Linear named by `targets` with MoLORA; the new parameters train, and with freeze_base the base
    model's weights are frozen (see `freeze_base`); return the model.

    A target matches a module whose dotted name equals it or ends with "." + target (T5: q, k, v, o, wi_0, wo).
    """
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    return _inject(model, targets, rank, alpha, num_experts, freeze_base)


def add_lora(model, rank=4, alpha=16, targets=TARGETS, freeze_base=True):
    """Wrap the same Linears with plain LoRA (one expert, no router); as add_molora for freezing."""
    return _inject(model, targets, rank, alpha, None, freeze_base)


def _inject(model, targets, rank, alpha, num_experts, freeze):
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
        setattr(model.get_submodule(parent_name), leaf, MoLoRALinear(module, rank, alpha, num_experts))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}; pass targets= with this "
                         "model's Linear names (see model.named_modules())")
    if freeze:
        freeze_base(model)
    for n, p in model.named_parameters():
        if is_adapter_param(n):
            p.requires_grad_(True)
    return model
