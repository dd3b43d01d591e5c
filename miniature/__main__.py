"""python -m miniature: pretrain (or reuse) the backbone, build the tasks, run or resume the sweep, write the report.

    python -m miniature                      # the whole experiment (resumable: re-run the same command)
    python -m miniature --size smoke         # the whole chain in about 20 s (tiny world and model, 2 steps)
    python -m miniature --stage report       # rewrite the report from the runs finished so far
Stages, in order: pretrain (backbone + gates), data (tasks + no-shortcut checks), pilot (MoV-10 and full on the
held-out dev split), sweep (learning rates, every method and seed, the ceiling), report. `--stage X` stops after X.
Outputs: the backbone under <cache>/miniature-<size>-backbone-<hash>/, tasks under <cache>/miniature-<size>-data-
<hash>/, runs under runs/miniature/<size>-<hash>/; the full size at the recipe's steps writes miniature/RESULTS.md
and miniature/results.png, the smoke size or --steps writes them into its run folder.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

from . import config

STAGES = ("pretrain", "data", "pilot", "sweep", "report")


def backbone(size, cache, log=print, progress=True):
    """The pretrained backbone directory (HF layout) and its gate report; pretrains (resumably) when absent."""
    from . import pretrain, templates
    from .world import World
    s = config.settings(size)
    root = os.path.join(cache, f"miniature-{size}-backbone-{config.backbone_hash(size)}")
    os.makedirs(root, exist_ok=True)
    gates = os.path.join(root, "gates.json")
    if os.path.exists(gates) and os.path.isdir(os.path.join(root, "model")):
        with open(gates) as f:
            return os.path.join(root, "model"), json.load(f)
    world = World(**s["world"])
    tok_path = os.path.join(root, "spiece.model")
    if not os.path.exists(tok_path):
        pretrain.train_vocabulary(world, templates.template_text(), tok_path, seed=s["world"]["seed"], **s["vocab"])
    b = dict(s["backbone"])
    report = pretrain.pretrain(world, root, tok_path, b.pop("steps"), log=log, progress=progress, **b)
    return os.path.join(root, "model"), report


def build_data(size, cache, model_dir):
    """(mixture dir, ceiling dir, checks): the tasks in P3's layout, built once per sweep hash."""
    from . import checks, tasks
    from .world import World
    s = config.settings(size)
    world = World(**s["world"])
    name = f"miniature-{size}-data-{config.sweep_hash(size)}"
    sizes = {k: v for k, v in s["tasks"].items() if k != "seed"}
    tok = os.path.join(model_dir, "spiece.model")
    mix = tasks.build_dir(world, cache, tok, sizes, s["tasks"]["seed"], False, name)
    ceil = tasks.build_dir(world, cache, tok, sizes, s["tasks"]["seed"], True, name + "-ceiling")
    path = os.path.join(mix, "checks.json")
    if not os.path.exists(path):
        res = checks.run(world, n=1200 if size == "full" else 120)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    with open(path) as f:
        return mix, ceil, json.load(f)


def machine():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from runner import build  # the project's own native-bf16 probe
    native = build.cpu_native_bf16()
    return f"{name}, {os.cpu_count()} cores, " + (f"native {native}" if native else "no native bf16 (float32)")


def set_steps(size, steps):
    """Every run of this process trains `steps` steps with a checkpoint every third of them: a new recipe in the
    size's settings (a new dict, so the module's own stays as written), hence a new sweep hash and new runs."""
    if steps < 3 or steps % 3:
        raise ValueError(f"--steps must be a positive multiple of 3 (a checkpoint every third), got {steps}")
    s = config.settings(size)
    s["recipe"] = {**s["recipe"], "steps": steps, "save_every": steps // 3}


def main(argv=None):
    from .project import ROOT, cache_root
    from runner.cli import ArgumentParser  # errors as one line, `error: ... (see ... --help)`
    p = ArgumentParser(prog="python -m miniature", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "smoke"), default="full",
                   help="full: the experiment; smoke: the whole chain in ~20 s")
    p.add_argument("--stage", choices=STAGES, default="report", help="stop after this stage (default: all)")
    p.add_argument("--cache", default=None, help="cache directory (default $PEFT_MOE_CACHE or ~/.cache/peft-moe)")
    p.add_argument("--out", default=None, help="sweep directory (default runs/miniature/<size>-<hash>)")
    p.add_argument("--steps", type=int, default=None,
                   help="train every run this many steps, with a checkpoint every third of them, instead of the "
                        "recipe's (full: 180, every 60); another recipe, so another hash and new runs")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; start none")
    args = p.parse_args(argv)
    if args.steps is not None:
        try:
            set_steps(args.size, args.steps)
        except ValueError as e:
            p.error(str(e))
    import torch
    torch.set_num_threads(1)
    t0 = time.time()
    cache = args.cache or cache_root()
    model_dir, gates = backbone(args.size, cache, progress=not args.no_progress)
    print(f"backbone {model_dir}: probe {gates['probe']['accuracy']:.3f} (chance {gates['probe']['chance']:.3f}), "
          f"held-out-story loss {gates['story']['model_nats']:.3f} vs unigram {gates['story']['unigram_nats']:.3f}")
    if gates["probe"]["accuracy"] < 0.8 or gates["story"]["model_nats"] > 0.8 * gates["story"]["unigram_nats"]:
        print("gate: the backbone misses the gate (probe >= 0.8, story loss clearly below unigram); see README")
    if args.stage == "pretrain":
        return 0
    mix, ceil, checks = build_data(args.size, cache, model_dir)
    from . import checks as checks_mod
    bad = checks_mod.passes(checks)
    print(f"tasks {mix}; no-shortcut checks: " + ("all within 5 points of chance" if not bad else f"FAILED {bad}"))
    if args.stage == "data":
        return 0
    from . import sweep
    root = args.out or os.path.join(ROOT, "runs", "miniature", f"{args.size}-{config.sweep_hash(args.size)}")
    sw = sweep.Sweep(args.size, model_dir, mix, ceil, root, workers=args.workers)
    state_path = os.path.join(root, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {"wall_seconds": 0.0}
    if not args.report_only:
        state.setdefault("started", time.time())
        state.pop("finished", None)
        os.makedirs(root, exist_ok=True)
        with open(state_path, "w") as f:
            json.dump(state, f, indent=1)
    if args.report_only:
        results = sw.collect()
        if not results:  # an empty report would replace the one written by the runs
            raise FileNotFoundError(f"no sweep under {root}; run `python -m miniature` first, or give its "
                                    "directory with --out")
        lrs = sw.chosen_lrs(results)
        pilot_lr = config.settings(args.size)["sweep"]["pilot_lr"]
        pilot = [r for r in results if r.get("stage") == "main" and r.get("seed") == 0 and "dev" in r and
                 r["lr"] == pilot_lr.get(config.METHODS[r["name"]]["family"])]
        return write_report(args, sw, results, sw.read_untuned(), checks, gates, pilot, lrs, state, model_dir, root)
    try:
        ran = run_sweep(args, sw, checks)
    finally:
        sw.close()  # the smoke size's worker processes
    if ran is None:  # --stage pilot
        return 0
    untuned, pilot = ran
    state["wall_seconds"] += time.time() - t0
    state["finished"] = time.time()
    results = sw.collect()
    state["lrs"] = sw.chosen_lrs(results)
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)
    return write_report(args, sw, results, untuned, checks, gates, pilot, state["lrs"], state, model_dir, root)


def run_sweep(args, sw, checks):
    """The untuned backbone, the pilot and (unless --stage pilot) the learning rates, every method and seed, the
    ceiling; returns (untuned, pilot), or None after the pilot stage."""
    untuned = sw.untuned()
    print(f"untuned backbone: held-in val {untuned['val']:.1f}, dev {untuned['dev']['average']:.1f}, "
          f"test {untuned['test']['average']:.1f}")
    pilot = sw.pilot()
    chance = 100 * sum(c["chance"] for c in checks.values()) / len(checks)
    devs = [r["dev"]["average"] for r in pilot if r and "dev" in r]
    for r in pilot:
        if r and "dev" in r:
            print(f"pilot {r['name']}: held-in val {r['val']:.1f}, dev {r['dev']['average']:.1f} (chance {chance:.1f})")
    if devs and max(devs) - chance < 3:
        print("pilot gate: both pilot runs sit within 3 points of chance on the dev split; the world, corpus or "
              "mixture may be revised (log it in miniature/README.md), or the sweep run anyway after two failures")
    if args.stage == "pilot":
        return None
    lrs = sw.learning_rates()
    print(f"learning rates (held-in validation): {lrs}")
    seeds = config.settings(args.size)["sweep"]["seeds"]
    sw.main_runs(lrs, seeds[:1])  # seed 0 of every method, then the ceiling, then the other seeds
    sw.ceiling(lrs)
    sw.main_runs(lrs, seeds[1:])
    return untuned, pilot


def write_report(args, sw, results, untuned, checks, gates, pilot, lrs, state, model_dir, root):
    from . import report
    for r in results:
        fam = config.METHODS.get(r.get("name"), {}).get("family")
        r["chosen"] = r.get("stage") == "main" and lrs.get(fam) == r.get("lr")
    chance = 100 * sum(c["chance"] for c in checks.values()) / len(checks)
    done = "finished" in state
    wall = (state["finished"] if done else time.time()) - state.get("started", time.time())
    runs_wall = sum(r.get("wall_seconds", 0.0) for r in results)
    meta = {"machine": machine(), "threads": 1, "date": datetime.date.today().isoformat(),
            "wall": f"{datetime.timedelta(seconds=int(wall))} from the sweep's start"
                    f"{'' if done else ' (still running)'}"
                    f" ({datetime.timedelta(seconds=int(runs_wall))} of run time over {len(results)} runs, "
                    f"{args.workers} at a time)", "hash": sw.hash,
            "backbone": os.path.basename(os.path.dirname(model_dir)),
            "command": "python -m miniature" + ("" if args.size == "full" else f" --size {args.size}")
                       + ("" if args.steps is None else f" --steps {args.steps}")}
    here = os.path.dirname(os.path.abspath(__file__))
    md, png = ((os.path.join(here, "RESULTS.md"), os.path.join(here, "results.png"))
               if args.size == "full" and args.steps is None  # the frozen experiment; any other into its folder
               else (os.path.join(root, "RESULTS.md"), os.path.join(root, "results.png")))
    report.write(md, png, results, untuned, checks, gates, pilot, lrs, meta, chance)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    from runner import cli  # (the project root is on sys.path: .project)
    sys.exit(cli.run(main))  # errors a user can fix (OSError, ValueError) as one `error:` line
