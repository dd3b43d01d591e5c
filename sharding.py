"""SPMD sharding for torch-xla: a ('data', 'fsdp') mesh, a table from parameter names to partition specs, the
batch sharding and block rematerialisation. How much memory a mesh leaves per chip is tools/tpu_memory.py's question.

The original (for-ai/parameter-efficient-moe, `configs/*.gin`: T5X's `PjitPartitioner` with
`t5x/partitioning.py` `standard_logical_axis_rules` plus `src/partitioning_custom.py`, which replicates the
'expert', 'rank' and 'unmodeled' axes) shards through logical axis names inside the Flax modules. Here sharding is
data applied from outside, with torch-xla's SPMD API (the SPMD user guide,
https://docs.pytorch.org/xla/release/r2.8/perf/spmd_basic.html): the model files import only torch, and
`train.py --device xla` calls

    sharding.enable_spmd()                                  # before the first XLA tensor of the process
    mesh = sharding.make_mesh(fsdp=4)                       # [devices / 4, 4] over ('data', 'fsdp')
    model = sharding.shard_model(model, mesh, "mov", device, remat=True)   # apply_remat, .to(device), the table

and shards each batch with `shard_batch(batch, mesh)`, never in the model.

Layout (transformers' T5 parameter names, Linear weights [out, in]):
  - Every big backbone matrix is sharded along 'fsdp' on its larger dim (vocab, d_model or d_ff; d_model >= heads *
    d_kv at every size) and replicated along 'data'. XLA gathers a weight just before its use (FSDP / ZeRO-3).
  - The batch is sharded over both axes (('data', 'fsdp'), None): the fsdp axis is data parallel too, as in FSDP;
    sharding it along 'data' alone would make the chips of an fsdp group compute the same rows.
  - Norm scales and relative-position tables are replicated (a few KB).
  - Adapters: MoV / (IA)3 tensors are replicated (MoV-30 at xxl is 47.5M parameters, 0.57 GB with fp32 gradient and
    full Adafactor second moment: small next to 32 GB of HBM, and replicas need no gather in the forward).
    MoLORA / LoRA A and B are sharded along 'fsdp' on their d_model / d_ff dim, like the weights they adapt
    (MoLORA-15 at xxl is 252M parameters, 3.0 GB replicated with gradient and optimizer state); their routers are
    replicated.
  - `apply_remat(model)` rematerialises each T5 block in the backward (torch-xla's checkpoint), for the sizes whose
    activations do not fit otherwise (`python -m tools.tpu_memory`: xl on 16 chips, xxl).
Deviation from the original: T5X's default rules give the `mlp`/`heads` axes to a 'model' (tensor-parallel) axis and
the batch to 'data'; we use FSDP instead of tensor parallelism (one `--fsdp` flag, no per-layer collectives in the
model code). `table=` takes any other table, e.g. one that gives d_ff / heads to a tensor-parallel axis.
"""
import functools
import math
import re

import torch
import torch.utils.checkpoint

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dim of every input is split over all chips

# (regex searched in the parameter name, partition spec: one entry per tensor dim, a mesh axis name or None).
# Each parameter must match exactly one pattern of the table it is sharded with.
BASE_TABLE = [
    (r"^shared\.weight$", ("fsdp", None)),  # [vocab, d_model]
    (r"^lm_head\.weight$", ("fsdp", None)),  # [vocab, d_model]
    (r"\.(SelfAttention|EncDecAttention)\.(q|k|v)\.weight$", (None, "fsdp")),  # [H * d_kv, d_model]
    (r"\.(SelfAttention|EncDecAttention)\.o\.weight$", ("fsdp", None)),  # [d_model, H * d_kv]
    (r"\.DenseReluDense\.(wi|wi_0|wi_1)\.weight$", ("fsdp", None)),  # [d_ff, d_model]
    (r"\.DenseReluDense\.wo\.weight$", (None, "fsdp")),  # [d_model, d_ff]
    (r"\.relative_attention_bias\.weight$", (None, None)),  # [buckets, H]
    (r"(^|\.)(layer_norm|final_layer_norm)\.weight$", (None,)),  # [d_model]
]

# Adapter tensors, by the names mov.py / molora.py give them (their `ADAPTER_PARAM_NAMES`).
ADAPTER_TABLES = {
    "full": [],
    "ia3": [
        (r"\.(k|v)\.ia3_scale$", (None, None)),  # [H, d_kv]
        (r"\.act\.ia3_scale$", (None,)),  # [d_ff]
    ],
    "mov": [
        (r"\.mov_router$", (None, None)),  # [d_kv or d_ff (or sentence dim), E]
        (r"\.(k|v)\.mov_experts$", (None, None, None)),  # [H, E, d_kv]
        (r"\.act\.mov_experts$", (None, None)),  # [E, d_ff]
    ],
    # MoLORA: A and B sharded like the weight they adapt (d_in / d_out along 'fsdp'); the router is replicated.
    "molora": [
        (r"\.lora_A$", (None, "fsdp", None)),  # [E, d_in, r]
        (r"\.lora_B$", (None, None, "fsdp")),  # [E, r, d_out]
        (r"\.lora_router$", (None, None)),  # [d_in, E]
    ],
    "lora": [
        (r"\.lora_A$", ("fsdp", None)),  # [d_in, r]
        (r"\.lora_B$", (None, "fsdp")),  # [r, d_out]
    ],
}


def table_for(method, tie_word_embeddings=False, router_bias=False):
    """The table for a T5 built with `method`: the backbone's patterns plus that method's adapter patterns.

    tie_word_embeddings=True (original T5: no lm_head, the head reuses shared.weight) drops the lm_head pattern;
    router_bias=True (mov / molora with --router-bias) adds the replicated router biases [E].
    """
    if method not in ADAPTER_TABLES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(ADAPTER_TABLES)}")
    base = [(p, s) for p, s in BASE_TABLE if not (tie_word_embeddings and p.startswith("^lm_head"))]
    bias = [(r"\.(mov|lora)_router_bias$", (None,))] if router_bias else []
    return base + ADAPTER_TABLES[method] + bias


def plan(named_shapes, table):
    """{name: spec} for every (name, shape); raises naming the unmatched parameters and the patterns matching none.

    Pure Python (no XLA): the same check runs in tests and on a meta-device model.
    """
    compiled = [(re.compile(p), tuple(spec)) for p, spec in table]
    hits = [0] * len(compiled)
    specs, unmatched, ambiguous, bad_rank = {}, [], [], []
    for name, shape in named_shapes:
        found = [i for i, (rx, _) in enumerate(compiled) if rx.search(name)]
        if not found:
            unmatched.append(name)
            continue
        if len(found) > 1:
            ambiguous.append(f"{name} <- {[table[i][0] for i in found]}")
            continue
        spec = compiled[found[0]][1]
        if len(spec) != len(shape):
            bad_rank.append(f"{name} {list(shape)} <- {table[found[0]][0]} {spec}")
        hits[found[0]] += 1
        specs[name] = spec
    unused = [table[i][0] for i, n in enumerate(hits) if n == 0]
    problems = []
    if unmatched:
        problems.append(f"parameters matching no pattern: {unmatched}")
    if ambiguous:
        problems.append(f"parameters matching several patterns: {ambiguous}")
    if bad_rank:
        problems.append(f"specs whose length differs from the tensor's rank: {bad_rank}")
    if unused:
        problems.append(f"patterns matching no parameter: {unused}")
    if problems:
        raise ValueError("sharding table does not fit the model: " + "; ".join(problems)
                         + ". Use table_for(<the method the model was built with>) or extend the table.")
    return specs


def apply_sharding(model, mesh, mark_sharding, table=None):
    """Call mark_sharding(param, mesh, spec) for every parameter of `model` by `table` (default: the backbone's).

    `mark_sharding` is torch-xla's `xs.mark_sharding` on a device (this module's `mark_sharding`), or any recorder in
    a test. Returns {name: spec}. Raises, naming them, if a parameter matches no pattern or a pattern no parameter.
    """
    table = BASE_TABLE if table is None else table
    params = dict(model.named_parameters())
    specs = plan([(n, p.shape) for n, p in params.items()], table)
    for name, spec in specs.items():
        mark_sharding(params[name], mesh, spec)
    return specs


# ----------------------------------------------------------------------------------------------- torch-xla
def enable_spmd():
    """Switch torch-xla to SPMD (once); must run before any XLA tensor exists in the process (else syncs crash)."""
    import torch_xla.runtime as xr
    if not xr.is_spmd():
        xr.use_spmd()


def make_mesh(fsdp=1):
    """A [devices / fsdp, fsdp] mesh over ('data', 'fsdp') from the runtime's device count."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    n = xr.global_runtime_device_count()
    if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise ValueError(f"--fsdp must be a positive divisor of the device count {n}, got {fsdp!r}")
    # fsdp is the fastest-varying axis: its chips are neighbours (ids in order), where the weight gathers run.
    return xs.Mesh(np.arange(n), (n // fsdp, fsdp), AXES)


def mark_sharding(tensor, mesh, spec):
    """torch-xla's xs.mark_sharding (imported on first use, so `import sharding` needs no torch-xla)."""
    import torch_xla.distributed.spmd as xs
    return xs.mark_sharding(tensor, mesh, spec)


def batch_spec(rank):
    """Partition spec of an input with `rank` dims: the batch dim over all chips, the rest replicated."""
    return (BATCH_AXES,) + (None,) * (rank - 1)


def _check_batch(tensor, mesh, name):
    chips = math.prod(mesh.mesh_shape)
    if tensor.shape[0] % chips:
        raise ValueError(f"batch input {name} has {tensor.shape[0]} rows, not divisible by the {chips} chips of the "
                         f"mesh {dict(mesh.shape())}; use a --batch-size (per micro-batch) that is a multiple")


def shard_batch(batch, mesh, mark_sharding=mark_sharding):
    """Mark every tensor of a dict batch already on the XLA device as split along its first (batch) dim."""
    for name, tensor in batch.items():
        _check_batch(tensor, mesh, name)
        mark_sharding(tensor, mesh, batch_spec(tensor.dim()))
    return batch


def shard_model(model, mesh, method, device, remat=False):
    """The XLA path of train.py: optional remat, the model moved to the device, its parameters marked by the
    method's table. Returns the model."""
    if remat:
        apply_remat(model)  # torch-xla's checkpoint: XLA would merge torch's back into the forward
    model = model.to(device)
    router_bias = any(n.endswith("_router_bias") for n, _ in model.named_parameters())
    apply_sharding(model, mesh, mark_sharding, table=table_for(method, model.config.tie_word_embeddings, router_bias))
    return model


# torch's own checkpoint, for apply_remat off XLA (eager CPU / CUDA)
torch_checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)


def apply_remat(model, checkpoint=None):
    """Rematerialise every encoder/decoder block of a T5 in the backward (keep only block inputs); returns model.

    `checkpoint` defaults to torch-xla's `torch_xla.utils.checkpoint.checkpoint`, which puts optimisation barriers
    around the recomputation so that XLA does not merge it back into the forward (torch.utils.checkpoint would be
    undone by XLA's common-subexpression elimination). That one is re-entrant: a block whose input needs no gradient
    (the frozen embedding's output) would give its adapters none, so the block input is made to require grad.
    """
    if checkpoint is None:
        from torch_xla.utils.checkpoint import checkpoint
    blocks = [m for n, m in model.named_modules() if re.fullmatch(r"(encoder|decoder)\.block\.\d+", n)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no encoder.block.N / decoder.block.N modules to rematerialise")

    def remat(forward):
        def run(x, *args):
            if not torch.is_grad_enabled():
                return forward(x, *args)
            if not x.requires_grad:  # nothing upstream trains, so cutting here loses no gradient
                x = x.detach().requires_grad_()  # [b, L, d_model]: the re-entrant checkpoint then tracks the block
            return checkpoint(forward, x, *args)
        return run
    for block in blocks:
        block.forward = remat(block.forward)
    return model
