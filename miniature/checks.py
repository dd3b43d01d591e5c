"""No-shortcut checks on the held-out sets: labels balanced, one-field and word-overlap baselines at chance.

Answers the question every NLI benchmark met after the fact (hypothesis-only baselines, Poliak et al. 2018;
Gururangan et al. 2018): can a held-out set be passed without doing the task? Before any method runs:
  - label balance: each label's share per dataset;
  - one-field baseline: a classifier that sees one field only (the hypothesis for NLI, the candidate for WSC, the
    second sentence for WiC; the answer text alone for choice tasks: WinoGrande, COPA, HellaSwag), trained and
    tested by 2-fold cross-validation on the set itself (naive Bayes over words and word pairs; for choices, how
    often each answer text was right in the other fold);
  - word-overlap baseline: the share of a field's words found in the context, its best threshold learnt in the
    other fold (label tasks), or the choice sharing most words with the context (choice tasks).
Each result is an accuracy beside its chance level; `passes` asks for all within `tolerance` points of chance.
"""
import math
import random
import re
from collections import Counter, defaultdict

from . import tasks, templates

ONE_FIELD = {"rte": "hyp", "cb": "hyp", "anli": "hyp", "wsc": "cand", "wic": "s2"}
CONTEXT = {"rte": ("premise", "hyp"), "cb": ("premise", "hyp"), "anli": ("premise", "hyp"), "wsc": ("passage", "cand"),
           "wic": ("s1", "s2"), "winogrande": "sentence", "copa": "premise", "hellaswag": "context"}


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def feats(text):
    ws = words(text)
    return ws + [a + "_" + b for a, b in zip(ws, ws[1:])]


def _folds(items, rng):
    """Two folds that keep each symmetric group (tasks.held_out_group) whole: a baseline never learns from an
    example's mirror image (which would make it score below chance, not at it)."""
    groups = sorted({f["_group"] for _, _, _, f in items})
    rng.shuffle(groups)
    first = set(groups[:len(groups) // 2])
    a = [i for i, it in enumerate(items) if it[3]["_group"] in first]
    b = [i for i, it in enumerate(items) if it[3]["_group"] not in first]
    return [(a, b), (b, a)]


def _nb(train, test, labels):
    counts, prior, vocab = defaultdict(Counter), Counter(), set()
    for f, y in train:
        counts[y].update(f)
        prior[y] += 1
        vocab.update(f)
    total = {y: sum(c.values()) for y, c in counts.items()}
    right = 0
    for f, y in test:
        best = max(labels, key=lambda c: math.log(prior[c] + 1) + sum(
            math.log((counts[c][w] + 1) / (total.get(c, 0) + len(vocab) + 1)) for w in f))
        right += best == y
    return right


def one_field(dataset, items, rng):
    right = 0
    if dataset in ONE_FIELD:
        labels = sorted({y for _, _, y, _ in items})
        data = [(feats(f[ONE_FIELD[dataset]]), y) for _, _, y, f in items]
        for tr, te in _folds(items, rng):
            right += _nb([data[i] for i in tr], [data[i] for i in te], labels)
    else:  # answer text alone: how often each choice string was right vs wrong in the other fold
        for tr, te in _folds(items, rng):
            good, seen = Counter(), Counter()
            for i in tr:
                _, ch, y, _ = items[i]
                for k, c in enumerate(ch):
                    seen[c] += 1
                    good[c] += k == y
            for i in te:
                _, ch, y, _ = items[i]
                scores = [(good[c] + 1) / (seen[c] + 2) for c in ch]
                right += max(range(len(ch)), key=lambda k: (scores[k], rng.random())) == y
    return right / len(items)


def overlap(dataset, items, rng):
    ctx = CONTEXT[dataset]
    right = 0
    if isinstance(ctx, tuple):
        def ratio(f):
            a, b = set(words(f[ctx[0]])), words(f[ctx[1]])
            return round(sum(w in a for w in b) / max(len(b), 1), 2)
        data = [(ratio(f), y) for _, _, y, f in items]
        labels = sorted({y for _, y in data})
        for tr, te in _folds(items, rng):
            by = defaultdict(Counter)  # per overlap value, the most frequent label in the other fold
            for i in tr:
                by[data[i][0]][data[i][1]] += 1
            overall = Counter(data[i][1] for i in tr)
            for i in te:
                c = by.get(data[i][0]) or overall
                top = max(c.values())
                guess = rng.choice([lab for lab in labels if c[lab] == top])
                right += guess == data[i][1]
    else:
        for _, ch, y, f in items:
            a = set(words(f[ctx]))
            sc = [sum(w in a for w in words(c)) / max(len(words(c)), 1) for c in ch]
            top = max(sc)
            right += rng.choice([k for k, s in enumerate(sc) if s == top]) == y
    return right / len(items)


def run(world, n=600, seed=0, split="eval"):
    """{dataset: {chance, label_shares, one_field, overlap}} over `n` items of each held-out dataset (all templates)."""
    rng = random.Random(seed)
    out = {}
    for dataset, temps in templates.HELD_OUT.items():
        items = []
        for j, (name, _, _) in enumerate(temps):
            items += [(x, ch, y, {**f, "_group": (j, f["_group"])})
                      for x, ch, y, f in tasks.held_out_items(dataset, name, world, split, n // len(temps), rng)]
        k = len(items[0][1])
        shares = Counter(y for _, _, y, _ in items)
        out[dataset] = {"chance": 1 / k, "items": len(items),
                        "label_shares": {str(y): shares[y] / len(items) for y in sorted(shares)},
                        "one_field": one_field(dataset, items, random.Random(seed + 1)),
                        "overlap": overlap(dataset, items, random.Random(seed + 2))}
    return out


def passes(results, tolerance=0.05):
    """[(dataset, what, value, chance)] of every check farther than `tolerance` from chance (empty: all pass)."""
    bad = []
    for d, r in results.items():
        for what in ("one_field", "overlap"):
            if abs(r[what] - r["chance"]) > tolerance:
                bad.append((d, what, r[what], r["chance"]))
        for y, s in r["label_shares"].items():
            if abs(s - r["chance"]) > tolerance:
                bad.append((d, f"label {y} share", s, r["chance"]))
    return bad
