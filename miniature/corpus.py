"""The pretraining corpus about the world: fact paragraphs (every fact in many phrasings), stories, definitions.

Stands in for C4, the corpus T5 was pretrained on (Raffel et al. 2020, section 2.2), at the scale of the world:
documents are drawn without end from a seeded stream, so each fact recurs in ever new phrasings and contexts
instead of as a memorised string. No document contains any task's prompt format (no "question", "options",
"yes or no", "premise", ...: tests/test_miniature.py checks). Kinds of document:
  - fact paragraphs: one thing or person, all its facts, each in one of several phrasings, in random order;
  - stories: a person goes to a place, meets things and people, acts on a thing and sees the effect its rule says,
    feels happy or sad about good or bad qualities (what sentiment tasks read), with he / she pronouns;
  - comparisons: sentences of the size order; definitions: the senses of homonyms, each with its context words.
`held_out_stories` draws stories from another stream (the held-out-story loss of the gate).
"""
import random

from .world import ACTIONS, RESULTS, SENSE_FRAMES

GOOD = "sweet fresh lovely shiny soft bright".split()
BAD = "sour rotten dull broken rough stale".split()

_THING = {
    "kind": ["The {t} is a {v}.", "A {t} is a kind of {v}.", "Every {t} is a {v}.", "The {t} is one of the {v} kinds.",
             "If you see a {t}, you see a {v}.", "Among the kinds of {v}, there is the {t}."],
    "color": ["The {t} is {v}.", "The color of the {t} is {v}.", "A {t} is always {v}.", "You know the {t} by its {v} color.",
              "{V} is the color of the {t}.", "Every {t} you see is {v}."],
    "place": ["The {t} is found at the {v}.", "You can find the {t} at the {v}.", "At the {v} there is a {t}.",
              "The home of the {t} is the {v}.", "The {t} stays at the {v}.", "People go to the {v} to see the {t}."],
}
_RULE = ["When the {t} is {a}, it {r}.", "If the {t} is {a}, it {r}.", "A {t} that is {a} {r}.",
         "The {t} {r} when it is {a}.", "Each time a {t} is {a}, it {r}."]
_PERSON = {
    "job": ["{p} is a {v}.", "{p} works as a {v}.", "The {v} {p} is at work.", "{p} has a job as a {v}.",
            "By trade, {p} is a {v}."],
    "town": ["{p} lives in {v}.", "The home of {p} is in {v}.", "{p} comes from {v}.", "In {v} lives {p}.",
             "{p} has a house in {v}."],
    "pet": ["{p} has a pet {v}.", "The pet of {p} is a {v}.", "{p} keeps a {v} as a pet.", "At home {p} feeds a pet {v}.",
            "The {v} is the pet of {p}."],
    "food": ["{p} likes to eat the {v}.", "The favourite food of {p} is the {v}.", "{p} loves eating a {v}.",
             "Of all fruit, {p} likes the {v} best.", "{p} eats a {v} every day."],
}
_SIZE = ["The {a} is bigger than the {b}.", "The {b} is smaller than the {a}.", "A {a} is larger than a {b}.",
         "Next to the {a}, the {b} looks small."]
_DEFINE = ["A {w} is {d}.", "The word {w} can mean {d}.", "Sometimes a {w} is {d}."]


def cap(s):
    return s[0].upper() + s[1:]


def thing_fact(world, t, relation, rng):
    th = world.things[t]
    if relation in _THING:
        v = getattr(th, relation)
        return rng.choice(_THING[relation]).format(t=t, v=v, V=cap(v))
    a = relation
    return rng.choice(_RULE).format(t=t, a=a, r=th.rules[a])


def person_fact(world, p, relation, rng):
    return rng.choice(_PERSON[relation]).format(p=p, v=getattr(world.people[p], relation))


def size_sentence(world, a, b, rng):
    if world.things[a].size < world.things[b].size:
        a, b = b, a
    return rng.choice(_SIZE).format(a=a, b=b)


def sense_sentence(world, word, sense, rng, name=None):
    ctx = world.homonyms[word][sense][1].split()
    c1, c2 = rng.sample(ctx, 2)
    name = name or rng.choice(list(world.people))
    return cap(rng.choice(SENSE_FRAMES).format(name=name, word=word, c1=c1, c2=c2))


def thing_paragraph(world, t, rng):
    th = world.things[t]
    rels = ["kind", "color", "place"] + list(th.rules)
    rng.shuffle(rels)
    out = [thing_fact(world, t, r, rng) for r in rels]
    others = rng.sample([o for o in world.things if o != t], 2)
    out += [size_sentence(world, t, o, rng) for o in others]
    return " ".join(out)


def person_paragraph(world, p, rng):
    rels = ["job", "town", "pet", "food"]
    rng.shuffle(rels)
    pron = world.people[p].pron
    out = []
    for i, r in enumerate(rels):
        s = person_fact(world, p, r, rng)
        if i and rng.random() < 0.3 and s.startswith(p + " "):  # pronouns: "he lives in ..."
            s = cap(pron) + s[len(p):]
        out.append(s)
    return " ".join(out)


def story(world, rng):
    """A few sentences about one person on one day; every detail agrees with the world."""
    p = rng.choice(list(world.people))
    per = world.people[p]
    pron, poss = per.pron, "his" if per.pron == "he" else "her"
    t = rng.choice(list(world.things))
    th = world.things[t]
    a, r = rng.choice(sorted(th.rules.items()))
    q = rng.choice([x for x in world.people if x != p])
    lines = [f"{p} the {per.job} left {per.town} one morning and went to the {th.place}.",
             f"There {pron} saw a {th.color} {t}.", f"{cap(pron)} {ACTIONS[a]} the {t}, and the {t} {RESULTS[r]}."]
    if rng.random() < 0.5:
        good = rng.random() < 0.5
        adj = rng.choice(GOOD if good else BAD)
        f = per.food
        lines.append(f"Later {p} ate a {adj} {f} and was {'happy' if good else 'sad'}.")
    if rng.random() < 0.5:
        lines.append(f"At the {th.place} {pron} met {q}, the {world.people[q].job} from {world.people[q].town}.")
        lines.append(f"{q} told {p} about {'his' if world.people[q].pron == 'he' else 'her'} pet "
                     f"{world.people[q].pet}.")
    if rng.random() < 0.5:
        lines.append(f"In the evening {pron} fed {poss} {per.pet} and went to sleep.")
    return " ".join(lines)


def opinion_story(world, rng):
    """Someone has a good or bad thing and feels so (polarity words next to happy / sad)."""
    p = rng.choice(list(world.people))
    t = rng.choice(list(world.things))
    good = rng.random() < 0.5
    adjs = rng.sample(GOOD if good else BAD, 2)
    feel = rng.choice(["happy", "glad", "pleased"] if good else ["sad", "upset", "unhappy"])
    return (f"{p} got a {adjs[0]} {t}. It was {adjs[1]}, and {p} was {feel}. "
            f"{'A ' + adjs[0] + ' thing makes people ' + feel if rng.random() < 0.5 else 'That is how it goes'}.")


def definitions(world, rng):
    w = rng.choice(sorted(world.homonyms))
    out = []
    for i, (d, _) in enumerate(world.homonyms[w]):
        out.append(rng.choice(_DEFINE).format(w=w, d=d))
        out += [sense_sentence(world, w, i, rng) for _ in range(2)]
    return " ".join(out)


def comparisons(world, rng):
    ts = rng.sample(list(world.things), 4)
    return " ".join(size_sentence(world, a, b, rng) for a, b in zip(ts, ts[1:]))


DOC_WEIGHTS = [("thing", 0.32), ("person", 0.2), ("story", 0.22), ("opinion", 0.06), ("define", 0.1),
               ("compare", 0.1)]


def document(world, rng):
    u, acc = rng.random(), 0.0
    for kind, w in DOC_WEIGHTS:
        acc += w
        if u < acc:
            break
    if kind == "thing":
        return thing_paragraph(world, rng.choice(list(world.things)), rng)
    if kind == "person":
        return person_paragraph(world, rng.choice(list(world.people)), rng)
    if kind == "story":
        return story(world, rng)
    if kind == "opinion":
        return opinion_story(world, rng)
    if kind == "define":
        return definitions(world, rng)
    return comparisons(world, rng)


def documents(world, seed):
    """An endless seeded stream of documents."""
    rng = random.Random(seed)
    while True:
        yield document(world, rng)


def held_out_stories(world, n=200, seed=10_001):
    """Stories from a stream the pretraining never draws from (the held-out-story loss)."""
    rng = random.Random(seed)
    return [story(world, rng) for _ in range(n)]
