"""Writing tasks in P3's parquet layout, as demo_data.py does: what data.Mixture and data.load_eval read.

- `<config>/train-00000-of-00001.parquet`: inputs (ids, no EOS), inputs_pretokenized, targets (ids + EOS),
  targets_pretokenized, answer_choices where the template has choices;
- `<config>_score_eval/validation-00000-of-00001.parquet`: one row per (example, choice) with idx, is_correct and
  weight, as t-zero's rank-classification tasks (T5's `rank_classification` preprocessor) lay them out;
- `t0_train_tasks.tsv` / `t0_eval_tasks.tsv` in the format of the project's p3/ tables (mixing rate = examples).
"""
import os

import pyarrow as pa
import pyarrow.parquet as pq

from .project import EOS, EVAL_TABLE, TRAIN_TABLE


def write(out, tok, train, evals):
    """train: [(dataset, template, [(input, choices or None, target)])];
    evals: [(dataset, template, [(input, choices, label)], in_MoV_eval)]."""
    ids = pa.list_(pa.int32())
    cache = {}

    def enc(text):
        if text not in cache:
            cache[text] = tok.encode(text)
        return cache[text]

    def put(config, split, columns):
        os.makedirs(os.path.join(out, config))
        pq.write_table(pa.table(columns), os.path.join(out, config, f"{split}-00000-of-00001.parquet"),
                       row_group_size=256)

    train_rows, eval_rows = [], []
    for dataset, template, exs in train:
        config = f"{dataset}_{template}"
        cols = {"inputs": pa.array([enc(x) for x, _, _ in exs], ids), "inputs_pretokenized": [x for x, _, _ in exs],
                "targets": pa.array([enc(y) + [EOS] for _, _, y in exs], ids),
                "targets_pretokenized": [y for _, _, y in exs]}
        has = exs[0][1] is not None
        if has:
            cols["answer_choices"] = pa.array([list(c) for _, c, _ in exs], pa.list_(pa.string()))
        put(config, "train", cols)
        train_rows.append([config, dataset, "", template, str(has), str(has), str(len(exs))])
    for dataset, template, items, in_eval in evals:
        config = f"{dataset}_{template}_score_eval"
        flat = [(i, c, x, ch, c == lab) for i, (x, ch, lab) in enumerate(items) for c in range(len(ch))]
        put(config, "validation", {
            "idx": pa.array([[i, c] for i, c, _, _, _ in flat], ids),
            "inputs": pa.array([enc(x) for _, _, x, _, _ in flat], ids),
            "inputs_pretokenized": [x for _, _, x, _, _ in flat],
            "targets": pa.array([enc(ch[c]) + [EOS] for _, c, _, ch, _ in flat], ids),
            "targets_pretokenized": [ch[c] for _, c, _, ch, _ in flat],
            "answer_choices": pa.array([list(ch) for _, _, _, ch, _ in flat], pa.list_(pa.string())),
            "is_correct": [ok for *_, ok in flat], "weight": pa.array([1.0] * len(flat), pa.float32())})
        eval_rows.append([config, dataset, "", template, "validation", str(len(items)), str(in_eval)])
    for name, header, rows in [
            (TRAIN_TABLE, "p3_config dataset subset template original_task has_answer_choices mixing_rate", train_rows),
            (EVAL_TABLE, "p3_config dataset subset_or_round template split raw_examples_in_split in_MoV_eval",
             eval_rows)]:
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join("\t".join(r) for r in [header.split()] + rows) + "\n")
