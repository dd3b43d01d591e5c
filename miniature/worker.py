"""A long-lived Python process that runs train.py / evaluate.py command lines one after another (the smoke size).

At the smoke size a run's work takes well under a second, and a fresh process spends about 3 s importing torch and
the project before it starts: 40-odd processes made the smoke chain take about 3 minutes. This process imports torch
once (the project's modules stay in sys.modules after the first run), then, for each request on stdin (one JSON
line: the command line and the log file), runs the script as `python train.py ...` would (runpy, as __main__, with
that sys.argv, stdin empty, stdout and stderr to the log) and answers with the exit status on one line, on the file
descriptor named by its argument. Between runs it puts back what a script may change and a fresh process would not
carry over: the working directory, the environment, torch's thread count, the warnings already shown. The full sweep
keeps one process per command (sweep.py).

    python -m miniature.worker FD < requests    # {"argv": ["train.py", "--model", ...], "log": "run/sweep.log"}
"""
import json
import os
import runpy
import sys
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, log_path):
    """One command line, as a process of its own would run it; returns its exit status."""
    script = os.path.join(ROOT, argv[0])
    cwd, env, threads = os.getcwd(), dict(os.environ), torch.get_num_threads()
    saved = [os.dup(0), os.dup(1), os.dup(2)]
    with open(os.devnull) as nothing, open(log_path, "a") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(nothing.fileno(), 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():  # each run shows its warnings, as a fresh process would
                sys.argv = list(argv)
                runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as e:  # sys.exit(status) at the script's end, argparse's errors, --help
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)  # as Python prints sys.exit("message")
            status = 0 if e.code is None else 1 if isinstance(e.code, str) else int(e.code) & 0xFF
        except Exception:  # a bug: its traceback in the log, as a process of its own would print it
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in enumerate(saved):
                os.dup2(copy, fd)
                os.close(copy)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            torch.set_num_threads(threads)
    return status


def main():
    with os.fdopen(int(sys.argv[1]), "w", buffering=1) as answers:
        for line in sys.stdin:
            req = json.loads(line)
            answers.write(f"{run(req['argv'], req['log'])}\n")


if __name__ == "__main__":
    main()
