"""Adafactor exactly as T5X configures it for the paper: a `torch.optim.Optimizer`.

Reproduces the optimizer of the original code (for-ai/parameter-efficient-moe,
`configs/{mov,molora,...}.gin`: `adafactor.Adafactor: decay_rate = 0.8, step_offset = 0`, with the factor rules
of `src/adafactor_custom.py`), which is T5X's `t5x/adafactor.py` with its defaults (Shazeer & Stern 2018,
"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv 1804.04235). The learning rate is the
paper's constant 3e-4 (no warm-up, no relative step). Only torch is imported.

    opt = Adafactor([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    Adafactor(params, step_offset=1_100_000)  # decay as in T5X resuming the 1.1M-step T5 checkpoint

The update of one parameter P with gradient G at T5X step t (t = 0 at a fresh run's first update), in fp32:
    mix = (t + 1) ** -decay_rate             # 1 - beta2_t; equals 1 at t = 0, so the first v is G^2 itself
    S   = G^2 + epsilon1
    factored (two largest dims both >= min_dim_size_to_factor; R = second largest dim, C = largest dim):
        v_row = (1 - mix) v_row + mix mean_C(S)          # P's shape without C
        v_col = (1 - mix) v_col + mix mean_R(S)          # P's shape without R
        Y = G / sqrt(v_row / mean_R(v_row)) / sqrt(v_col)  # rank-1 estimate v_row v_col / mean(v_row)
    otherwise:
        v = (1 - mix) v + mix S;    Y = G / sqrt(v)
    Y = Y / max(1, RMS(Y) / clipping_threshold)              # update clipping, before any scaling
    U = lr * max(RMS(P), epsilon2) * Y                       # parameter scale, RMS of the old P
    U = m = beta1 m + (1 - beta1) U                          # only when beta1 is not None
    P = (1 - weight_decay) P - U                             # decay NOT multiplied by lr (T5X weight_decay_rate)
RMS runs over all elements of the tensor. State (`v_row`/`v_col` or `v`, `m`, `step`) is fp32 whatever P's
dtype; a bf16 P is updated in fp32 and cast back once. `step` is a 0-dim fp32 tensor on P's device, so `step()`
has no `.item()` and no Python branch on a tensor value: on torch-xla it traces into the step's one graph.

Hyper-parameters (differences from torch 2.9's `torch.optim.Adafactor` [torch] and from
`transformers.optimization.Adafactor` [HF]):
- lr: absolute step size (float or 1-element tensor), times the parameter scale. [torch] uses min(lr, 1/sqrt(t))
  (relative step); [HF] defaults to relative_step=True, lr=None (1/sqrt(t) capped at 1e-2); pass relative_step=False.
- decay_rate: 0.8, positive; beta2_t = 1 - (t + 1)^-decay_rate. [torch] `beta2_decay=-0.8` and [HF]
  `decay_rate=-0.8` are negative and count t from 1 in a fresh run, i.e. the same schedule, with no offset.
- step_offset: number of updates T5X had already counted when this run starts (see deviation 1); t above is
  step_offset + updates done so far. 1_100_000 reproduces the paper's run, which restores T5X's step counter from
  the pre-trained T5 checkpoint: the decay then starts at 1 - 1.5e-5 instead of 0. [torch] and [HF] have none.
- clipping_threshold: update clipping d (None disables it). [torch] `d` (same formula), [HF] `clip_threshold`.
- multiply_by_parameter_scale: scale the update by max(RMS(P), epsilon2). [torch] always does; [HF]
  `scale_parameter`.
- epsilon1: added to G^2 before averaging (as [HF] `eps[0]`). [torch] instead clamps the variance estimate at
  eps1^2, with eps1 = machine epsilon of the parameter's dtype by default.
- epsilon2: floor of the parameter scale (as [torch] eps[1] and [HF] eps[1]).
- beta1: None (no momentum, the paper) or the decay of a momentum of the scaled, clipped update (T5X and [HF]
  style, fp32). [torch] has no momentum.
- min_dim_size_to_factor: 128; a tensor gets the factored second moment only if its two largest dims are both at
  least this (T5X's `_factored_dims`); vectors, small matrices, the MoV/MoLORA expert and LoRA tensors keep a full
  one. [torch] and [HF] factor every tensor of two or more dims, always along the last two dims.
- weight_decay: T5X `weight_decay_rate`: P <- (1 - weight_decay) P, decoupled and not scaled by lr; 0.0 is T5X's
  None. [torch] multiplies P by (1 - lr * weight_decay); [HF] subtracts weight_decay * lr * scale * P.
Also: fp32 state for bf16 parameters ([HF] too; [torch] keeps it in the gradient's dtype), and no host sync in step
([torch] calls `.item()` and [HF] compares a tensor RMS in Python for every parameter, so a traced step breaks
into many graphs).

Factoring in the original: T5X factors a tensor of rank <= 2 by the size rule whatever its axis names
(t5x/adafactor.py `_parse_rule` falls back to the heuristic there), and a tensor of rank > 2 by logical-axis rules:
the original maps its 'expert', 'rank' and 'unmodeled' axes to NONE (`src/adafactor_custom.py`), and T5X's
`set_param_axes` marks a tensor lacking a ROW or a COLUMN axis wholly unfactored. So MoV's FFN vectors [E, d_ff] and
the routers [d, E] follow the size rule there too (factored once E >= 128), while MoV's attention vectors
[H, E, d_kv] and MoLORA's [E, d_in, r] / [E, r, d_out] always keep a full second moment. This plain optimizer sees
no axis names and applies the size rule to every rank: a 3-D tensor factors over its two largest dims, the other
dims kept in both v_row and v_col. For this project's adapters the answer is the same at the paper's sizes: MoV
[E, d_ff] and routers [d, E] have E < 128; attention MoV [H, E, d_kv] has every dim < 128 in every T5 size
(H <= 64, d_kv = 64); a MoLORA tensor [E, in, r] has second largest dim max(E, r) < 128 (rank 4). The T5
matrices that the full fine-tuning baseline trains ([out, in] here, Flax [in, out] or [embed, heads, kv] there)
get the same estimate: the rank-1 estimate is symmetric in rows and columns.

Deliberate deviations from T5X (the option that restores T5X in brackets):
1. `step_offset` counts where T5X's counter starts; T5X's own `step_offset` is subtracted from its global step
   (meant to reset the decay when fine-tuning). T5X with global step S0 at start and step_offset k equals ours
   with step_offset = S0 - k. [step_offset = S0 - k]
2. Rank > 2 tensors follow the size rule, not logical-axis rules (above). With 128 or more experts this one would
   factor MoLORA's [E, d_in, r] and [E, r, d_out] (MoV's [H, E, d_kv] only if H or d_kv also reached 128), which
   the original leaves unfactored; 2-D tensors such as MoV's [E, d_ff] are factored by both. [put those tensors in
   a param group with
   min_dim_size_to_factor=2**62]
3. The step counter is per parameter (torch convention) and a parameter whose .grad is None is skipped; T5X
   updates every parameter every step, a zero gradient still decaying its state. [zero_grad(set_to_none=False)]
4. mix is computed as (t + 1)^-decay_rate, not as 1 - (1 - (t + 1)^-decay_rate): the same number, but without
   losing ~3 of fp32's 7 digits when t ~ 1e6 (T5X's fp32 mixing rate there is off by up to ~0.2%).
5. For a bf16 P the parameter scale is computed in fp32 (T5X rounds it to bf16). The paper's parameters are fp32.
6. T5X extras left out: factored=False [min_dim_size_to_factor=2**62], per-parameter multiply_by_parameter_scale
   [param groups], weight_decay_rate_lr_exponent, global_norm_clip_threshold, max_parameter_scale,
   skip_nan_updates, dtype_momentum (always fp32). The paper uses none of them.
"""
from typing import Optional, Tuple, Union

import torch


def factored_dims(shape: Tuple[int, ...], min_dim_size_to_factor: int) -> Optional[Tuple[int, int]]:
    """(row dim R, column dim C) to factor over, or None: T5X's `_factored_dims` size rule.

    R is the second largest dim and C the largest; on ties the earlier dim is R (a stable sort, as NumPy's
    argsort on a handful of elements), so a square matrix has R = 0, C = 1.
    """
    if len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda i: shape[i])
    row, col = by_size[-2], by_size[-1]
    if shape[row] < min_dim_size_to_factor:
        return None
    return row, col


class Adafactor(torch.optim.Optimizer):
    """Adafactor with T5X's semantics (see the module docstring for the update and every hyper-parameter)."""

    def __init__(self, params, lr: Union[float, torch.Tensor] = 3e-4, decay_rate: float = 0.8,
                 step_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
                 multiply_by_parameter_scale: bool = True, epsilon1: float = 1e-30, epsilon2: float = 1e-3,
                 beta1: Optional[float] = None, min_dim_size_to_factor: int = 128, weight_decay: float = 0.0):
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"a tensor lr must hold one number, got shape {tuple(lr.shape)}")
        elif not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not decay_rate > 0.0:
            raise ValueError(f"decay_rate must be > 0 (T5X's 0.8; beta2_t = 1 - (t+1)^-decay_rate), got {decay_rate}"
                             "; torch/transformers write it negative (-0.8): drop the sign")
        if not (isinstance(step_offset, int) and step_offset >= 0):
            raise ValueError(f"step_offset must be an int >= 0 (e.g. 1_100_000), got {step_offset!r}")
        if clipping_threshold is not None and not clipping_threshold > 0.0:
            raise ValueError(f"clipping_threshold must be > 0 or None (no clipping), got {clipping_threshold}")
        if not (epsilon1 >= 0.0 and epsilon2 >= 0.0):
            raise ValueError(f"epsilon1 and epsilon2 must be >= 0, got {epsilon1}, {epsilon2}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be None (no momentum) or in [0, 1), got {beta1}")
        if not (isinstance(min_dim_size_to_factor, int) and min_dim_size_to_factor >= 1):
            raise ValueError(f"min_dim_size_to_factor must be an int >= 1 (2**62 never factors), "
                             f"got {min_dim_size_to_factor!r}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"weight_decay is T5X's per-step rate (P <- (1 - wd) P, not times lr), must be in "
                             f"[0, 1), got {weight_decay}")
        defaults = dict(lr=lr, decay_rate=decay_rate, step_offset=step_offset,
                        clipping_threshold=clipping_threshold,
                        multiply_by_parameter_scale=multiply_by_parameter_scale, epsilon1=epsilon1,
                        epsilon2=epsilon2, beta1=beta1, min_dim_size_to_factor=min_dim_size_to_factor,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def state_shapes(shape: Tuple[int, ...], group: dict) -> dict:
        """{state key: shape} of a parameter of `shape`: `step` [], `v_row`/`v_col` (factored) or `v`, `m` with
        momentum."""
        shapes = {"step": ()}
        dims = factored_dims(tuple(shape), group["min_dim_size_to_factor"])
        if dims is None:
            shapes["v"] = tuple(shape)
        else:
            row, col = dims
            shapes["v_row"] = tuple(n for i, n in enumerate(shape) if i != col)
            shapes["v_col"] = tuple(n for i, n in enumerate(shape) if i != row)
        if group["beta1"] is not None:
            shapes["m"] = tuple(shape)
        return shapes

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Zero fp32 state for p (state_shapes)."""
        return {k: torch.zeros(shape, dtype=torch.float32, device=p.device)
                for k, shape in self.state_shapes(p.shape, group).items()}

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError naming the group, parameter and key where a saved state_dict does not fit this optimizer: the
        groups and their sizes, the hyper-parameters that shape or drive the update (all but lr and step_offset,
        which a resumed run sets anew), and each parameter's state: its keys and shapes (state_shapes), floating
        point and finite. Loading one that passes cannot fail, or fail later inside step()."""
        groups, state = (state_dict.get(k) if isinstance(state_dict, dict) else None for k in ("param_groups", "state"))
        if not (isinstance(groups, list) and isinstance(state, dict) and len(groups) == len(self.param_groups)):
            raise ValueError(f"the optimizer state does not hold {len(self.param_groups)} parameter group(s) and "
                             "their state")
        ids = set()
        for g, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not (isinstance(saved, dict) and isinstance(saved.get("params"), list) and
                    len(saved["params"]) == len(group["params"])):
                raise ValueError(f"optimizer parameter group {g} does not list its {len(group['params'])} parameters")
            for key, value in group.items():
                if key not in ("params", "lr", "step_offset") and saved.get(key) != value:
                    raise ValueError(f"optimizer parameter group {g} has {key} {saved.get(key)!r}, this optimizer "
                                     f"{value!r}")
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                ids.add(pid)
                if pid not in state:
                    continue  # not stepped yet
                got, want = state[pid], self.state_shapes(p.shape, group)
                if not isinstance(got, dict) or set(got) != set(want):
                    raise ValueError(f"optimizer state of parameter {i} of group {g} {tuple(p.shape)} holds "
                                     f"{sorted(got) if isinstance(got, dict) else type(got).__name__}, expected "
                                     f"{sorted(want)}")
                for key, shape in want.items():
                    t = got[key]
                    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == shape):
                        raise ValueError(f"optimizer state {key} of parameter {i} of group {g} {tuple(p.shape)} is "
                                         f"{_describe(t)}, expected a float tensor of shape {shape}")
                    if not bool(torch.isfinite(t).all()) or (key == "step" and float(t) < 0):
                        raise ValueError(f"optimizer state {key} of parameter {i} of group {g} {tuple(p.shape)} "
                                         "holds a NaN, inf or negative step")
        if set(state) - ids:
            raise ValueError(f"the optimizer state holds parameters its groups do not list: {sorted(set(state) - ids)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One T5X Adafactor update of every parameter that has a gradient; returns closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients; use a dense embedding")
                if not self.state[p]:
                    self.state[p] = self._init_state(p, group)
                self._update(p, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """The update of the module docstring for one parameter, in fp32, written back in p's dtype."""
        if (group["beta1"] is not None) != ("m" in state):
            raise ValueError(f"beta1={group['beta1']} but the state of a {tuple(p.shape)} parameter "
                             f"{'has' if 'm' in state else 'lacks'} momentum: keep beta1 as when the state was made")
        grad = p.grad.float()
        param = p.float()  # a copy for bf16 P; p itself for fp32 P (only read before the final copy_)

        # t + 1 = T5X's step at this update + 1 = step_offset + updates done including this one.
        state["step"].add_(1.0)
        mix = (state["step"] + group["step_offset"]).pow(-group["decay_rate"])  # 1 - beta2_t, 0-dim
        decay = 1.0 - mix

        grad_sqr = grad * grad + group["epsilon1"]
        if "v" in state:
            v = state["v"]
            v.mul_(decay).add_(mix * grad_sqr)
            y = grad * v.rsqrt()
        else:
            row, col = factored_dims(tuple(p.shape), 1)
            v_row, v_col = state["v_row"], state["v_col"]
            v_row.mul_(decay).add_(mix * grad_sqr.mean(dim=col))  # P's shape without C
            v_col.mul_(decay).add_(mix * grad_sqr.mean(dim=row))  # P's shape without R
            row_in_v_row = row - 1 if col < row else row          # R's index once C is removed
            row_factor = (v_row / v_row.mean(dim=row_in_v_row, keepdim=True)).rsqrt()
            y = grad * row_factor.unsqueeze(col) * v_col.rsqrt().unsqueeze(row)

        if group["clipping_threshold"] is not None:
            rms_y = y.square().mean().sqrt()
            y = y / torch.clamp(rms_y / group["clipping_threshold"], min=1.0)

        scale = group["lr"]
        if isinstance(scale, torch.Tensor):
            scale = scale.reshape(())  # a [1] lr must not add a dim to a 0-dim parameter
        if group["multiply_by_parameter_scale"]:
            scale = scale * torch.clamp(param.square().mean().sqrt(), min=group["epsilon2"])
        update = scale * y

        if group["beta1"] is not None:
            m = state["m"]
            m.mul_(group["beta1"]).add_((1.0 - group["beta1"]) * update)
            update = m

        if group["weight_decay"] != 0.0:
            new_param = (1.0 - group["weight_decay"]) * param - update
        else:
            new_param = param - update
        p.copy_(new_param)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, but state stays fp32 and on each parameter's device (torch casts it to P's dtype)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                self.state[p] = {k: torch.as_tensor(v).to(device=p.device, dtype=torch.float32, copy=True)
                                 for k, v in saved_state[pid].items()}


def _describe(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
