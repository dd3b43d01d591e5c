"""A small seeded world in plain English words: the facts every corpus sentence and every task label comes from.

Mirrors nothing of the paper's code: it stands in for the world knowledge that T5 learns from C4 and that T0's
held-out tasks (RTE, CB, ANLI, WSC, WinoGrande, COPA, HellaSwag, WiC) probe. What it holds:
  - things (nouns with an English kind: bird, fish, fruit, tool, toy, tree), each with a seeded colour, home place,
    size rank (a total order "bigger than") and two cause-and-effect rules: "when the heron is washed, it sings";
  - people (names with he / she), each with a seeded job, town, pet (a bird or fish) and favourite food (a fruit);
  - homonyms with two senses each, every sense with a definition and its own context words (word sense, WiC);
  - a split of things and people into "train" (the only entities training tasks use) and "eval" (held-in
    validation, the held-out sets), so adapters cannot pass held-out tasks by memorising training entities.
`World.facts()` lists every fact as a (subject, relation, value) triple; tests/test_miniature.py checks task labels
against brute force over that list (an oracle independent of the task builders).
"""
import dataclasses
import random

KINDS = {
    "bird": "heron sparrow robin crow owl swan finch eagle".split(),
    "fish": "trout salmon carp pike perch eel cod tuna".split(),
    "fruit": "apple pear plum cherry lemon peach grape melon".split(),
    "tool": "hammer saw spade rake drill chisel wrench axe".split(),
    "toy": "kite doll ball drum yoyo puppet top whistle".split(),
    "tree": "oak pine birch maple willow cedar elm ash".split(),
}
COLORS = "red blue green yellow brown white".split()
PLACES = "forest river farm garden market hill".split()
TOWNS = "Oakford Millbrook Stonehill Redwater Ashby Fairfield".split()
JOBS = "baker farmer teacher doctor painter sailor".split()
NAMES = {"he": "Tom Sam Ben Max Leo Jack Paul Hugo Finn Owen Carl Dan".split(),
         "she": "Mia Ann Lucy Emma Rose Kate Nora Ella Ruth Jane Iris Zoe".split()}
# actions on a thing and their results (past tense forms beside): each thing has two rules action -> result
ACTIONS = {"washed": "washed", "dropped": "dropped", "heated": "heated", "shaken": "shook"}  # participle: past
RESULTS = {"sings": "sang", "glows": "glowed", "grows": "grew", "sleeps": "slept", "cracks": "cracked",
           "floats": "floated", "shrinks": "shrank", "hums": "hummed"}
# homonyms: word -> two senses (definition, context words); contexts never share a word across senses
HOMONYMS = {
    "bat": [("an animal that flies at night", "cave night wings dark"), ("a stick used to hit a ball", "ball game swing hit")],
    "bank": [("the side of a river", "river water grass mud"), ("a place that keeps money", "money coins pay gold")],
    "bark": [("the skin of a tree", "trunk rough wood tree"), ("the sound a dog makes", "dog loud noise angry")],
    "ring": [("a band worn on a finger", "finger gold wedding shiny"), ("the sound of a bell", "bell phone loud door")],
    "seal": [("an animal that swims in the sea", "sea fish swim beach"), ("a stamp pressed into wax", "letter wax stamp king")],
    "spring": [("the season after winter", "season flowers warm april"), ("a metal coil that bounces", "metal coil bounce bed")],
    "bow": [("a knot tied with a ribbon", "ribbon knot gift hair"), ("a weapon that shoots arrows", "arrow shoot hunt aim")],
    "fan": [("a machine that moves air", "air cool summer blow"), ("a person who loves a team", "team cheer game shout")],
    "match": [("a small stick that makes fire", "fire light candle strike"), ("a game between two teams", "team win score play")],
    "pitch": [("the field where a game is played", "field grass players goal"), ("how high a sound is", "sound note voice high")],
    "trunk": [("the long nose of an elephant", "elephant nose long grey"), ("a big box for clothes", "box clothes lid travel")],
    "glass": [("a cup for drinking", "drink water cup pour"), ("a clear hard material", "window clear hard pane")],
}
SENSE_FRAMES = ["{name} thought about the {word} and the {c1}.", "The {word} was near the {c1} and the {c2}.",
                "{name} saw a {word} by the {c1}.", "There was a {word}, a {c1} and a {c2}.",
                "{name} talked about the {word} and the {c2}."]


@dataclasses.dataclass
class Thing:
    name: str
    kind: str
    color: str
    place: str
    size: int  # rank: larger is bigger
    rules: dict  # action (participle) -> result (present)
    split: str


@dataclasses.dataclass
class Person:
    name: str
    pron: str  # he / she
    job: str
    town: str
    pet: str  # a bird or a fish (thing name)
    food: str  # a fruit (thing name)
    split: str


class World:
    """The seeded world. `per_kind` things of each kind and `people` people (half each gender)."""

    def __init__(self, seed=0, per_kind=8, people=24, eval_fraction=0.5):
        rng = random.Random(seed)
        self.seed = seed
        self.things, self.people = {}, {}
        names = [n for kind in sorted(KINDS) for n in rng.sample(KINDS[kind], per_kind)]
        sizes = list(range(len(names)))
        rng.shuffle(sizes)
        for i, name in enumerate(names):
            kind = next(k for k in KINDS if name in KINDS[k])
            actions = rng.sample(sorted(ACTIONS), 2)
            results = rng.sample(sorted(RESULTS), 2)
            self.things[name] = Thing(name, kind, rng.choice(COLORS), rng.choice(PLACES), sizes[i],
                                      dict(zip(actions, results)), "")
        # split things: within each kind half train, half eval (so every kind / value occurs in both splits)
        for kind in sorted(KINDS):
            members = [t for t in names if self.things[t].kind == kind]
            rng.shuffle(members)
            k = round(len(members) * eval_fraction)
            for j, t in enumerate(members):
                self.things[t].split = "eval" if j < k else "train"
        animals = [t for t in names if self.things[t].kind in ("bird", "fish")]
        fruits = [t for t in names if self.things[t].kind == "fruit"]
        for pron in ("he", "she"):
            chosen = rng.sample(NAMES[pron], people // 2)
            for j, name in enumerate(chosen):
                split = "eval" if j < round(len(chosen) * eval_fraction) else "train"
                pool_a = [t for t in animals if self.things[t].split == split]
                pool_f = [t for t in fruits if self.things[t].split == split]
                self.people[name] = Person(name, pron, rng.choice(JOBS), rng.choice(TOWNS), rng.choice(pool_a),
                                           rng.choice(pool_f), split)
        self.homonyms = HOMONYMS

    # ------------------------------------------------------------------ views
    def thing_names(self, split=None):
        return [t for t in self.things if split is None or self.things[t].split == split]

    def person_names(self, split=None):
        return [p for p in self.people if split is None or self.people[p].split == split]

    def facts(self):
        """Every fact as (subject, relation, value): the oracle's ground truth."""
        out = []
        for t in self.things.values():
            out += [(t.name, "kind", t.kind), (t.name, "color", t.color), (t.name, "place", t.place),
                    (t.name, "size", t.size)]
            out += [(t.name, "when " + a, r) for a, r in t.rules.items()]
        for p in self.people.values():
            out += [(p.name, "pron", p.pron), (p.name, "job", p.job), (p.name, "town", p.town),
                    (p.name, "pet", p.pet), (p.name, "food", p.food)]
        for w, senses in self.homonyms.items():
            out += [(w, f"sense{i}", " ".join(ctx.split())) for i, (_, ctx) in enumerate(senses)]
        return out

    def words(self):
        """Every word the world can put in a sentence (for the vocabulary)."""
        ws = set(self.things) | set(self.people) | set(COLORS) | set(PLACES) | set(TOWNS) | set(JOBS) | set(KINDS)
        ws |= set(ACTIONS) | set(ACTIONS.values()) | set(RESULTS) | set(RESULTS.values()) | set(self.homonyms)
        for senses in self.homonyms.values():
            for d, ctx in senses:
                ws |= set(d.split()) | set(ctx.split())
        return ws
