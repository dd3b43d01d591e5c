"""The paper in miniature (miniature/): world labels, the span-corruption mask, no-shortcut checks, the whole chain."""
import collections
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from miniature import checks, corpus, spans, tasks, templates
from miniature.world import ACTIONS, RESULTS, World

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world():
    return World(seed=0, per_kind=6, people=20)


# ----------------------------------------------------------------------------------------------- oracle
class Oracle:
    """Answers from the world's fact triples alone, by brute force: no task builder code is used."""

    def __init__(self, facts):
        self.facts = set((s, r, str(v)) for s, r, v in facts)

    def holds(self, s, r, v):
        return (s, r, v) in self.facts

    def subjects(self, r, v):
        return [s for s, rr, vv in self.facts if rr == r and vv == v]

    def value(self, s, r):
        vals = [v for ss, rr, v in self.facts if ss == s and rr == r]
        assert len(vals) == 1, (s, r, vals)
        return vals[0]


def _oracle_label(o, dataset, f, choices):
    past_to_action = {v: k for k, v in ACTIONS.items()}
    past_to_result = {v: k for k, v in RESULTS.items()}
    if dataset == "rte":
        m = re.fullmatch(r"(\w+) bought a (\w+) at the market\.", f["premise"])
        thing = m.group(2)
        h = re.fullmatch(r"\w+ bought (?:a|something) (\w+)\.", f["hyp"]).group(1)
        return 0 if o.holds(thing, "kind", h) or o.holds(thing, "color", h) else 1
    if dataset in ("cb", "anli"):
        got = dict(re.findall(r"(\w+) (?:bought a|took the) (\w+)", f["premise"]))
        name, v = re.fullmatch(r"(\w+) (?:bought a|took home something) (\w+)\.", f["hyp"]).groups()
        if name not in got:
            return 2
        return 0 if o.holds(got[name], "kind", v) or o.holds(got[name], "color", v) else 1
    if dataset in ("wsc", "winogrande"):
        text = f["passage"] if dataset == "wsc" else f["sentence"]
        a, b = re.match(r"(\w+) and (\w+) met", text).groups()
        for rel, pat in (("town", r"went home to (\w+)"), ("job", r"work as a (\w+)"), ("pet", r"pet (\w+)")):
            m = re.search(pat, text)
            if m:
                ref = [p for p in (a, b) if o.holds(p, rel, m.group(1))]
        assert len(ref) == 1
        if dataset == "wsc":
            return 0 if f["cand"] == ref[0] else 1
        return [f["a"], f["b"]].index(ref[0])
    if dataset == "copa":
        m = re.fullmatch(r"(\w+) (\w+) the (\w+)\.", f["premise"])
        if m and m.group(2) in past_to_action:  # effect: which result does this action bring
            _, act, thing = m.groups()
            res = o.value(thing, "when " + past_to_action[act])
            good = [i for i, c in enumerate(choices) if c == f"The {thing} {RESULTS[res]}."]
        else:  # cause: which action brings this result
            thing, res = re.fullmatch(r"The (\w+) (\w+)\.", f["premise"]).groups()
            acts = [a for a in ACTIONS if o.holds(thing, "when " + a, past_to_result[res])]
            good = [i for i, c in enumerate(choices) if re.fullmatch(rf"\w+ {ACTIONS[acts[0]]} the {thing}\.", c)]
        assert len(good) == 1
        return good[0]
    if dataset == "hellaswag":
        place, color, kind = re.search(r"went to the (\w+)\. There \w+ saw a (\w+) (\w+)\.", f["context"]).groups()
        fits = set(o.subjects("color", color)) & set(o.subjects("kind", kind)) & set(o.subjects("place", place))
        good = [i for i, c in enumerate(choices) if re.search(r"took the (\w+) home", c).group(1) in fits]
        assert len(good) == 1
        return good[0]
    if dataset == "wic":
        word = f["word"]

        def sense(sentence):
            ws = set(re.findall(r"[a-z]+", sentence.lower()))
            found = [r for s, r, v in o.facts if s == word and r.startswith("sense") and ws & set(v.split())]
            assert len(found) == 1, (sentence, found)
            return found[0]
        return 0 if sense(f["s1"]) == sense(f["s2"]) else 1
    raise ValueError(dataset)


@pytest.mark.parametrize("dataset", list(templates.HELD_OUT))
def test_held_out_labels_match_a_symbolic_oracle(world, dataset):
    """Every held-out label (all templates, both entity splits) equals what brute force over the world's facts
    gives, and the right choice is the one the label names."""
    o = Oracle(world.facts())
    rng = random.Random(3)
    for split in ("eval", "train"):
        for name, _, _ in templates.HELD_OUT[dataset]:
            for text, choices, label, fields in tasks.held_out_items(dataset, name, world, split, 60, rng):
                assert _oracle_label(o, dataset, fields, choices) == label, text


def test_held_out_sets_use_eval_entities_and_training_sets_train_entities(world):
    """Held-out items name only "eval" things and people, training examples only "train" ones (so adapters cannot
    pass a held-out set by memorising training entities)."""
    names = {n: t.split for n, t in world.things.items()} | {n: p.split for n, p in world.people.items()}

    def splits(text):  # "saw" is also a tool of the world: "she saw a ..." is the verb
        return {names[w] for w in re.findall(r"[A-Za-z]+", re.sub(r"\bsaw a\b", "", text)) if w in names}
    rng = random.Random(0)
    for dataset, temps in templates.HELD_OUT.items():
        for name, _, _ in temps:
            for text, choices, _, _ in tasks.held_out_items(dataset, name, world, "eval", 20, rng):
                assert splits(text + " ".join(choices)) <= {"eval"}, text
    for dataset, temps in templates.HELD_IN.items():
        for name, fmt, _ in temps:
            for _ in range(30):
                f, ans, _ = tasks.held_in_example(dataset, name, world, "train", rng)
                assert splits(tasks.fill(fmt, f) + " " + ans) <= {"train"}, (dataset, name, f)


def test_corpus_holds_no_prompt_format(world):
    """No pretraining document contains a task's prompt format (questions, options, answer words lists)."""
    stream = corpus.documents(world, 0)
    markers = ["?", "yes or no", "Question", "Options", "Answer", "Sentence 1", "true, false", "Summarize",
               "TL;DR", "Topic:", "Review:", "Statement:", "Premise", "_"]
    for _ in range(3000):
        doc = next(stream)
        assert not [m for m in markers if m in doc], doc


# ----------------------------------------------------------------------------------------------- span corruption
def _seqio_counts(length, density, mean_span):
    """seqio's random_spans_noise_mask counts, transcribed from its definition: num_noise_tokens =
    round(length * noise_density) clipped to [1, length - 1] (tf.round: halves to even), num_noise_spans =
    max(round(num_noise_tokens / mean_noise_span_length), 1)."""
    length = max(length, 2)
    noise = min(max(int(np.round(length * density)), 1), length - 1)
    return noise, max(int(np.round(noise / mean_span)), 1)


def _runs(mask):
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask)]


@pytest.mark.parametrize("length,density,mean_span", [(142, 0.15, 3.0), (568, 0.15, 3.0), (10, 0.25, 3.0),
                                                      (37, 0.3, 2.0), (5, 0.15, 3.0), (2, 0.5, 1.0)])
def test_noise_mask_follows_seqio_definition(length, density, mean_span):
    """Noise-token count, noise-span count (equal to the non-noise-span count), spans alternating and starting
    with non-noise, ending with noise: as seqio's random_spans_noise_mask defines them."""
    rng = np.random.default_rng(0)
    noise, n_spans = _seqio_counts(length, density, mean_span)
    for _ in range(200):
        mask = spans.random_spans_noise_mask(length, rng, density, mean_span)
        runs = _runs(mask)
        assert len(mask) == length and mask.sum() == noise
        assert runs[0][0] is False and runs[-1][0] is True
        assert sum(k for k, _ in runs) == n_spans and sum(not k for k, _ in runs) == n_spans
        assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))


def test_noise_mask_every_segmentation_equally_likely():
    """Length 12, density 0.5, mean span 2: 3 noise and 3 non-noise spans of 6 tokens each, 10 x 10 = 100 masks,
    all equally likely (seqio: "Subject to the above restrictions, all masks are equally likely")."""
    rng = np.random.default_rng(1)
    n = 30_000
    counts = collections.Counter(tuple(spans.random_spans_noise_mask(12, rng, 0.5, 2.0)) for _ in range(n))
    assert len(counts) == 100
    expected = n / 100
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 160  # 99 degrees of freedom: p < 1e-4 above 160


def test_span_corruption_sentinels_and_round_trip():
    """Inputs keep non-noise tokens with one sentinel per noise span, targets hold each span after its sentinel
    and end with EOS; sentinels count down from the top of the vocabulary (<extra_id_0> = vocab_size - 1), and
    the two interleave back into the original chunk."""
    rng = np.random.default_rng(2)
    tokens = list(range(10, 152))
    inputs, targets = spans.span_corruption(tokens, 1124, rng)
    assert targets[-1] == spans.EOS
    sent_in = [t for t in inputs if t >= 1024]
    sent_out = [t for t in targets if t >= 1024]
    assert sent_in == sent_out == list(range(1123, 1123 - len(sent_in), -1))
    pieces = {}
    cur = None
    for t in targets[:-1]:
        if t >= 1024:
            cur = t
            pieces[cur] = []
        else:
            pieces[cur].append(t)
    rebuilt = [x for t in inputs for x in (pieces[t] if t >= 1024 else [t])]
    assert rebuilt == tokens
    assert len(inputs) <= 128 and len(targets) <= 32  # raw_length(128) = 142 fits the pretraining shapes


# ----------------------------------------------------------------------------------------------- no shortcuts
def test_held_out_sets_have_no_shortcut(world):
    """Labels balanced, and a one-field baseline and a word-overlap baseline within 5 points of chance on every
    held-out dataset."""
    results = checks.run(world, n=1200)
    assert checks.passes(results, tolerance=0.05) == []


def test_shortcut_check_catches_a_shortcut(world):
    """The check can fail: a set whose hypothesis word gives the label away is flagged."""
    rng = random.Random(0)
    items = []
    for i in range(400):
        y = i % 2
        items.append(("x", ["yes", "no"], y, {"hyp": "alpha" if y else "beta", "premise": "p", "_group": i}))
    assert checks.one_field("rte", items, rng) > 0.9


# ----------------------------------------------------------------------------------------------- the chain
def test_steps_flag_checked_and_another_experiment(monkeypatch):
    """`--steps` not a positive multiple of 3 is one error line (status 2); a valid one changes the sweep's hash, so
    its runs never mix with the frozen experiment's, and leaves the backbone's (no new pretraining)."""
    p = subprocess.run([sys.executable, "-m", "miniature", "--steps", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --steps must be a positive multiple of 3 (a checkpoint every third), got 4 "
        "(see python -m miniature --help)"], p.stderr
    from miniature import config
    from miniature.__main__ import set_steps
    before, recipe = (config.sweep_hash("full"), config.backbone_hash("full")), config.FULL["recipe"]
    monkeypatch.setitem(config.FULL, "recipe", recipe)  # put back after the test
    set_steps("full", 720)
    assert config.FULL["recipe"] == {**recipe, "steps": 720, "save_every": 240} and recipe["steps"] == 180
    assert config.sweep_hash("full") != before[0] and config.backbone_hash("full") == before[1]


@pytest.mark.slow
def test_report_only_without_runs_is_an_error(tmp_path):
    """`--report-only` where no sweep ran says so in one line (status 1) and writes no report: an empty one would
    replace the one the runs wrote."""
    out = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "miniature", "--size", "smoke", "--cache", str(tmp_path / "cache"),
                        "--out", str(out), "--report-only", "--no-progress"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: no sweep under {out}; run `python -m miniature` first, or give its directory with --out"], p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_smoke_chain(tmp_path):
    """The whole chain at smoke size: a tiny backbone pretrained for a few steps, the tasks in P3's layout, two
    training steps per method through train.py, evaluation through evaluate.py, and the report."""
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "miniature", "--size", "smoke", "--cache", str(tmp_path / "cache"),
                        "--out", str(out), "--workers", "1", "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "RESULTS.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    for method in ("full", "ia3", "lora-r4", "mov-10", "mov-30", "molora-10", "mov-10-top2", "mov-10-top1",
                   "mov-10-sentence", "lora-matched"):
        assert f"| {method} |" in md
    assert "| MoV-10 beats (IA)3 |" in md and "untuned backbone" in md and "ceiling" in md

    # the smoke size hands its command lines to a long-lived worker process (miniature/worker.py): the same
    # commands, each in a fresh process as the full sweep runs them, log the same losses and routing, and score the
    # same. The run compared is one of the last (one worker ran every command before it: --workers 1)
    run, = (out / "runs").glob("main-mov-10-sentence-lr*-s0")
    cmds = [shlex.split(line[2:]) for line in (run / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    train_cmd = next(c for c in cmds if c[1] == "train.py")
    test_cmd = next(c for c in cmds if c[1] == "evaluate.py" and c[c.index("--out") + 1].endswith("/test"))
    fresh = tmp_path / "fresh"

    def moved(cmd, flag, path):
        return cmd[:cmd.index(flag) + 1] + [str(path)] + cmd[cmd.index(flag) + 2:]
    for cmd in (moved(train_cmd, "--out", fresh), moved(moved(test_cmd, "--run", fresh), "--out", fresh / "test")):
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]

    def logged(path):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]
    assert logged(fresh / "log.jsonl") == logged(run / "train" / "log.jsonl")
    a, b = (json.loads((d / "test" / "eval.json").read_text()) for d in (fresh, run))
    assert a["tasks"] == b["tasks"] and a["routing"] == b["routing"]
