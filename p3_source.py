"""Where P3-layout parquet lives and how it is read: the task tables, the source (hub or local), one task's stream.

P3 (`bigscience/P3` on the hub, parquet, one folder per config) holds every promptsource template of T0's datasets
applied to every example, as bigscience-workshop/t-zero built it (`t0/seqio_tasks/tasks.py`; for-ai/
parameter-efficient-moe copies it as `t0_data/tasks.py`): config `<dataset>_<subset>_<template>` (t-zero's
`get_task_name`), token ids in `inputs` (no EOS) and `targets` (ending in EOS = 1) next to their
`*_pretokenized` text, and for the rank-classification variants (`*_score_eval`) one row per (example, choice)
with `idx`, `is_correct` and `weight`. A local directory in the same layout (`<config>/<split>-*.parquet`) serves
the same rows; text is tokenized with the model's SentencePiece vocabulary only where ids are absent.

The task tables (p3/t0_train_tasks.tsv, p3/t0_eval_tasks.tsv; p3/README.md says where they come from) name the
313 template tasks of t-zero's `t0_train` mixture with their rates (`mixture_cap`: the train size, capped at
`MAX_EXAMPLES_PER_DATASET // num_templates`) and the held-out `*_score_eval` tasks that Zadouri et al. 2023
("Pushing Mixture of Experts to the Limit", arXiv 2309.05444, section 3) evaluate on.

Deliberate deviations from the original (each keeps the distribution; none changes what an example contains):
- Reading: the hub's files are resolved by `datasets` (`load_dataset_builder(...).config.data_files`, the README's
  config -> files map) and read with pyarrow one parquet row group at a time, not through `datasets`' streaming
  iterator: a resume then seeks through parquet metadata (three ints per task) instead of re-reading the stream
  (`IterableDataset.skip(n)` reads n rows). Hub and local sources differ only in how the file list is found.
- Shuffling: seqio shuffles each task's files and examples with a buffer. Here each epoch of a task visits its row
  groups in a random order and each row group's rows in a random order, both drawn from (seed, config, epoch), so
  the state is a position and memory is one row group per open task. `shuffle=False` reads every task in order.
"""
import csv
import difflib
import glob
import os
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenizer import EOS, Tokenizer

P3_HUB = "bigscience/P3"
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "p3")
TRAIN_TABLE, EVAL_TABLE = "t0_train_tasks.tsv", "t0_eval_tasks.tsv"


def unknown_name_error(kind, name, known, where):
    """The error for a name that is not there, with the nearest names that are."""
    near = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; {len(known)} known, e.g. {sorted(known)[:5]}"
    return ValueError(f"unknown {kind} {name!r} in {where}{hint}")


class Source:
    """Where P3-layout parquet lives. Hub: files resolved by `datasets` from the repo's config -> data_files map.
    Local directory: `<dir>/<config>/<split>-*.parquet`. Both are then read by pyarrow through fsspec.
    (`data` resolves the name "demo" to demo_data.demo_dir() before it gets here.)"""

    def __init__(self, source):
        self.name = os.fspath(source)
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
            raise unknown_name_error("config", config, self.configs(), self.name)
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
                raise unknown_name_error("split", split, splits, f"{self.name}/{config}")
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


class TaskStream:
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
