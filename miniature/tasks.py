"""P3 in miniature: a training mixture mirroring T0's clusters and held-out sets mirroring the paper's eight.

Mirrors bigscience/P3 as T0 (Sanh et al. 2021) and the paper (Zadouri et al. 2023, section 3) use it, in P3's own
parquet layout (demo_data.py's writer conventions), so data.Mixture, train.py and evaluate.py read it unchanged:
  - held-in (training) datasets, one per T0 cluster: paraphrase, sentiment, topic, multiple-choice QA, extractive
    QA, closed-book QA, structure-to-text, summarisation; three templates each (templates.py). Training examples
    use the world's "train" entities only.
  - held-in validation (`val_*`, rank classification, "eval" entities): picks learning rates and the early-stopping
    step; never the held-out sets.
  - held-out datasets, none of whose task types is trained: NLI (rte, cb, anli), coreference (wsc, winogrande),
    cause and effect (copa), story completion (hellaswag), word sense (wic): a `dev_*` split for the pilot and the
    final `m_*` split (in_MoV_eval: True), on "eval" entities, disjoint examples.
  - the ceiling control's extra training data (`ceil_*`): the held-out types on "train" entities.
Every held-out set is built in symmetric groups so that labels are balanced and each answer string is as often
right as wrong (a one-field baseline sits at chance); `baselines` measures that (one-field and word-overlap
baselines, cross-validated), and tests/test_miniature.py checks the labels against a brute-force oracle.
Deviation from P3: each template of a held-out dataset gets its own examples (P3 applies every template to the
same ones), so the same evaluation cost covers three times as many distinct examples.
"""
import os
import random
import shutil

from . import corpus, templates
from .world import ACTIONS, COLORS, JOBS, KINDS, PLACES, RESULTS, SENSE_FRAMES, TOWNS

# ----------------------------------------------------------------------------------------------- helpers


def cap(s):
    return s[0].upper() + s[1:]


def poss(pron):
    return "his" if pron == "he" else "her"


def fill(fmt, f):
    return fmt.format(**f)


# ----------------------------------------------------------------------------------------------- held-in
def _relation_pick(w, split, rng):
    if rng.random() < 0.6:
        t = rng.choice(w.thing_names(split))
        rel = rng.choice(["kind", "color", "place"] + sorted(w.things[t].rules))
        return "thing", t, rel
    p = rng.choice(w.person_names(split))
    return "person", p, rng.choice(["job", "town", "pet", "food"])


VALUES = {"kind": sorted(KINDS), "color": COLORS, "place": PLACES, "job": JOBS, "town": TOWNS}


def _fact_sentence(w, who, s, rel, rng, value=None):
    """A phrasing of (s, rel, value); value defaults to the world's."""
    if who == "thing":
        th = w.things[s]
        if rel in corpus._THING:
            v = value or getattr(th, rel)
            return rng.choice(corpus._THING[rel]).format(t=s, v=v, V=cap(v))
        return rng.choice(corpus._RULE).format(t=s, a=rel, r=value or th.rules[rel])
    v = value or getattr(w.people[s], rel)
    return rng.choice(corpus._PERSON[rel]).format(p=s, v=v)


def _other_value(w, who, s, rel, rng):
    if who == "thing" and rel not in corpus._THING:
        return rng.choice([r for r in RESULTS if r != w.things[s].rules[rel]])
    if rel in ("pet", "food"):
        cur = getattr(w.people[s], rel)
        kinds = ("bird", "fish") if rel == "pet" else ("fruit",)
        split = w.people[s].split  # a wrong pet or fruit of the person's own split: no entity crosses splits
        return rng.choice([t for t in w.things if w.things[t].kind in kinds and t != cur and w.things[t].split == split])
    cur = getattr(w.things[s] if who == "thing" else w.people[s], rel)
    return rng.choice([v for v in VALUES[rel] if v != cur])


def held_in_example(dataset, template, w, split, rng):
    """(fields, answer text, choices or None) of one example of a held-in template."""
    if dataset == "para":
        who, s, rel = _relation_pick(w, split, rng)
        same = rng.random() < 0.5
        s1 = _fact_sentence(w, who, s, rel, rng)
        s2 = _fact_sentence(w, who, s, rel, rng, None if same else _other_value(w, who, s, rel, rng))
        if rng.random() < 0.5:
            s1, s2 = s2, s1
        return {"s1": s1, "s2": s2}, "yes" if same else "no", None
    if dataset == "senti":
        p, t = rng.choice(w.person_names(split)), rng.choice(w.thing_names(split))
        pol = rng.choice(["good", "bad", "none"] if template == "liked3" else ["good", "bad"])
        if pol == "none":
            text = f"{p} got a {t}. It was from the {rng.choice(PLACES)}."
        else:
            a1, a2 = rng.sample(corpus.GOOD if pol == "good" else corpus.BAD, 2)
            text = f"{p} got a {a1} {t}. It was {a2}."
        ans = {"pos_neg": {"good": "positive", "bad": "negative"}, "liked": {"good": "yes", "bad": "no"},
               "liked3": {"good": "yes", "bad": "no", "none": "maybe"}}[template][pol]
        return {"text": text, "p": p}, ans, None
    if dataset == "topic":
        t = rng.choice(w.thing_names(split))
        rels = rng.sample(["color", "place"] + sorted(w.things[t].rules), 2)
        return {"text": " ".join(_fact_sentence(w, "thing", t, r, rng) for r in rels)}, w.things[t].kind, None
    if dataset == "mcqa":
        if template == "which_true":
            who, s, rel = _relation_pick(w, split, rng)
            n = rng.choice([2, 3, 4])
            wrong = set()
            for _ in range(100):  # as many wrong values as the relation has (a split holds 3 fruits)
                wrong.add(_other_value(w, who, s, rel, rng))
                if len(wrong) == n - 1:
                    break
            true = _fact_sentence(w, who, s, rel, rng)
            choices = [true] + [_same_frame(true, w, who, s, rel, v) for v in sorted(wrong)]
            rng.shuffle(choices)
            return {"options_sent": " ".join(f"- {c}" for c in choices)}, true, choices
        who, s, rel = _relation_pick(w, split, rng)
        while rel not in VALUES:
            who, s, rel = _relation_pick(w, split, rng)
        q = {"kind": f"What kind of thing is the {s}?", "color": f"What color is the {s}?",
             "place": f"Where can you find the {s}?", "job": f"What does {s} work as?",
             "town": f"Where does {s} live?"}[rel]
        true = getattr(w.things[s] if who == "thing" else w.people[s], rel)
        opts = [true] + rng.sample([v for v in VALUES[rel] if v != true], 2)
        rng.shuffle(opts)
        return {"question": q, "options": ", ".join(opts)}, true, opts
    if dataset == "exqa":
        a, b = rng.sample(w.person_names(split), 2)
        x, y = rng.sample(w.thing_names(split), 2)
        pa, pb = w.people[a].pron, w.people[b].pron
        (ax, rx), (ay, ry) = rng.choice(sorted(w.things[x].rules.items())), rng.choice(sorted(w.things[y].rules.items()))
        second = cap(pb) if pa != pb else b
        passage = (f"{a} and {b} went to the {rng.choice(PLACES)}. {a} {ACTIONS[ax]} the {x}. "
                   f"{second} {ACTIONS[ay]} the {y}.")
        kind = rng.choice(["who_x", "who_y", "what_a"])
        if kind == "who_x":
            return {"passage": passage, "question": f"Who {ACTIONS[ax]} the {x}?"}, a, [a, b]
        if kind == "who_y":
            return {"passage": passage, "question": f"Who {ACTIONS[ay]} the {y}?"}, b, [a, b]
        return {"passage": passage, "question": f"What did {a} {_base(ax)}?"}, f"the {x}", [f"the {x}", f"the {y}"]
    if dataset == "cbqa":
        if template == "statement":
            lab = rng.choice(["true", "false", "neither"])
            if lab == "neither":
                s, u = rng.sample(w.thing_names(split), 2)
                st = rng.choice([f"The {s} is older than the {u}.", f"{rng.choice(w.person_names(split))} has seen "
                                 f"the {s}.", f"The {s} was made in {rng.choice(TOWNS)}."])
            else:
                who, s, rel = _relation_pick(w, split, rng)
                st = _fact_sentence(w, who, s, rel, rng, None if lab == "true" else _other_value(w, who, s, rel, rng))
            return {"statement": st}, lab, None
        who, s, rel = _relation_pick(w, split, rng)
        if who == "thing" and rel not in VALUES:
            q, ans = f"What happens when the {s} is {rel}?", f"It {w.things[s].rules[rel]}."
            choices = [f"It {r}." for r in sorted(RESULTS)]
        elif rng.random() < 0.2:
            s, u = rng.sample(w.thing_names(split), 2)
            q, ans = f"Is the {s} bigger than the {u}?", "yes" if w.things[s].size > w.things[u].size else "no"
            choices = ["yes", "no"]
        else:
            q = {"kind": f"What kind of thing is the {s}?", "color": f"What color is the {s}?",
                 "place": f"Where is the {s} found?", "job": f"What is the job of {s}?", "town": f"Where does {s} live?",
                 "pet": f"What pet does {s} have?", "food": f"What fruit does {s} like best?"}[rel]
            obj = w.things[s] if who == "thing" else w.people[s]
            ans = getattr(obj, rel)
            if rel in VALUES:
                choices = list(VALUES[rel])
            else:
                kinds = ("bird", "fish") if rel == "pet" else ("fruit",)
                choices = [t for t in w.thing_names(split) if w.things[t].kind in kinds]
            ans = f"a {ans}" if rel in ("pet",) else ans
            choices = [f"a {c}" for c in choices] if rel == "pet" else choices
        return {"question": q}, ans, choices
    if dataset == "s2t":
        if template == "table":
            p = rng.choice(w.person_names(split))
            pp = w.people[p]
            return ({"table": f"name: {p} | job: {pp.job} | town: {pp.town}"}, f"{p} is a {pp.job} from {pp.town}.",
                    None)
        t = rng.choice(w.thing_names(split))
        th = w.things[t]
        if rng.random() < 0.5:
            return {"words": f"{t}, {th.color}, {th.place}"}, f"The {th.color} {t} is found at the {th.place}.", None
        a = rng.choice(sorted(th.rules))
        return {"words": f"{t}, {a}"}, f"When the {t} is {a}, it {th.rules[a]}.", None
    if dataset == "summ":
        p = rng.choice(w.person_names(split))
        t = rng.choice(w.thing_names(split))
        pp, th = w.people[p], w.things[t]
        a, r = rng.choice(sorted(th.rules.items()))
        story = (f"{p} the {pp.job} left {pp.town} one morning and went to the {th.place}. There {pp.pron} saw a "
                 f"{th.color} {t}. {cap(pp.pron)} {ACTIONS[a]} the {t}, and the {t} {RESULTS[r]}. In the evening "
                 f"{pp.pron} went home.")
        ans = f"{p} and the {t}" if template == "title" else f"{p} {ACTIONS[a]} a {t} and it {RESULTS[r]}."
        return {"story": story}, ans, None
    raise ValueError(dataset)


def _base(participle):
    return {"washed": "wash", "dropped": "drop", "heated": "heat", "shaken": "shake"}[participle]


def _same_frame(sentence, w, who, s, rel, value):
    """The sentence with the true value swapped for `value` (same phrasing, so options differ in the value only)."""
    true = (getattr(w.things[s], rel) if who == "thing" and rel in corpus._THING else
            w.things[s].rules[rel] if who == "thing" else getattr(w.people[s], rel))
    words = sentence.split(" ")
    out = [(x.replace(true, value, 1) if x.strip(".,").lower() == true.lower() else x) for x in words]
    res = " ".join(out)
    if res == sentence:  # value capitalised at the start ("Red is the color of ...")
        res = sentence.replace(cap(true), cap(value), 1)
    return res


# ----------------------------------------------------------------------------------------------- held-out
def _pair_things(w, split, rng, differ):
    while True:
        x, y = rng.sample(w.thing_names(split), 2)
        if getattr(w.things[x], differ) != getattr(w.things[y], differ):
            return x, y


def held_out_group(dataset, w, split, rng):
    """A symmetric group of (fields, label index, choices) items: labels and answer strings balanced within it."""
    people = w.person_names(split)
    if dataset == "rte":
        p = rng.choice(people)
        attr = rng.choice(["kind", "color"])
        x, y = _pair_things(w, split, rng, attr)
        hyp = (lambda v: f"{p} bought a {v}.") if attr == "kind" else (lambda v: f"{p} bought something {v}.")
        out = []
        for t in (x, y):
            prem = f"{p} bought a {t} at the market."
            for v, lab in ((getattr(w.things[t], attr), 0),
                           (getattr(w.things[y if t == x else x], attr), 1)):
                out.append(({"premise": prem, "hyp": hyp(v)}, lab))
        return out
    if dataset in ("cb", "anli"):
        p, q, r = rng.sample(people, 3)
        attr = "kind" if dataset == "cb" else "color"
        x, y = _pair_things(w, split, rng, attr)
        if dataset == "cb":
            prem = f"{p}, {q} and {r} went to the market. {p} bought a {x} and {q} bought a {y}."
            hyp = lambda n, v: f"{n} bought a {v}."  # noqa: E731
        else:
            place = rng.choice(PLACES)
            prem = f"{p}, {q} and {r} went to the {place}. {p} took the {x} home and {q} took the {y} home."
            hyp = lambda n, v: f"{n} took home something {v}."  # noqa: E731
        vx, vy = getattr(w.things[x], attr), getattr(w.things[y], attr)
        return [({"premise": prem, "hyp": hyp(p, vx)}, 0), ({"premise": prem, "hyp": hyp(p, vy)}, 1),
                ({"premise": prem, "hyp": hyp(q, vy)}, 0), ({"premise": prem, "hyp": hyp(q, vx)}, 1),
                ({"premise": prem, "hyp": hyp(r, vx)}, 2), ({"premise": prem, "hyp": hyp(r, vy)}, 2)]
    if dataset in ("wsc", "winogrande"):
        pron = rng.choice(["he", "she"])
        cands = [n for n in people if w.people[n].pron == pron]
        while True:
            a, b = rng.sample(cands, 2)
            rel = rng.choice(["town", "job", "pet"])
            if getattr(w.people[a], rel) != getattr(w.people[b], rel):
                break
        place = rng.choice(PLACES)
        out, labs = [], rng.sample([0, 1], 2)
        for ref in (a, b):
            v = getattr(w.people[ref], rel)
            if dataset == "wsc":
                clue = {"town": f"Then {pron} went home to {v}.", "job": f"Then {pron} went to work as a {v}.",
                        "pet": f"Then {pron} fed {poss(pron)} pet {v}."}[rel]
                passage = f"{a} and {b} met at the {place}. {clue}"
                out += [({"passage": passage, "pron": pron, "cand": ref}, 0),
                        ({"passage": passage, "pron": pron, "cand": b if ref == a else a}, 1)]
            else:
                clue = {"town": f"_ went home to {v}.", "job": f"_ went to work as a {v}.",
                        "pet": f"_ fed {poss(pron)} pet {v}."}[rel]
                lab = labs.pop()
                other = b if ref == a else a
                first, second = (ref, other) if lab == 0 else (other, ref)
                out.append(({"sentence": f"{a} and {b} met at the {place}. {clue}", "a": first, "b": second}, lab))
        return out
    if dataset == "copa":
        p = rng.choice(people)
        t = rng.choice(w.thing_names(split))
        (a1, r1), (a2, r2) = sorted(w.things[t].rules.items())
        direction = rng.choice(["effect", "cause"])
        out, labs = [], rng.sample([0, 1], 2)
        for (a, r), (ao, ro) in (((a1, r1), (a2, r2)), ((a2, r2), (a1, r1))):
            if direction == "effect":
                prem, right, wrong = (f"{p} {ACTIONS[a]} the {t}.", f"The {t} {RESULTS[r]}.",
                                      f"The {t} {RESULTS[ro]}.")
            else:
                prem, right, wrong = (f"The {t} {RESULTS[r]}.", f"{p} {ACTIONS[a]} the {t}.",
                                      f"{p} {ACTIONS[ao]} the {t}.")
            lab = labs.pop()
            c1, c2 = (right, wrong) if lab == 0 else (wrong, right)
            out.append(({"premise": prem, "ask": templates.COPA_ASK[direction], "c1": c1, "c2": c2}, lab))
        return out
    if dataset == "hellaswag":
        while True:  # four things of pairwise different colours: the colour alone names the right one
            group = rng.sample(w.thing_names(split), 4)
            if len({w.things[t].color for t in group}) == 4:
                break
        p = rng.choice(people)
        pron = w.people[p].pron
        out, positions = [], rng.sample(range(4), 4)  # the right ending's position: each once per group
        for t, pos in zip(group, positions):
            th = w.things[t]
            ctx = f"{p} went to the {th.place}. There {pron} saw a {th.color} {th.kind}."
            others = [u for u in group if u != t]
            rng.shuffle(others)
            order = others[:pos] + [t] + others[pos:]
            fields = {"context": ctx, **{f"e{i}": f"{cap(pron)} took the {u} home." for i, u in enumerate(order)}}
            out.append((fields, pos))
        return out
    if dataset == "wic":
        word = rng.choice(sorted(w.homonyms))
        name1, name2 = rng.sample(people, 2)
        out = []
        for same in (True, False):
            i = rng.randrange(2)
            j = i if same else 1 - i
            ci, cj = w.homonyms[word][i][1].split(), w.homonyms[word][j][1].split()
            first = rng.sample(ci, 2)
            rest = [c for c in cj if c not in first]
            second = rng.sample(rest, 2)
            s1 = cap(rng.choice(SENSE_FRAMES).format(name=name1, word=word, c1=first[0], c2=first[1]))
            s2 = cap(rng.choice(SENSE_FRAMES).format(name=name2, word=word, c1=second[0], c2=second[1]))
            out.append(({"s1": s1, "s2": s2, "word": word}, 0 if same else 1))
        return out
    raise ValueError(dataset)


def held_out_items(dataset, template, w, split, n, rng):
    """n items (fields, label, choices) of one template: whole symmetric groups, then a shuffle."""
    _, fmt, choice_fmts = next(t for t in templates.HELD_OUT[dataset] if t[0] == template)
    items, group = [], 0
    while len(items) < n:
        for fields, label in held_out_group(dataset, w, split, rng):
            items.append(({**fields, "_group": group}, label, [fill(c, fields) for c in choice_fmts]))
        group += 1
    items = items[:n - n % _group_size(dataset)] if n % _group_size(dataset) and len(items) > n else items[:n]
    rng.shuffle(items)
    return [(fill(fmt, f), choices, label, f) for f, label, choices in items]


def _group_size(dataset):
    return {"rte": 4, "cb": 6, "anli": 6, "wsc": 4, "winogrande": 2, "copa": 2, "hellaswag": 4, "wic": 2}[dataset]


# ----------------------------------------------------------------------------------------------- the build
def build(world, out, tok, sizes, seed=0, ceiling=False):
    """Write the miniature P3 into `out` (a new directory): training configs, val_/dev_/m_ score_eval configs,
    task tables and spiece.model (tok's file). sizes: train (examples per training template), val (per held-in
    validation template), dev and test (per held-out template). ceiling: also train on the held-out types."""
    from . import p3_layout
    rng = random.Random(seed)
    train, evals = [], []
    for dataset, temps in templates.HELD_IN.items():
        for name, fmt, choice_fmt in temps:
            exs = []
            for _ in range(sizes["train"]):
                f, ans, choices = held_in_example(dataset, name, world, "train", rng)
                exs.append((fill(fmt, f), choices if choice_fmt == "{choices}" else
                            choice_fmt if isinstance(choice_fmt, list) else None, ans))
            train.append((dataset, name, exs))
    if ceiling:
        for dataset, temps in templates.HELD_OUT.items():
            for name, _, _ in temps:
                items = held_out_items(dataset, name, world, "train", sizes["train"], rng)
                train.append(("ceil_" + dataset, name, [(x, ch, ch[lab]) for x, ch, lab, _ in items]))
    for dataset, temps in templates.HELD_IN.items():  # held-in validation: eval entities, rank classification
        for name, fmt, choice_fmt in temps:
            items = []
            for _ in range(sizes["val"]):
                f, ans, choices = held_in_example(dataset, name, world, "eval", rng)
                choices = choice_fmt if isinstance(choice_fmt, list) else choices
                if choices is None or ans not in choices:
                    break
                items.append((fill(fmt, f), choices, choices.index(ans)))
            if len(items) == sizes["val"]:
                evals.append(("val_" + dataset, name, items, False))
    seen = set()
    for prefix, key, in_eval in (("dev_", "dev", False), ("m_", "test", True)):
        for dataset, temps in templates.HELD_OUT.items():
            for name, _, _ in temps:
                items = []
                for x, ch, lab, _ in held_out_items(dataset, name, world, "eval", sizes[key] * 3, rng):
                    if (name, x, tuple(ch)) in seen:
                        continue
                    seen.add((name, x, tuple(ch)))
                    items.append((x, ch, lab))
                # keep labels balanced after removing repeats: equal counts per label
                items = _balance(items, sizes[key], rng)
                evals.append((prefix + dataset, name, items, in_eval))
    p3_layout.write(out, tok, train, evals)


def _balance(items, n, rng):
    """At most n items with every label equally often (as far as the items allow)."""
    by = {}
    for it in items:
        by.setdefault(it[2], []).append(it)
    k = min(len(v) for v in by.values())
    per = min(k, n // len(by))
    out = [it for v in by.values() for it in v[:per]]
    rng.shuffle(out)
    return out


def build_dir(world, cache_dir, tok_path, sizes, seed, ceiling, name):
    """Build once into cache_dir/name (atomically) and return the path."""
    from .project import Tokenizer
    path = os.path.join(cache_dir, name)
    if os.path.isdir(path):
        return path
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    shutil.copy(tok_path, os.path.join(tmp, "spiece.model"))
    build(world, tmp, Tokenizer(tok_path), sizes, seed, ceiling)
    os.rename(tmp, path)
    return path
