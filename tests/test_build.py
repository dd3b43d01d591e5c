"""runner/build.py: --dtype auto (bf16 autocast on accelerators, float32 on every CPU; printed at the start of
training and recorded in config.json), the CPU thread rule, and models built from settings (the
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
from conftest import demo_args
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
def test_auto_is_float32_on_every_cpu(monkeypatch, native):
    """--dtype auto on the CPU is float32 whether or not the detection finds native bf16 (and the line says which
    case it is); explicit dtypes are obeyed either way; a GPU or TPU device is bf16 under auto."""
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: native)
    on, line = build.activations("auto", CPU)
    assert on is False and line.startswith("activations: float32 (--dtype auto on a CPU")
    assert (native in line) if native else ("emulates bf16" in line)
    assert build.autocast_enabled("auto", CPU) is False
    assert build.activations("float32", CPU)[0] is False and build.activations("bfloat16", CPU)[0] is True
    assert build.activations("auto", torch.device("cuda"))[0] is True
    with pytest.raises(ValueError, match="--dtype must be"):
        build.activations("float16", CPU)


@pytest.mark.parametrize("native", ["AMX-BF16", ""])
def test_training_says_and_records_the_resolved_dtype_and_threads(tmp_path, monkeypatch, capsys, native):
    """A --dtype auto demo run, on a CPU detected with and without native bf16, prints float32 and its thread count
    first and writes activations=float32 and cpu_threads=1 (the tiny model) next to dtype=auto in config.json."""
    monkeypatch.setattr(build, "cpu_native_bf16", lambda: native)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg, _ = train.parse_args(demo_args(tmp_path / "run", "--steps", "1", "--dtype", "auto"))
    assert cfg.dtype == "auto"
    train.main(cfg)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("activations: float32 (--dtype auto on a CPU") and "threads: 1 (a model of" in first
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["dtype"], saved["activations"], saved["cpu_threads"], saved["world_size"]) == ("auto", "float32",
                                                                                              1, 1)


def big_model():
    """A model of 12M parameters, on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return nn.Linear(4000, 3000)


def test_thread_rule(monkeypatch):
    """--threads wins, then OMP_NUM_THREADS; a model under 10M parameters gets one thread; a larger one every core
    this process may use but those other processes are busy on (at least one)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(build.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert build.cpu_threads(big_model(), 3)[0] == 3
    assert build.cpu_threads(t5.T5(t5.T5Config.preset("tiny")))[0] == 1
    for busy, expected in ((0, 4), (1, 3), (3, 1), (6, 1)):
        monkeypatch.setattr(build, "busy_cores", lambda busy=busy: busy)
        threads, line = build.cpu_threads(big_model())
        assert threads == expected and f"threads: {expected}" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert "OMP_NUM_THREADS" in build.cpu_threads(big_model())[1]


def test_busy_cores_reads_the_idle_time_of_this_processs_cores(tmp_path, monkeypatch):
    """busy_cores sums, over the cores this process may use, the non-idle share of the time that passed while it
    slept: core 0 fully busy (+100 jiffies, none idle) and core 1 idle (+100, all idle or iowait) make one busy core
    of the two, and none when the process may use core 1 only; no /proc/stat, none."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 0 100 2000 50 0 0 0 0 0\ncpu0 150 0 50 1000 25 0 0 0 0 0\n"
                    "cpu1 150 0 50 1000 25 0 0 0 0 0\n")
    later = ("cpu  400 0 100 2080 70 0 0 0 0 0\ncpu0 250 0 50 1000 25 0 0 0 0 0\n"
             "cpu1 150 0 50 1080 45 0 0 0 0 0\n")
    first = stat.read_text()

    def sample(seconds):  # the second reading comes after the sleep
        stat.write_text(later)
    monkeypatch.setattr(build.time, "sleep", sample)
    assert build.busy_cores({0, 1}, stat=str(stat)) == 1
    stat.write_text(first)
    assert build.busy_cores({1}, stat=str(stat)) == 0
    stat.write_text(first)
    assert build.busy_cores({0}, stat=str(stat)) == 1
    assert build.busy_cores(stat=str(tmp_path / "none")) == 0


def test_a_resumed_run_keeps_its_thread_count(monkeypatch):
    """The thread count a run recorded is kept when it resumes (sums depend on it), unless --threads says otherwise."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(build, "busy_cores", lambda: 0)
    assert build.cpu_threads(big_model(), kept=3)[0] == 3 and "kept" in build.cpu_threads(big_model(), kept=3)[1]
    assert build.cpu_threads(big_model(), threads=2, kept=3)[0] == 2


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
