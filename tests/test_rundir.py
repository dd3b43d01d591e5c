"""The run directory survives kills, damaged files, hostile files, full disks and bad input (runner/rundir.py).

Every run here is the command line itself (`python train.py ...`, `python evaluate.py ...`) in a child process,
killed for real where a test says so; tests/cli_child.py forks the children from a server that has already imported
everything, and injects faults by monkeypatching in the child (the product code has no test hooks). The reference
for every resumed run is the same command run once without interruption: the whole log.jsonl must come out equal,
step for step and bit for bit (one thread per process, fp32 on the CPU).
"""
import collections
import errno
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

import cli_child
from runner import rundir

pytestmark = pytest.mark.slow  # kills, damaged files and full disks under train.py child processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo preset shortened as tests/test_train.py's demo_cfg, with a checkpoint every step and two kept, so that
# kills land inside checkpoint writes and pruning.
STEPS = 6
TRAIN = ["--preset", "demo", "--steps", str(STEPS), "--batch-size", "4", "--input-length", "64", "--target-length",
         "16", "--log-every", "1", "--save-every", "1", "--keep", "2", "--no-evaluate", "--device", "cpu"]
Result = collections.namedtuple("Result", "rc out err")


@pytest.fixture(scope="module")
def server():
    """A multiprocessing fork server with torch, train.py and evaluate.py imported, one thread per process."""
    env = {"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["cli_child"])
        multiprocessing.forkserver.ensure_running()
        child = ctx.Process(target=os.getpid)  # waits for the server's imports
        child.start()
        child.join()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return ctx


def start(server, tmp_path, script, *argv, faults=()):
    """Start `python <script> <argv>` in a child; `faults`: [(cli_child fault name, kwargs)]. Returns (the child
    process, its stdout file, its stderr file)."""
    out, err = (os.path.join(tmp_path, f"{name}-{time.monotonic_ns()}") for name in ("out", "err"))
    child = server.Process(target=cli_child.run, args=(script, [str(a) for a in argv], out, err, list(faults)))
    child.start()
    return child, out, err


def cli(server, tmp_path, script, *argv, faults=(), kill=None, timeout=300, started=None):
    """Run `python <script> <argv>` in a child (or wait for `started`, start()'s result); `faults`: [(cli_child fault
    name, kwargs)]; `kill`: (log, lines, seconds): SIGKILL it that many seconds after the file `log` holds that many
    lines, if it still runs. Returns Result(rc, stdout, stderr); rc = -9 for a SIGKILL."""
    child, out, err = started or start(server, tmp_path, script, *argv, faults=faults)
    if kill is not None:
        log, lines, seconds = kill
        while child.is_alive() and (not os.path.exists(log) or open(log, "rb").read().count(b"\n") < lines):
            time.sleep(0.002)
        child.join(seconds)
        if child.is_alive():
            child.kill()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{script} {argv} ran past {timeout} s")
    with open(out) as o, open(err) as e:
        return Result(child.exitcode, o.read(), e.read())


def log_of(run):
    """log.jsonl's lines without the throughput (the only field that depends on the clock)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def leftovers(run):
    """Temporary files and directories in a run directory."""
    return [os.path.join(d, n) for d in (run, os.path.join(run, "checkpoints")) if os.path.isdir(d)
            for n in os.listdir(d) if n.startswith(".") or ".tmp-" in n]


def digest(folder):
    """{relative path: sha256} of every file under `folder` (a symbolic link: its target; a folder: "folder")."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for n in files + dirs:
            path = os.path.join(d, n)
            if os.path.islink(path):
                out[os.path.relpath(path, folder)] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[os.path.relpath(path, folder)] = "folder"
            else:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The log lines of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    r = cli(server, tmp, "train.py", *TRAIN, "--out", tmp / "run")
    assert r.rc == 0, r.err[-3000:]
    lines = log_of(tmp / "run")
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    return lines


@pytest.fixture(scope="module")
def four_steps(server, tmp_path_factory):
    """A run directory stopped cleanly after step 4 (checkpoints 3 and 4), to copy and damage."""
    tmp = tmp_path_factory.mktemp("four")
    r = cli(server, tmp, "train.py", *TRAIN, "--steps", "4", "--out", tmp / "run")
    assert r.rc == 0, r.err[-3000:]
    assert [s for s, _ in rundir.checkpoints(tmp / "run")] == [3, 4]
    return tmp / "run"


def complete_checkpoints_only(run):
    """Every directory listed as a checkpoint holds its three files, whole (a kill never leaves a partial one)."""
    for _, path in rundir.checkpoints(run):
        rundir.read_checkpoint(path)


def finish(server, tmp_path, run, reference):
    """Run the same command to the end; its whole log must equal the uninterrupted run's. Returns the Result."""
    r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run)
    assert r.rc == 0, r.err[-3000:]
    assert log_of(run) == reference
    assert [s for s, _ in rundir.checkpoints(run)] == [STEPS - 1, STEPS]
    assert leftovers(run) == []
    return r


# ----------------------------------------------------------------------------------------------- kills
def test_sigkill_at_random_moments_then_rerun_logs_the_uninterrupted_run(server, reference, tmp_path):
    """SIGKILL at random moments (start-up, log writes, checkpoint writes, pruning: a random time after a random
    number of logged steps) of runs that checkpoint every step, each followed by the same command: the final
    log.jsonl equals the uninterrupted run's, no step missing or twice."""
    rng, run, landed = random.Random(14), tmp_path / "run", 0
    for _ in range(6):
        logged = len(log_of(run)) if (run / "log.jsonl").exists() else 0  # a torn last line is not counted
        kill = (run / "log.jsonl", min(logged + rng.randint(0, 2), STEPS - 1), rng.uniform(0, 0.3))
        r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, kill=kill)
        landed += r.rc == -9
        assert r.rc in (0, -9), r.err[-3000:]
        complete_checkpoints_only(run)
        if r.rc == 0:
            break
    assert landed  # at least one kill struck a running process
    finish(server, tmp_path, run, reference)


@pytest.mark.parametrize("kills", [
    [("kill_before_replace", dict(n=1, name="config.json"))],       # the first config.json write
    [("kill_in_log_write", dict(n=1))],                              # a torn first log line, before any checkpoint
    [("kill_in_save_file", dict(n=1))],                              # inside the first checkpoint's tensor file
    [("kill_before_rename", dict(n=1, prefix=".tmp-step_"))],        # the first checkpoint complete, unpublished
    [("kill_in_save_file", dict(n=3))],                              # inside a later checkpoint's tensor file
    [("kill_before_rename", dict(n=4, prefix=".tmp-step_"))],        # a later checkpoint complete, unpublished
    [("kill_before_rename", dict(n=1, prefix="step_"))],             # pruning: before the rename-away
    [("kill_in_prune", dict(n=2))],                                  # pruning: between rename-away and deletion
    [("kill_in_log_write", dict(n=4))],                              # a torn log line after checkpoints
    [("kill_in_save_file", dict(n=3)), ("kill_before_replace", dict(n=1, name="config.json"))],  # config, resumed
    [("kill_in_save_file", dict(n=3)), ("kill_before_replace", dict(n=1, name="log.jsonl"))],    # log cut, resumed
], ids=lambda kills: "+".join(f"{name}-{'-'.join(map(str, kw.values()))}" for name, kw in kills))
def test_sigkill_inside_a_write_then_rerun_logs_the_uninterrupted_run(server, reference, tmp_path, kills):
    """A SIGKILL at a chosen point of a write (one fault per run, then the same command without faults): every
    checkpoint listed after the kill is complete, the final log.jsonl equals the uninterrupted run's and no
    temporary file or directory is left."""
    run = tmp_path / "run"
    for fault in kills:
        r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, faults=[fault])
        assert r.rc == -9, f"the fault {fault} was never reached: {r.err[-3000:]}"
        complete_checkpoints_only(run)
    finish(server, tmp_path, run, reference)


# ----------------------------------------------------------------------------------------------- damaged files
def _cut(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _torn_log_line(run):
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 2')  # a line cut off by a kill or a full disk


def _newest(run, name):
    return os.path.join(run, "checkpoints", "step_00000004", name)


def _retype_tensors(run):
    """The safetensors header's dtypes rewritten F32 -> I32 (same size): the file still loads, as garbage."""
    path = _newest(run, rundir.TRAINABLE_FILE)
    with open(path, "rb") as f:
        raw = f.read()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].replace(b'"F32"', b'"I32"')
    assert header != raw[8:8 + size]
    with open(path, "wb") as f:
        f.write(raw[:8] + header + raw[8 + size:])


def _nonfinite_tensor(value):
    def damage(run):
        from safetensors.torch import load_file, save_file
        tensors = load_file(_newest(run, rundir.TRAINABLE_FILE))
        tensors[sorted(tensors)[0]].view(-1)[0] = value
        save_file(tensors, _newest(run, rundir.TRAINABLE_FILE))
    return damage


def _optimizer_state_shape(run):
    """One second-moment tensor of the Adafactor state one element longer (a valid file of the wrong layout)."""
    saved = torch.load(_newest(run, rundir.OPTIMIZER_FILE), weights_only=True)
    state = saved["optimizer"]["state"][0]
    key = next(k for k in state if k != "step")
    state[key] = torch.ones(state[key].numel() + 1)
    torch.save(saved, _newest(run, rundir.OPTIMIZER_FILE))


def _edit_state(edit):
    def damage(run):
        with open(_newest(run, rundir.STATE_FILE)) as f:
            state = json.load(f)
        edit(state)
        with open(_newest(run, rundir.STATE_FILE), "w") as f:
            json.dump(state, f)
    return damage


@pytest.mark.parametrize("damage, skipped", [
    (_torn_log_line, False),
    (lambda run: _cut(os.path.join(run, "config.json")), False),
    (lambda run: open(os.path.join(run, "config.json"), "w").close(), False),
    (lambda run: _cut(_newest(run, rundir.TRAINABLE_FILE)), True),
    (lambda run: _cut(_newest(run, rundir.OPTIMIZER_FILE)), True),
    (lambda run: _cut(_newest(run, rundir.STATE_FILE)), True),
    (_retype_tensors, True),
    (_nonfinite_tensor(float("nan")), True),
    (_nonfinite_tensor(float("inf")), True),
    (_optimizer_state_shape, True),
    (_edit_state(lambda state: state["data"]["tasks"].__setitem__(0, "demo_review_is_negative")), True),
    (_edit_state(lambda state: state["data"].__setitem__("ready", [["not", "rows"]])), True),
], ids=["torn-log-line", "config-cut", "config-empty", "trainable-cut", "optimizer-cut", "state-cut",
        "trainable-dtype", "trainable-nan", "trainable-inf", "optimizer-shape", "state-task-name", "state-rows"])
def test_damaged_file_then_rerun_logs_the_uninterrupted_run(server, reference, four_steps, tmp_path, damage,
                                                            skipped):
    """A run stopped at step 4 whose log, settings or newest checkpoint was then damaged (cut, or well-formed with
    wrong content: dtypes, non-finite values, optimizer state shapes, a task name, pending rows): the same command
    completes with the uninterrupted losses, skipping a damaged checkpoint with one notice (resuming step 3)."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run)
    r = finish(server, tmp_path, run, reference)
    notices = [line for line in r.out.splitlines() if line.startswith("skipping checkpoint")]
    assert len(notices) == skipped and all("step_00000004" in line for line in notices), r.out
    assert f"from step {3 if skipped else 4}" in r.out
    assert rundir.settings_at(json.loads((run / "config.json").read_text()), STEPS)["steps"] == STEPS  # rewritten


class _Touch:
    """Unpickling this runs `os.system("touch <marker>")`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    """Unpickling this runs `open(<marker>, "w")`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("crafted", [[4], [3, 4]], ids=["newest", "all"])
def test_crafted_optimizer_state_is_never_unpickled(server, reference, four_steps, tmp_path, crafted):
    """optimizer.pt files whose unpickling would create a file (torch.save's zip format calling os.system, a bare
    pickle calling open): resuming creates no file; it falls back to a clean checkpoint with the uninterrupted
    losses, or, when none is clean, stops with one error line and leaves the run directory as it was."""
    import pickle
    run, markers = tmp_path / "run", [tmp_path / "touched", tmp_path / "opened"]
    shutil.copytree(four_steps, run)
    for step in crafted:
        path = run / "checkpoints" / f"step_{step:08d}" / "optimizer.pt"
        rng = {"cpu": torch.get_rng_state()}
        if step == 4:
            torch.save({"optimizer": _Touch(markers[0]), "rng": rng}, path)
        else:
            path.write_bytes(pickle.dumps({"optimizer": _Open(markers[1]), "rng": rng}))
    before = digest(run)
    if crafted == [4]:
        r = finish(server, tmp_path, run, reference)
    else:
        r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run)
        errors = [line for line in r.err.splitlines() if "error:" in line]
        assert r.rc == 1 and len(errors) == 1 and f"no checkpoint of {run} loads" in errors[0], r.err[-3000:]
        assert digest(run) == before
    notices = [line for line in r.out.splitlines() if line.startswith("skipping checkpoint")]
    assert len(notices) == len(crafted) and all("optimizer.pt" in line for line in notices), r.out
    assert not any(m.exists() for m in markers)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, four_steps):
    """Bad inputs on disk: model directories, data directories, run directories, a plain file."""
    import dataclasses

    import data
    import t5
    from sources import t5_weights
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("inputs")
    p = {"missing": str(root / "no_such_dir"), "empty_dir": str(root / "empty"), "a_file": str(root / "a_file")}
    os.makedirs(p["empty_dir"])
    with open(p["a_file"], "w") as f:
        f.write("not a directory, not safetensors\n")
    # model directories in Hugging Face layout (config.json + model.safetensors), from t5.py's tiny shapes
    torch.manual_seed(0)
    config = t5.T5Config.preset("tiny")
    state = {k: v.contiguous() for k, v in t5.T5(config).state_dict().items()}
    hf = {**dataclasses.asdict(config), "model_type": "t5"}

    def model_dir(name, state=state, config=json.dumps(hf)):
        path = root / name
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
        (path / "config.json").write_text(config)
        p[name] = str(path)
        return path
    assert t5_weights.load(str(model_dir("model_ok"))) is not None  # the undamaged form loads
    model_dir("model_missing_tensor", {k: v for k, v in state.items()
                                       if k != "decoder.block.1.layer.0.SelfAttention.k.weight"})
    (model_dir("model_garbage") / "model.safetensors").write_bytes(b"garbage" * 100)
    _cut(model_dir("model_truncated") / "model.safetensors")
    model_dir("model_no_key", config=json.dumps({k: v for k, v in hf.items() if k != "d_model"}))
    model_dir("model_not_json", config='{"d_model": 64,')
    # data directories: the demo with every parquet file cut in half, and without its held-out configs
    demo = data.demo_dir()
    p["data_corrupt"], p["data_no_eval"] = str(root / "data_corrupt"), str(root / "data_no_eval")
    shutil.copytree(demo, p["data_corrupt"])
    for d, _, files in os.walk(p["data_corrupt"]):
        for n in files:
            if n.endswith(".parquet"):
                _cut(os.path.join(d, n))
    shutil.copytree(demo, p["data_no_eval"], ignore=shutil.ignore_patterns("*_score_eval"))
    p["data_fewer_tasks"] = str(root / "data_fewer_tasks")  # another mixture: one training task less
    shutil.copytree(demo, p["data_fewer_tasks"], ignore=shutil.ignore_patterns("demo_opposite_repeat"))
    p["prompts_latin1"] = str(root / "prompts.txt")
    with open(p["prompts_latin1"], "wb") as f:
        f.write("first prompt\nun caf\u00e9 ?\n".encode("latin-1"))
    # run directories: copies of a 4-step demo run (checkpoints 3 and 4), each damaged one way
    for name in ("run_mov", "run_damaged", "run_nan", "run_config_garbage", "run_config_type", "run_no_ckpt"):
        p[name] = str(root / name)
        shutil.copytree(four_steps, p[name])
    for step in (3, 4):
        _cut(os.path.join(p["run_damaged"], "checkpoints", f"step_{step:08d}", "trainable.safetensors"))
        from safetensors.torch import load_file
        tensors = load_file(os.path.join(p["run_nan"], "checkpoints", f"step_{step:08d}", "trainable.safetensors"))
        tensors[sorted(tensors)[-1]].view(-1)[-1] = float("nan")
        save_file(tensors, os.path.join(p["run_nan"], "checkpoints", f"step_{step:08d}", "trainable.safetensors"))
    with open(os.path.join(p["run_config_garbage"], "config.json"), "w") as f:
        f.write("{garbage")
    settings = json.load(open(os.path.join(p["run_config_type"], "config.json")))
    with open(os.path.join(p["run_config_type"], "config.json"), "w") as f:
        json.dump({**settings, "experts": "ten"}, f)
    shutil.rmtree(os.path.join(p["run_no_ckpt"], "checkpoints"))
    return p


# (script, arguments, what the error line says); {name} is a path of the `inputs` fixture, {new} a fresh --out
BAD = {
    "train-method": ("train.py", "--method adapterx", "invalid choice: 'adapterx'"),
    "train-unknown-flag": ("train.py", "--no-such-flag", "unrecognized arguments: --no-such-flag"),
    "train-experts-0": ("train.py", "--experts 0", "--experts must be positive, got 0"),
    "train-experts-text": ("train.py", "--experts ten", "invalid int value: 'ten'"),
    "train-steps-negative": ("train.py", "--steps -3", "--steps must be positive, got -3"),
    "train-keep-0": ("train.py", "--keep 0", "--keep must be positive, got 0"),
    "train-eval-max-examples-0": ("train.py", "--evaluate --eval-max-examples 0",
                                  "--eval-max-examples must be positive, got 0"),
    "train-z-loss-negative": ("train.py", "--z-loss -1", "--z-loss must be a number >= 0, got -1.0"),
    "train-alpha-0": ("train.py", "--alpha 0", "--alpha must be a positive number, got 0.0"),
    "train-lr-nan": ("train.py", "--lr nan", "--lr must be a positive number, got nan"),
    "train-dropout-1": ("train.py", "--dropout 1", "--dropout must be in [0, 1), got 1.0"),
    "train-top-k": ("train.py", "--top-k 11", "--top-k must be between 1 and --experts (10), got 11"),
    "train-data-missing": ("train.py", "--data {missing}", "{missing}"),
    "train-data-file": ("train.py", "--data {a_file}", "{a_file}"),
    "train-data-empty-dir": ("train.py", "--data {empty_dir}", "{empty_dir}"),
    "train-data-corrupt-parquet": ("train.py", "--data {data_corrupt}", "{data_corrupt}/demo_"),
    "train-model-missing": ("train.py", "--model {missing}", "{missing}"),
    "train-model-missing-tensor": ("train.py", "--model {model_missing_tensor}",
                                   "decoder.block.1.layer.0.SelfAttention.k.weight"),
    "train-model-garbage": ("train.py", "--model {model_garbage}", "{model_garbage}/model.safetensors"),
    "train-model-truncated": ("train.py", "--model {model_truncated}", "{model_truncated}/model.safetensors"),
    "train-model-config-key": ("train.py", "--model {model_no_key}", "{model_no_key}/config.json"),
    "train-model-config-not-json": ("train.py", "--model {model_not_json}", "{model_not_json}/config.json"),
    "train-count-params-config-key": ("train.py", "--count-params --model {model_no_key}",
                                      "{model_no_key}/config.json"),
    "train-count-params-config-not-json": ("train.py", "--count-params --model {model_not_json}",
                                           "{model_not_json}/config.json"),
    "train-other-method": ("train.py", "--out {run_mov} --method molora", "method: saved 'mov', asked 'molora'"),
    "train-other-experts": ("train.py", "--out {run_mov} --experts 4", "experts: saved 10, asked 4"),
    "train-other-seed": ("train.py", "--out {run_mov} --seed 1",
                         "--seed: saved 0, asked 1). Pass --seed 0 to resume it, or another --out"),
    "train-other-batch-size": ("train.py", "--out {run_mov} --batch-size 8",
                               "--batch-size: saved 4, asked 8). Pass --batch-size 4 to resume it"),
    "train-other-input-length": ("train.py", "--out {run_mov} --input-length 32",
                                 "--input-length: saved 64, asked 32). Pass --input-length 64 to resume it"),
    "train-other-mixture": ("train.py", "--out {run_mov} --data {data_fewer_tasks}",
                            "To resume it, pass --data demo"),
    "train-all-checkpoints-damaged": ("train.py", "--out {run_damaged}", "no checkpoint of {run_damaged} loads"),
    "train-all-checkpoints-nan": ("train.py", "--out {run_nan}", "no checkpoint of {run_nan} loads"),
    "train-out-is-a-file": ("train.py", "--out {a_file}", "{a_file}"),
    "train-ctrl-c-at-start-up": ("train.py", "--out {run_mov}", "interrupted"),
    "evaluate-run-missing": ("evaluate.py", "--run {missing}", "--run {missing}: no such directory"),
    "evaluate-run-not-a-run": ("evaluate.py", "--run {empty_dir}", "{empty_dir} is not a run directory"),
    "evaluate-run-config-not-json": ("evaluate.py", "--run {run_config_garbage}",
                                     "{run_config_garbage}/config.json is not valid JSON"),
    "evaluate-run-config-bad-value": ("evaluate.py", "--run {run_config_type}", "experts='ten'"),
    "evaluate-run-no-checkpoint": ("evaluate.py", "--run {run_no_ckpt}", "{run_no_ckpt} has no checkpoint yet"),
    "evaluate-run-all-damaged": ("evaluate.py", "--run {run_damaged}", "no checkpoint of {run_damaged} loads"),
    "evaluate-run-all-nan": ("evaluate.py", "--run {run_nan}", "no checkpoint of {run_nan} loads"),
    "generate-run-all-nan": ("generate.py", "--run {run_nan} hello", "no checkpoint of {run_nan} loads"),
    "generate-max-new-tokens-0": ("generate.py", "--model tiny --max-new-tokens 0 hello",
                                  "--max-new-tokens must be positive, got 0"),
    "generate-input-file-not-utf8": ("generate.py", "--model tiny --input-file {prompts_latin1}",
                                     "--input-file {prompts_latin1} line 2 is not UTF-8 text"),
    "evaluate-run-step-missing": ("evaluate.py", "--run {run_mov} --step 99", "no checkpoint of step 99"),
    "evaluate-data-without-held-out": ("evaluate.py", "--run {run_mov} --data {data_no_eval}",
                                       "--data {data_no_eval} has no evaluation tasks"),
    "evaluate-data-corrupt-parquet": ("evaluate.py", "--run {run_mov} --data {data_corrupt}",
                                      "{data_corrupt}/demo_"),
    "evaluate-adapter-garbage": ("evaluate.py", "--model tiny --adapter {a_file}",
                                 "{a_file} cannot be read as safetensors"),
    "evaluate-adapter-missing": ("evaluate.py", "--model tiny --adapter {missing}", "--adapter {missing}"),
    "evaluate-adapter-other-shape": ("evaluate.py", "--model tiny --experts 4 --adapter "
                                     "{run_mov}/checkpoints/step_00000004", "step_00000004/trainable.safetensors"),
    "evaluate-model-garbage": ("evaluate.py", "--model {model_garbage}", "{model_garbage}/model.safetensors"),
    "evaluate-model-config-key": ("evaluate.py", "--model {model_no_key}", "{model_no_key}/config.json"),
    "evaluate-max-examples-0": ("evaluate.py", "--run {run_mov} --max-examples 0",
                                "--max-examples must be positive, got 0"),
    "evaluate-batch-size-negative": ("evaluate.py", "--run {run_mov} --batch-size -1",
                                     "--batch-size must be positive, got -1"),
    "evaluate-ctrl-c-at-start-up": ("evaluate.py", "--run {run_mov}", "interrupted"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line_and_changes_nothing(server, inputs, tmp_path, case):
    """Each bad flag value, file or directory, given on the command line, ends the process with a non-zero status
    and exactly one `error:` line naming the value or file, no traceback, and every input left as it was (a
    fresh --out is not even created; except that data is read lazily, so a corrupt training file is met after
    start-up: then no checkpoint is written)."""
    import string
    script, args, needle = BAD[case]
    paths = {**inputs, "new": str(tmp_path / "new")}
    used = {name for _, name, _, _ in string.Formatter().parse(args) if name}
    if script == "train.py":
        argv = [*TRAIN, "--out", "{new}", *args.split()]
    elif script == "generate.py":
        argv = ["--device", "cpu", *args.split()]
    else:
        argv = ["--device", "cpu", "--max-examples", "2", "--out", "{new}", *args.split()]
    argv = [a.format(**paths) for a in argv]
    before = {name: digest(paths[name]) for name in used if os.path.isdir(paths[name])}
    faults = [("sigint_in_build", {})] if "ctrl-c" in case else []
    r = cli(server, tmp_path, script, *argv, faults=faults)
    errors = [line for line in r.err.splitlines() if "error:" in line]
    assert r.rc in ((130,) if faults else (1, 2)), (r.rc, r.err[-3000:])
    assert "Traceback" not in r.err + r.out, r.err[-3000:]
    assert len(errors) == 1 and needle.format(**paths) in errors[0], r.err[-3000:]
    assert {name: digest(paths[name]) for name in before} == before
    if case == "train-data-corrupt-parquet":
        assert rundir.checkpoints(paths["new"]) == []
    else:
        assert not os.path.exists(paths["new"])
    if os.path.isfile(inputs["a_file"]):
        assert open(inputs["a_file"]).read() == "not a directory, not safetensors\n"


@pytest.mark.parametrize("script, args, needle", [
    ("train.py", "--steps ten", "argument --steps: invalid int value: 'ten'"),
    ("train.py", "--methd mov", "unrecognized arguments: --methd mov"),
    ("evaluate.py", "--run x --max-examples many", "argument --max-examples: invalid int value: 'many'"),
    ("generate.py", "--max-new-tokens 5 hello", "one of the arguments --run --model is required"),
    ("bench.py", "--batch-size two", "argument --batch-size: invalid int value: 'two'"),
])
def test_command_line_syntax_errors_are_one_line(server, tmp_path, script, args, needle):
    """What argparse itself rejects (a wrong type, an unknown flag, a missing choice) is one `error:` line naming the
    flag and pointing to --help, with argparse's status 2: no usage block, in each program a user runs."""
    r = cli(server, tmp_path, script, *args.split())
    assert r.rc == 2, r.err
    assert r.err.strip().splitlines() == [f"error: {needle} (see {script} --help)"], r.err


def test_the_command_line_runs_as_the_harness_says(tmp_path):
    """The fork-server harness is `python <script>` itself: a real interpreter gives the same single error line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "train.py", "--z-loss", "-1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: --z-loss must be a number >= 0, got -1.0"


# ----------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a real full disk: the libraries' own errors), or None where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk, leave):
    """Fill `disk` with a ballast file but `leave` bytes (tmpfs counts whole 4 KiB pages)."""
    ballast = os.path.join(disk, "ballast")
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(ballast, os.path.getsize(ballast) - leave)
    return ballast


def one_error(r):
    errors = [line for line in r.err.splitlines() if "error:" in line]
    assert r.rc == 1 and len(errors) == 1 and "Traceback" not in r.err, r.err[-3000:]
    return errors[0]


@pytest.mark.parametrize("free", [12 << 10, 120 << 10], ids=["in-tensors", "in-optimizer-state"])
def test_disk_full_during_a_checkpoint_write(server, reference, small_disk, tmp_path, free):
    """The disk fills up while a checkpoint is written (in trainable.safetensors, 83 KB, or in optimizer.pt,
    103 KB): one error line says so and names the newest intact checkpoint, which is left as it was, with no
    temporary behind; once space is freed the same command completes with the uninterrupted losses."""
    if small_disk is None and free != 12 << 10:
        pytest.skip("cannot mount a tmpfs here; the patched full disk covers the tensor file only")
    run = (small_disk or tmp_path) / "run"
    r = cli(server, tmp_path, "train.py", *TRAIN, "--steps", "3", "--out", run)
    assert r.rc == 0, r.err[-3000:]
    kept = digest(run / "checkpoints")
    if small_disk is not None:
        ballast = fill(small_disk, free)
        r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run)
        os.remove(ballast)
    else:
        r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, faults=[("no_space_in_save_file", dict(n=1))])
    line = one_error(r)
    assert "no space left on the disk" in line and f"{run}/checkpoints/step_00000003" in line, line
    assert digest(run / "checkpoints") == kept and leftovers(run) == []
    finish(server, tmp_path, run, reference)


def test_disk_full_during_a_log_write(server, reference, four_steps, tmp_path):
    """The disk fills up while a log line is written (the kernel's ENOSPC at the write, half the line on disk):
    one error line says so and names the newest intact checkpoint; the same command then completes with the
    uninterrupted log, the torn line gone."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, faults=[("no_space_in_log_write", dict(n=2))])
    line = one_error(r)
    assert "no space left on the disk" in line and f"{run}/checkpoints/step_00000005" in line, line
    assert not (run / "log.jsonl").read_text().endswith("\n")  # the torn line
    finish(server, tmp_path, run, reference)


# ----------------------------------------------------------------------------------------------- evaluate.py --run
@pytest.mark.parametrize("damage", [lambda run: _cut(_newest(run, rundir.TRAINABLE_FILE)), _retype_tensors,
                                    _nonfinite_tensor(float("nan"))], ids=["cut", "dtype", "nan"])
def test_evaluate_run_skips_a_damaged_newest_checkpoint(server, four_steps, tmp_path, damage):
    """evaluate.py --run evaluates the newest checkpoint whose tensors load and pass the checks: with step 4's
    tensors cut, retyped or holding a NaN, step 3, after one notice naming step 4."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run)
    r = cli(server, tmp_path, "evaluate.py", "--run", run, "--device", "cpu", "--max-examples", "2")
    assert r.rc == 0, r.err[-3000:]
    notices = [line for line in r.out.splitlines() if line.startswith("skipping checkpoint")]
    assert len(notices) == 1 and "step_00000004" in notices[0], r.out
    assert json.loads((run / "eval-max2.json").read_text())["meta"]["step"] == 3


def test_evaluate_max_examples_never_overwrites_the_full_evaluation(server, four_steps, tmp_path):
    """--max-examples N writes eval-max<N>.json / .md (N examples per template) and leaves eval.json and eval.md
    as they were; a run whose config.json has a key this train.py does not know evaluates all the same."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "a_setting_from_the_future": 1}))
    (run / "eval.json").write_text('{"full": "evaluation"}\n')
    (run / "eval.md").write_text("# full evaluation\n")
    r = cli(server, tmp_path, "evaluate.py", "--run", run, "--device", "cpu", "--max-examples", "3")
    assert r.rc == 0, r.err[-3000:]
    quick = json.loads((run / "eval-max3.json").read_text())
    assert (run / "eval-max3.md").exists() and quick["meta"]["step"] == 4
    assert {t["examples"] for ts in quick["tasks"].values() for t in ts.values()} == {3}
    assert (run / "eval.json").read_text() == '{"full": "evaluation"}\n'
    assert (run / "eval.md").read_text() == "# full evaluation\n"


def test_generate_run_skips_a_damaged_newest_checkpoint(server, four_steps, tmp_path):
    """generate.py --run answers with the newest checkpoint whose tensors pass the checks: with a NaN in step 4's
    tensors, one notice naming step 4, and the answers and scores of `--step 3`."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    _nonfinite_tensor(float("nan"))(run)
    ask = ["--device", "cpu", "--choices", "positive,negative", "Someone said: the trip was dull. Positive or negative?"]
    fallback = cli(server, tmp_path, "generate.py", "--run", run, *ask)
    step_3 = cli(server, tmp_path, "generate.py", "--run", run, "--step", "3", *ask)
    assert fallback.rc == 0 and step_3.rc == 0, fallback.err[-3000:] + step_3.err[-3000:]
    notices = [line for line in fallback.out.splitlines() if line.startswith("skipping checkpoint")]
    assert len(notices) == 1 and "step_00000004" in notices[0] and "NaN" in notices[0], fallback.out
    assert fallback.out.splitlines()[1:] == step_3.out.splitlines() and "score 'positive'" in step_3.out


# ----------------------------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_while_the_first_runs(server, reference, tmp_path):
    """A second train.py on a run directory that a first one is writing ends with one error line naming the
    directory and the first's pid, and changes nothing; the first then completes with the uninterrupted log."""
    run, go = tmp_path / "run", tmp_path / "go"
    first = start(server, tmp_path, "train.py", *TRAIN, "--out", run,
                  faults=[("pause_after_step", dict(n=3, until=str(go)))])
    try:
        while first[0].is_alive() and not (tmp_path / "go.waiting").exists():
            time.sleep(0.01)
        assert len(log_of(run)) == 2
        before = digest(run)
        second = cli(server, tmp_path, "train.py", *TRAIN, "--out", run)
        line = one_error(second)
        assert f"run directory {run} is being written by another train.py (pid {first[0].pid} " in line, line
        assert digest(run) == before
    finally:
        go.touch()  # whatever happened, the first run goes on to its end
    r = cli(server, tmp_path, "train.py", started=first)
    assert r.rc == 0, r.err[-3000:]
    assert log_of(run) == reference and not (run / rundir.LOCK_FILE).exists()


def test_the_lock_of_a_killed_writer_is_taken_over_with_a_note(server, reference, tmp_path):
    """A train.py SIGKILLed mid-run leaves train.lock naming its pid (the kernel released the lock itself); the same
    command takes it over, says so naming that pid, and completes with the uninterrupted run's log."""
    run = tmp_path / "run"
    r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, faults=[("kill_in_save_file", dict(n=3))])
    assert r.rc == -9, r.err[-3000:]
    held = json.loads((run / "train.lock").read_text())
    r = finish(server, tmp_path, run, reference)
    notes = [line for line in r.out.splitlines() if "train.lock" in line]
    assert len(notes) == 1 and f"pid {held['pid']} on {held['host']}" in notes[0] and "taking it over" in notes[0]
    assert not (run / rundir.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------- settings on resume
def test_settings_changed_on_resume_are_recorded_with_their_step(server, four_steps, tmp_path):
    """A run of 4 steps resumed with another --steps, --lr, --dropout, --z-loss, --grad-accum, --dropout-mask and
    --router-jitter: config.json keeps the settings steps 1-4 ran with and records the new values as one change at
    step 4; settings_at gives either set for its steps, and each log line's lr is its step's."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    first = json.loads((run / "config.json").read_text())
    new = {"steps": 6, "lr": 0.02, "dropout": 0.2, "z_loss": 0.001, "grad_accum": 2, "dropout_mask": "elementwise",
           "router_jitter": 0.1}
    flags = [w for k, v in new.items() for w in (f"--{k.replace('_', '-')}", str(v))]
    r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, *flags)
    assert r.rc == 0, r.err[-3000:]
    record = json.loads((run / "config.json").read_text())
    assert {k: v for k, v in record.items() if k != "changes"} == {k: v for k, v in first.items() if k != "changes"}
    assert record["changes"] == [{"step": 4, "settings": new}]
    assert {k: rundir.settings_at(record, 4)[k] for k in new} == {k: first[k] for k in new}
    assert {k: rundir.settings_at(record, 5)[k] for k in new} == new
    assert [line["lr"] for line in log_of(run)] == [first["lr"]] * 4 + [0.02] * 2


def test_a_resume_from_an_older_checkpoint_forgets_the_changes_after_it():
    """A record with changes at steps 4 and 8, resumed at step 6 (a newer checkpoint lost): the step-8 change is
    dropped (those steps run again); with the settings of step 6 nothing is added, with another lr one change at
    step 6."""
    first = {"method": "mov", "lr": 0.01, "steps": 10, "activations": "float32", "world_size": 1}
    record = {**first, "changes": [{"step": 4, "settings": {"lr": 0.02}}, {"step": 8, "settings": {"lr": 0.03}}]}
    assert rundir.resumed_record(record, {**first, "lr": 0.02}, 6) == {**first, "changes": record["changes"][:1]}
    assert rundir.resumed_record(record, {**first, "lr": 0.05}, 6) == {**first, "changes": [
        {"step": 4, "settings": {"lr": 0.02}}, {"step": 6, "settings": {"lr": 0.05}}]}
    assert [rundir.settings_at(record, s)["lr"] for s in (4, 5, 8, 9)] == [0.01, 0.02, 0.02, 0.03]


def _resume_one_step(server, tmp_path, four_steps, name, *flags):
    """A copy of the 4-step run resumed for one step with `flags`: (step 4's and step 5's trainable tensors,
    step 4's and step 5's optimizer state)."""
    from safetensors.torch import load_file
    run = tmp_path / name
    shutil.copytree(four_steps, run)
    r = cli(server, tmp_path, "train.py", *TRAIN, "--steps", "5", "--out", run, *flags)
    assert r.rc == 0, r.err[-3000:]
    ckpt = [run / "checkpoints" / f"step_{s:08d}" for s in (4, 5)]
    return ([load_file(c / rundir.TRAINABLE_FILE) for c in ckpt],
            [torch.load(c / rundir.OPTIMIZER_FILE, weights_only=True)["optimizer"]["state"] for c in ckpt])


def test_lr_and_step_offset_given_on_resume_drive_the_update(server, four_steps, tmp_path):
    """Resumed for one step with --lr 3x the run's, every parameter moves 3x as far (Adafactor's update is lr times a
    term without lr: same weights, batch and dropout); with --adafactor-step-offset 100, every second moment is
    v5 = (1 - mix) v4 + mix (g^2 + eps1) with mix = (step + 100)^-0.8, g^2 + eps1 taken from the run resumed with the
    saved offset 0 (T5X's decay, adafactor.py's docstring)."""
    lr = json.loads((four_steps / "config.json").read_text())["lr"]
    (p4, p5), (v4, v5) = _resume_one_step(server, tmp_path, four_steps, "same")
    (_, p5_lr), _ = _resume_one_step(server, tmp_path, four_steps, "lr", "--lr", str(3 * lr))
    _, (_, v5_offset) = _resume_one_step(server, tmp_path, four_steps, "offset", "--adafactor-step-offset", "100")
    for name in p4:
        moved, moved_lr = (p4[name] - p5[name]).double(), (p4[name] - p5_lr[name]).double()
        assert moved.abs().max() > 0, name
        # the weights are float32: each moved amount is off by a rounding of the weight itself
        torch.testing.assert_close(moved_lr, 3 * moved, rtol=1e-3, atol=1e-3 * float(moved.abs().max()), msg=name)
    for i in v4:
        step = float(v5[i]["step"])
        mix0, mix100 = step ** -0.8, (step + 100) ** -0.8
        for key in (k for k in v4[i] if k != "step"):
            squared = (v5[i][key].double() - (1 - mix0) * v4[i][key].double()) / mix0
            expected = (1 - mix100) * v4[i][key].double() + mix100 * squared
            torch.testing.assert_close(v5_offset[i][key].double(), expected, rtol=1e-4, atol=1e-30, msg=(i, key))


# ----------------------------------------------------------------------------------------------- the log
def _write_log(run, lines):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "log.jsonl"), "wb") as f:
        f.write(b"".join(lines))


def _line(step):
    return json.dumps({"step": step, "loss": 1.0 / step}).encode() + b"\n"


def test_the_log_keeps_every_good_line_around_a_damaged_one(tmp_path, capsys):
    """Cut back to step 30, a 30-line log whose line 6 holds a byte that is not UTF-8 keeps the 29 other lines as
    they were, and one note names line 6."""
    lines = [_line(s) for s in range(1, 31)]
    lines[5] = lines[5].replace(b"loss", b"lo\xffss")
    _write_log(tmp_path, lines)
    rundir.open_log(str(tmp_path), 30).close()
    notes = capsys.readouterr().out.splitlines()
    assert (tmp_path / "log.jsonl").read_bytes() == b"".join(lines[:5] + lines[6:])
    assert len(notes) == 1 and "1 damaged (line 6)" in notes[0], notes


def test_the_log_keeps_one_line_per_step(tmp_path, capsys):
    """Cut back to step 4, a log holding step 3's line twice (and a torn last line) keeps steps 1-4 once each, and
    one note names the repeated line."""
    lines = [_line(1), _line(2), _line(3), _line(4), _line(3), _line(5)[:9]]
    _write_log(tmp_path, lines)
    rundir.open_log(str(tmp_path), 4).close()
    notes = capsys.readouterr().out.splitlines()
    assert (tmp_path / "log.jsonl").read_bytes() == b"".join(lines[:4])
    assert len(notes) == 1 and "1 repeating a step (line 5)" in notes[0], notes


# ----------------------------------------------------------------------------------------------- paths
def _loop(path):
    os.symlink(os.path.basename(path), path)  # a link to itself: every access fails with ELOOP


@pytest.mark.parametrize("place", [
    ("checkpoints/step_00000004", lambda p: (shutil.rmtree(p), open(p, "w").close())),
    ("checkpoints/step_00000005", _loop),
    ("checkpoints", lambda p: (shutil.rmtree(p), open(p, "w").close())),
    ("config.json", lambda p: (os.remove(p), os.mkdir(p))),
    ("config.json", lambda p: (os.remove(p), _loop(p))),
    ("log.jsonl", lambda p: (os.remove(p), os.mkdir(p))),
    ("log.jsonl", lambda p: (os.remove(p), _loop(p))),
], ids=["checkpoint-a-file", "checkpoint-a-link-loop", "checkpoints-a-file", "config-a-folder", "config-a-link-loop",
        "log-a-folder", "log-a-link-loop"])
def test_a_path_of_the_wrong_kind_is_refused_before_training(server, four_steps, tmp_path, place):
    """A path where the run directory keeps a file or folder, of the wrong kind (a file for a folder, a folder for a
    file, a symbolic link to itself): the same command ends with one error line naming that path and saying to
    remove it, before training (nothing changes); no temporary is named."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    name, damage = place
    damage(str(run / name))
    before = digest(run)
    line = one_error(cli(server, tmp_path, "train.py", *TRAIN, "--out", run))
    assert f"{run / name} is a " in line and "remove it or move it away" in line and ".tmp-" not in line, line
    assert digest(run) == before


def test_a_read_only_run_directory_is_one_error_line(server, four_steps, tmp_path):
    """A run directory that cannot be written (a read-only file system; without root, no write permission): the same
    command ends with one error line naming the directory and saying to make it writable or pass another --out;
    nothing changes, no temporary is named."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and not subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                                       capture_output=True).returncode
    run = disk / "run"
    shutil.copytree(four_steps, run)
    try:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        elif os.geteuid() != 0:
            for d, _, _ in os.walk(run):
                os.chmod(d, 0o555)
        else:
            pytest.skip("root without mount: no read-only directory to be had")
        before = digest(run)
        line = one_error(cli(server, tmp_path, "train.py", *TRAIN, "--out", run))
        assert f"{run} cannot be written" in line and "make it writable, or pass another --out" in line, line
        assert ".tmp-" not in line and digest(run) == before
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
        else:
            for d, _, _ in os.walk(run):
                os.chmod(d, 0o755)


# ----------------------------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_an_unknown_setting_in_a_runs_config_is_named_in_a_warning(server, four_steps, tmp_path, script):
    """evaluate.py --run and generate.py --run on a run whose config.json holds a key this version does not know
    (a newer version wrote it) work, after one warning line naming the key."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "a_setting_from_the_future": 1}))
    argv = ["--max-examples", "1"] if script == "evaluate.py" else ["hello"]
    r = cli(server, tmp_path, script, "--run", run, "--device", "cpu", *argv)
    assert r.rc == 0, r.err[-3000:]
    warned = [line for line in r.err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "a_setting_from_the_future" in warned[0], r.err[-3000:]


# ----------------------------------------------------------------------------------------------- edges
def test_ctrl_c_after_the_results_are_written_is_one_line_and_status_130(server, four_steps, tmp_path):
    """SIGINT after train.py has written everything (as the interpreter ends): exit status 130 with one line, no
    traceback; the run directory is complete."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    r = cli(server, tmp_path, "train.py", *TRAIN, "--steps", "5", "--out", run, faults=[("sigint_after_run", {})])
    errors = [line for line in r.err.splitlines() if "error:" in line]
    assert r.rc == 130 and len(errors) == 1 and "Traceback" not in r.err + r.out, (r.rc, r.err[-3000:])
    assert [s for s, _ in rundir.checkpoints(run)] == [4, 5] and len(log_of(run)) == 5


def test_keep_is_honoured_after_a_kill_while_pruning(server, reference, tmp_path):
    """Killed before the last checkpoint's pruning renamed the oldest away (3 checkpoints for --keep 2): the same
    command, with nothing left to train, leaves the newest 2."""
    run = tmp_path / "run"
    r = cli(server, tmp_path, "train.py", *TRAIN, "--out", run, faults=[("kill_before_rename", dict(n=4,
                                                                                                   prefix="step_"))])
    assert r.rc == -9 and [s for s, _ in rundir.checkpoints(run)] == [4, 5, 6], r.err[-3000:]
    finish(server, tmp_path, run, reference)


def test_a_smaller_keep_on_resume_is_honoured(server, four_steps, tmp_path):
    """A run with checkpoints 3 and 4, rerun with --keep 1 and nothing to train, keeps step 4 alone."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    r = cli(server, tmp_path, "train.py", *TRAIN, "--steps", "4", "--keep", "1", "--out", run)
    assert r.rc == 0, r.err[-3000:]
    assert [s for s, _ in rundir.checkpoints(run)] == [4]


def test_a_checkpoint_folder_without_its_files_is_set_aside(server, reference, four_steps, tmp_path):
    """An empty checkpoints/step_99999999/ neither counts toward --keep nor is deleted: it is moved aside with one
    note naming it, and the run completes with the uninterrupted losses and its newest 2 checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    (run / "checkpoints" / "step_99999999").mkdir()
    r = finish(server, tmp_path, run, reference)
    notes = [line for line in r.out.splitlines() if "step_99999999" in line]
    assert len(notes) == 1 and "moved it aside" in notes[0], r.out
    assert (run / "checkpoints" / "incomplete-step_99999999").is_dir()


def test_a_resume_past_steps_says_so(server, four_steps, tmp_path):
    """Rerun with --steps 2 below its newest checkpoint (step 4), a run says it is past --steps and trains nothing:
    checkpoints and log stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = digest(run / "checkpoints"), log_of(run)
    r = cli(server, tmp_path, "train.py", *TRAIN, "--steps", "2", "--out", run)
    assert r.rc == 0, r.err[-3000:]
    assert f"{run} is at step 4, past --steps 2: nothing to train" in r.out, r.out
    assert (digest(run / "checkpoints"), log_of(run)) == before
