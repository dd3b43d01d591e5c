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
- Reading: the hub's files are found by one recursive listing of the repository at a pinned commit (hub.py), not
  by `datasets` (whose `load_dataset_builder` re-parses P3's 1.5 MB README per config), and read with pyarrow one
  parquet row group at a time by HTTP range requests, not through `datasets`' streaming iterator: a resume then
  seeks through parquet metadata (three ints per task) instead of re-reading the stream (`IterableDataset.skip(n)`
  reads n rows). Hub and local sources differ only in how the file list is found and how bytes are fetched.
- Shuffling: seqio shuffles each task's files and examples with a buffer. Here each epoch of a task visits its row
  groups in a random order and each row group's rows in a random order, both drawn from (seed, config, epoch), so
  the state is a position and memory is one row group per open task. `shuffle=False` reads every task in order.
"""
import csv
import difflib
import glob
import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sources import EVAL_TABLE, TRAIN_TABLE, hub
from sources.tokenizer import EOS, Tokenizer

P3_HUB = "bigscience/P3"
TABLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "p3")  # the repository's p3/


def unreadable_error(path, config, err, local=True):
    """The error for a parquet file that cannot be read (truncated, corrupt, not parquet), naming it and its config."""
    fix = ("fetch the file again, or move the config's folder out of a local source to leave the task out" if local
           else "the hub's copy is damaged: pass --data a local mirror holding a good copy, or leave the config out "
           "(data.Mixture(tasks=...))")
    return ValueError(f"{path} (config {config!r}) cannot be read as parquet ({type(err).__name__}: {err}); {fix}")


def unknown_name_error(kind, name, known, where):
    """The error for a name that is not there, with the nearest names that are."""
    near = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; {len(known)} known, e.g. {sorted(known)[:5]}"
    return ValueError(f"unknown {kind} {name!r} in {where}{hint}")


class Source:
    """Where P3-layout parquet lives: a local directory (`<dir>/<config>/<split>-*.parquet`), else a hub dataset
    repository in the same layout, listed once at a pinned commit and read by byte ranges (hub.py). An existing
    directory wins over a hub name. (`data` resolves the name "demo" to sources.demo.demo_dir() before it gets here.)"""

    def __init__(self, source):
        self.name = os.fspath(source)
        self.local, self.hub, self.revision = os.path.isdir(self.name), None, None
        if not self.local:
            self.hub = self._snapshot()
            self.revision = self.hub.sha
        self._configs, self._files = None, {}

    def _snapshot(self):
        """The hub repository `self.name` names, or an error saying it is neither a directory nor on the hub."""
        state = "not a directory" if os.path.exists(self.name) else "no such directory"
        missing = f"data source {self.name!r}: {state} ({os.path.abspath(self.name)})"
        fix = (f"pass a directory in P3's layout (<dir>/<config>/<split>-*.parquet), a hub dataset name like "
               f"{P3_HUB!r}, or demo")
        if not hub.could_be_repo_id(self.name):
            raise FileNotFoundError(f"{missing}; {fix}")
        try:
            return hub.snapshot(self.name)
        except hub.HubError as e:
            if e.reason.startswith("no dataset repository"):
                raise FileNotFoundError(f"{missing}, and {e.reason}; {fix}") from e
            raise OSError(f"{missing}, and {e.reason}. Without the hub: `hf download {self.name} "
                          "--repo-type dataset --local-dir DIR` where it is reachable, then pass DIR") from e

    def describe(self, path):
        """A file's name in messages: the local path, or its hf:// address at the pinned commit."""
        return path if self.local else self.hub.describe(path)

    def _layout(self):
        """{config: {split: [files]}} of the hub snapshot: `<config>/<split>-*.parquet` at the repository root."""
        if not self._files:
            for path in sorted(self.hub.files):
                config, _, name = path.partition("/")
                if name and "/" not in name and name.endswith(".parquet"):
                    self._files.setdefault(config, {}).setdefault(name.split("-")[0], []).append(path)
        return self._files

    def configs(self):
        if self._configs is None:
            if self.local:
                self._configs = {d for d in os.listdir(self.name) if os.path.isdir(os.path.join(self.name, d))}
            else:
                self._configs = set(self._layout())
        return self._configs

    def table(self, filename):
        """The task table: the source's own copy (the demo carries one) or the packaged p3/ one."""
        path = os.path.join(self.name, filename) if self.local else ""
        with open(path if os.path.isfile(path) else os.path.join(TABLE_DIR, filename), newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))

    def files(self, config, split):
        if config not in self.configs():
            raise unknown_name_error("config", config, self.configs(), self.name)
        if self.local:
            folder = glob.escape(os.path.join(self.name, config))
            found = sorted(glob.glob(os.path.join(folder, glob.escape(split) + "-*.parquet")))
            splits = {os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(folder, "*.parquet"))}
        else:
            splits = self._layout()[config]
            found = splits.get(split)
        if not found:
            raise unknown_name_error("split", split, splits, f"{self.name}/{config}")
        return found

    def tokenizer(self):
        """The source directory's spiece.model (the demo ships one), for text that has no token ids."""
        path = os.path.join(self.name, "spiece.model")
        if not os.path.isfile(path):
            raise ValueError(f"{self.name} holds text without token ids and no spiece.model; pass "
                             "tokenizer=sources.tokenizer.Tokenizer.from_pretrained(<the model's name or directory>)")
        return Tokenizer(path)

    def _parquet(self, config, path, read):
        """read(file) on the open file (a pyarrow OSFile, or a hub.HubFile), errors naming the file and config."""
        try:
            with pa.OSFile(path) if self.local else self.hub.open(path) as f:
                return read(f)
        except pa.ArrowException as e:
            raise unreadable_error(self.describe(path), config, e, self.local) from e

    def metadata(self, config, path):
        """The parquet footer (one range request on the hub)."""
        return self._parquet(config, path, lambda f: pq.ParquetFile(f).metadata)

    def read_row_group(self, config, path, meta, group, columns):
        """Row group `group` of the file whose footer is `meta`, these columns only (one range request on the hub)."""
        def read(f):
            if not self.local:
                f.prefetch(hub.column_spans(meta, [group], columns))
            return pq.ParquetFile(f, metadata=meta).read_row_group(group, columns=columns)
        return self._parquet(config, path, read)

    def read(self, config, split, columns):
        """All rows of a (small) config, those of `columns` that it has: the evaluation sets."""
        def read(f):
            pf = pq.ParquetFile(f)
            names = [c for c in pf.schema_arrow.names if c in columns]
            if not self.local:
                f.prefetch(hub.column_spans(pf.metadata, range(pf.metadata.num_row_groups), names))
            return pf.read(columns=names)
        return pa.concat_tables([self._parquet(config, path, read) for path in self.files(config, split)])


def _ids(column):
    """A list<int> column -> (offsets, values) numpy arrays; row i = values[offsets[i]:offsets[i + 1]]."""
    arr = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], pa.list_(pa.int32()))
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


class TaskStream:
    """One template task read row by row, epoch after epoch. Its position (epoch, unit, row) is the checkpoint;
    `unit` indexes the epoch's row-group order. Holds its files' footers and at most one row group's columns."""

    def __init__(self, source, config, split, seed, shuffle, need_text):
        self.source, self.config, self.split, self.seed, self.shuffle = source, config, split, seed, shuffle
        self.need_text, self.salt = need_text, zlib.crc32(config.encode())
        self.epoch = self.unit = self.row = 0
        self.units, self.fields, self.data, self.meta = None, None, None, {}

    def _open(self):
        self.units, self.meta = [], {}
        for path in self.source.files(self.config, self.split):
            meta = self.meta[path] = self.source.metadata(self.config, path)
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
        table = self.source.read_row_group(self.config, path, self.meta[path], group, ids + text)
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
