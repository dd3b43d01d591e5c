"""train.py: the loss, the demo run end to end, resuming, checkpoints and bad inputs (tiny model, demo data)."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import adafactor
from runner import build
from runner import rundir
import train
from conftest import demo_args
from safetensors.torch import load_file


def demo_cfg(out, **overrides):
    """The demo preset, shortened to a handful of steps and small shapes for CI."""
    cfg, _ = train.parse_args(["--preset", "demo", "--out", str(out), "--steps", "6", "--batch-size", "4",
                               "--input-length", "64", "--target-length", "16", "--log-every", "1",
                               "--save-every", "3", "--no-evaluate", "--device", "cpu"])
    return train.Config(**{**cfg.__dict__, **overrides})


def logged_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_loss_is_t5x_average_per_sequence_with_z_loss():
    """loss_fn equals a NumPy loop: per-example mean token CE (+ z-loss) over packed segments, averaged over examples."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5))
    targets = rng.integers(1, 5, size=(2, 6))
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    weights = (segments > 0).astype(np.float64)
    weights[0, 1] = 0.0  # a token without loss still counts nowhere
    batch = {"decoder_target_tokens": torch.tensor(targets), "decoder_segment_ids": torch.tensor(segments),
             "decoder_loss_weights": torch.tensor(weights)}
    loss, ce, z = train.loss_fn(torch.tensor(logits), batch, z_loss=1e-2)
    per_example = []
    for b in range(2):
        for seg in set(segments[b]) - {0}:
            toks = [t for t in range(6) if segments[b, t] == seg and weights[b, t] > 0]
            lse = [np.log(np.exp(logits[b, t]).sum()) for t in toks]
            token_losses = [l - logits[b, t, targets[b, t]] + 1e-2 * l ** 2 for l, t in zip(lse, toks)]
            per_example.append(np.mean(token_losses))
    assert loss.item() == pytest.approx(np.mean(per_example), rel=1e-6)
    assert (ce + z).item() == pytest.approx(loss.item(), rel=1e-6)


def test_count_params_xl_matches_reference_table(capsys):
    """--count-params on the meta device prints the original's trainable counts for xl (see test_param_counts)."""
    expected = {("mov", 10): "7,956,480", ("mov", 30): "23,869,440", ("ia3", 1): "540,672",
                ("lora", 1): "7,471,104", ("molora", 15): "126,074,880"}
    for (method, experts), count in expected.items():
        cfg, action = train.parse_args(["--model", "xl", "--method", method, "--experts", str(experts),
                                        "--count-params"])
        assert action == "count"
        text = build.count_params(cfg)
        assert f"trainable parameters {count} " in text, text
        assert "backbone parameters  2,849,757,184" in text, text


def test_demo_runs_end_to_end_and_evaluates(tmp_path):
    """The demo preset trains, writes a checkpoint and log, and its evaluation writes eval-max3.json and eval-max3.md (a --eval-max-examples run)."""
    cfg = demo_cfg(tmp_path / "run", steps=3, evaluate=True, eval_max_examples=3)
    result = train.main(cfg)
    assert result["step"] == 3
    assert [s for s, _ in rundir.checkpoints(cfg.out)] == [3]
    assert os.path.exists(tmp_path / "run" / "eval-max3.json") and os.path.exists(tmp_path / "run" / "eval-max3.md")
    assert sorted(logged_losses(cfg.out)) == [1, 2, 3]


def test_resume_after_stop_gives_the_uninterrupted_losses(tmp_path, monkeypatch):
    """A run stopped by SIGTERM at step 4 and resumed logs the same losses as an uninterrupted run."""
    full = demo_cfg(tmp_path / "full")
    train.main(full)
    reference = logged_losses(full.out)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    calls = {"n": 0}
    original_step = adafactor.Adafactor.step

    def step_then_signal(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGTERM)  # as `kill` would, mid-run, between checkpoints (every 3)
        return out
    monkeypatch.setattr(adafactor.Adafactor, "step", step_then_signal)
    part = demo_cfg(tmp_path / "part")
    assert train.main(part)["signal"] == signal.SIGTERM
    assert train.cli  # the command line turns it into exit status 128 + SIGTERM
    assert [s for s, _ in rundir.checkpoints(part.out)] == [3, 4]
    monkeypatch.setattr(adafactor.Adafactor, "step", original_step)
    train.main(part)  # the same command again resumes from step 4
    resumed = logged_losses(part.out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for s in reference:
        assert resumed[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7), s


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_checkpoint_holds_only_adapter_tensors(tmp_path, method):
    """A PEFT checkpoint holds the adapter and router tensors only, none of the frozen backbone."""
    cfg = demo_cfg(tmp_path / method, method=method, experts=3, steps=1)
    train.main(cfg)
    tensors = load_file(os.path.join(rundir.checkpoints(cfg.out)[-1][1], "trainable.safetensors"))
    model = build.build_model(cfg, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable
    assert not any(n.endswith(".weight") for n in tensors), sorted(tensors)[:5]
    assert any("router" in n for n in tensors)


@pytest.mark.parametrize("argv, message", [
    (["--method", "adapterx"], "invalid choice"),
    (["--experts", "0"], "--experts must be positive"),
    (["--top-k", "5", "--experts", "4"], "--top-k must be between 1 and --experts"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--compile", "--remat"], "--compile applies to steps without --remat"),
    (["--compile", "--device", "xla"], "--compile applies to CPU or CUDA steps"),
    (["--eval-max-examples", "5"], "--eval-max-examples applies with --evaluate only"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    """Unknown methods, impossible values and unknown flags stop with a message naming them."""
    with pytest.raises((SystemExit, ValueError)) as err:
        train.parse_args(argv)
    assert message in str(err.value) + capsys.readouterr().err


def test_missing_model_directory_is_a_clear_error(tmp_path):
    """A --model path that does not exist fails with an error naming it."""
    cfg = demo_cfg(tmp_path / "run", model=str(tmp_path / "no_such_model"))
    with pytest.raises(Exception, match="no_such_model"):
        train.main(cfg)


def test_checkpoint_of_another_method_refuses_to_load(tmp_path):
    """Resuming a run directory with another method or expert count names the mismatch."""
    train.main(demo_cfg(tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="method: saved 'mov', asked 'molora'"):
        train.main(demo_cfg(tmp_path / "run", method="molora", steps=2))
    with pytest.raises(ValueError, match="experts: saved 10, asked 4"):
        train.main(demo_cfg(tmp_path / "run", experts=4, steps=2))


def test_log_has_one_line_per_logged_step_with_that_steps_values(tmp_path):
    """With a log interval of 3 (and checkpoints every 6), log.jsonl has a line for steps 3 and 6 only, each with that
    step's loss and examples_seen from a log-every-step run, and loss_mean the mean of the losses since the line
    before."""
    every = demo_cfg(tmp_path / "every")
    train.main(every)
    sparse = demo_cfg(tmp_path / "sparse", log_every=3, save_every=6)
    train.main(sparse)

    def lines(out):
        with open(os.path.join(out, "log.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f)}
    dense, logged = lines(every.out), lines(sparse.out)
    assert sorted(logged) == [3, 6] and sorted(dense) == [1, 2, 3, 4, 5, 6]
    for step in (3, 6):
        assert logged[step]["examples_seen"] == dense[step]["examples_seen"]
        assert logged[step]["loss"] == pytest.approx(dense[step]["loss"], rel=1e-6)
        assert logged[step]["loss_mean"] == pytest.approx(np.mean([dense[s]["loss"] for s in range(step - 2, step + 1)]),
                                                          rel=1e-6)


def test_sentence_routing_trains_on_minilm_embeddings(tmp_path):
    """--router-input sentence trains with the real MiniLM embedder: routers read 384-d embeddings and change."""
    cfg = demo_cfg(tmp_path / "sentence", router_input="sentence", experts=3, steps=2)
    train.main(cfg)
    tensors = load_file(os.path.join(rundir.checkpoints(cfg.out)[-1][1], "trainable.safetensors"))
    routers = {n: t for n, t in tensors.items() if n.endswith("mov_router")}
    assert routers and all(tuple(t.shape) == (384, 3) for t in routers.values())
    torch.manual_seed(cfg.seed + 1)
    fresh = build.build_model(cfg, torch.device("cpu"))
    assert any(not torch.equal(routers[n], p) for n, p in fresh.named_parameters() if n in routers)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A non-finite loss at step 5 stops the run with a message; the step-3 checkpoint stays and none is added."""
    calls = {"n": 0}
    original = train.loss_fn

    def nan_at_step_5(logits, batch, z_loss):
        calls["n"] += 1
        loss, ce, z = original(logits, batch, z_loss)
        return (loss * float("nan"), ce, z) if calls["n"] == 5 else (loss, ce, z)
    monkeypatch.setattr(train, "loss_fn", nan_at_step_5)
    cfg = demo_cfg(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        train.main(cfg)
    assert [s for s, _ in rundir.checkpoints(cfg.out)] == [3]
    assert sorted(logged_losses(cfg.out)) == [1, 2, 3, 4]


def test_a_nan_loss_after_resuming_names_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    """A non-finite loss at the first step after resuming from step 3 names that checkpoint as the one the run
    resumed from, and calls no checkpoint intact."""
    cfg = demo_cfg(tmp_path / "run", steps=3)
    train.main(cfg)
    original = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda logits, batch, z_loss: tuple(
        x * float("nan") for x in original(logits, batch, z_loss)))
    with pytest.raises(FloatingPointError) as err:
        train.main(demo_cfg(tmp_path / "run"))
    assert f"resumed from {os.path.join(cfg.out, 'checkpoints', 'step_00000003')}" in str(err.value), err.value
    assert "intact" not in str(err.value)


def test_resume_after_a_hard_kill_relogs_nothing_twice(tmp_path):
    """Killed after logging step 5 but before its checkpoint: the resumed log holds steps 1-6 once, as uninterrupted."""
    import shutil
    full = demo_cfg(tmp_path / "full")
    train.main(full)
    part = demo_cfg(tmp_path / "part", steps=5)
    train.main(part)
    shutil.rmtree(dict(rundir.checkpoints(part.out))[5])  # as if SIGKILL struck between the log line and the rename
    train.main(demo_cfg(tmp_path / "part"))
    with open(os.path.join(part.out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    reference = logged_losses(full.out)
    assert [r["loss"] for r in lines] == pytest.approx([reference[s] for s in range(1, 7)], rel=1e-6, abs=1e-7)


E = 3  # experts of the router-option runs


# ----------------------------------------------------------------------------------------------- recipes and router flags
def short_demo(out, *flags):
    return train.parse_args(demo_args(out, "--experts", "3", *flags))[0]


@pytest.mark.parametrize("flags,balance", [(("--method", "mov"), False),
                                           (("--method", "molora", "--top-k", "2", "--router-bias",
                                             "--router-jitter", "0.01", "--load-balance-weight", "0.01"), True)])
def test_demo_run_logs_routing_health(tmp_path, flags, balance):
    """A short demo run of mov / molora writes router_entropy and expert_load_max on every log line (and
    load_balance_loss when --load-balance-weight > 0); the values lie in their ranges."""
    cfg = short_demo(tmp_path / "run", *flags)
    train.main(cfg)
    with open(os.path.join(cfg.out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert 0 < line["router_entropy"] <= math.log(E) + 1e-6 and 1 / E - 1e-6 <= line["expert_load_max"] <= 1
        assert ("load_balance_loss" in line) == balance
        if balance:
            assert line["load_balance_loss"] > 0


# The released configs' recipe per method (for-ai/parameter-efficient-moe configs/*.gin `SaveCheckpointConfig.period`,
# `base_learning_rate`; scripts/*_train.sh BATCH_SIZE and TRAIN_STEPS - 1.1M): batch, lr, steps, checkpoint period.
RELEASED = {"mov": (32, 3e-4, 500_000, 10_000), "molora": (32, 3e-4, 500_000, 10_000),
            "ia3": (32, 3e-4, 500_000, 50_000), "lora": (32, 3e-4, 500_000, 50_000),
            "full": (256, 1e-3, 10_000, 1_000)}


@pytest.mark.parametrize("method", RELEASED)
def test_print_config_shows_each_methods_recipe(method, capsys):
    """`train.py --method M --print-config` prints the released recipe of M as JSON: batch, lr, steps and the
    checkpoint cadence of its configs/*.gin (ia3 / lora every 50k, mov / molora every 10k, the T0 full fine-tune of
    configs/t0.gin every 1k at batch 256, lr 1e-3, 10k steps), LoRA rank 4, 1024/256 tokens, dropout 0.1; and only
    the settings M uses."""
    assert train.cli(["--method", method, "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["batch_size"], cfg["lr"], cfg["steps"], cfg["save_every"]) == RELEASED[method]
    assert (cfg["input_length"], cfg["target_length"], cfg["dropout"], cfg["dropout_mask"]) == \
        (1024, 256, 0.1, "broadcast")
    # only the settings the method uses: experts and router options for mov / molora, rank for lora / molora
    assert ("experts" in cfg, "router_jitter" in cfg, "rank" in cfg) == \
        (method in ("mov", "molora"), method in ("mov", "molora"), method in ("lora", "molora"))
    if "rank" in cfg:
        assert cfg["rank"] == 4
    if "router_jitter" in cfg:
        assert (cfg["router_jitter"], cfg["router_bias"], cfg["load_balance_weight"]) == (0.0, False, 0.0)


@pytest.mark.parametrize("argv,match", [
    (["--method", "lora", "--router-jitter", "0.1"], "--router-jitter applies to --method mov or molora"),
    (["--method", "ia3", "--load-balance-weight", "0.01"], "--load-balance-weight applies"),
    (["--method", "full", "--router-bias"], "--router-bias applies"),
    (["--method", "molora", "--top-k", "11"], "--top-k must be between 1 and --experts"),
    (["--router-jitter", "1.5"], "--router-jitter must be in"),
    (["--load-balance-weight", "-1"], "--load-balance-weight must be"),
])
def test_router_flags_are_validated(argv, match):
    """Router options outside mov/molora, a top-k above the experts, and out-of-range values are refused."""
    with pytest.raises(ValueError, match=match):
        train.parse_args(argv)
