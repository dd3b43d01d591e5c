"""A long-lived Python process that runs train.py / evaluate.py command lines one after another (the smoke size).

At the smoke size a run's work takes well under a second, and a fresh process spends about 3 s importing torch and
the project before it starts: 40-odd processes made the smoke chain take about 3 minutes. This process imports them
once (the first script run imports them; later ones find them in sys.modules), then, for each request on stdin
(one JSON line: the command line and the log file), runs the script as `python train.py ...` would (runpy, as
__main__, with that sys.argv) with its output sent to the log, and answers with the exit status on one line. The
full sweep keeps one process per command (sweep.py).

    python -m miniature.worker < requests    # {"argv": ["train.py", "--model", ...], "log": "run/sweep.log"}
"""
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the answers' channel; fd 1 and 2 go to each run's log
    for line in sys.stdin:
        req = json.loads(line)
        script = os.path.join(ROOT, req["argv"][0])
        saved = [os.dup(1), os.dup(2)]
        with open(req["log"], "a") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                sys.argv = req["argv"]
                runpy.run_path(script, run_name="__main__")  # the script as `python train.py ...` runs it
                status = 0
            except SystemExit as e:  # sys.exit(status) at the script's end, argparse's errors, --help
                status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            except Exception:  # a bug: its traceback in the log, as a process of its own would print it
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
        answers.write(f"{status}\n")


if __name__ == "__main__":
    main()
