"""The run directory: settings, log and checkpoints, written so that no interruption can lose a run, by one writer.

T5X keeps a training run in its `--model_dir` (checkpoints with the optimizer and the dataset iterator state, the
gin config); the original's scripts (for-ai/parameter-efficient-moe `scripts/*.sh`) resume by re-running the same
command. This file is that directory for train.py, evaluate.py and generate.py:

    <run>/config.json                    the settings the run started with, and "changes": [{"step": S, "settings":
                                         {name: value}}], each in effect from step S + 1 on (settings_at)
    <run>/log.jsonl                      one JSON line per logged step
    <run>/train.lock                     while a train.py writes the directory: its pid, host and start time
    <run>/checkpoints/step_NNNNNNNN/     trainable.safetensors (adapter and router tensors; all tensors for full
                                         fine-tuning), optimizer.pt (Adafactor and RNG state: tensors, ints and
                                         floats only), state.json (step, data-pipeline position, the settings record)

Guarantees (tests/test_rundir.py kills, damages and fills the disk under each):
  - One writer: train.py holds an exclusive flock on train.lock for its life (`writer`); a second one is refused,
    naming the holder. The kernel releases the lock of a killed process, so a kill never blocks a resume.
  - Every file is written to a temporary name, flushed, fsynced and renamed into place; a checkpoint is a
    temporary directory renamed once complete (and once the log lines up to its step are fsynced). Pruning renames
    an old checkpoint away before deleting it, so a kill never leaves an incomplete directory under a checkpoint's
    name. Leftover temporaries are removed at start; a path of the wrong kind is refused before anything is written.
  - Settings change only on the record: another value of an identity setting (runner/settings.py) is refused;
    any other change is applied from the resumed step on and appended to config.json's "changes".
  - Resume takes the newest checkpoint that loads completely and passes the checks (dtypes and shapes against the
    model, finite values, the optimizer state's layout, state.json's types); others are skipped with a one-line
    notice. The log is cut back to the resumed step, one line per step, damaged lines dropped and named.
  - Nothing is unpickled: tensors go through safetensors, optimizer state through `torch.load(weights_only=True)`
    (plain tensors and numbers only, no code), the rest through JSON.
  - Errors are `RunDirError` (a ValueError) or `OSError`s whose message names the user's file (never a temporary)
    and the fix; a full disk says so and names the newest intact checkpoint.
"""
import contextlib
import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import socket
import stat
import time
import warnings

import torch

from runner.settings import IDENTITY, RECORD, RESOLVED, Config, flag_text

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE)
LOG_FILE = "log.jsonl"
LOCK_FILE = "train.lock"
INCOMPLETE = "incomplete-"  # prefix of a directory named like a checkpoint that lacked its files, moved aside
_TEMP = re.compile(r"\.(tmp|trash)-.*|.*\.tmp-\d+")
_STEP = re.compile(r"step_(\d+)")


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


class WriteError(OSError):
    """An OSError whose message already names the user's path and the fix (errno kept)."""


def _errno(err):
    """The errno of an OSError, or of safetensors' SafetensorError, whose text ends in Rust's "(os error N)"."""
    if getattr(err, "errno", None) is not None:
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def write_error(err, path, what=None, run_dir=None):
    """The OSError to raise when writing `path` (the user's file or folder, whatever temporary the write went
    through) failed: the errno kept, the message naming `what` (default: `path`) and the fix. A full disk inside a
    run directory names its newest intact checkpoint."""
    if isinstance(err, WriteError):
        return err
    code, what = _errno(err), what or path
    reason = os.strerror(code) if code else str(err)
    if code == errno.ENOSPC:
        if run_dir is None:
            return WriteError(code, f"no space left on the disk while writing {what}; free disk space, or pass "
                                    "another --out")
        found = checkpoints(run_dir)
        newest = found[-1][1] if found else "none yet"
        return WriteError(code, f"no space left on the disk while writing {what}; the newest intact checkpoint is "
                                f"{newest}. Free disk space and run the same command to resume")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(code, f"cannot write {what} ({reason}); make {os.path.dirname(os.path.abspath(path))} "
                                "writable, or pass another --out")
    if code in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY):
        return WriteError(code, f"cannot write {what} ({reason}): a file, folder or symbolic link of the wrong kind "
                                f"is in the way at {path} or above it; remove it or move it away, then rerun")
    return WriteError(code, f"cannot write {what} ({reason})")


def write_atomic(path, content):
    """Write text or bytes to `path` through a temporary file, fsynced and renamed: the old file or the new one.
    A failure is a WriteError naming `path` and the fix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if os.path.isfile(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_json(path, what="file", fix=""):
    """A JSON file's content, or RunDirError naming the file (and `fix`) when it is empty, torn or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the {what} is damaged{fix}") from e


# ----------------------------------------------------------------------------------------------- paths and the lock
def _kind(path):
    """What `path` is, following symbolic links: "folder", "file", "special file", "broken symbolic link",
    "symbolic link loop" or None when nothing is there."""
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else "broken symbolic link"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special file"


def check_paths(run_dir):
    """RunDirError, before anything is written, for a run directory that train.py could not write through: --out not
    a folder, config.json / log.jsonl / train.lock not files, checkpoints not a folder, an entry named like a
    checkpoint that is not a folder (broken or looping links included), or a run directory (or its checkpoints
    folder) that is read-only."""
    kind = _kind(run_dir)
    if kind not in (None, "folder"):
        raise RunDirError(f"--out {run_dir} is a {kind}; pass a folder (new, or a run's to resume it)")
    if kind is None:
        return
    root = os.path.join(run_dir, "checkpoints")
    for name, want in (("config.json", "file"), (LOG_FILE, "file"), (LOCK_FILE, "file"), ("checkpoints", "folder")):
        kind = _kind(os.path.join(run_dir, name))
        if kind not in (None, want):
            raise RunDirError(f"{os.path.join(run_dir, name)} is a {kind}, where the run keeps its {name} {want}; "
                              "remove it or move it away, then rerun")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        kind = _kind(os.path.join(root, name))
        if _STEP.fullmatch(name) and kind != "folder":
            raise RunDirError(f"{os.path.join(root, name)} is a {kind}, named like a checkpoint folder; remove it "
                              "or move it away, then rerun")
    for folder in (run_dir, root):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise RunDirError(f"{folder} cannot be written (read-only); make it writable, or pass another --out")


def _holder(fd):
    """Who holds a lock file, from its content (pid, host, start time), or None when it is empty."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        held = json.loads(raw)
        return f"pid {held['pid']} on {held['host']}, started {held['started']}"
    except (ValueError, KeyError, TypeError):
        return "its holder unreadable"


@contextlib.contextmanager
def writer(run_dir, log=print):
    """The run directory for this process alone, for the life of the `with` block (train.py; rank 0 under torchrun):
    created if new and locked with an exclusive flock on train.lock, which holds this process's pid, host and start
    time. A second writer is refused (RunDirError naming the holder); the kernel releases the lock of a process that
    dies, and the next writer notes the content it left. Readers (evaluate.py, generate.py) take no lock: every
    file is replaced atomically. On the way out the lock file is removed, and a folder created here that nothing
    was written to (bad input) is removed too."""
    check_paths(run_dir)
    created = not os.path.isdir(run_dir)
    path, fd = os.path.join(run_dir, LOCK_FILE), None
    try:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise write_error(e, run_dir) from e
        while fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(e, path) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                fd = None
                raise RunDirError(f"run directory {run_dir} is being written by another train.py ({holder}; "
                                  f"{path}); wait for it to end or stop it, or pass another --out") from None
            # the holder before us removes the file on its way out: if it did after our open, lock the new one
            try:
                now, mine = os.stat(path), os.fstat(fd)
                same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        left = _holder(fd)
        if left is not None:
            log(f"note: {path} was left by a train.py that ended without releasing it ({left}; killed?); "
                "taking it over")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        except OSError as e:
            raise write_error(e, path, run_dir=run_dir) from e
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(path)  # before the lock goes: whoever opens the name next creates a new file
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only when empty: nothing was written


# ----------------------------------------------------------------------------------------------- settings
_FIX = ("; rerun this run's train.py command, which rewrites it from the checkpoints' state.json, or restore it from "
        "a backup")


def read_config(run_dir):
    """The record of a run directory's config.json: the settings it started with and "changes" (see settings_at),
    checked (RunDirError naming the file when it is damaged)."""
    path = os.path.join(run_dir, "config.json")
    kind = _kind(path)
    if kind != "file":
        raise RunDirError(f"{run_dir} is not a run directory (no config.json)" if kind is None else
                          f"{path} is a {kind}, not the run's settings file{_FIX}")
    saved = read_json(path, "run's settings file", _FIX)
    check_record(saved, path)
    return saved


def check_record(record, where):
    """RunDirError naming `where` unless `record` is a settings record: a dict of settings of the right types (any
    config.json written so far; keys this version does not know are named in one warning), with "changes" (if any)
    a list of {"step": int, "settings": {...}} in step order, none of them changing an identity setting but --data."""
    if not isinstance(record, dict):
        raise RunDirError(f"{where} holds {type(record).__name__}, not the run's settings{_FIX}")
    changes = record.get("changes", [])
    if not (isinstance(changes, list) and all(isinstance(c, dict) and set(c) == {"step", "settings"} and
                                              type(c["step"]) is int and isinstance(c["settings"], dict)
                                              for c in changes)):
        raise RunDirError(f"{where}: its \"changes\" are not a list of {{\"step\": int, \"settings\": {{...}}}}{_FIX}")
    if [c["step"] for c in changes] != sorted(c["step"] for c in changes):
        raise RunDirError(f"{where}: its \"changes\" are out of step order{_FIX}")
    first = {k: v for k, v in record.items() if k not in RECORD}
    method = first.get("method", Config.method)
    for c in changes:
        fixed = [k for k in c["settings"] if k != "data" and method in IDENTITY.get(k, ())]
        if fixed:
            raise RunDirError(f"{where}: a change at step {c['step']} of {', '.join(fixed)}, which cannot change in "
                              f"a run{_FIX}")
    try:
        with _quiet() if where in _WARNED else contextlib.nullcontext():
            Config.from_dict(_known(first), where=where)  # the one warning for unknown keys (per file and process)
        _WARNED.add(where)
        with _quiet():
            for c in changes:
                Config.from_dict(_known({**first, **c["settings"]}), where=where)
    except ValueError as e:
        raise RunDirError(str(e)) from e


_WARNED = set()  # the files whose unknown keys were named already: generate.py reads config.json twice


def _known(settings):
    """A flat settings dict without the resolved values and the record's keys: what Config.from_dict reads."""
    return {k: v for k, v in settings.items() if k not in RESOLVED and k not in RECORD}


def settings_at(record, step=math.inf):
    """The settings in effect at `step` (those that ran it; default: the latest): config.json's first settings with
    every change recorded before `step` laid over them ({"step": S, "settings": ...} is in effect from step S + 1)."""
    now = {k: v for k, v in record.items() if k not in RECORD}
    for change in record.get("changes", []):
        if change["step"] < step:
            now.update(change["settings"])
    return now


def run_settings(record, step=math.inf):
    """The Config in effect at `step` of a checked record (settings_at): what evaluate.py and generate.py rebuild."""
    with _quiet():
        return Config.from_dict(_known(settings_at(record, step)))


def _filled(settings):
    """A flat settings dict with what older runs did not record filled in with the value they used (Config's)."""
    with _quiet():
        filled = vars(Config.from_dict(_known(settings)))
    return {**filled, **{k: settings[k] for k in RESOLVED if k in settings}}


@contextlib.contextmanager
def _quiet():
    """Warnings off: check_record names unknown keys once, every later read of the same record is silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_same_run(settings, run_dir):
    """Refuse a run directory whose run has another value of an identity setting (runner/settings.py: method, model,
    experts, seed, batch size, lengths, ...; --data is data.check_same_mixture's) than `settings` (this command's, a
    flat dict), naming each flag, both values and how to resume; return its record (None for a new run). A missing,
    empty or damaged config.json (rewritten after the checks) is stood in for by the record the newest readable
    checkpoint's state.json keeps."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--out {run_dir} is a file; pass a directory (new, or a run's to resume it)")
    try:
        saved = read_config(run_dir)
    except RunDirError:
        saved = None
    for _, path in reversed(checkpoints(run_dir) if saved is None else []):
        try:
            saved = read_json(os.path.join(path, STATE_FILE), "checkpoint's state")["config"]
            check_record(saved, os.path.join(path, STATE_FILE))
            break
        except (OSError, RunDirError, KeyError, TypeError):
            saved = None
    if saved is None:
        return None  # a new run, or one whose settings nothing kept: resume() checks the tensors themselves
    first, asked = _filled(settings_at(saved, 0)), _filled(settings)
    differ = [k for k in IDENTITY if k != "data" and asked["method"] in IDENTITY[k] and first[k] != asked[k]]
    if differ:
        shown = "; ".join(f"--{k.replace('_', '-')}: saved {first[k]!r}, asked {asked[k]!r}" for k in differ)
        resume = " ".join(flag_text(k, first[k]) for k in differ)
        raise RunDirError(f"run directory {run_dir} holds another run ({shown}). Pass {resume} to resume it, or "
                          "another --out for a new run")
    return saved


def resumed_record(saved, settings, step):
    """config.json's content for a run resuming at `step` with `settings` (this command's, flat): the first
    settings and the changes before `step` that `saved` records (later ones belonged to steps about to run again),
    and one change at `step` holding every setting whose value differs from the one in effect then. Identity
    settings do not differ (check_same_run; those of other methods, such as --experts for ia3, mean nothing and
    are not recorded); `out` is the directory itself. A run starting at step 0 records `settings` alone."""
    if saved is None or step == 0:
        return {**settings, "changes": []}
    first = {k: v for k, v in saved.items() if k not in RECORD}
    changes = [c for c in saved.get("changes", []) if c["step"] < step]
    now = _filled(settings_at({**first, "changes": changes}, step))  # the settings that ran step `step`
    fixed = {k for k in IDENTITY if k != "data"} | {"out"}
    changed = {k: v for k, v in settings.items() if k not in fixed and (k not in now or now[k] != v)}
    return {**first, "changes": changes + ([{"step": step, "settings": changed}] if changed else [])}


def trained_tasks(run_dir):
    """The training tasks each readable checkpoint's data position lists, newest first (lists of task names; a
    damaged one may differ from the others, resume then skips it): what a resumed run's --data must give again
    (data.check_same_mixture decides)."""
    found = []
    for _, path in reversed(checkpoints(run_dir)):
        try:
            tasks = read_json(os.path.join(path, STATE_FILE), "checkpoint's state")["data"]["tasks"]
        except (OSError, RunDirError, KeyError, TypeError):
            continue
        if isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks):
            found.append(tasks)
    return found


def write_config(run_dir, record):
    """config.json: the run's settings record (resumed_record)."""
    path = os.path.join(run_dir, "config.json")
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(path, json.dumps(record, indent=1) + "\n")
    except OSError as e:
        raise write_error(e, path, run_dir=run_dir) from e


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoints(run_dir):
    """Checkpoints of a run, oldest first: [(step, path)] (a checkpoint exists only once its directory is renamed)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP.fullmatch(n)))


def clear_temporaries(run_dir):
    """Remove what a killed run left half-written: temporary checkpoints, half-pruned ones, temporary files."""
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if _TEMP.fullmatch(name):
                    path = os.path.join(folder, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)


def set_aside_incomplete(run_dir, log=print):
    """Move a folder named like a checkpoint that lacks one of its three files (our writes never leave one: a
    checkpoint is renamed into place once complete) to checkpoints/incomplete-step_NNNNNNNN, with a note, so that it
    neither counts toward --keep nor is deleted: what it holds is the user's to look at."""
    for step, path in checkpoints(run_dir):
        lacks = [n for n in CHECKPOINT_FILES if _kind(os.path.join(path, n)) != "file"]
        if not lacks:
            continue
        aside = os.path.join(os.path.dirname(path), INCOMPLETE + os.path.basename(path))
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = os.path.join(os.path.dirname(path), f"{INCOMPLETE}{os.path.basename(path)}-{n}")
        try:
            os.rename(path, aside)
        except OSError as e:
            raise write_error(e, path) from e
        log(f"note: {path} lacks {', '.join(lacks)}, so it is no checkpoint; moved it aside to {aside} (delete it "
            "once you no longer need it)")


def prune(run_dir, keep, step):
    """Remove all but the newest `keep` checkpoints, never the one of `step` (resumed from, or just saved) or a newer
    one (skipped as damaged, it is replaced once training reaches its step). Each is renamed away before it is
    deleted: gone from the list at once, a kill leaves only a temporary behind."""
    root = os.path.join(run_dir, "checkpoints")
    for s, old in checkpoints(run_dir)[:-keep]:
        if s >= step:
            continue
        trash = os.path.join(root, ".trash-" + os.path.basename(old))
        try:
            os.rename(old, trash)
        except OSError as e:
            raise write_error(e, old, run_dir=run_dir) from e
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir, step, model, optimizer, data_state, record, keep):
    """Trainable tensors, optimizer + RNG state, data position and the settings record, gathered to the host, to a
    temporary directory that is renamed once complete; then all but the newest `keep` are pruned. Returns the path."""
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
            json.dump({"step": step, "data": data_state, "config": record}, f)
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
            raise write_error(e, final, f"the checkpoint of step {step} ({final})", run_dir) from e
        raise
    prune(run_dir, keep, step)
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


def check_trainable(model, saved, path):
    """RunDirError naming the file and the tensor unless `saved` ({name: tensor}) holds exactly `model`'s trainable
    parameters, each with its shape and dtype, every value finite (training never saves a NaN: it stops first).
    Returns {name: parameter}."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise RunDirError(f"{path} does not fit this model (check the method, experts and rank): missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        t = saved[name]
        if t.shape != p.shape:
            raise RunDirError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)} (check "
                              "the experts and rank)")
        if t.dtype != p.dtype:
            raise RunDirError(f"{path}: {name} is {t.dtype}, the model's parameter {p.dtype}; the file is damaged")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunDirError(f"{path}: {name} holds {_nonfinite(t)}; the file is damaged (training stops before "
                              "it saves a NaN or inf)")
    return params


def _nonfinite(t):
    bad = int((~torch.isfinite(t)).sum())
    return f"{bad} NaN or inf value{'s' if bad > 1 else ''}"


def load_trainable(model, path, tensors=None):
    """Copy a safetensors file of trainable tensors into `model`'s trainable parameters, strictly by name, shape and
    dtype, all finite (check_trainable)."""
    saved = read_trainable(path) if tensors is None else tensors
    params = check_trainable(model, saved, path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def read_checkpoint(path):
    """(trainable tensors, optimizer.pt content, state.json content) of one checkpoint, each file read and its types
    checked (the tensors against a model: check_trainable; the optimizer state: the optimizer's check_state_dict)."""
    trainable = read_trainable(os.path.join(path, TRAINABLE_FILE))
    opt_path = os.path.join(path, OPTIMIZER_FILE)
    try:
        extra = torch.load(opt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise RunDirError(f"{opt_path}: no such file") from e
    except Exception as e:  # truncated zip, or a pickle that asks for anything but tensors and numbers
        raise RunDirError(f"{opt_path} cannot be loaded as plain tensors ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(extra, dict) or not {"optimizer", "rng"} <= set(extra) or not isinstance(extra["rng"], dict):
        raise RunDirError(f"{opt_path} does not hold the optimizer and RNG state")
    cuda = extra["rng"].get("cuda", [])  # one device's state (older checkpoints: a list, one per device)
    for state in [extra["rng"].get("cpu")] + (list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]):
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
            raise RunDirError(f"{opt_path}: its RNG state is not a byte tensor; the file is damaged")
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise RunDirError(f"{state_path}: no such file")
    state = read_json(state_path, "checkpoint's state")
    if not isinstance(state, dict) or not {"step", "data"} <= set(state):
        raise RunDirError(f"{state_path} lacks the step or the data position")
    if type(state["step"]) is not int or not isinstance(state["data"], dict):
        raise RunDirError(f"{state_path}: the step is not an int or the data position not a dict; the file is damaged")
    return trainable, extra, state


def resume(run_dir, model, optimizer, load_data_state, log=print):
    """Restore the newest checkpoint that loads completely and passes the checks into model, optimizer, RNG and data
    pipeline (`load_data_state(state_dict)`, which checks before it changes anything). Every part is checked before
    anything is set; a checkpoint that fails is skipped with a notice. Returns (its step, its path), or (0, None)."""
    found = checkpoints(run_dir)
    for step, path in reversed(found):
        try:
            trainable, extra, state = read_checkpoint(path)
            if state["step"] != step:
                raise RunDirError(f"{os.path.join(path, STATE_FILE)} says step {state['step']}, its name {step}")
            check_trainable(model, trainable, os.path.join(path, TRAINABLE_FILE))
            check = getattr(optimizer, "check_state_dict", None)
            if check is not None:
                check(extra["optimizer"])
            cpu = extra["rng"]["cpu"]
            if cpu.numel() != torch.get_rng_state().numel():
                raise RunDirError(f"{os.path.join(path, OPTIMIZER_FILE)}: its RNG state has {cpu.numel()} bytes, "
                                  f"torch's {torch.get_rng_state().numel()}")
            load_data_state(state["data"])
            load_trainable(model, os.path.join(path, TRAINABLE_FILE), trainable)
            optimizer.load_state_dict(extra["optimizer"])
            torch.set_rng_state(cpu)
            if "cuda" in extra["rng"] and torch.cuda.is_available():
                cuda = extra["rng"]["cuda"]  # one device's state (older checkpoints: a list, one per device)
                torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)
        except (RunDirError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            log(f"skipping checkpoint {path}: {e}")  # nothing was set, or the next one overwrites it all
            continue
        return step, path
    if found:
        raise RunDirError(f"no checkpoint of {run_dir} loads (see above). To start over, move "
                          f"{os.path.join(run_dir, 'checkpoints')} and log.jsonl away; to keep a damaged one, "
                          "restore its files from a backup")
    return 0, None


# ----------------------------------------------------------------------------------------------- log
class LogFile:
    """log.jsonl open for appending, unbuffered: each write() goes to the file at once (a kill loses nothing
    written, a failed write leaves nothing to re-flush at close), and a full disk says so, naming the newest
    intact checkpoint."""

    def __init__(self, path, run_dir):
        self.path, self.run_dir = path, run_dir
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(e, path, run_dir=run_dir) from e

    def write(self, text):
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise write_error(e, self.path, run_dir=self.run_dir) from e

    def flush(self):
        pass

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_log(run_dir, step, log=print):
    """log.jsonl opened for appending (a LogFile), cut back to one line per step up to `step` (a fresh start: an
    empty log). Every well-formed line of a step <= `step` is kept, whatever the other lines hold; a damaged line
    (not UTF-8, not JSON, without an int step) and a repeated step's line are dropped and named in one note (a torn
    last line, which a kill or a full disk leaves, silently)."""
    path = os.path.join(run_dir, LOG_FILE)
    keep, damaged, repeated, last = [], [], [], 0
    if step > 0 and os.path.exists(path):
        with open(path, "rb") as f:
            lines = f.readlines()
        for number, raw in enumerate(lines, 1):
            if not raw.endswith(b"\n"):  # torn: a kill or a full disk while writing
                damaged += [number] if number < len(lines) else []
                continue
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                damaged.append(number)
                continue
            if not isinstance(line, dict) or type(line.get("step")) is not int or line["step"] < 1:
                damaged.append(number)
            elif line["step"] <= last:
                repeated.append(number)
            elif line["step"] <= step:
                keep.append(raw)
                last = line["step"]
        if damaged or repeated:
            shown = [f"{len(n)} {what} (line{'s' if len(n) > 1 else ''} {', '.join(map(str, n[:10]))}"
                     f"{', ...' if len(n) > 10 else ''})" for n, what in ((damaged, "damaged"),
                                                                         (repeated, "repeating a step")) if n]
            log(f"note: {path}: dropped {' and '.join(shown)}; kept the {len(keep)} other lines up to step {step}")
    if keep or os.path.exists(path):
        try:
            write_atomic(path, b"".join(keep))
        except OSError as e:
            raise write_error(e, path, run_dir=run_dir) from e
    return LogFile(path, run_dir)
