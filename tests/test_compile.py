"""train.py --compile (build.compiled): the torch.compile'd training step gives the eager step's losses, dropout
included, and compiles once. Tiny model, demo data, a few steps; the first step compiles (about a minute on two
cores)."""
import json
import os

import pytest
import torch
import torch._dynamo

import train

pytestmark = pytest.mark.slow  # torch.compile of a training step

ARGS = ["--preset", "demo", "--batch-size", "4", "--input-length", "32", "--target-length", "8", "--steps", "4",
        "--log-every", "1", "--no-evaluate", "--device", "cpu", "--dtype", "float32"]


def logged(out, field):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r[field] for r in map(json.loads, f)}


def test_compiled_steps_equal_eager_and_compile_once(tmp_path):
    """Four MoV steps with dropout 0.1: --compile logs the eager run's losses (1e-5) and routing entropy; dynamo
    compiles at least one graph and never recompiles (error_on_recompile), so later steps reuse the first graph."""
    eager, _ = train.parse_args([*ARGS, "--out", str(tmp_path / "eager")])
    train.main(eager)
    compiled, _ = train.parse_args([*ARGS, "--compile", "--out", str(tmp_path / "compiled")])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        train.main(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    for field in ("loss", "router_entropy"):
        reference, got = logged(tmp_path / "eager", field), logged(tmp_path / "compiled", field)
        assert sorted(got) == [1, 2, 3, 4]
        for step in reference:
            assert got[step] == pytest.approx(reference[step], rel=1e-5), (field, step)
        assert len(set(reference.values())) == 4  # the steps differ: the comparison can fail
