"""Runs `python train.py ...` / `python evaluate.py ...` in child processes, with faults injected from outside.

tests/test_rundir.py starts a multiprocessing fork server that has imported this module (and through it torch,
train.py, evaluate.py and the libraries they import lazily), so a child skips ~10 s of imports on two shared cores.
Each child runs the script's `__main__` block through `runpy`, as the interpreter would: stdout and stderr go to
files, an uncaught exception prints its traceback and exits 1, a signal kills it for real.

Faults are monkeypatches applied in the child before the script runs (the product code has no test hooks):
SIGKILL at the Nth call of a writer, SIGINT during start-up or at the end, a pause mid-run. `FAULTS` names them;
each takes keyword arguments.
"""
import errno
import os
import runpy
import shutil
import signal
import sys
import time
import traceback

# Imported here so that the fork server holds them (train.main imports them lazily; ~4 s per child otherwise).
import pandas  # noqa: F401  (pyarrow's to_numpy)
import safetensors
import safetensors.torch
import torch._dynamo  # noqa: F401  (torch.optim's first optimizer)
import tqdm  # noqa: F401

import adafactor
from runner import build, cli
import evaluate  # noqa: F401
import generate  # noqa: F401
from runner import rundir
import train  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _countdown(n):
    """A callable that is true at its nth call."""
    left = [n]

    def tick():
        left[0] -= 1
        return left[0] == 0
    return tick


def kill_in_save_file(n):
    """The nth safetensors write stops half-way: the file is cut to half its bytes, then SIGKILL."""
    real, tick = safetensors.torch.save_file, _countdown(n)

    def save_file(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if tick():
            os.truncate(path, os.path.getsize(path) // 2)
            _die()
    safetensors.torch.save_file = save_file


def kill_before_rename(n, prefix):
    """SIGKILL just before the nth os.rename of a path whose name starts with `prefix` (".tmp-step_": a complete
    temporary checkpoint about to be published; "step_": an old checkpoint about to be pruned)."""
    real, tick = os.rename, _countdown(n)

    def rename(src, dst, *args, **kwargs):
        if os.path.basename(src).startswith(prefix) and tick():
            _die()
        return real(src, dst, *args, **kwargs)
    os.rename = rename


def kill_in_prune(n):
    """The nth deletion of a pruned checkpoint stops half-way: one of its files is gone, then SIGKILL."""
    real, tick = shutil.rmtree, _countdown(n)

    def rmtree(path, *args, **kwargs):
        if os.path.basename(path).startswith(".trash-") and tick():
            os.remove(os.path.join(path, rundir.TRAINABLE_FILE))
            _die()
        return real(path, *args, **kwargs)
    shutil.rmtree = rmtree


def kill_before_replace(n, name):
    """SIGKILL just before the nth os.replace onto a file called `name` (config.json, log.jsonl): its temporary is
    complete and left behind."""
    real, tick = os.replace, _countdown(n)

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == name and tick():
            _die()
        return real(src, dst, *args, **kwargs)
    os.replace = replace


def kill_in_log_write(n):
    """The nth line written to log.jsonl reaches the disk half-way (a torn line), then SIGKILL."""
    real, tick = rundir.open_log, _countdown(n)

    class Torn:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            if tick():
                self.file.write(text[:len(text) // 2])
                self.file.flush()
                _die()
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)
    rundir.open_log = lambda *args, **kwargs: Torn(real(*args, **kwargs))


def no_space_in_log_write(n):
    """The nth os.write to log.jsonl finds the disk full: half its bytes land, then OSError(ENOSPC), as the kernel
    reports a full disk to a plain file write."""
    real, tick = os.write, _countdown(n)

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == rundir.LOG_FILE and tick():
            real(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    os.write = write


def no_space_in_save_file(n):
    """The nth safetensors write finds the disk full: half the file lands, then the error safetensors 0.8 raises
    on a full disk (measured on a full tmpfs; where tests/test_rundir.py cannot mount one)."""
    real, tick = safetensors.torch.save_file, _countdown(n)

    def save_file(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if tick():
            os.truncate(path, os.path.getsize(path) // 2)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              f"(os error {errno.ENOSPC})")
    safetensors.torch.save_file = save_file


def sigint_in_build():
    """Ctrl-C while the model is being built (start-up, before the training loop owns SIGINT)."""
    real = build.build_model

    def build_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    build.build_model = build_model


def pause_after_step(n, until):
    """After the nth optimizer step, create `<until>.waiting` and wait until the file `until` exists: the run stays
    alive, holding its run directory, while the test starts another process on it."""
    real, tick = adafactor.Adafactor.step, _countdown(n)

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if tick():
            open(f"{until}.waiting", "w").close()
            while not os.path.exists(until):
                time.sleep(0.01)
        return out
    adafactor.Adafactor.step = step


def sigint_after_run():
    """Ctrl-C once the command has returned its exit status (its results written), as the interpreter ends."""
    real = cli.run

    def run(*args, **kwargs):
        status = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between two bytecodes of the main thread
            time.sleep(0.001)
        return status
    cli.run = run


FAULTS = {f.__name__: f for f in (kill_in_save_file, kill_before_rename, kill_in_prune, kill_before_replace,
                                  kill_in_log_write, no_space_in_log_write, no_space_in_save_file, sigint_in_build,
                                  pause_after_step, sigint_after_run)}


def run(script, argv, out, err, faults=()):
    """The child: `python <script> <argv>` with stdout/stderr to the files `out`/`err`, after the faults
    [(name, kwargs)]. Exits with the script's status, as the interpreter would."""
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = [script, *argv]
        for name, kwargs in faults:
            FAULTS[name](**kwargs)
        try:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with sys.exit(<int | None | str>)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # an uncaught exception: its traceback, status 1
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
