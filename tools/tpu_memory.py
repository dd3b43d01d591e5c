"""Bytes per chip of one training step on a TPU v4 slice, for each T5 size, method and mesh that sharding.py builds:
which `train.py --fsdp` / `--remat` fit, before a TPU is rented.

    python -m tools.tpu_memory --chips 16                    # markdown: the mesh to use per size and method
    tpu_memory.memory_per_chip("xl", "mov", experts=30, data=16, fsdp=1, remat=True)     # {part: bytes}
    tpu_memory.recommend("xxl", "mov", chips=16, experts=30)                            # (data, fsdp, remat, parts)

The step is the paper's (Zadouri et al. 2023, arXiv 2309.05444, section 3): 32 packed rows of 1024 input and 256
target tokens (for-ai/parameter-efficient-moe `scripts/*_train.sh`: BATCH_SIZE 32, TASK_FEATURE_LENGTHS), fp32
parameters and optimizer state, bf16 activations, Adafactor as T5X configures it. Each parameter is split by the
partition spec of `sharding.table_for(method)`, on a [data, fsdp] mesh with the batch over all chips. A model, not a
measurement on a TPU: its activation term is checked against the bytes eager autograd saves (tests/test_xla.py).
"""
import argparse
import functools
import math
import re

import torch

import adafactor
import sharding
import t5
from runner import build
from runner.settings import Config, ModelSettings, parse_run_name, run_name

# Model of the bytes one chip holds at the peak of a training step (an estimate: XLA's fusion, rematerialisation
# and scheduling move the activation figure by tens of percent either way):
#   frozen      backbone weights / (their shards), in `weight_bytes` (fp32 as the original, or bf16)
#   trainable   fp32 parameters + fp32 gradients + Adafactor state, sharded like the parameter: a full second moment
#               unless the two largest dims are both >= 128 (then a row and a column vector); MoV / MoLORA / LoRA
#               tensors all have an expert or rank dim < 128, so they keep full second moments (T5X
#               `t5x/adafactor.py` min_dim_size_to_factor; the original's `src/adafactor_custom.py`)
#   gather      with fsdp > 1, weights gathered just in time: two full blocks (one in use, one prefetched) or the
#               vocabulary matrix, whichever is larger
#   activations tensors saved for the backward, bf16 (2 B), router probabilities fp32, per row:
#     a frozen Linear saves nothing (its weight needs no gradient; the input gradient needs only the weight), so
#     what is kept is the input of each RMSNorm (the fp32 residual stream, 4 d B), q/k/v and the attention output
#     (4 H d_kv), the attention's additive mask in the compute dtype (2 H L_kv B per query: t5.py casts the fp32
#     position bias + mask once per layer; cross-attention's mask has no head axis) and its log-sum-exp (fp32 H),
#     the FFN's wi_0 output, gelu output and wi_1 output (3 d_ff), the cross-attention keys/values of each decoder
#     layer over the encoder tokens (2 H d_kv per input token), and the fp32 logits with their log-softmax (8 V
#     bytes per target token). Dropout masks are T5X's broadcast ones (one per row): negligible.
#     Full fine-tuning trains the position bias, so attention keeps its fp32 weights instead (4 H L_kv B).
#     Adapters add what their backward needs: MoV keeps the pre-scale activation and the mixed scale per site
#     (bf16) and the router's fp32 copy of its input (+8 H d_kv B at k, v; +8 d_ff B at the FFN) and the
#     probabilities (fp32 H E / E); (IA)3 the pre-scale activation;
#     LoRA / MoLORA and full fine-tuning the input of every adapted Linear and A x ([E, r]) with its router's p
#     (MoLORA also the router's fp32 copy of the input). Checked against the bytes eager autograd saves under bf16
#     autocast (tests/test_xla.py): within -25% / +10% for every method.
#   remat=False keeps all layers' activations; remat=True (`sharding.apply_remat`: each block recomputed) keeps each
#     block's fp32 input (4 d B per token per layer) and the encoder output, plus one block's activations while it
#     is recomputed.
# Rows per chip = batch / (data * fsdp): the batch is split over every chip (sharding.BATCH_AXES).
GIB = 2 ** 30
V4_HBM = 32 * GIB  # TPU v4: 32 GiB of HBM per chip
HEADROOM = 0.75  # 25% for XLA temporaries, fragmentation, the program, and this model's error (-25%..+10%)


@functools.lru_cache(maxsize=None)
def _meta_model(size, method, experts, rank):
    """T5 of preset `size` with `method`'s adapters on the meta device (shapes only, no memory); cached."""
    settings = ModelSettings(method=method, experts=experts, rank=rank)
    with torch.device("meta"):
        return build.add_adapters(t5.T5(t5.T5Config.preset(size)), settings)


def _local_numel(shape, spec, axis_size):
    """Elements of one chip's shard of a tensor of `shape` split by `spec` (uneven splits padded up)."""
    n = 1
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= math.ceil(dim / math.prod(axis_size[a] for a in axes))
    return n


def _adafactor_numel(shape):
    """Elements of Adafactor's second-moment state for a tensor of `shape` (adafactor.factored_dims: T5X's rule)."""
    factored = adafactor.factored_dims(shape, 128)
    if factored is None:
        return math.prod(shape)
    return math.prod(shape) // shape[factored[1]] + math.prod(shape) // shape[factored[0]]


def activation_bytes_per_row(config, method, experts=30, rank=4, input_length=1024, target_length=256,
                             remat=False):
    """Bytes of saved activations for one packed row (model in the comment block above)."""
    d, f, heads, li, lt = config.d_model, config.d_ff, config.num_heads, input_length, target_length
    a, vocab, n_enc, n_dec = heads * config.d_kv, config.vocab_size, config.num_layers, config.num_decoder_layers
    e = experts if method in ("mov", "molora") else 1
    # per encoder token per layer, per decoder token per layer, per encoder token per decoder layer (cross k/v)
    # norm inputs: the fp32 residual stream (4 d each); q, k, v, attention outputs and FFN activations bf16;
    # per query: the attention mask (bf16 per key; fp32 weights when the position bias trains) and log-sum-exp
    pair = 4 if method == "full" else 2
    enc = 4 * 2 * d + 2 * 4 * a + pair * heads * li + 4 * heads + 2 * 3 * f
    cross_mask = (4 * heads if method == "full" else 2) * li  # cross-attention's mask has no head axis
    dec = 4 * 3 * d + 2 * 6 * a + pair * heads * lt + cross_mask + 8 * heads + 2 * 3 * f
    cross = 2 * 2 * a
    once = 4 * d * (li + lt) + 8 * vocab * lt  # final norms' inputs, fp32 logits and log-softmax
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
    specs = sharding.plan([(n, p.shape) for n, p in model.named_parameters()], sharding.table_for(method))
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
            label = run_name(method, experts)
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
    p = argparse.ArgumentParser(description="Bytes per chip of a training step on a TPU v4 mesh "
                                            "(python -m tools.tpu_memory); prints the memory table (markdown).")
    p.add_argument("--chips", type=int, default=16, help="chips in the slice (v4-32 = 16 chips)")
    p.add_argument("--methods", default="mov-30,molora-15,ia3,lora,full",
                   help="comma-separated configurations as train.py names runs (mov-30, ia3, ...); the first one "
                        "also gets the fsdp grid")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32", help="dtype of the frozen weights")
    Config.add_flags(p, only=("batch_size", "input_length", "target_length"))
    args = p.parse_args(argv)
    try:
        methods = [parse_run_name(item.strip()) for item in args.methods.split(",")]
    except ValueError as e:
        p.error(f"--methods: {e}")
    methods = [(method, experts or 1) for method, experts in methods]
    print(memory_table(tuple(methods), chips=args.chips, weight_bytes=4 if args.weights == "fp32" else 2,
                       batch=args.batch_size, input_length=args.input_length, target_length=args.target_length))


if __name__ == "__main__":
    main()
