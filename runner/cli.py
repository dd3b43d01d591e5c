"""What train.py, evaluate.py and generate.py share as command lines: bad input ends with one line, never a traceback.

    if __name__ == "__main__":
        from runner import cli
        cli.catch_early_interrupt()      # first thing: Ctrl-C while torch loads prints one line
    ...
    if __name__ == "__main__":
        sys.exit(cli.run(main))

Helpers raise ValueError or OSError whose message names the file or value and the fix; `run` prints it as
`error: <message>` and returns 1. Ctrl-C at any moment prints one line and ends with status 130 (a training run
handles it itself: runner/train_log.py), never a traceback, never status 0. Warnings print as one
`warning: <message>` line (Python would add the source line).
"""
import argparse
import os
import signal
import sys
import warnings


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type, a missing choice) are one line,
    `error: <what argparse says> (see <program> --help)`, with argparse's exit status 2; no usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def catch_early_interrupt():
    """Until `run` starts, Ctrl-C exits with one line (importing torch takes seconds: a traceback would be noise)."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(*_):
    print("error: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def run(main, argv=None, interrupted="error: interrupted; what was written is complete (every file is replaced "
                                     "atomically)"):
    """main(argv) with the errors a user can fix as one line: the exit status (0, 1, 130, or main's own int)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C raises KeyboardInterrupt
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    ending = _end_on_interrupt if argv is None else lambda: None  # the process's command line, not a caller's
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except (OSError, ValueError, FloatingPointError) as err:  # bad input, unreachable or damaged files, a NaN loss
        ending()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ending()
        print(interrupted, file=sys.stderr)
        return 130
    ending()
    return status if isinstance(status, int) else 0


def _end_on_interrupt():
    """From here to the process's end (its output written, the interpreter tearing down), Ctrl-C ends it with one
    line and status 130: a KeyboardInterrupt raised now would print a traceback, or be lost with status 0."""
    signal.signal(signal.SIGINT, _interrupted_while_ending)


def _interrupted_while_ending(*_):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe
            pass
    os.write(2, b"error: interrupted while ending; what this command wrote is complete\n")
    os._exit(130)
