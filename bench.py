"""Training and evaluation throughput of MoV, MoLORA, (IA)3, LoRA and full fine-tuning on our T5, against
transformers' T5 with peft's (IA)3 and LoRA.

Measures the cost side of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444): the
paper's claim is that MoV / MoLORA add little to the step of their dense baselines ((IA)3 and LoRA, section 2),
trained with Adafactor as T5X configures it (the original's `configs/*.gin`, T5X's `t5x/adafactor.py`) and
evaluated by rank classification (section 3). The original code (for-ai/parameter-efficient-moe) publishes no such
benchmark; this file is ours.

Usage:
    python bench.py --peer --markdown                     # small model, 2 threads, < 10 min on 2 CPU cores
    python bench.py --methods ia3,mov-30 --steps 10 --dtypes float32,bfloat16 --out bench.jsonl
    python bench.py --device cuda --model xl --batch-size 32 --input-length 1024 --target-length 256 --methods mov-30 \
        --peer --dtypes bfloat16                          # MFU of the paper's MoV-30 step on a GPU

This file plans the runs (per dtype: the matmul peak, then each configuration in a fresh `python bench.py --worker
SPEC` process, ours and the peer's interleaved, the first of each pair alternating), collects their JSON records
and writes the markdown report of what was measured;
what one run measures, and how, is tools/bench_measure.py; the FLOP count and the peak, tools/bench_flops.py.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from runner import build, cli
import t5
from runner.settings import parse_run_name
from tools.bench_measure import CONFIGS, PEERS, run_spec

NOISY_SPREAD = 1.3  # max / min step time above which a configuration's timings are flagged as disturbed


# ----------------------------------------------------------------------------------------------- runs
def run_worker(spec):
    """Run one configuration in a fresh `python bench.py --worker SPEC` process; returns its JSON record."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {spec} failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args):
    """The specs to run, in order, per dtype: the matmul peak, then each configuration's ours/peer pair interleaved
    (the first of each pair alternating); the evaluation comparison last, in the first dtype."""
    common = {k: getattr(args, k) for k in ("model", "batch_size", "input_length", "target_length", "warmup", "steps",
                                            "threads", "device", "seed", "peak_n", "compile")}
    specs, pairs = [], 0
    for dtype in args.dtypes:
        specs.append({"kind": "peak", "impl": "ours", "name": "matmul-peak", **common, "dtype": dtype})
        for name in args.methods:
            if name == "eval":
                continue
            pair = [{"kind": "train", "impl": "ours", "name": name, **common, "dtype": dtype}]
            if args.peer and name in PEERS:
                pair.append({"kind": "train", "impl": "peer", "name": name, **common, "dtype": dtype})
                pair = pair if pairs % 2 == 0 else pair[::-1]
                pairs += 1
            specs += pair
    if "eval" in args.methods:
        specs.append({"kind": "eval", "impl": "ours", "name": "eval", "eval_examples": args.eval_examples, **common,
                      "dtype": args.dtypes[0]})
    for s in specs:
        s["method"], s["experts"] = parse_run_name(s["name"]) if s["name"] in CONFIGS else (s["kind"], None)
    return specs


# ----------------------------------------------------------------------------------------------- report
def machine():
    """CPU model, cores and threads, library versions and the date, for the table's heading."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = models[0] if models else cpu
    versions = {"torch": torch.__version__}
    for lib in ("transformers", "peft"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, **versions,
            "date": datetime.date.today().isoformat()}


def _fmt(x, spec="{:.1f}"):
    return "n/a" if x is None else spec.format(x)


# The comparisons the summary reports, per dtype: MoV-30 against (IA)3 and MoLORA-10 against LoRA (the adapters'
# cost over their dense baselines), and ours against the peer's (IA)3 and LoRA.
ROUTED = (("mov-30", "ia3", "MoV-30 / (IA)3"), ("molora-10", "lora", "MoLORA-10 / LoRA"))
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def by_name(records, kind="train"):
    """{(impl, name, dtype): record} of one kind of record."""
    return {(r["impl"], r["name"], r.get("dtype", "float32")): r for r in records if r["kind"] == kind}


def peak_fraction(record, records):
    """A training record's model FLOP/s over the matmul peak measured in its dtype, or None."""
    peak = by_name(records, "peak").get(("ours", "matmul-peak", record.get("dtype", "float32")))
    if peak is None or "model_flops_per_s" not in record:
        return None
    return record["model_flops_per_s"] / peak["peak_flops_per_s"]


def comparisons(records):
    """[(comparison, measured value text)] per dtype run: ours / the peer's tokens/s and peak memory for (IA)3 and
    LoRA, the (IA)3 step's fraction of the matmul peak, MoV-30 / (IA)3 and MoLORA-10 / LoRA step time, and the
    rank-classification speed-up; a comparison whose runs are missing is left out."""
    train, rows = by_name(records), []
    for dtype in ("float32", "bfloat16"):
        for name, label in (("ia3", "(IA)3"), ("lora", "LoRA")):
            ours, peer = train.get(("ours", name, dtype)), train.get(("peer", name, dtype))
            if ours and peer:
                rows.append((f"{SHORT[dtype]}: {label} tokens/s, ours / peft's",
                             f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x"))
                if ours.get("peak_mem_mb") and peer.get("peak_mem_mb"):
                    rows.append((f"{SHORT[dtype]}: {label} peak memory, ours / peft's",
                                 f"{ours['peak_mem_mb'] / peer['peak_mem_mb']:.2f} ({ours['peak_mem_mb']:.0f} / "
                                 f"{peer['peak_mem_mb']:.0f} MB)"))
        ia3 = train.get(("ours", "ia3", dtype))
        fraction = peak_fraction(ia3, records) if ia3 else None
        if fraction is not None:
            rows.append((f"{SHORT[dtype]}: (IA)3 step, fraction of the matmul peak", f"{fraction:.0%}"))
        for name, base, label in ROUTED:
            ours, dense = train.get(("ours", name, dtype)), train.get(("ours", base, dtype))
            if ours and dense:
                rows.append((f"{SHORT[dtype]}: {label} step time", f"{ours['step_s'] / dense['step_s']:.2f}x"))
    ev = next((r for r in records if r["kind"] == "eval"), None)
    if ev is not None:
        rows.append(("rank classification, one encoder pass / naive per-choice forward", f"{ev['speedup']:.2f}x"))
    return rows


def markdown(records, args, total_s):
    """The report: machine heading; per dtype its matmul peak and one row per configuration with its peer; the
    evaluation; the comparisons."""
    m = machine()
    threads = f"{args.threads} torch threads" if args.device == "cpu" else f"device {args.device}"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores visible, {threads}"
             + (f", GPU {m['gpu']}" if m["gpu"] and args.device == "cuda" else "")
             + f"; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {m['date']}.",
             f"Model `{args.model}` (random weights), batch {args.batch_size}, input {args.input_length} + target "
             f"{args.target_length} tokens, median of {args.steps} timed steps after {args.warmup} warm-up, Adafactor"
             f"{', training steps torch.compiled (peak memory includes compiling)' if args.compile else ''}; "
             f"total benchmark wall time {total_s:.0f} s.", ""]
    train = [r for r in records if r["kind"] == "train"]
    if train:
        lines += [f"Peak memory: {train[0]['mem_method']}.", ""]
    for why in getattr(args, "skipped", {}).values():
        lines += [why[0].upper() + why[1:] + ".", ""]
    xla = args.device == "xla"
    for dtype in args.dtypes:
        peak = by_name(records, "peak").get(("ours", "matmul-peak", dtype))
        ours = {r["name"]: r for r in train if r["impl"] == "ours" and r.get("dtype") == dtype}
        peer = {r["name"]: r for r in train if r["impl"] == "peer" and r.get("dtype") == dtype}
        mode = "bf16 autocast (fp32 weights)" if dtype == "bfloat16" else "float32"
        peak_text = ("not measured" if peak is None else
                     f"{peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s (best of {len(peak['times'])} "
                     f"{peak.get('peak_n', 2048)}^3 {dtype} matmuls)")
        lines += [f"**{mode}**; matmul peak {peak_text}.", ""]
        head = ["config", "trainable params", "step ms", "tokens/s", "peak MB", "GFLOP/step", "of peak"]
        head += ["compiles"] if xla else []
        if peer:
            head += ["peer step ms", "peer peak MB", "peer of peak", "tokens/s ours/peer", "memory ours/peer"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in ours.items():
            row = [name, f"{r['trainable_params']:,}", f"{1000 * r['step_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                   _fmt(r.get("peak_mem_mb"), "{:.0f}"), _fmt(r.get("model_flops", 0) / 1e9, "{:.3g}"),
                   _fmt(peak_fraction(r, records), "{:.0%}")] + ([str(r.get("compiles_timed"))] if xla else [])
            p = peer.get(name)
            if peer and p is None:
                row += [""] * 5
            elif p is not None:
                mem_ratio = (r["peak_mem_mb"] / p["peak_mem_mb"] if r.get("peak_mem_mb") and p.get("peak_mem_mb")
                             else None)
                row += [f"{1000 * p['step_s']:.0f}", _fmt(p.get("peak_mem_mb"), "{:.0f}"),
                        _fmt(peak_fraction(p, records), "{:.0%}"), f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x",
                        _fmt(mem_ratio, "{:.2f}")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    ev = next((r for r in records if r["kind"] == "eval"), None)
    if ev is not None:
        lines += [f"Rank classification ({ev.get('dtype', 'float32')}) of {ev['examples']} random {ev['choices']}-"
                  f"choice items (batch {args.batch_size} examples): one encoder pass "
                  f"{ev['one_pass_examples_per_s']:.1f} examples/s, naive per-choice forward "
                  f"{ev['naive_examples_per_s']:.1f} examples/s, speed-up {ev['speedup']:.2f}x (scores agree to "
                  f"{ev['max_abs_score_diff']:.1e}).", ""]
    noisy = [f"{r['impl']} {r['name']} {SHORT.get(r.get('dtype'), '')} ({r['spread']:.1f}x)" for r in records
             if r["kind"] != "peak" and r["spread"] > NOISY_SPREAD]
    if noisy:
        lines += [f"**Noisy:** the slowest timed step exceeded the fastest by more than {NOISY_SPREAD}x for "
                  f"{', '.join(noisy)}; another process probably competed for the cores. Re-run on a quiet machine.",
                  ""]
    lines += ["| comparison | measured |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in comparisons(records)]
    lines += ["", "GFLOP/step: the model's matmul FLOPs per training step (tools/bench_flops.py: forward, plus the "
              "backward's needed input and weight gradients); of peak = (GFLOP/step / step time) / the matmul peak "
              "of the same dtype, threads and device (on a GPU in bf16: the MFU). tokens/s ours/peer above 1: ours "
              "faster; memory ours/peer = our peak / the peer's (below 1: ours smaller)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter, allow_abbrev=False)
    p.add_argument("--model", default="small", help="the shape of the model: a t5.T5Config preset (tiny, small, ..., "
                   "xxl), random weights")
    p.add_argument("--methods", default=",".join([*CONFIGS, "eval"]),
                   help=f"comma-separated configurations among {', '.join(CONFIGS)} and eval; a method name "
                        "(mov, molora) selects all its configurations")
    p.add_argument("--batch-size", type=int, default=2, help="rows per training step")
    p.add_argument("--input-length", type=int, default=256, help="encoder tokens per row")
    p.add_argument("--target-length", type=int, default=64, help="decoder tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps (evaluation: timed rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (XLA compiles during these)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda", "xla"),
                   help="where to run; cuda when available, else cpu")
    p.add_argument("--dtypes", default="auto",
                   help="comma-separated float32, bfloat16 (bf16 autocast, fp32 weights); auto: float32, plus "
                        "bfloat16 on a GPU / TPU or a CPU with native bf16 matmuls (AVX512-BF16, AMX)")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmuls that measure the peak")
    p.add_argument("--eval-examples", type=int, default=16, help="rank-classification items for the eval timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batches")
    p.add_argument("--peer", action="store_true", help="also run transformers + peft (full, ia3, lora)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model, ours and the peer's (train.py --compile; compiled in warm-up)")
    p.add_argument("--markdown", action="store_true", help="print the README table after the JSON lines")
    p.add_argument("--out", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (fast, for tests; memory numbers less isolated)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration's spec as JSON
    args = p.parse_args(argv)
    if args.worker:
        return args
    chosen = []
    for item in (s.strip() for s in args.methods.split(",") if s.strip()):
        names = [n for n in CONFIGS if item in (n, parse_run_name(n)[0])] or (["eval"] if item == "eval" else [])
        if not names:
            p.error(f"--methods: unknown configuration {item!r}; choose from {', '.join(CONFIGS)}, eval, mov, molora")
        chosen += [n for n in names if n not in chosen]
    args.methods = chosen
    args.skipped = {}
    if args.dtypes == "auto":
        native = args.device != "cpu" or build.cpu_native_bf16()
        args.dtypes = ["float32"] + (["bfloat16"] if native else [])
        if not native:
            args.skipped["bfloat16"] = ("not measured in bf16: this CPU has no native bf16 matmul (AVX512-BF16 or "
                                        "AMX) and --dtypes auto skips it; --dtypes float32,bfloat16 runs the emulated "
                                        "path (tens of times slower)")
    else:
        args.dtypes = list(dict.fromkeys(d.strip() for d in args.dtypes.split(",") if d.strip()))
        bad = [d for d in args.dtypes if d not in ("float32", "bfloat16")]
        if bad or not args.dtypes:
            p.error(f"--dtypes: expected auto or a comma-separated list of float32, bfloat16, got {bad or '(none)'}")
    for flag in ("batch_size", "input_length", "target_length", "steps", "threads", "eval_examples", "peak_n"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup < (1 if args.compile else 0):
        p.error(f"--warmup must be >= {1 if args.compile else 0} (compiling happens in warm-up), got {args.warmup}")
    if args.compile and args.device == "xla":
        p.error("--compile applies to cpu and cuda (on XLA every step is compiled already)")
    t5.T5Config.preset(args.model)  # raises naming the presets
    return args


def main(argv=None):
    """Run the benchmark; returns the list of JSON records (also written as JSON lines)."""
    args = parse_args(argv)
    if args.worker:
        record = run_spec(json.loads(args.worker))
        print(json.dumps(record))
        return [record]
    t0 = time.perf_counter()
    out = open(args.out, "w") if args.out else sys.stdout
    records = []
    try:
        for spec in plan(args):
            print(f"bench: {spec['impl']} {spec['name']} {spec['dtype']} ...", file=sys.stderr, flush=True)
            record = run_spec(spec, in_process=True) if args.in_process else run_worker(spec)
            records.append(record)
            print(json.dumps(record), file=out, flush=True)
    finally:
        if args.out:
            out.close()
    if args.markdown:
        print(markdown(records, args, time.perf_counter() - t0))
    return records


if __name__ == "__main__":
    main()
