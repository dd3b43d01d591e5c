"""The verdict: per-method tables with 95% intervals over seeds, accuracy against parameters, routing specialisation,
and each of the paper's claims as a paired difference with one word: holds, reversed, or not resolved.

Mirrors Table 1 (average held-out accuracy, median over templates), the ablations of section 5 (top-k, sentence
routing, number of experts) and Figure 5 (which experts each held-out task uses) of Zadouri et al. 2023, beside the
paper's own T5-3B numbers. Intervals: mean over seeds +- t(0.975, n-1) * sd / sqrt(n); a claim "A beats B" holds
when the paired (same seed) difference's interval lies above 0, is reversed when it lies below, else not resolved;
"A approaches B" holds when the interval lies above -APPROACH points and B itself beats the untuned backbone (else
approaching B says nothing: not resolved). Routing specialisation: the mean total-
variation distance between each held-out dataset's mean routing (last decoder FFN) and the overall mean, against
the same statistic with templates shuffled between datasets (a permutation test).
"""
import math
import os
import random
import statistics

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
APPROACH = 2.0
PAPER = {"full": 60.06, "ia3": 52.90, "lora-r4": 57.51, "mov-10": 59.93, "mov-30": 60.61, "molora-10": 60.79,
         "mov-10-top2": 57.45, "mov-10-top1": 54.92}
PAPER_NOTE = {"molora-10": "MoLORA-15", "mov-10-sentence": "0.94-8.86 below token routing"}
CLAIMS = [  # (claim, A, B, kind, the paper's numbers)
    ("MoV-10 beats (IA)3", "mov-10", "ia3", "beats", "59.93 vs 52.90"),
    ("MoV-30 beats (IA)3", "mov-30", "ia3", "beats", "60.61 vs 52.90"),
    ("MoV-30 approaches full fine-tuning", "mov-30", "full", "approaches", "60.61 vs 60.06"),
    ("MoLORA beats LoRA", "molora-10", "lora-r4", "beats", "60.79 (MoLORA-15) vs 57.51"),
    ("soft merging beats top-2", "mov-10", "mov-10-top2", "beats", "59.93 vs 57.45"),
    ("top-2 beats top-1", "mov-10-top2", "mov-10-top1", "beats", "57.45 vs 54.92"),
    ("token routing beats sentence routing", "mov-10", "mov-10-sentence", "beats", "0.94 to 8.86 points"),
    ("more experts help (MoV-30 vs MoV-10)", "mov-30", "mov-10", "beats", "60.61 vs 59.93"),
    ("a mixture beats the same parameters spent densely (MoV-30 vs LoRA at matched size)", "mov-30", "lora-matched",
     "beats", "not in the paper"),
    ("tuning beats the untuned backbone (MoV-10)", "mov-10", "untuned", "beats", "implied"),
    ("parameter-efficient approaches full fine-tuning (MoV-10)", "mov-10", "full", "approaches", "59.93 vs 60.06"),
]


def interval(values):
    n = len(values)
    if n == 0:
        return None
    m = statistics.fmean(values)
    if n == 1:
        return m, None
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return m, half


def fmt(iv, digits=1):
    if iv is None:
        return "-"
    m, h = iv
    return f"{m:.{digits}f}" if h is None else f"{m:.{digits}f} ± {h:.{digits}f}"


def verdict(iv, kind):
    if iv is None or iv[1] is None:
        return "not resolved"
    lo, hi = iv[0] - iv[1], iv[0] + iv[1]
    bar = -APPROACH if kind == "approaches" else 0.0
    return "holds" if lo > bar else "reversed" if hi < bar else "not resolved"


def by_method(results):
    """{method: {seed: result}} of the main stage at each family's chosen learning rate."""
    out = {}
    for r in results:
        if r.get("stage") == "main" and "test" in r and r.get("chosen"):
            out.setdefault(r["name"], {})[r["seed"]] = r
    return out


def specialisation(routing, perms=2000, seed=0):
    """(statistic, permutation p-value) for {dataset: {template: [E probs]}}."""
    rows = [(d, p) for d, ts in routing.items() for p in ts.values()]
    if len({d for d, _ in rows}) < 2:
        return None

    def stat(labels):
        groups = {}
        for lab, (_, p) in zip(labels, rows):
            groups.setdefault(lab, []).append(p)
        means = {d: [statistics.fmean(c) for c in zip(*ps)] for d, ps in groups.items()}
        grand = [statistics.fmean(c) for c in zip(*means.values())]
        return statistics.fmean(0.5 * sum(abs(a - b) for a, b in zip(m, grand)) for m in means.values())
    labels = [d for d, _ in rows]
    s0 = stat(labels)
    rng, ge = random.Random(seed), 0
    for _ in range(perms):
        shuffled = labels[:]
        rng.shuffle(shuffled)
        ge += stat(shuffled) >= s0
    return s0, (1 + ge) / (1 + perms)


def write(out_md, out_png, results, untuned, checks, gates, pilot, lrs, meta, chance):
    """RESULTS.md and results.png from the sweep's results (partial results give a partial report)."""
    methods = by_method(results)
    from . import config, templates
    order = [m for m in config.METHODS if m in methods]
    datasets = list(templates.HELD_OUT)
    L = [f"# The paper in miniature: results", "",
         f"Machine: {meta.get('machine')}; {meta.get('threads')} thread per run, float32; date {meta.get('date')}; "
         f"sweep wall time {meta.get('wall')}. Reproduce: `{meta.get('command')}`. Sweep hash "
         f"`{meta.get('hash')}` (world, tasks, recipes, methods, grids and the source that makes them); backbone "
         f"`{meta.get('backbone')}`.", ""]
    L += ["## Backbone (before any method is tuned)", "",
          f"{gates['params']:,} parameters, {gates['steps']} steps. Knowledge probe: **{gates['probe']['accuracy']:.3f}**"
          f" ({gates['probe']['items']} cloze facts, chance {gates['probe']['chance']:.3f}; by relation "
          + ", ".join(f"{k} {v:.2f}" for k, v in gates["probe"]["by_relation"].items()) + "). Held-out-story loss "
          f"**{gates['story']['model_nats']:.3f}** nats/token against a unigram model's "
          f"{gates['story']['unigram_nats']:.3f}.", ""]
    if checks:
        L += ["## No-shortcut checks (held-out sets, before any method runs)", "",
              "| dataset | chance | label shares | one-field baseline | word-overlap baseline |", "|---|---|---|---|---|"]
        for d, r in checks.items():
            L.append(f"| {d} | {r['chance']:.3f} | {', '.join(f'{v:.2f}' for v in r['label_shares'].values())} | "
                     f"{r['one_field']:.3f} | {r['overlap']:.3f} |")
        L.append("")
    if pilot:
        L += ["## Pilot (held-out dev split, seed 0)", "", "| run | held-in val | dev average | " +
              " | ".join(datasets) + " |", "|---|---|---|" + "---|" * len(datasets)]
        for r in pilot:
            if r and "dev" in r:
                L.append(f"| {r['name']} lr {r['lr']:g} | {r['val']:.1f} | {r['dev']['average']:.1f} | " + " | ".join(
                    f"{r['dev']['columns'].get('dev_' + d, float('nan')):.1f}" for d in datasets) + " |")
        if untuned and "dev" in untuned:
            L.append(f"| untuned backbone | {untuned['val']:.1f} | {untuned['dev']['average']:.1f} | " + " | ".join(
                f"{untuned['dev']['columns'].get('dev_' + d, float('nan')):.1f}" for d in datasets) + " |")
        L.append("")
    if lrs:
        L += ["Learning rates chosen on held-in validation (seed 0): " +
              ", ".join(f"{f} {lr:g}" for f, lr in lrs.items()) + ".", ""]
    # main table
    L += ["## Held-out (zero-shot) and held-in accuracy per method", "",
          f"Held-out: mean over the 8 held-out datasets of the median over 3 templates (chance {chance:.1f}); "
          "held-in: held-in validation (trained task types, unseen entities). Mean ± 95% interval over seeds.", "",
          "| method | trainable | seeds | held-out avg | held-in val | paper (T5-3B) | " + " | ".join(
              templates.MIRRORS[d] for d in datasets) + " |", "|---|---|---|---|---|---|" + "---|" * len(datasets)]
    rows = {}
    for m in order:
        runs = methods[m]
        test = [r["test"]["average"] for r in runs.values()]
        val = [r["val"] for r in runs.values()]
        cols = {d: interval([r["test"]["columns"].get("m_" + d) for r in runs.values()]) for d in datasets}
        rows[m] = (interval(test), next(iter(runs.values()))["spec"]["params"])
        paper = PAPER.get(m)
        L.append(f"| {m} | {rows[m][1]:,} | {len(runs)} | {fmt(interval(test))} | {fmt(interval(val))} | "
                 f"{'' if paper is None else f'{paper:.2f}'}{' (' + PAPER_NOTE[m] + ')' if m in PAPER_NOTE else ''} | "
                 + " | ".join(fmt(cols[d]) for d in datasets) + " |")
    if untuned:
        L.append(f"| untuned backbone | 0 | - | {untuned['test']['average']:.1f} | {untuned['val']:.1f} | | " +
                 " | ".join(f"{untuned['test']['columns'].get('m_' + d, float('nan')):.1f}" for d in datasets) + " |")
    ceil = [r for r in results if r.get("stage") == "ceiling" and "test" in r]
    if ceil:
        L.append(f"| ceiling ({ceil[0]['name']} trained on the held-out types too) | {ceil[0]['spec']['params']:,} | "
                 f"{len(ceil)} | {fmt(interval([r['test']['average'] for r in ceil]))} | "
                 f"{fmt(interval([r['val'] for r in ceil]))} | | " + " | ".join(
                     fmt(interval([r["test"]["columns"].get("m_" + d) for r in ceil])) for d in datasets) + " |")
    L.append(f"| chance | | | {chance:.1f} | | | |")
    L.append("")
    # claims
    L += ["## The paper's claims", "",
          f"Paired difference A - B over the seeds both have (points of held-out average), 95% interval; "
          f"\"approaches\" holds when the interval lies above -{APPROACH:g} and the method approached itself beats the "
          "untuned backbone.", "",
          "| claim | A - B | seeds | verdict | paper (T5-3B) |", "|---|---|---|---|---|"]
    for claim, a, b, kind, paper in CLAIMS:
        if a not in methods or (b not in methods and b != "untuned"):
            L.append(f"| {claim} | - | 0 | not resolved (not run yet) | {paper} |")
            continue
        seeds = sorted(set(methods[a]) & (set(methods[b]) if b != "untuned" else set(methods[a])))
        diffs = [methods[a][s]["test"]["average"] - (untuned["test"]["average"] if b == "untuned"
                                                     else methods[b][s]["test"]["average"]) for s in seeds]
        iv = interval(diffs)
        word = verdict(iv, kind)
        if kind == "approaches" and word == "holds" and b != "untuned":  # approaching what does not transfer: vacuous
            ref = interval([methods[b][s]["test"]["average"] - untuned["test"]["average"] for s in sorted(methods[b])])
            if verdict(ref, "beats") != "holds":
                word = f"not resolved ({b} itself does not beat the untuned backbone)"
        L.append(f"| {claim} | {fmt(iv)} | {len(seeds)} | **{word}** | {paper} |")
    # routing: the paper's Figure 5 claim, as a row of the claims table
    ps = [specialisation(per) for r in methods.get("mov-10", {}).values() for per in (r.get("routing") or {}).values()]
    ps = [p for p in ps if p]
    if ps:
        word = ("holds" if len(ps) >= 2 and all(p < 0.05 for _, p in ps) else
                "reversed" if len(ps) >= 2 and all(p > 0.5 for _, p in ps) else "not resolved")
        L.append(f"| experts specialise by task (MoV-10, routing at the last decoder FFN, permutation test) | "
                 f"p = {', '.join(f'{p:.3f}' for _, p in ps)} | {len(ps)} | **{word}** | Figure 5 (qualitative) |")
    # routing
    spec_rows = []
    for m in order:
        for seed, r in sorted(methods[m].items()):
            for site, per in (r.get("routing") or {}).items():
                sp = specialisation(per)
                if sp:
                    spec_rows.append((m, seed, site, sp))
    if spec_rows:
        L += ["", "## Routing specialisation per held-out task (the paper's Figure 5)", "",
              "Mean total-variation distance between each held-out dataset's mean routing and the overall mean "
              "(last decoder FFN), and the permutation p-value (templates shuffled between datasets). Templates of one "
              "dataset share their wording and entities, so part of the separation comes from the inputs themselves "
              "(a router reads the activation it rescales): compare the statistic across methods and seeds, not p "
              "alone.", "",
              "| method | seed | statistic | p |", "|---|---|---|---|"]
        for m, seed, site, (s0, p) in spec_rows:
            L.append(f"| {m} | {seed} | {s0:.4f} | {p:.4f} |")
    fails = [r for r in results if r.get("error")]
    L += ["", f"Runs reported: {len(results)}" + (f"; failed: {len(fails)}" if fails else "") + ". Every run's "
          "result.json (validation curve, chosen step, per-template test accuracy, command) is under the sweep "
          "directory."]
    with open(out_md + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(out_md + ".tmp", out_md)
    _plot(out_png, rows, methods, untuned, chance, ceil)


def _plot(path, rows, methods, untuned, chance, ceil):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    for m, (iv, params) in rows.items():
        if iv is None:
            continue
        ax.errorbar([max(params, 1)], [iv[0]], yerr=[[iv[1] or 0]], fmt="o", capsize=3)
        ax.annotate(m, (max(params, 1), iv[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(chance, color="grey", ls=":", label="chance")
    if untuned:
        ax.axhline(untuned["test"]["average"], color="black", ls="--", label="untuned backbone")
    if ceil:
        ax.axhline(statistics.fmean(r["test"]["average"] for r in ceil), color="green", ls="-.", label="ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out average accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("accuracy against trainable parameters (mean ± 95% over seeds)")
    ax = axes[1]
    r = next((methods["mov-10"][s] for s in sorted(methods.get("mov-10", {})) if methods["mov-10"][s].get("routing")),
             None)
    if r:
        site, per = next(iter(r["routing"].items()))
        names = list(per)
        mat = [[statistics.fmean(c) for c in zip(*per[d].values())] for d in names]
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)), [n.replace("m_", "") for n in names])
        ax.set_xlabel("expert")
        ax.set_title(f"MoV-10 seed {r['seed']}: mean routing per held-out task", fontsize=9)
        fig.colorbar(im, ax=ax)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
