"""Smoke tests of bench.py on the `tiny` preset: every configuration runs and reports sane numbers; no timing claims.

The comparisons bench.py draws are only fair if the peers are the same model: these tests check that against
transformers / peft themselves (equal parameter counts), check evaluate.score_choices against bench's naive
per-choice scorer (a brute-force reference written independently), and check the FLOP count of bench_flops.py
against torch's own FlopCounterMode on a real training step.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
from tools import bench_flops
from runner import build
from runner.settings import ModelSettings
import t5

pytestmark = pytest.mark.slow  # benchmark workers

TINY = ["--model", "tiny", "--batch-size", "2", "--input-length", "16", "--target-length", "8", "--warmup", "1",
        "--steps", "1", "--threads", "1", "--eval-examples", "3", "--peak-n", "64"]
TRAIN_FIELDS = {"kind", "impl", "name", "method", "experts", "dtype", "step_s", "step_s_all", "spread", "tokens_per_s",
                "loss", "trainable_params", "total_params", "peak_mem_mb", "mem_method", "wall_s", "model_flops",
                "model_flops_per_s"}
EVAL_FIELDS = {"kind", "examples", "choices", "one_pass_s", "naive_s", "speedup", "spread", "max_abs_score_diff"}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """One in-process run of every configuration, with peers and the evaluation comparison."""
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    records = bench.main(TINY + ["--peer", "--in-process", "--out", str(out), "--dtypes", "float32"])
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
            assert r["loss"] > 0 and r["model_flops"] > 0
        elif r["kind"] == "peak":
            assert r["dtype"] == "float32" and r["peak_flops_per_s"] > 0
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
    specs = bench.plan(bench.parse_args(TINY + ["--peer", "--dtypes", "float32,bfloat16"]))
    order = [(s["impl"], s["name"], s["dtype"]) for s in specs]
    assert order[:5] == [("ours", "matmul-peak", "float32"), ("ours", "full", "float32"), ("peer", "full", "float32"),
                         ("peer", "ia3", "float32"), ("ours", "ia3", "float32")]
    assert ("ours", "matmul-peak", "bfloat16") in order and order[-1] == ("ours", "eval", "float32")


def test_markdown_reports_measured_comparisons(in_process, capsys):
    """The report names the machine and gives, for the float32 runs, ours / peft's speed for (IA)3 and LoRA, the
    (IA)3 peak fraction, MoV-30 / (IA)3 and MoLORA-10 / LoRA and the evaluation speed-up (memory where measured);
    no bf16 row when only float32 ran, and no acceptance target."""
    records, _ = in_process
    args = bench.parse_args(TINY + ["--peer", "--dtypes", "float32"])
    text = bench.markdown(records, args, total_s=1.0)
    assert "torch" in text and "peft" in text and "cores" in text and "of peak" in text
    assert "| target |" not in text and "| met |" not in text
    rows = dict(bench.comparisons(records))
    for what in ("fp32: (IA)3 tokens/s, ours / peft's", "fp32: LoRA tokens/s, ours / peft's",
                 "fp32: (IA)3 step, fraction of the matmul peak", "fp32: MoV-30 / (IA)3 step time",
                 "fp32: MoLORA-10 / LoRA step time", "rank classification, one encoder pass / naive per-choice forward"):
        assert what in rows and f"| {what} | {rows[what]} |" in text
    assert not any(k.startswith("bf16") for k in rows)


def test_bf16_runs_ours_and_the_peer_under_autocast():
    """--dtypes bfloat16 runs ours and the peer (in bf16 autocast) with the bf16 matmul peak, and reports the bf16
    comparisons: the peak fraction is a percentage."""
    records = bench.main(TINY + ["--methods", "ia3", "--peer", "--in-process", "--dtypes", "bfloat16"])
    assert [(r["kind"], r["impl"], r["dtype"]) for r in records] == [
        ("peak", "ours", "bfloat16"), ("train", "ours", "bfloat16"), ("train", "peer", "bfloat16")]
    rows = dict(bench.comparisons(records))
    assert rows["bf16: (IA)3 step, fraction of the matmul peak"].endswith("%")
    assert rows["bf16: (IA)3 tokens/s, ours / peft's"].endswith("x")


def test_dtypes_auto_adds_bf16_only_where_native(monkeypatch):
    """--dtypes auto on the CPU is float32 plus bfloat16 exactly when build.cpu_native_bf16 finds native bf16."""
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: "AMX-BF16")
    assert bench.parse_args(TINY + ["--device", "cpu"]).dtypes == ["float32", "bfloat16"]
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: "")
    args = bench.parse_args(TINY + ["--device", "cpu"])
    assert args.dtypes == ["float32"] and "bfloat16" in args.skipped


def _sdpa_as_matmuls(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention written with plain matmuls, which FlopCounterMode counts (the fused CPU kernel
    it does not know)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale + attn_mask, -1) @ v


RELU_T5 = t5.T5Config(96, 32, 8, 64, 2, 1, 4, feed_forward_proj="relu", tie_word_embeddings=True,
                      scale_decoder_outputs=True)


@pytest.mark.parametrize("cfg, method, experts", [
    *[(t5.T5Config.preset("tiny"), m, e) for m, e in [("full", None), ("ia3", None), ("mov", 3), ("lora", None),
                                                      ("molora", 3)]],
    *[(RELU_T5, m, e) for m, e in [("full", None), ("ia3", None), ("mov", 3)]],  # LoRA's targets need wi_0
])
def test_flop_count_equals_torch_flop_counter(monkeypatch, cfg, method, experts):
    """bench_flops.train_step_flops equals the matmul FLOPs torch's FlopCounterMode counts in one forward and
    backward of the model (attention written as matmuls), exactly."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _sdpa_as_matmuls)
    settings = ModelSettings(method=method, experts=experts or 1, rank=4, alpha=16)
    model = build.add_adapters(t5.T5(cfg), settings).eval()  # eval: no dropout, same matmuls
    ids, dec = torch.randint(2, cfg.vocab_size, (2, 12)), torch.randint(2, cfg.vocab_size, (2, 5))
    with FlopCounterMode(display=False) as counter:
        model(ids, dec).logsumexp(-1).sum().backward()
    expected = bench_flops.train_step_flops(cfg, method, experts, 4, 2, 12, 5)
    assert expected["total"] == counter.get_total_flops()


def test_worker_process_measures_memory():
    """The default path runs each configuration in a fresh worker process and reports its peak RSS growth."""
    peak, record = bench.main(TINY + ["--methods", "lora", "--dtypes", "float32"])
    assert peak["kind"] == "peak" and peak["peak_flops_per_s"] > 0
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
    _, record = bench.main(TINY + ["--methods", "mov-10", "--device", "xla", "--warmup", "2", "--steps", "2",
                                   "--dtypes", "float32"])
    assert record["compiles_timed"] == 0
    assert record["step_s"] > 0
