"""The quick start's table with what to read it against: the demo run over several seeds, chance, the majority
answer of each template and the untrained backbone, on the same held-out examples.

`python train.py --experts 30 --preset demo` ends with one row of accuracies; whether that row shows learning depends
on what the same tasks give without it. For each held-out template (the demo's `*_score_eval` configs, the first
--max-examples examples, as the demo evaluates them) this tool computes:
  - chance: the mean over its examples of 1 / (number of choices);
  - majority answer: the accuracy of always picking the answer that is most often correct in the template, by its
    text or by its position, whichever scores more (a model that learned only the answer prior scores this);
  - untrained backbone: `evaluate.py --model tiny --seed S` (the random backbone the run of seed S adapts);
  - the demo itself, `train.py --preset demo --experts 30 --seed S` for each seed (or the runs already under --out).
Each row is a dataset's median over templates, as the paper's table (runner/report.py), and the average.

    python -m tools.demo_table --seeds 0,1,2          # about 3 minutes per seed on two CPU cores
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

import data
from runner import report
from sources import demo
from sources.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baselines(max_examples):
    """{row: {dataset: {template: accuracy %}}} for chance and the majority answer."""
    sets = data.load_eval("demo", max_examples=max_examples)
    tok = Tokenizer(os.path.join(demo.demo_dir(), "spiece.model"))
    rows = {"chance": {}, "majority answer": {}}
    for dataset, templates in sets.items():
        for template, items in templates.items():
            chance = statistics.mean(1 / len(it["choices"]) for it in items)
            rows["chance"].setdefault(dataset, {})[template] = 100 * chance
            texts = [[tok.decode(c) for c in it["choices"]] for it in items]
            labelled = [(t, it["label"]) for t, it in zip(texts, items) if it["label"] is not None]
            text = collections.Counter(t[label] for t, label in labelled).most_common(1)[0][0]
            position = collections.Counter(label for _, label in labelled).most_common(1)[0][0]
            by_text = sum(text in t and t.index(text) == label for t, label in labelled)
            by_position = sum(label == position for _, label in labelled)
            rows["majority answer"].setdefault(dataset, {})[template] = 100 * max(by_text, by_position) / len(items)
    return rows


def run(argv):
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the demo runs")
    p.add_argument("--max-examples", type=int, default=40, help="examples per template (the demo's 40)")
    p.add_argument("--out", default=os.path.join("runs", "demo-table"), help="where the runs go (reused if there)")
    args = p.parse_args(argv)
    rows = baselines(args.max_examples)
    name = f"eval-max{args.max_examples}.json"
    seeds = args.seeds.split(",")
    runs = [(f"untrained backbone, seed {s}", os.path.join(args.out, f"untrained-seed-{s}"), "untrained", s)
            for s in seeds] + [(f"mov-30, seed {s}", os.path.join(args.out, f"seed-{s}"), "mov-30", s) for s in seeds]
    for label, path, kind, seed in runs:
        if not os.path.exists(os.path.join(path, name)):
            if kind == "untrained":  # --seed also draws the random backbone: the one seed S's run adapts
                run(["evaluate.py", "--model", "tiny", "--seed", seed, "--data", "demo", "--max-examples",
                     str(args.max_examples), "--device", "cpu", "--dtype", "float32", "--out", path])
            else:
                run(["train.py", "--experts", "30", "--preset", "demo", "--seed", seed, "--eval-max-examples",
                     str(args.max_examples), "--out", path])
        with open(os.path.join(path, name)) as f:
            rows[label] = {d: {t: r["accuracy"] for t, r in ts.items()} for d, ts in json.load(f)["tasks"].items()}
    keys = report.ordered(next(iter(rows.values())))
    print("| | " + " | ".join(report.COLUMN_NAMES.get(k, k) for k in keys) + " | Avg |")
    print("|---" * (len(keys) + 2) + "|")
    averages = []
    for label, accuracy in rows.items():
        summary = report.summarize(accuracy)
        averages.append(summary["average"]) if label.startswith("mov-30") else None
        print(f"| {label} | " + " | ".join(f"{summary['columns'][k]:.2f}" for k in keys) +
              f" | {summary['average']:.2f} |")
    if len(averages) > 1:
        print(f"\nmov-30 average over {len(averages)} seeds: {statistics.mean(averages):.2f} "
              f"(sd {statistics.stdev(averages):.2f}, range {min(averages):.2f}-{max(averages):.2f})")


if __name__ == "__main__":
    main()
