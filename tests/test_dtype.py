"""--dtype auto (build.activations): bf16 autocast on accelerators and on CPUs with native bf16 matmuls, float32 on
other CPUs; the choice is printed at the start of training and recorded in the run's config.json."""
import json

import pytest
import torch

import build
import train

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
