"""Training and evaluation throughput of MoV, MoLORA, (IA)3, LoRA and full fine-tuning on our T5, against
transformers' T5 with peft's (IA)3 and LoRA.

Measures the cost side of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444): the
paper's claim is that MoV / MoLORA add little to the step of their dense baselines ((IA)3 and LoRA, section 2),
trained with Adafactor as T5X configures it (the original's `configs/*.gin`, T5X's `t5x/adafactor.py`) and
evaluated by rank classification (section 3). The original code (for-ai/parameter-efficient-moe) publishes no such
benchmark; this file is ours.

Usage:
    python bench.py --peer --markdown                     # small preset, 2 threads, < 10 min on 2 CPU cores
    python bench.py --methods ia3,mov-30 --steps 10 --out bench.jsonl
    python bench.py --device cuda --preset base --batch-size 32 --input-len 1024 --target-len 256 --peer

This file plans the runs (each configuration in a fresh `python bench.py --worker SPEC` process, ours and the
peer's interleaved, the first of each pair alternating), collects their JSON records and writes the markdown report
with the README's performance targets; what one run measures, and how, is bench_measure.py.
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

import t5
from bench_measure import CONFIGS, PEERS, run_spec

NOISY_SPREAD = 1.3  # max / min step time above which a configuration's timings are flagged as disturbed
VERDICT = {True: "yes", False: "**no**", None: "n/a"}  # a target met, missed, or not measured


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
    """The specs to run, in order: each configuration's ours/peer pair interleaved, the first of each pair
    alternating, then the evaluation comparison."""
    common = {k: getattr(args, k) for k in ("preset", "batch_size", "input_len", "target_len", "warmup", "steps",
                                            "threads", "device", "seed")}
    specs, pairs = [], 0
    for name in args.methods:
        if name == "eval":
            continue
        pair = [{"kind": "train", "impl": "ours", "name": name, **common}]
        if args.peer and name in PEERS:
            pair.append({"kind": "train", "impl": "peer", "name": name, **common})
            pair = pair if pairs % 2 == 0 else pair[::-1]
            pairs += 1
        specs += pair
    if "eval" in args.methods:
        specs.append({"kind": "eval", "impl": "ours", "name": "eval", "eval_examples": args.eval_examples, **common})
    for s in specs:
        s["method"], s["experts"] = CONFIGS.get(s["name"], ("eval", None))
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


def targets(records):
    """[(target, value text, met: True / False / None)] for the README's performance targets."""
    ours = {r["name"]: r for r in records if r["kind"] == "train" and r["impl"] == "ours"}
    peer = {r["name"]: r for r in records if r["kind"] == "train" and r["impl"] == "peer"}
    ev = next((r for r in records if r["kind"] == "eval"), None)
    rows = []
    for name, label in (("ia3", "(IA)3"), ("lora", "LoRA")):
        if name in ours and name in peer:
            speed = peer[name]["step_s"] / ours[name]["step_s"]
            aim = "met" if speed >= 1.25 else "missed"
            rows.append((f"our {label} step at least as fast as peft's", f"{speed:.2f}x (aim 1.25x: {aim})",
                         speed >= 1.0))
            m, pm = ours[name].get("peak_mem_mb"), peer[name].get("peak_mem_mb")
            rows.append((f"our {label} peak memory no higher than peft's", f"{_fmt(m)} / {_fmt(pm)} MB",
                         None if m is None or pm is None else m <= pm))
        else:
            rows.append((f"our {label} vs peft's {label}", f"not measured (needs --peer and {name})", None))
    for name, base, label, limit in (("mov-30", "ia3", "MoV-30 / (IA)3", 1.15),
                                     ("molora-10", "lora", "MoLORA-10 / LoRA", 1.5)):
        if name in ours and base in ours:
            ratio = ours[name]["step_s"] / ours[base]["step_s"]
            rows.append((f"{label} step time at most {limit}x", f"{ratio:.2f}x", ratio <= limit))
        else:
            rows.append((f"{label} step time at most {limit}x", f"not measured (needs {name} and {base})", None))
    if ev is not None:
        rows.append(("rank classification, one encoder pass vs naive, at least 2x", f"{ev['speedup']:.2f}x",
                     ev["speedup"] >= 2.0))
    else:
        rows.append(("rank classification at least 2x faster", "not measured (needs eval)", None))
    return rows


def markdown(records, args, total_s):
    """The README's table: machine heading, one row per configuration with its peer, comparisons, targets."""
    m = machine()
    threads = f"{args.threads} torch threads" if args.device == "cpu" else f"device {args.device}"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores visible, {threads}"
             + (f", GPU {m['gpu']}" if m["gpu"] and args.device == "cuda" else "")
             + f"; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {m['date']}.",
             f"Preset `{args.preset}` (random weights), batch {args.batch_size}, input {args.input_len} + target "
             f"{args.target_len} tokens, median of {args.steps} timed steps after {args.warmup} warm-up, Adafactor; "
             f"total benchmark wall time {total_s:.0f} s.", ""]
    train = [r for r in records if r["kind"] == "train"]
    if train:
        lines.append(f"Peak memory: {train[0]['mem_method']}.")
        lines.append("")
    ours = {r["name"]: r for r in train if r["impl"] == "ours"}
    peer = {r["name"]: r for r in train if r["impl"] == "peer"}
    xla = args.device == "xla"
    head = ["config", "trainable params", "step ms", "tokens/s", "peak MB"] + (["compiles"] if xla else [])
    if peer:
        head += ["peer step ms", "peer peak MB", "speed ours/peer", "memory ours/peer"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ours.items():
        row = [name, f"{r['trainable_params']:,}", f"{1000 * r['step_s']:.0f}", f"{r['tokens_per_s']:.0f}",
               _fmt(r.get("peak_mem_mb"), "{:.0f}")] + ([str(r.get("compiles_timed"))] if xla else [])
        if peer:
            p = peer.get(name)
            if p is None:
                row += ["", "", "", ""]
            else:
                mem_ratio = (r["peak_mem_mb"] / p["peak_mem_mb"] if r.get("peak_mem_mb") and p.get("peak_mem_mb")
                             else None)
                row += [f"{1000 * p['step_s']:.0f}", _fmt(p.get("peak_mem_mb"), "{:.0f}"),
                        f"{p['step_s'] / r['step_s']:.2f}x", _fmt(mem_ratio, "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    ev = next((r for r in records if r["kind"] == "eval"), None)
    if ev is not None:
        lines += ["", f"Rank classification of {ev['examples']} random {ev['choices']}-choice items (batch "
                  f"{args.batch_size} examples): one encoder pass {ev['one_pass_examples_per_s']:.1f} examples/s, "
                  f"naive per-choice forward {ev['naive_examples_per_s']:.1f} examples/s, speed-up "
                  f"{ev['speedup']:.2f}x (scores agree to {ev['max_abs_score_diff']:.1e})."]
    noisy = [f"{r['impl']} {r['name']} ({r['spread']:.1f}x)" for r in records if r["spread"] > NOISY_SPREAD]
    if noisy:
        lines += ["", f"**Noisy:** the slowest timed step exceeded the fastest by more than {NOISY_SPREAD}x for "
                  f"{', '.join(noisy)}; another process probably competed for the cores. Re-run on a quiet machine."]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target, value, met in targets(records):
        lines.append(f"| {target} | {value} | {VERDICT[met]} |")
    lines += ["", "Speed ours/peer = peer step time / our step time (above 1: ours faster); memory ours/peer = our "
              "peak / peer peak (below 1: ours smaller)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter, allow_abbrev=False)
    p.add_argument("--preset", default="small", help="t5.T5Config preset, random weights")
    p.add_argument("--methods", default=",".join([*CONFIGS, "eval"]),
                   help=f"comma-separated configurations among {', '.join(CONFIGS)} and eval; a method name "
                        "(mov, molora) selects all its configurations")
    p.add_argument("--batch-size", type=int, default=2, help="rows per training step")
    p.add_argument("--input-len", type=int, default=256, help="encoder tokens per row")
    p.add_argument("--target-len", type=int, default=64, help="decoder tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps (evaluation: timed rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (XLA compiles during these)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda", "xla"),
                   help="where to run; cuda when available, else cpu")
    p.add_argument("--eval-examples", type=int, default=16, help="rank-classification items for the eval timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batches")
    p.add_argument("--peer", action="store_true", help="also run transformers + peft (full, ia3, lora)")
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
        names = [n for n, (method, _) in CONFIGS.items() if item in (n, method)] or (["eval"] if item == "eval" else [])
        if not names:
            p.error(f"--methods: unknown configuration {item!r}; choose from {', '.join(CONFIGS)}, eval, mov, molora")
        chosen += [n for n in names if n not in chosen]
    args.methods = chosen
    for flag in ("batch_size", "input_len", "target_len", "steps", "threads", "eval_examples"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    t5.T5Config.preset(args.preset)  # raises naming the presets
    if args.device not in ("cpu", "cuda", "xla"):
        p.error(f"--device must be cpu, cuda or xla, got {args.device!r}")
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
            print(f"bench: {spec['impl']} {spec['name']} ...", file=sys.stderr, flush=True)
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
