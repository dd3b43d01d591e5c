"""How many CPU threads a training step should use, quiet and with one core held by another process.

Torch's intra-op pool defaults to one thread per core, and OpenMP threads meet at a barrier after every parallel
region: when another process holds a core, the thread that shares it arrives late at every barrier, and a small
model's step, made of many short regions, slows many times over. This tool times training steps of our T5
(tools/bench_measure.py, the benchmark's worker, each configuration in a fresh process) for a few model sizes with
1 thread and with every core, and with OpenMP's passive waiting, on a quiet machine and with a busy loop holding
one core; the thread rule of runner/build.py (`cpu_threads`) is read off its table.

    python -m tools.threads_bench                               # tiny (the demo) and small, about 5 minutes
    python -m tools.threads_bench --models tiny,small,base --steps 5
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busy_loop():
    """A process that holds one core until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(model, threads, passive, busy, steps, batch, lengths):
    spec = {"kind": "train", "impl": "ours", "name": "mov-30", "model": model, "batch_size": batch,
            "input_length": lengths[0], "target_length": lengths[1], "warmup": 2, "steps": steps,
            "threads": threads, "device": "cpu", "seed": 0, "peak_n": 64, "compile": False, "dtype": "float32"}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE" if passive else "ACTIVE")
    loop = busy_loop() if busy else None
    try:  # bench.py's worker: one configuration in a fresh process, its JSON record on the last line
        done = subprocess.run([sys.executable, "bench.py", "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["step_s"]
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,small", help="comma-separated t5.T5Config presets (random weights)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median)")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    shapes = {"tiny": (8, (128, 32)), "small": (2, (256, 64)), "base": (2, (256, 64))}  # the demo's, the bench's
    print(f"MoV-30 training step, median of {args.steps} after 2 warm-up, float32, {cores} cores; "
          "step ms (x the quiet machine's best)")
    print("| model | threads | OpenMP wait | quiet | one core busy |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        batch, lengths = shapes.get(model, shapes["base"])
        rows = []
        for threads, passive in ((1, False), (cores, False), (cores, True)):
            quiet = measure(model, threads, passive, False, args.steps, batch, lengths)
            busy = measure(model, threads, passive, True, args.steps, batch, lengths)
            rows.append((threads, passive, quiet, busy))
        best = min(q for _, _, q, _ in rows)
        for threads, passive, quiet, busy in rows:
            print(f"| {model} | {threads} | {'passive' if passive else 'active'} | {1000 * quiet:.0f} "
                  f"({quiet / best:.2f}x) | {1000 * busy:.0f} ({busy / best:.2f}x) |")


if __name__ == "__main__":
    main()
