"""The run directory: settings, log and checkpoints, written so that no interruption can lose a run.

T5X keeps a training run in its `--model_dir` (checkpoints with the optimizer and the dataset iterator state, the
gin config); the original's scripts (for-ai/parameter-efficient-moe `scripts/*.sh`) resume by re-running the same
command. This file is that directory for train.py, evaluate.py and generate.py:

    <run>/config.json                    every setting of the run (written only after the settings are checked)
    <run>/log.jsonl                      one JSON line per logged step
    <run>/checkpoints/step_NNNNNNNN/     trainable.safetensors (adapter and router tensors; all tensors for full
                                         fine-tuning), optimizer.pt (Adafactor and RNG state: tensors, ints and
                                         floats only), state.json (step, data-pipeline position, settings)

Guarantees (tests/test_rundir.py kills, damages and fills the disk under each):
  - Every file is written to a temporary name, flushed, fsynced and renamed into place; a checkpoint is a
    temporary directory renamed once complete (and once the log lines up to its step are fsynced). Pruning renames
    an old checkpoint away before deleting it, so a kill never leaves an incomplete directory under a checkpoint's
    name. Leftover temporaries are removed at start.
  - config.json is written only after check_same_run and resume (train.main); a damaged one is stood in for by the
    settings in the newest checkpoint's state.json, then rewritten.
  - Resume takes the newest checkpoint that loads completely; damaged ones are skipped with a one-line notice. The
    log is cut back to the resumed step, torn lines dropped.
  - Nothing is unpickled: tensors go through safetensors, optimizer state through `torch.load(weights_only=True)`
    (plain tensors and numbers only, no code), the rest through JSON.
  - Errors are `RunDirError` (a ValueError) or `OSError`s whose message names the file and the fix; a full disk
    says so and names the newest intact checkpoint.
"""
import errno
import io
import json
import os
import re
import shutil

import torch

from runner.settings import LORA, METHODS, ROUTED

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE)
LOG_FILE = "log.jsonl"
# The settings that make a checkpoint belong to a run, each with the methods whose tensors it shapes (--experts
# means nothing to ia3, --rank nothing to mov): another value of one that applies refuses to resume.
IDENTITY = {"method": METHODS, "model": METHODS, "experts": ROUTED, "top_k": ROUTED, "router_input": ROUTED,
            "router_bias": ROUTED, "rank": LORA, "alpha": LORA}
_ADDED_LATER = {"router_bias": False}  # identity settings that older run directories do not record
_TEMP = re.compile(r"\.(tmp|trash)-.*|.*\.tmp-\d+")


class RunDirError(ValueError):
    """A run directory (or a file in it) that cannot be used as it is; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def write_atomic(path, content):
    """Write text or bytes to `path` through a temporary file, fsynced and renamed: the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _no_space(err, what, run_dir):
    """The OSError to raise when writing `what` failed: for a full disk, one that says so and names the newest
    intact checkpoint. safetensors reports I/O errors as its own SafetensorError, whose text ends in Rust's
    "(os error N)"; it becomes an OSError naming `what`."""
    full = getattr(err, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(err)
    if not full:
        return err if isinstance(err, OSError) else OSError(f"could not write {what} ({err})")
    found = checkpoints(run_dir)
    newest = found[-1][1] if found else "none yet"
    return OSError(errno.ENOSPC, f"no space left on the disk while writing {what}; the newest intact checkpoint "
                                 f"is {newest}. Free disk space and run the same command to resume")


def read_json(path, what="file", fix=""):
    """A JSON file's content, or RunDirError naming the file (and `fix`) when it is empty, torn or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the {what} is damaged{fix}") from e


# ----------------------------------------------------------------------------------------------- settings
def read_config(run_dir):
    """The settings dict of a run directory's config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} is not a run directory (no config.json); pass the --out of a train.py run")
    fix = ("; rerun this run's train.py command, which rewrites it from the checkpoints' state.json, or restore it "
           "from a backup")
    saved = read_json(path, "run's settings file", fix)
    if not isinstance(saved, dict):
        raise RunDirError(f"{path} holds {type(saved).__name__}, not the run's settings{fix}")
    return saved


def check_same_run(settings, run_dir):
    """Refuse a run directory that holds another method, expert count or model (settings: a dict); return the
    settings it holds (None for a new run). A missing, empty or damaged config.json (rewritten after the checks) is
    stood in for by the settings the newest readable checkpoint's state.json keeps."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--out {run_dir} is a file; pass a directory (new, or a run's to resume it)")
    try:
        saved = read_config(run_dir)
    except RunDirError:
        saved = None
    for _, path in reversed(checkpoints(run_dir) if saved is None else []):
        try:
            saved = read_json(os.path.join(path, STATE_FILE), "checkpoint's state").get("config")
            break
        except (OSError, RunDirError, AttributeError):
            continue
    if not isinstance(saved, dict):
        return None  # a new run, or one whose settings nothing kept: resume() checks the tensors themselves
    diff = [f"{k}: saved {saved.get(k, _ADDED_LATER.get(k))!r}, asked {settings.get(k)!r}" for k in IDENTITY
            if settings.get("method") in IDENTITY[k] and saved.get(k, _ADDED_LATER.get(k)) != settings.get(k)]
    if diff:
        raise RunDirError(f"run directory {run_dir} holds another run ({'; '.join(diff)}). Use another --out, or "
                          "the saved settings to resume it")
    return saved


def trained_tasks(run_dir):
    """The training tasks the newest readable checkpoint's data position lists (None without one): what a resumed
    run's --data must give again (data.check_same_mixture decides)."""
    for _, path in reversed(checkpoints(run_dir)):
        try:
            return read_json(os.path.join(path, STATE_FILE), "checkpoint's state")["data"]["tasks"]
        except (OSError, RunDirError, KeyError, TypeError):
            continue
    return None


def write_config(run_dir, settings):
    os.makedirs(run_dir, exist_ok=True)
    try:
        write_atomic(os.path.join(run_dir, "config.json"), json.dumps(settings, indent=1) + "\n")
    except OSError as e:
        raise _no_space(e, os.path.join(run_dir, "config.json"), run_dir) from e


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoints(run_dir):
    """Checkpoints of a run, oldest first: [(step, path)] (a checkpoint exists only once its directory is renamed)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root)
                  if (m := re.fullmatch(r"step_(\d+)", n)))


def clear_temporaries(run_dir):
    """Remove what a killed run left half-written: temporary checkpoints, half-pruned ones, temporary files."""
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if _TEMP.fullmatch(name):
                    path = os.path.join(folder, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_checkpoint(run_dir, step, model, optimizer, data_state, settings, keep):
    """Trainable tensors, optimizer + RNG state, data position and settings, gathered to the host, to a temporary
    directory that is renamed once complete; then all but the newest `keep` are pruned. Returns the path."""
    from safetensors.torch import save_file
    root = os.path.join(run_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:08d}"), os.path.join(root, f".tmp-step_{step:08d}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(tmp, TRAINABLE_FILE))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()  # this process's device: resumable on any number of GPUs
        # torch.save to a file reports a full disk as a bare RuntimeError ("unexpected pos"); through memory
        # (the factored Adafactor state is small) the write is Python's, whose OSError carries the errno
        optimizer_bytes = io.BytesIO()
        torch.save({"optimizer": _to_host(optimizer.state_dict()), "rng": rng}, optimizer_bytes)
        with open(os.path.join(tmp, OPTIMIZER_FILE), "wb") as f:
            f.write(optimizer_bytes.getbuffer())
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "data": data_state, "config": settings}, f)
        # the bytes are durable before the rename publishes them, and so are the log lines up to this step
        for path in [os.path.join(tmp, name) for name in CHECKPOINT_FILES] + [os.path.join(run_dir, LOG_FILE)]:
            if os.path.exists(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.isdir(final):  # a re-save of the same step: move the old one away first
            os.rename(final, os.path.join(root, f".trash-step_{step:08d}"))
        os.rename(tmp, final)
        _fsync_dir(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # a failed write, not a bug
            raise _no_space(e, f"the checkpoint of step {step}", run_dir) from e
        raise
    for _, old in checkpoints(run_dir)[:-keep]:
        trash = os.path.join(root, ".trash-" + os.path.basename(old))
        os.rename(old, trash)  # gone from the list at once; a kill now leaves only a temporary behind
        shutil.rmtree(trash, ignore_errors=True)
    clear_temporaries(run_dir)
    return final


def _to_host(obj):
    """A copy of nested dicts / lists of tensors with every tensor on the CPU (from CUDA, or gathered from XLA)."""
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj.to("cpu") if isinstance(obj, torch.Tensor) else obj


def read_trainable(path):
    """{name: tensor} of a safetensors file, or RunDirError naming the file when it is damaged."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise RunDirError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for truncated files
        raise RunDirError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from e


def load_trainable(model, path, tensors=None):
    """Copy a safetensors file of trainable tensors into `model`'s trainable parameters, strictly by name and shape."""
    saved = read_trainable(path) if tensors is None else tensors
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise RunDirError(f"{path} does not fit this model (check the method, experts and rank): missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise RunDirError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model expects "
                              f"{tuple(p.shape)} (check the experts and rank)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def read_checkpoint(path):
    """(trainable tensors, optimizer.pt content, state.json content) of one checkpoint, each file checked."""
    trainable = read_trainable(os.path.join(path, TRAINABLE_FILE))
    opt_path = os.path.join(path, OPTIMIZER_FILE)
    try:
        extra = torch.load(opt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise RunDirError(f"{opt_path}: no such file") from e
    except Exception as e:  # truncated zip, or a pickle that asks for anything but tensors and numbers
        raise RunDirError(f"{opt_path} cannot be loaded as plain tensors ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(extra, dict) or not {"optimizer", "rng"} <= set(extra):
        raise RunDirError(f"{opt_path} does not hold the optimizer and RNG state")
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise RunDirError(f"{state_path}: no such file")
    state = read_json(state_path, "checkpoint's state")
    if not isinstance(state, dict) or not {"step", "data"} <= set(state):
        raise RunDirError(f"{state_path} lacks the step or the data position")
    return trainable, extra, state


def resume(run_dir, model, optimizer, load_data_state, log=print):
    """Restore the newest checkpoint that loads completely into model, optimizer, RNG and data pipeline (through
    `load_data_state(state_dict)`). Skips damaged ones with a notice. Returns its step, or 0 with none."""
    found = checkpoints(run_dir)
    for step, path in reversed(found):
        try:
            trainable, extra, state = read_checkpoint(path)
            if state["step"] != step:
                raise RunDirError(f"{os.path.join(path, STATE_FILE)} says step {state['step']}, its name {step}")
            load_trainable(model, os.path.join(path, TRAINABLE_FILE), trainable)
            optimizer.load_state_dict(extra["optimizer"])
            load_data_state(state["data"])
            torch.set_rng_state(extra["rng"]["cpu"])
            if "cuda" in extra["rng"] and torch.cuda.is_available():
                cuda = extra["rng"]["cuda"]  # one device's state (older checkpoints: a list, one per device)
                torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)
        except (RunDirError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            log(f"skipping checkpoint {path}: {e}")  # the next one overwrites whatever this one set
            continue
        return step
    if found:
        raise RunDirError(f"no checkpoint of {run_dir} loads (see above). To start over, move "
                          f"{os.path.join(run_dir, 'checkpoints')} and log.jsonl away; to keep a damaged one, "
                          "restore its files from a backup")
    return 0


# ----------------------------------------------------------------------------------------------- log
class LogFile:
    """log.jsonl open for appending, unbuffered: each write() goes to the file at once (a kill loses nothing
    written, a failed write leaves nothing to re-flush at close), and a full disk says so, naming the newest
    intact checkpoint."""

    def __init__(self, path, run_dir):
        self.path, self.run_dir = path, run_dir
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text):
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise _no_space(e, self.path, self.run_dir) from e

    def flush(self):
        pass

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_log(run_dir, step):
    """log.jsonl opened for appending (a LogFile), cut back to the lines of steps <= `step` (a fresh start: an
    empty log). Torn or unparsable lines (a kill or a full disk while writing) are dropped with the lines after."""
    path = os.path.join(run_dir, LOG_FILE)
    keep = []
    if step > 0 and os.path.exists(path):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if not raw.endswith(b"\n") or not isinstance(line, dict) or not isinstance(line.get("step"), int):
                    break
                if line["step"] <= step:
                    keep.append(raw)
    if keep or os.path.exists(path):
        try:
            write_atomic(path, b"".join(keep))
        except OSError as e:
            raise _no_space(e, path, run_dir) from e
    return LogFile(path, run_dir)
