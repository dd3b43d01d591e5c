"""The offline demo: a small synthetic instruction-tuning mixture in P3's layout, with its own vocabulary and tables.

Nothing here reproduces the original: for-ai/parameter-efficient-moe trains on P3 (`bigscience/P3`, the `t0_train`
mixture of bigscience-workshop/t-zero's `t0/seqio_tasks/tasks.py`) and evaluates on T0's held-out
`*_score_eval` tasks (Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit", arXiv 2309.05444, section 3),
which need the hub and a pre-trained T5. The demo gives the same pipeline something to run on offline: four
training datasets of three templates each (`demo_review`, `demo_compare`, `demo_category`, `demo_opposite`) and
three held-out rank-classification datasets (`demo_opinion`, `demo_order`, `demo_kind`) that reuse the training
skills in new wordings. It is written exactly as P3 holds its data, so `data.Mixture` and `data.load_eval` read it
through the code that reads P3:
- `<config>/train-00000-of-00001.parquet` with `inputs` (ids, no EOS), `inputs_pretokenized`, `targets` (ids
  ending in EOS), `targets_pretokenized` and `answer_choices` where the template has choices;
- `<config>_score_eval/validation-00000-of-00001.parquet`, one row per (example, choice) with `idx`,
  `is_correct` and `weight`, as t-zero's rank-classification tasks (`t5.data.preprocessors.rank_classification`)
  lay them out;
- `spiece.model` (a unigram SentencePiece model of at most 400 pieces trained on the demo's text, pad/eos/unk =
  0/1/2 as in T5's) and its own `t0_train_tasks.tsv` / `t0_eval_tasks.tsv` in the format of p3/.
Generation is deterministic: two builds give byte-identical files (tests/test_data.py checks it).
"""
import io
import os
import random
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from sources import EVAL_TABLE, TRAIN_TABLE
from sources.tokenizer import EOS, PAD, UNK, Tokenizer


def cache_root(cache_dir=None):
    """Where generated and cached files go: cache_dir, else $PEFT_MOE_CACHE, else ~/.cache/peft-moe."""
    return cache_dir or os.environ.get("PEFT_MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "peft-moe")


# The held-out datasets and their column titles in the evaluation table.
DEMO_EVAL_DATASETS = [("demo_opinion", "Opinion"), ("demo_order", "Order"), ("demo_kind", "Kind")]
_POS = "good great lovely happy fun nice bright sweet pleasant wonderful".split()
_NEG = "bad awful boring sad dull ugly poor rude terrible horrible".split()
_NOUNS = "movie meal trip book song game show room party class".split()
_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen twenty").split()
_KINDS = {"animal": "dog cat horse bird fish cow lion mouse sheep goat tiger duck".split(),
          "food": "apple bread cheese rice soup cake egg pear bean corn plum pie".split(),
          "object": "chair table lamp cup spoon door pen box car shoe clock key".split()}
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("light", "dark"),
              ("open", "closed"), ("high", "low"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
              ("wet", "dry"), ("rich", "poor"), ("long", "short"), ("loud", "quiet"), ("happy", "sad")]


def _demo_sample(dataset, rng):
    """One synthetic example's fields; the held-out datasets reuse the training skills (polarity words, number
    order, kinds of things) in new wordings, so a tuned model has something to transfer."""
    if dataset in ("demo_review", "demo_opinion"):
        good = rng.random() < 0.5
        words = _POS if good else _NEG
        text = f"the {rng.choice(_NOUNS)} was {rng.choice(words)} and {rng.choice(words)}."
        return {"text": text, "pn": "positive" if good else "negative", "yn": "yes" if good else "no"}
    if dataset in ("demo_compare", "demo_order"):
        a, b = rng.sample(range(len(_NUMBERS)), 2)
        return {"a": _NUMBERS[a], "b": _NUMBERS[b], "larger": _NUMBERS[max(a, b)], "smaller": _NUMBERS[min(a, b)],
                "a_gt": "yes" if a > b else "no", "a_lt": "yes" if a < b else "no"}
    if dataset in ("demo_category", "demo_kind"):
        kind = rng.choice(sorted(_KINDS))
        animal, thing = rng.choice(_KINDS["animal"]), rng.choice(_KINDS["object"] + _KINDS["food"])
        first, second = (animal, thing) if rng.random() < 0.5 else (thing, animal)
        return {"w": rng.choice(_KINDS[kind]), "kind": kind, "is_animal": "yes" if kind == "animal" else "no",
                "is_food": "yes" if kind == "food" else "no", "first": first, "second": second, "animal": animal}
    a, b = rng.choice(_OPPOSITES)
    return {"a": a, "b": b} if rng.random() < 0.5 else {"a": b, "b": a}


# dataset -> (train examples per template, or None for a held-out rank-eval dataset; templates). A template is
# (name, input format, answer choices (formats) or None for a generative one, the field holding the answer).
_DEMO_TASKS = {
    "demo_review": (300, [
        ("is_positive", "{text} Is this review positive or negative?", ["positive", "negative"], "pn"),
        ("sentiment", "Review: {text} Sentiment:", ["positive", "negative"], "pn"),
        ("did_like", "{text} Did the writer like it?", ["yes", "no"], "yn")]),
    "demo_compare": (200, [
        ("which_larger", "Which is larger, {a} or {b}?", ["{a}", "{b}"], "larger"),
        ("is_greater", "Is {a} greater than {b}? yes or no", ["yes", "no"], "a_gt"),
        ("which_smaller", "Which number is smaller: {a} or {b}?", ["{a}", "{b}"], "smaller")]),
    "demo_category": (250, [
        ("what_kind", "What kind of thing is a {w}? animal, food or object?", ["animal", "food", "object"], "kind"),
        ("is_animal", "Is a {w} an animal? yes or no", ["yes", "no"], "is_animal"),
        ("is_food", "Is a {w} a food? yes or no", ["yes", "no"], "is_food")]),
    "demo_opposite": (150, [
        ("opposite", "What is the opposite of {a}?", None, "b"),
        ("antonym", "Give the antonym: {a}", None, "b"),
        ("repeat", "Repeat the word: {a}", None, "a")]),
    "demo_opinion": (None, [
        ("does_like", "Someone said: {text} Does the speaker like it? yes or no", ["yes", "no"], "yn"),
        ("feeling", "Someone said: {text} Is the feeling positive or negative?", ["positive", "negative"], "pn")]),
    "demo_order": (None, [
        ("is_less", "Is {a} less than {b}? yes or no", ["yes", "no"], "a_lt"),
        ("bigger_number", "Pick the bigger number: {a} or {b}.", ["{a}", "{b}"], "larger")]),
    "demo_kind": (None, [
        ("can_eat", "Can you eat a {w}? yes or no", ["yes", "no"], "is_food"),
        ("which_animal", "Which one is an animal, {first} or {second}?", ["{first}", "{second}"], "animal")]),
}


def _build_demo(out, seed=0, eval_examples=60):
    """Write the demo (P3 layout, task tables, spiece.model) into the empty directory `out`."""
    import sentencepiece as spm
    rng = random.Random(seed)
    train, evals = [], []  # (dataset, template, [(input text, choices or None, target text)])
    for dataset, (n, templates) in _DEMO_TASKS.items():
        for template, fmt, choices, answer in templates:
            fields = [_demo_sample(dataset, rng) for _ in range(n or eval_examples)]
            examples = [(fmt.format(**f), choices and [c.format(**f) for c in choices], f[answer]) for f in fields]
            (train if n else evals).append((dataset, template, examples))
    lines = sorted({s for _, _, exs in train + evals for x, choices, y in exs for s in [x, y, *(choices or [])]})
    model = io.BytesIO()  # written through model_writer: a model_prefix path would be stored in the model
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="unigram", pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
                                   hard_vocab_limit=False, num_threads=1, character_coverage=1.0, minloglevel=2)
    with open(os.path.join(out, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    tok = Tokenizer(os.path.join(out, "spiece.model"))
    assert tok.vocab_size <= 512, f"demo vocabulary {tok.vocab_size} exceeds the tiny preset's 512"
    ids = pa.list_(pa.int32())

    def write(config, split, columns):
        os.makedirs(os.path.join(out, config))
        pq.write_table(pa.table(columns), os.path.join(out, config, f"{split}-00000-of-00001.parquet"),
                       row_group_size=64)

    train_rows, eval_rows = [], []
    for dataset, template, exs in train:
        config = f"{dataset}_{template}"
        cols = {"inputs": pa.array([tok.encode(x) for x, _, _ in exs], ids),
                "inputs_pretokenized": [x for x, _, _ in exs],
                "targets": pa.array([tok.encode(y) + [EOS] for _, _, y in exs], ids),
                "targets_pretokenized": [y for _, _, y in exs]}
        if exs[0][1]:
            cols["answer_choices"] = pa.array([c for _, c, _ in exs], pa.list_(pa.string()))
        write(config, "train", cols)
        choice = str(exs[0][1] is not None)
        train_rows.append([config, dataset, "", template, choice, choice, str(len(exs))])
    for dataset, template, exs in evals:
        config = f"{dataset}_{template}_score_eval"
        flat = [(i, c, x, choices, choice == y) for i, (x, choices, y) in enumerate(exs)
                for c, choice in enumerate(choices)]
        write(config, "validation", {
            "idx": pa.array([[i, c] for i, c, _, _, _ in flat], ids),
            "inputs": pa.array([tok.encode(x) for _, _, x, _, _ in flat], ids),
            "inputs_pretokenized": [x for _, _, x, _, _ in flat],
            "targets": pa.array([tok.encode(ch[c]) + [EOS] for _, c, _, ch, _ in flat], ids),
            "targets_pretokenized": [ch[c] for _, c, _, ch, _ in flat],
            "answer_choices": pa.array([ch for _, _, _, ch, _ in flat], pa.list_(pa.string())),
            "is_correct": [ok for *_, ok in flat], "weight": pa.array([1.0] * len(flat), pa.float32())})
        eval_rows.append([config, dataset, "", template, "validation", str(len(exs)), "True"])
    for name, header, rows in [
            (TRAIN_TABLE, "p3_config dataset subset template original_task has_answer_choices mixing_rate", train_rows),
            (EVAL_TABLE, "p3_config dataset subset_or_round template split raw_examples_in_split in_MoV_eval",
             eval_rows)]:
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join("\t".join(r) for r in [header.split()] + rows) + "\n")


def demo_dir(cache_dir=None):
    """Path of the offline demo (P3 layout + spiece.model + task tables), generated on first use under
    `<cache_dir or $PEFT_MOE_CACHE or ~/.cache/peft-moe>/demo-v1`, atomically (temporary dir, then rename)."""
    root = cache_root(cache_dir)
    path = os.path.join(root, "demo-v1")
    if not os.path.isdir(path):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo-v1-", dir=root)
        try:
            _build_demo(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # a concurrent builder did not win the race either: a real error
                raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    return path
