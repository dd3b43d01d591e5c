"""runner/build.py: --dtype auto (bf16 autocast on accelerators and on CPUs with native bf16 matmuls, float32 on
other CPUs; printed at the start of training and recorded in config.json), and models built from settings (the
run's dropout on a loaded checkpoint, MoLORA's top-k)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import molora
import t5
import train
from runner import build
from runner.settings import ModelSettings

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16", "AVX512-BF16"),
                                             ("fpu avx2 amx_tile amx_bf16 amx_int8", "AMX-BF16"),
                                             ("fpu sse2 avx2 fma", "")])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    """cpu_native_bf16 names AMX-BF16 / AVX512-BF16 from /proc/cpuinfo's flags line, and nothing without them."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert build.cpu_native_bf16(str(cpuinfo)) == expected


@pytest.mark.parametrize("native", ["AVX512-BF16", "AMX-BF16", ""])
def test_auto_is_bf16_on_a_cpu_exactly_when_native(monkeypatch, native):
    """--dtype auto on the CPU autocasts to bf16 iff the detection finds native bf16 (and says which); explicit
    dtypes are obeyed either way; a GPU or TPU device is bf16 under auto."""
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: native)
    on, line = build.activations("auto", CPU)
    assert on is bool(native)
    assert (f"bf16 autocast (--dtype auto: CPU with {native})" if native else "float32") in line
    assert build.autocast_enabled("auto", CPU) is bool(native)
    assert build.activations("float32", CPU)[0] is False and build.activations("bfloat16", CPU)[0] is True
    assert build.activations("auto", torch.device("cuda"))[0] is True
    with pytest.raises(ValueError, match="--dtype must be"):
        build.activations("float16", CPU)


def test_training_says_and_records_the_resolved_dtype(tmp_path, monkeypatch, capsys):
    """A --dtype auto run on a CPU detected as AMX-BF16 prints the bf16 line first and writes activations=bfloat16
    (next to dtype=auto) in config.json."""
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: "AMX-BF16")
    cfg, _ = train.parse_args(["--preset", "demo", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                               "--input-length", "32", "--target-length", "8", "--no-evaluate", "--device", "cpu"])
    assert cfg.dtype == "auto"
    train.main(cfg)
    assert "activations: bf16 autocast (--dtype auto: CPU with AMX-BF16)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dtype"] == "auto" and saved["activations"] == "bfloat16" and saved["world_size"] == 1


def test_molora_accepts_top_k_and_dropout_mask_reaches_the_model():
    """--top-k is accepted for molora and reaches every MoLORA layer; --dropout-mask reaches the T5 config."""
    cfg, _ = train.parse_args(["--method", "molora", "--top-k", "2", "--model", "tiny", "--dropout-mask",
                               "elementwise"])
    model = build.build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, molora.MoLoRALinear)]
    assert layers and all(m.router.top_k == 2 for m in layers)
    assert model.config.dropout_mask == "elementwise"


def test_loaded_checkpoint_gets_the_runs_dropout(tmp_path):
    """A checkpoint directory (HF layout) built with --dropout-mask elementwise --dropout 0.2 holds elementwise (HF's)
    dropout modules of rate 0.2 everywhere (no broadcast dimension), its config says so, and its weights are the
    files'."""
    source = t5.T5(t5.T5Config.preset("tiny")).eval()
    c = source.config
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    hf = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "dropout_mask"}
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "t5"}))
    settings = ModelSettings(method="full", model=str(tmp_path), dropout=0.2, dropout_mask="elementwise")
    model = build.build_model(settings, torch.device("cpu"))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(getattr(m, "broadcast_dim", None) is None and m.p == 0.2 for m in drops)  # elementwise
    assert model.config.dropout_mask == "elementwise" and model.config.dropout_rate == 0.2
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
