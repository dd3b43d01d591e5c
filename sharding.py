"""SPMD sharding for torch-xla: a ('data', 'fsdp') mesh, a table from parameter names to partition specs, the
input sharding, and the memory per chip that a mesh implies.

The original (for-ai/parameter-efficient-moe, T5X `PjitPartitioner` with `standard_logical_axis_rules` plus
`src/partitioning_custom.py`) shards through logical axis names inside the Flax modules. Here sharding is data
applied from outside (STYLE.md): the model files import only torch, and `train.py --device xla` calls

    sharding.enable_spmd()                                  # before the first XLA tensor of the process
    mesh = sharding.make_mesh(fsdp=4)                       # [devices / 4, 4] over ('data', 'fsdp')
    sharding.apply_sharding(model, mesh, sharding.mark_sharding, table=sharding.table_for("mov"))

(optionally `sharding.apply_remat(model)` first) and shards each batch with `shard_batch(batch, mesh)` (or hands
`batch_sharding(mesh)` to torch-xla's `MpDeviceLoader(loader, device, input_sharding=...)`), never in the model.
`python sharding.py --memory` prints the bytes per chip of every size and method for the paper's batch
(REFERENCE.md sections 1, 4-6) and a mesh.

Layout (REFERENCE.md section 1: HF names, Linear weights [out, in]):
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
    activations do not fit otherwise (see the memory table: xl on 16 chips, xxl).
Deviation from the original: T5X's default rules give the `mlp`/`heads` axes to a 'model' (tensor-parallel) axis and
the batch to 'data'; we use FSDP instead of tensor parallelism (one `--fsdp` flag, no per-layer collectives in the
model code). `table=` takes any other table, e.g. one that gives d_ff / heads to a tensor-parallel axis.
"""
import argparse
import functools
import math
import re

import torch

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


def table_for(method, tie_word_embeddings=False):
    """The table for a T5 built with `method`: the backbone's patterns plus that method's adapter patterns.

    tie_word_embeddings=True (original T5: no lm_head, the head reuses shared.weight) drops the lm_head pattern.
    """
    if method not in ADAPTER_TABLES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(ADAPTER_TABLES)}")
    base = [(p, s) for p, s in BASE_TABLE if not (tie_word_embeddings and p.startswith("^lm_head"))]
    return base + ADAPTER_TABLES[method]


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


def batch_sharding(mesh):
    """The `input_sharding=` of torch-xla's MpDeviceLoader / ParallelLoader for our rank-2 [rows, length] inputs."""
    import torch_xla.distributed.spmd as xs
    return xs.ShardingSpec(mesh, batch_spec(2))


def shard_batch(batch, mesh, mark_sharding=mark_sharding):
    """Mark every tensor of a dict batch already on the XLA device as split along its first (batch) dim."""
    for name, tensor in batch.items():
        _check_batch(tensor, mesh, name)
        mark_sharding(tensor, mesh, batch_spec(tensor.dim()))
    return batch


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


# ----------------------------------------------------------------------------------------------- memory per chip
# Model of the bytes one chip holds at the peak of a training step (an estimate: XLA's fusion, rematerialisation
# and scheduling move the activation figure by tens of percent either way):
#   frozen      backbone weights / (their shards), in `weight_bytes` (fp32 as the original, or bf16)
#   trainable   fp32 parameters + fp32 gradients + Adafactor state, sharded like the parameter: a full second moment
#               unless the two largest dims are both >= 128 (then a row and a column vector); MoV / MoLORA / LoRA
#               tensors all have an expert or rank dim < 128, so they keep full second moments (REFERENCE.md sec. 6)
#   gather      with fsdp > 1, weights gathered just in time: two full blocks (one in use, one prefetched) or the
#               vocabulary matrix, whichever is larger
#   activations tensors saved for the backward, bf16 (2 B), dropout masks 1 B, router probabilities fp32, per row:
#     a frozen Linear saves nothing (its weight needs no gradient; the input gradient needs only the weight), so
#     what is kept is the input of each RMSNorm (the fp32 residual stream, 4 d B), q/k/v (3 H d_kv), the attention
#     probabilities (fp32 softmax output, 1 B dropout mask, bf16 dropped copy: 7 H L_kv B), the FFN's wi_0 output,
#     gelu output and wi_1 output (3 d_ff) with the dropout mask (d_ff),
#     the residual dropout masks (d), the cross-attention keys/values of each decoder layer over the encoder tokens
#     (2 H d_kv per input token), and the logits (bf16 + fp32 + fp32 softmax: 10 V bytes per target token).
#     Adapters add what their backward needs: MoV keeps the pre-scale activation and the mixed scale per site
#     (bf16) and the router's fp32 copy of its input (+8 H d_kv B at k, v; +8 d_ff B at the FFN) and the
#     probabilities (fp32 H E / E); (IA)3 the pre-scale activation;
#     LoRA / MoLORA and full fine-tuning the input of every adapted Linear and A x ([E, r]) with its router's p
#     (MoLORA also the router's fp32 copy of the input). Checked against the bytes eager autograd saves under bf16
#     autocast (tests/test_xla.py): within -25% / +10% for every method.
#   remat=False keeps all layers' activations; remat=True (`apply_remat`: rematerialise each block) keeps each
#     block's fp32 input (4 d B per token per layer) and the encoder output, plus one block's activations while it
#     is recomputed.
# Rows per chip = batch / (data * fsdp): the batch is split over every chip (BATCH_AXES).
GIB = 2 ** 30
V4_HBM = 32 * GIB  # TPU v4: 32 GiB of HBM per chip
HEADROOM = 0.75  # 25% for XLA temporaries, fragmentation, the program, and this model's error (-25%..+10%)


@functools.lru_cache(maxsize=None)
def _meta_model(size, method, experts, rank):
    """T5 of preset `size` with `method`'s adapters on the meta device (shapes only, no memory); cached."""
    import molora
    import mov
    import t5
    with torch.device("meta"):
        model = t5.T5(t5.T5Config.preset(size))
        if method == "mov":
            mov.add_mov(model, experts)
        elif method == "ia3":
            mov.add_ia3(model)
        elif method == "molora":
            molora.add_molora(model, experts, rank=rank)
        elif method == "lora":
            molora.add_lora(model, rank=rank)
        elif method == "full":
            model.requires_grad_(True)
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {sorted(ADAPTER_TABLES)}")
    return model


def _local_numel(shape, spec, axis_size):
    """Elements of one chip's shard of a tensor of `shape` split by `spec` (uneven splits padded up)."""
    n = 1
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= math.ceil(dim / math.prod(axis_size[a] for a in axes))
    return n


def _adafactor_numel(shape, min_dim=128):
    """Elements of Adafactor's second-moment state for a tensor of `shape` (T5X's factoring rule)."""
    dims = sorted(shape)
    if len(shape) >= 2 and dims[-2] >= min_dim:
        return math.prod(shape) // dims[-1] + math.prod(shape) // dims[-2]
    return math.prod(shape)


def activation_bytes_per_row(config, method, experts=30, rank=4, input_length=1024, target_length=256,
                             remat=False):
    """Bytes of saved activations for one packed row (model in the comment block above)."""
    d, f, heads, li, lt = config.d_model, config.d_ff, config.num_heads, input_length, target_length
    a, vocab, n_enc, n_dec = heads * config.d_kv, config.vocab_size, config.num_layers, config.num_decoder_layers
    e = experts if method in ("mov", "molora") else 1
    # per encoder token per layer, per decoder token per layer, per encoder token per decoder layer (cross k/v)
    # norm inputs: the fp32 residual stream (4 d each); attention probabilities: fp32 softmax output, 1-byte dropout
    # mask and the bf16 dropped probabilities (7 B per query-key pair); q, k, v and the FFN activations bf16
    enc = 4 * 2 * d + 2 * 3 * a + 7 * heads * li + 2 * 3 * f + (f + 2 * d)
    dec = 4 * 3 * d + 2 * 4 * a + 7 * heads * (lt + li) + 2 * 3 * f + (f + 3 * d)
    cross = 2 * 2 * a
    once = 4 * d * (li + lt) + 10 * vocab * lt  # final norms' inputs, logits
    if method in ("mov", "ia3"):
        # MoV: pre-scale activation and mixed scale (bf16), the router's fp32 copy of its input, probabilities
        site_attn = (2 * 2 * a + 4 * a + 4 * heads * e) if method == "mov" else 2 * a
        site_ffn = (2 * 2 * f + 4 * f + 4 * e) if method == "mov" else 2 * f
        enc += 2 * site_attn + site_ffn
        dec += 2 * site_attn + site_ffn
        cross += 2 * site_attn
    elif method in ("lora", "molora", "full"):
        lin = 0 if method == "full" else 2 * e * rank + (4 * e if method == "molora" else 0)  # A x and p, per Linear
        inputs = 2 if method != "molora" else 2 + 4  # bf16 input of an adapted Linear (+ its router's fp32 copy)
        enc += inputs * (d + a + d + f) + 6 * lin  # inputs of q/k/v (shared), o, wi_0/wi_1 (shared), wo
        dec += inputs * (d + a + d + a + d + f) + 8 * lin  # self q,k,v,o; cross q,o; wi_0; wo
        cross += 2 * lin
        once += inputs * d * li  # the encoder output, input of every cross k/v
        if method == "full":  # trainable norm scales: each norm's fp32 normalised input too
            enc, dec, once = enc + 4 * 2 * d, dec + 4 * 3 * d, once + 4 * d * (li + lt)
    if not remat:
        return li * n_enc * enc + lt * n_dec * dec + li * n_dec * cross + once
    block = max(li * enc, lt * dec + li * cross)  # one block recomputed at a time
    return 4 * d * (li * n_enc + lt * n_dec) + 4 * d * li + block + once  # fp32 block inputs, encoder output


def memory_per_chip(size, method="mov", experts=30, rank=4, data=4, fsdp=4, batch=32, input_length=1024,
                    target_length=256, weight_bytes=4, remat=False):
    """{part: bytes} one chip holds for a training step on a (data x fsdp) mesh; see the model above."""
    if batch % (data * fsdp):
        raise ValueError(f"batch {batch} does not split over data {data} x fsdp {fsdp} chips; pick a mesh whose "
                         "size divides the batch")
    model = _meta_model(size, method, experts, rank)
    axis_size = {"data": data, "fsdp": fsdp}
    specs = plan([(n, p.shape) for n, p in model.named_parameters()], table_for(method))
    frozen = trainable = gather = 0
    blocks = {}
    for name, p in model.named_parameters():
        local = _local_numel(p.shape, specs[name], axis_size)
        if p.requires_grad:
            shards = p.numel() / local
            trainable += 4 * (2 * local + math.ceil(_adafactor_numel(tuple(p.shape)) / shards))
        else:
            frozen += weight_bytes * local
        block = re.match(r"(encoder|decoder)\.block\.\d+\.", name)
        key = block.group(0) if block else name
        blocks[key] = blocks.get(key, 0) + weight_bytes * p.numel()
    if fsdp > 1:
        per_block = [v for k, v in blocks.items() if k.endswith(".")]
        gather = max(2 * max(per_block), max(blocks.get("shared.weight", 0), blocks.get("lm_head.weight", 0)))
    rows = batch // (data * fsdp)
    act = rows * activation_bytes_per_row(model.config, method, experts, rank, input_length, target_length, remat)
    parts = {"frozen": frozen, "trainable": trainable, "gather": gather, "activations": act}
    parts["total"] = sum(parts.values())
    parts["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parts


def recommend(size, method="mov", chips=16, hbm=V4_HBM, **kw):
    """(data, fsdp, remat, parts) with the smallest fsdp that fits hbm * HEADROOM, preferring no remat; None if none."""
    fsdps = [f for f in range(1, chips + 1) if chips % f == 0]
    for remat in (False, True):
        for fsdp in fsdps:
            parts = memory_per_chip(size, method, data=chips // fsdp, fsdp=fsdp, remat=remat, **kw)
            if parts["total"] <= HEADROOM * hbm:
                return chips // fsdp, fsdp, remat, parts
    return None


def memory_table(methods=(("mov", 30),), sizes=("small", "base", "large", "xl", "xxl"), chips=16, weight_bytes=4,
                 batch=32, input_length=1024, target_length=256):
    """Markdown: the recommended mesh per size and method with its bytes per chip, then a grid over fsdp for the
    first method (total GiB without / with remat)."""
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    kw = dict(weight_bytes=weight_bytes, batch=batch, input_length=input_length, target_length=target_length)
    lines = [f"Per chip, TPU v4 ({V4_HBM // GIB} GiB HBM, fits = at most {HEADROOM:.0%}), {chips} chips, batch "
             f"{batch} x {input_length}/{target_length}, frozen weights {'fp32' if weight_bytes == 4 else 'bf16'}, "
             "GiB:", "",
             "| size | method | trainable | mesh data x fsdp | remat | frozen | trainable+grad+opt | gather | "
             "activations | total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for method, experts in methods:
            label = f"{method}-{experts}" if method in ("mov", "molora") else method
            rec = recommend(size, method, chips, experts=experts, **kw)
            if rec is None:
                lines.append(f"| {size} | {label} | | does not fit on {chips} chips | | | | | | |")
                continue
            data, fsdp, remat, p = rec
            lines.append(f"| {size} | {label} | {p['trainable_params'] / 1e6:.2f}M | {data} x {fsdp} | "
                         f"{'yes' if remat else 'no'} | {gib(p['frozen'])} | {gib(p['trainable'])} | "
                         f"{gib(p['gather'])} | {gib(p['activations'])} | {gib(p['total'])} |")
    method, experts = methods[0]
    fsdps = [f for f in range(1, chips + 1) if chips % f == 0]
    lines += ["", f"Total GiB per chip for {method}-{experts}, no remat / remat, by fsdp (data = {chips} / fsdp):",
              "", "| size | " + " | ".join(f"fsdp {f}" for f in fsdps) + " |", "|---" * (len(fsdps) + 1) + "|"]
    for size in sizes:
        cells = []
        for f in fsdps:
            no, yes = (memory_per_chip(size, method, experts, data=chips // f, fsdp=f, remat=r, **kw)["total"]
                       for r in (False, True))
            cells.append(f"{gib(no)} / {gib(yes)}")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Bytes per chip of a training step on a TPU v4 mesh (sharding.py).")
    p.add_argument("--memory", action="store_true", help="print the memory table (markdown)")
    p.add_argument("--chips", type=int, default=16, help="chips in the slice (v4-32 = 16 chips)")
    p.add_argument("--methods", default="mov:30,molora:15,ia3,lora,full",
                   help="comma-separated method[:experts]; the first one also gets the fsdp grid")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32", help="dtype of the frozen weights")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-length", type=int, default=1024)
    p.add_argument("--target-length", type=int, default=256)
    args = p.parse_args(argv)
    if not args.memory:
        p.error("nothing to do: pass --memory")
    methods = []
    for item in args.methods.split(","):
        name, _, experts = item.partition(":")
        if name not in ADAPTER_TABLES:
            p.error(f"unknown method {name!r} in --methods; expected one of {sorted(ADAPTER_TABLES)}")
        methods.append((name, int(experts) if experts else 1))
    print(memory_table(tuple(methods), chips=args.chips, weight_bytes=4 if args.weights == "fp32" else 2,
                       batch=args.batch, input_length=args.input_length, target_length=args.target_length))


if __name__ == "__main__":
    main()
