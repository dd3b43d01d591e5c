"""Smoke tests of bench.py on the `tiny` preset: every configuration runs and reports sane numbers; no timing claims.

The comparisons bench.py draws are only fair if the peers are the same model: these tests check that against
transformers / peft themselves (equal parameter counts), and check evaluate.score_choices against bench's naive
per-choice scorer (a brute-force reference written independently).
"""
import json

import pytest

import bench

TINY = ["--preset", "tiny", "--batch-size", "2", "--input-len", "16", "--target-len", "8", "--warmup", "1",
        "--steps", "1", "--threads", "1", "--eval-examples", "3"]
TRAIN_FIELDS = {"kind", "impl", "name", "method", "experts", "step_s", "step_s_all", "spread", "tokens_per_s", "loss",
                "trainable_params", "total_params", "peak_mem_mb", "mem_method", "wall_s"}
EVAL_FIELDS = {"kind", "examples", "choices", "one_pass_s", "naive_s", "speedup", "spread", "max_abs_score_diff"}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """One in-process run of every configuration, with peers and the evaluation comparison."""
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    records = bench.main(TINY + ["--peer", "--in-process", "--out", str(out)])
    return records, out


def test_every_configuration_reports_positive_numbers(in_process):
    """Each configuration (ours, peers, eval) writes one JSON line with the expected fields and positive numbers."""
    records, out = in_process
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    train = [(r["impl"], r["name"]) for r in records if r["kind"] == "train"]
    assert sorted(train) == sorted([("ours", n) for n in bench.CONFIGS] + [("peer", n) for n in bench.PEERS])
    for r in records:
        if r["kind"] == "train":
            assert TRAIN_FIELDS <= r.keys(), TRAIN_FIELDS - r.keys()
            assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["trainable_params"] > 0
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0  # tiny models may fit in freed memory
            assert r["loss"] > 0
        else:
            assert EVAL_FIELDS <= r.keys(), EVAL_FIELDS - r.keys()
            assert r["one_pass_s"] > 0 and r["naive_s"] > 0 and r["speedup"] > 0


def test_peers_are_the_same_model(in_process):
    """transformers' T5 and peft's IA3 / LoRA have exactly our parameter counts, trainable and total."""
    records, _ = in_process
    ours = {r["name"]: r for r in records if r["kind"] == "train" and r["impl"] == "ours"}
    peer = {r["name"]: r for r in records if r["kind"] == "train" and r["impl"] == "peer"}
    assert ours["full"]["total_params"] == peer["full"]["total_params"]
    for name in bench.PEERS:
        assert ours[name]["trainable_params"] == peer[name]["trainable_params"], name


def test_one_encoder_pass_scores_equal_naive(in_process):
    """evaluate.score_choices gives the same choice scores as a full forward per (example, choice) pair."""
    records, _ = in_process
    ev = next(r for r in records if r["kind"] == "eval")
    assert ev["max_abs_score_diff"] < 1e-4


def test_ordering_interleaves_ours_and_peer():
    """Each configuration's peer runs next to ours, the first of each pair alternating, the evaluation last."""
    specs = bench.plan(bench.parse_args(TINY + ["--peer"]))
    order = [(s["impl"], s["name"]) for s in specs]
    assert order[:4] == [("ours", "full"), ("peer", "full"), ("peer", "ia3"), ("ours", "ia3")]
    assert order[-1] == ("ours", "eval")


def test_markdown_states_every_target(in_process, capsys):
    """The README table names the machine and says met / missed / n/a for each of the five targets."""
    records, _ = in_process
    args = bench.parse_args(TINY + ["--peer"])
    text = bench.markdown(records, args, total_s=1.0)
    assert "torch" in text and "peft" in text and "cores" in text
    rows = bench.targets(records)
    assert len(rows) == 7  # speed and memory for (IA)3 and LoRA, MoV-30, MoLORA-10, evaluation
    assert all(met in (True, False) for _, _, met in rows)


def test_worker_process_measures_memory():
    """The default path runs each configuration in a fresh worker process and reports its peak RSS growth."""
    (record,) = bench.main(TINY + ["--methods", "lora"])
    assert record["impl"] == "ours" and record["name"] == "lora" and record["step_s"] > 0
    assert record["peak_mem_mb"] is not None and record["peak_mem_mb"] >= 0
    assert "in-process" not in record["mem_method"]


def test_unknown_method_is_an_error():
    """A configuration name that does not exist stops the run with a message naming it."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "mov-99"])


@pytest.mark.xla
def test_xla_timed_steps_do_not_recompile():
    """On XLA a MoV training step compiles during warm-up only: zero compilations over the timed steps."""
    (record,) = bench.main(TINY + ["--methods", "mov-10", "--device", "xla", "--warmup", "2", "--steps", "2"])
    assert record["compiles_timed"] == 0
    assert record["step_s"] > 0
