"""runner/settings.py: one settings type read back from every config.json written so far, one flag vocabulary in every
command line, and run directories written by earlier versions (tests/fixtures/) resuming and evaluating."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

import train
from runner.settings import Config, ModelSettings, parse_run_name, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# Run directories written by train.py at commit 76b3f61 (before this layout), float32, one thread:
#   python train.py --preset demo --method M --experts E --steps 4 --save-every 2 --keep 2 --log-every 1
#       --no-evaluate --dtype float32 --out ...          (step 4's checkpoint removed: the test trains it again)
OLD_RUNS = ("demo-mov-4", "demo-molora-2")
# config.json as the first versions wrote it, before the router options and the dropout mask were settings
FIRST_CONFIG = {"method": "mov", "experts": 10, "rank": 4, "alpha": 16.0, "top_k": None, "router_input": "token",
                "model": "tiny", "data": "demo", "steps": 1500, "batch_size": 8, "grad_accum": 1, "input_length": 128,
                "target_length": 32, "lr": 0.01, "adafactor_step_offset": 0, "dropout": 0.1, "z_loss": 1e-4,
                "dtype": "auto", "device": "auto", "fsdp": 1, "remat": False, "out": "runs/demo-mov-10", "seed": 0,
                "save_every": 500, "keep": 3, "log_every": 50, "evaluate": True, "eval_max_examples": 40}


@pytest.mark.parametrize("name", OLD_RUNS)
def test_every_config_written_so_far_reads_back(name):
    """config.json files of earlier versions read back as Config: what they hold, the values those runs used for
    the settings added since (router options off, T5X's broadcast dropout), and nothing unknown."""
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        saved = json.load(f)
    cfg = Config.from_dict(saved)
    assert {k: getattr(cfg, k) for k in saved if k not in ("activations", "world_size")} == \
        {k: v for k, v in saved.items() if k not in ("activations", "world_size")}
    first = Config.from_dict(FIRST_CONFIG)
    assert (first.router_jitter, first.router_bias, first.load_balance_weight, first.dropout_mask, first.compile) == \
        (0.0, False, 0.0, "broadcast", False)
    first.validate()


def test_unknown_and_impossible_settings():
    """A key this version does not know is named in one warning; a value of the wrong type is a ValueError naming
    the file and the setting."""
    with pytest.warns(UserWarning, match="router_temperature"):
        Config.from_dict({**FIRST_CONFIG, "router_temperature": 2.0}, where="run/config.json")
    for key, value in (("experts", "ten"), ("experts", True), ("top_k", 1.5), ("dropout", "0.1")):
        with pytest.raises(ValueError, match=rf"run/config.json holds impossible settings \({key}="):
            Config.from_dict({**FIRST_CONFIG, key: value}, where="run/config.json")


def test_run_names_round_trip():
    """run_name and parse_run_name are inverses for every method; anything else is refused, naming the forms."""
    for method, experts in (("mov", 30), ("molora", 15), ("ia3", None), ("lora", None), ("full", None)):
        assert parse_run_name(run_name(method, experts or 7)) == (method, experts and experts)
    for bad in ("mov", "mov:30", "ia3-2", "moe-4", "mov-x"):
        with pytest.raises(ValueError, match="mov-N"):
            parse_run_name(bad)


def flags_of(argv):
    """The long options of a command line's --help."""
    out = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {w.strip(",[]") for w in out.stdout.split() if w.startswith("--")}


@pytest.mark.slow
def test_every_command_line_spells_a_setting_as_train_py():
    """Each setting that train.py, evaluate.py, generate.py, bench.py and tools/tpu_memory.py share is one flag,
    spelled as Config's field (the old spellings --input-len, --target-len, --batch, --preset in bench are gone)."""
    parser = Config.add_flags(argparse.ArgumentParser())
    ours = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    commands = {"train": ["train.py"], "evaluate": ["evaluate.py"], "generate": ["generate.py"],
                "bench": ["bench.py"], "tpu_memory": ["-m", "tools.tpu_memory"]}
    seen = {name: flags_of(argv) for name, argv in commands.items()}
    assert ours <= seen["train"]
    for name, flags in seen.items():
        assert not flags & {"--input-len", "--target-len", "--batch"}, name
    assert {"--model", "--batch-size", "--input-length", "--target-length", "--device"} <= seen["bench"]
    assert {"--batch-size", "--input-length", "--target-length"} <= seen["tpu_memory"]
    for name in ("evaluate", "generate"):
        assert {"--model", "--method", "--experts", "--rank", "--alpha", "--top-k", "--router-bias",
                "--router-input", "--seed", "--device", "--dtype"} <= seen[name], name


def test_model_settings_validate_like_train():
    """ModelSettings refuses what train.py refuses for a model: router options outside mov / molora, a top-k above
    the experts, a jitter outside [0, 1)."""
    for values, match in ((dict(method="lora", router_jitter=0.1), "--router-jitter applies"),
                          (dict(method="mov", experts=3, top_k=4), "--top-k must be between 1 and --experts"),
                          (dict(method="mov", router_jitter=1.5), "--router-jitter must be in"),
                          (dict(method="ia3", router_input="sentence"), "--router-input sentence applies")):
        with pytest.raises(ValueError, match=match):
            ModelSettings(**values).validate()


def logged(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return {line["step"]: line for line in map(json.loads, f)}


@pytest.mark.parametrize("name", OLD_RUNS)
def test_run_directory_of_an_earlier_version_resumes_and_evaluates(tmp_path, name):
    """A run directory written before this layout (its step-2 checkpoint) resumes with today's train.py and logs
    the losses and routing health the earlier version logged for steps 3 and 4; evaluate.py --run scores it."""
    run = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), run)
    earlier = logged(run)
    method, experts = name.split("-")[1:]
    train.main(train.parse_args(["--preset", "demo", "--method", method, "--experts", experts, "--steps", "4",
                                 "--save-every", "2", "--keep", "2", "--log-every", "1", "--no-evaluate",
                                 "--dtype", "float32", "--device", "cpu", "--out", run])[0])
    now = logged(run)
    assert sorted(now) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "z_loss", "router_entropy", "expert_load_max", "examples_seen"):
            assert now[step][key] == pytest.approx(earlier[step][key], rel=1e-6, abs=1e-7), (step, key)
    import evaluate
    results = evaluate.main(["--run", run, "--step", "2", "--data", "demo", "--max-examples", "2", "--device", "cpu",
                             "--dtype", "float32", "--out", str(tmp_path / "eval")])
    assert results["meta"]["step"] == 2 and results["meta"]["method"] == method
    assert set(results["datasets"]) == {"demo_opinion", "demo_order", "demo_kind"}


def test_the_readme_lists_each_setting_in_its_resume_class():
    """The README's table of which settings may change on resume names every flag of Config once: the identity
    ones (setting(identity=...)) in its identity row, every other but --out in its may-change row."""
    import dataclasses
    import re
    from runner.settings import IDENTITY
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("Which settings may change when a run resumes"):]
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:4]
    identity, changeable = ({m.replace("-", "_") for m in re.findall(r"`--([a-z-]+)`", row)} for row in rows[:2])
    fields = {f.name for f in dataclasses.fields(Config)}
    assert identity == set(IDENTITY)
    assert changeable == fields - set(IDENTITY) - {"out"}
