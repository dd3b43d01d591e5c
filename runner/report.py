"""The paper's table from per-template accuracies: medians over templates, ANLI, the 8-dataset average, files.

Zadouri et al. 2023 (arXiv 2309.05444) report, in Table 1, each held-out dataset's accuracy as the median over its
prompt templates, as T0 does (Sanh et al. 2021, section 6), ANLI R1-R3 as one column (their mean), and the average
over the eight datasets ANLI, CB, RTE, WSC, WiC, COPA, WinoGrande, HellaSwag. The original code (T5X's
`t5x.eval`, for-ai/parameter-efficient-moe `scripts/*_eval.sh`) writes per-task accuracy only: the median and the
average are post-processing, done here.

    results = report.summarize({"rte": {"template_a": 61.0, "template_b": 58.5}, ...})
    print(report.format_table(results, compare="paper"))
    report.write_outputs(results, "runs/mov-30")          # eval.json, eval.md
"""
import csv
import io
import json
import os
import statistics

import numpy as np

from runner import rundir
from sources.demo import DEMO_EVAL_DATASETS

# The paper's held-out datasets, Table 1's columns in its order, by their T0 evaluation keys (data.load_eval's):
# ANLI's three rounds are averaged into one column before the average over the eight datasets.
HELD_OUT = {"anli_r1": "ANLI R1", "anli_r2": "ANLI R2", "anli_r3": "ANLI R3", "cb": "CB", "rte": "RTE",
            "wsc": "WSC", "wic": "WiC", "copa": "COPA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag"}
ANLI_ROUNDS = ("anli_r1", "anli_r2", "anli_r3")
PAPER_DATASETS = ("anli",) + tuple(k for k in HELD_OUT if k not in ANLI_ROUNDS)  # the eight averaged columns
COLUMN_NAMES = {**HELD_OUT, "anli": "ANLI", **dict(DEMO_EVAL_DATASETS)}
# Table 1 of the paper (T5-3B, median accuracy over templates), averages only: the per-dataset cells were not
# available to us first-hand, so they are not reproduced.
PAPER_AVERAGES = {"T0-3B": 60.06, "(IA)3": 52.90, "LoRA r4": 57.51, "MoV-10": 59.93, "MoV-30": 60.61,
                  "MoLORA-15": 60.79}


def summarize(task_accuracy):
    """Per-dataset medians over templates, ANLI, and the average, from {dataset: {template: accuracy %}}.

    Returns {"datasets": {dataset: median}, "columns": {column: value}, "average": mean of the columns,
    "average_over": [columns]}. Columns are ANLI (the mean of whichever rounds are present) and every other
    dataset; when all of P3's keys are present the average is the paper's 8-dataset average.
    """
    datasets = {}
    for name, templates in task_accuracy.items():
        if not templates:
            raise ValueError(f"dataset {name!r} has no templates; remove it or give it at least one")
        datasets[name] = float(statistics.median(templates.values()))
    columns = {}
    rounds = [datasets[r] for r in ANLI_ROUNDS if r in datasets]
    if rounds:
        columns["anli"] = float(np.mean(rounds))
    columns.update({k: v for k, v in datasets.items() if k not in ANLI_ROUNDS})
    average = float(np.mean(list(columns.values())))
    return {"datasets": datasets, "columns": columns, "average": average, "average_over": list(columns)}


def ordered(keys):
    """Table 1's column order for the paper's datasets (then the demo's), then any others sorted."""
    order = ANLI_ROUNDS + PAPER_DATASETS + tuple(k for k, _ in DEMO_EVAL_DATASETS)
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def paper_row(meta):
    """The Table 1 row of the same method (from meta: method, experts, rank), or None."""
    method, experts, rank = meta.get("method"), meta.get("experts"), meta.get("rank")
    name = {"full": "T0-3B", "ia3": "(IA)3", "lora": f"LoRA r{rank}", "mov": f"MoV-{experts}",
            "molora": f"MoLORA-{experts}"}.get(method)
    return name if name in PAPER_AVERAGES else None


def format_table(results, compare=None):
    """A Markdown table of `results` (from evaluate): one row for us, and with compare="paper" the Table 1 row of
    the same method (every Table 1 row when the method has none), or compare=<row name> that row."""
    if compare not in (None, "paper") and compare not in PAPER_AVERAGES:
        raise ValueError(f"compare must be None, 'paper' or one of {list(PAPER_AVERAGES)}, got {compare!r}")
    keys = ordered(set(results["datasets"]) | set(results["columns"]))
    head = [COLUMN_NAMES.get(k, k) for k in keys] + ["Avg"]
    values = {**results["datasets"], **results["columns"]}
    label = results.get("meta", {}).get("label", "ours")
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
             f"| {label} | " + " | ".join(f"{values[k]:.2f}" for k in keys) + f" | {results['average']:.2f} |"]
    notes = []
    if compare is not None:
        rows = [compare] if compare != "paper" else [paper_row(results.get("meta", {}))]
        rows = list(PAPER_AVERAGES) if rows == [None] else rows
        for row in rows:
            lines.append(f"| paper: {row} | " + " | ".join("-" for _ in keys) + f" | {PAPER_AVERAGES[row]:.2f} |")
        notes.append("Paper rows: Table 1 of arXiv 2309.05444 (T5-3B), averages only; its per-dataset cells are "
                     "not reproduced.")
    missing = [k for k in PAPER_DATASETS if k not in results["columns"]]
    if missing and set(PAPER_DATASETS) & set(results["columns"]):
        notes.append(f"Average over {len(results['columns'])} columns; missing from the paper's eight: {missing}.")
    notes.append("Accuracy in %, median over templates" + ("; ANLI = mean of R1-R3" if "anli" in results["columns"]
                  else "") + f"; Avg = mean over {', '.join(COLUMN_NAMES.get(k, k) for k in results['average_over'])}.")
    return "\n".join(lines + [""] + notes)


def output_name(max_examples=None):
    """eval, or eval-max<N> for a quick run on N examples per template: it never overwrites a full evaluation."""
    return "eval" if max_examples is None else f"eval-max{max_examples}"


def write_outputs(results, out_dir, compare=None, name="eval"):
    """<name>.json (everything) and <name>.md (the table and per-template accuracies), each written atomically."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise rundir.write_error(e, out_dir) from e
    rundir.write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(results, indent=1) + "\n")
    lines = ["# Held-out evaluation (rank classification)", "", format_table(results, compare), "",
             "## Per template", "", "| dataset | template | examples | accuracy |", "|---|---|---|---|"]
    for dataset in ordered(results["tasks"]):
        for template, r in sorted(results["tasks"][dataset].items()):
            lines.append(f"| {dataset} | {template} | {r['examples']} | {r['accuracy']:.2f} |")
    no_correct = sum(r.get("no_correct", 0) for ts in results["tasks"].values() for r in ts.values())
    if no_correct:
        lines += ["", f"{no_correct} examples have no choice marked is_correct; each counts as wrong, as in T5's "
                  "`rank_classification` (t5/evaluation/metrics.py). Per template: `no_correct` in the JSON."]
    rundir.write_atomic(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")


def write_routing(results, out_dir):
    """routing.csv (site, dataset, template, tokens, expert_0..) with a template '*' row per dataset (token-weighted
    over its templates), and routing.png: one heatmap per site, datasets x experts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sites = list(results["routing"])
    per_dataset = {}
    f, writer = io.StringIO(newline=""), None  # the table in memory, then written atomically
    for site in sites:
        for dataset in ordered(results["routing"][site]):
            probs = results["routing"][site][dataset]
            tokens = results["routing_tokens"][site][dataset]
            if writer is None:
                num_experts = len(next(iter(probs.values())))
                writer = csv.writer(f)
                writer.writerow(["site", "dataset", "template", "tokens"] +
                                [f"expert_{e}" for e in range(num_experts)])
            for template in sorted(probs):
                writer.writerow([site, dataset, template, int(tokens[template])] +
                                [f"{p:.6f}" for p in probs[template]])
            weight = np.array([tokens[t] for t in probs])
            mean = (np.array([probs[t] for t in probs]) * weight[:, None]).sum(0) / max(weight.sum(), 1.0)
            per_dataset.setdefault(site, {})[dataset] = mean
            writer.writerow([site, dataset, "*", int(weight.sum())] + [f"{p:.6f}" for p in mean])
    rundir.write_atomic(os.path.join(out_dir, "routing.csv"), f.getvalue())
    num_experts = len(next(iter(per_dataset[sites[0]].values())))
    fig, axes = plt.subplots(len(sites), 1, squeeze=False,
                             figsize=(3.5 + 0.4 * num_experts, sum(1.2 + 0.3 * len(per_dataset[s]) for s in sites)))
    for ax, site in zip(axes[:, 0], sites):
        names = list(per_dataset[site])
        grid = np.stack([per_dataset[site][d] for d in names])  # [datasets, E]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(names)), [COLUMN_NAMES.get(d, d) for d in names])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(site, fontsize=8)
        fig.colorbar(image, ax=ax).set_label("mean routing prob.", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    rundir.write_atomic(os.path.join(out_dir, "routing.png"), png.getvalue())
    plt.close(fig)
