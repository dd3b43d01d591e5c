"""The sweep: controls, the pilot, learning rates on held-in validation, every method with seeds; resumable.

Mirrors the paper's experiments (Zadouri et al. 2023, section 4 and the ablations of section 5) at miniature scale,
through the project's own command lines (train.py, then evaluate.py), each in a process of its own (at the smoke
size, handed to long-lived worker processes instead: worker.py):
  - controls: chance (from the sets), the untuned backbone, and a ceiling (`ceiling` in config: a method trained
    with the held-out task types in its mixture, on "train" entities; not zero-shot);
  - the pilot: MoV-10 and full fine-tuning, seed 0, scored on the held-out *dev* split (the pilot gate);
  - learning rates: each family's representative (config.REPRESENTATIVE) over its grid, seed 0, scored on held-in
    validation only; every family member then uses the chosen rate;
  - every method of config.METHODS with every seed; per run the checkpoint with the best held-in validation average
    is the one evaluated on the held-out test split (early stopping), with routing recorded for routed methods.
A run directory holds train.py's files plus `val-<step>/`, `test/` and `result.json`; a run whose result.json
carries the current sweep hash is skipped, so the sweep resumes across days. At most `workers` runs at a time, each
with one thread.
"""
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from . import config
from .project import ROOT

RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}


def _env():
    env = dict(os.environ)
    env.update(RUN_ENV)
    return env


def _run(cmd, log_path, worker=None):
    """One command line (`python train.py ...`, `python evaluate.py ...`) in a process of its own, or handed to a
    long-lived worker process (worker.py) that has torch imported already."""
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        if worker is None:
            status = subprocess.run(["nice", "-n", "10"] + cmd, cwd=ROOT, env=_env(), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
        else:
            status = worker.run(cmd[1:], log_path)
    if status:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({status}); see {log_path}")


class Worker:
    """A `python -m miniature.worker FD` process (worker.py): command lines in on its stdin, exit statuses out on
    a pipe of their own (whatever else the process prints cannot be read as one), one run at a time."""

    def __init__(self):
        r, w = os.pipe()
        self.p = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "miniature.worker", str(w)], cwd=ROOT,
                                  env=_env(), stdin=subprocess.PIPE, pass_fds=(w,), text=True, bufsize=1)
        os.close(w)
        self.answers = os.fdopen(r)

    def run(self, argv, log_path):
        try:
            self.p.stdin.write(json.dumps({"argv": argv, "log": os.path.abspath(log_path)}) + "\n")
            self.p.stdin.flush()
            answer = self.answers.readline()
        except BrokenPipeError:
            answer = ""
        if answer.strip().isdigit():
            return int(answer)
        status = self.p.wait()  # no answer: the worker died (killed, or out of memory), so say so in the log
        with open(log_path, "a") as log:
            log.write(f"the worker process (miniature/worker.py) ended with status {status} during this run\n")
        return status or 1

    @property
    def alive(self):
        return self.p.poll() is None

    def close(self):
        self.p.stdin.close()
        self.p.wait()
        self.answers.close()


def _read(path):
    with open(path) as f:
        return json.load(f)


def _write(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def trainable_params(model_dir, spec):
    """Trainable parameters of a method on this backbone, as train.py builds it (runner/build.py, on the meta
    device: no memory, no weights)."""
    import torch
    import t5
    from runner import build
    from runner.settings import ModelSettings
    from sources import t5_weights
    with torch.device("meta"):
        m = t5.T5(t5_weights.read_config(os.path.join(model_dir, "config.json")))
    settings = ModelSettings(method=spec["method"], experts=spec.get("experts", 10), rank=spec.get("rank", 4),
                             top_k=spec.get("top_k"), router_input=spec.get("router_input", "token"))
    build.add_adapters(m, settings)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def resolve(name, model_dir):
    """config.METHODS[name] with `rank: match:<method>` replaced by the LoRA rank whose trainable parameters come
    closest to that method's."""
    spec = dict(config.METHODS[name])
    if isinstance(spec.get("rank"), str) and spec["rank"].startswith("match:"):
        target = trainable_params(model_dir, config.METHODS[spec["rank"][6:]])
        spec["rank"] = min(range(1, 65), key=lambda r: abs(trainable_params(model_dir, {**spec, "rank": r}) - target))
    spec["params"] = trainable_params(model_dir, spec)
    return spec


class Sweep:
    def __init__(self, size, model_dir, data_dir, ceiling_dir, root, workers=2, log=print):
        self.size, self.model, self.data, self.ceiling_data = size, model_dir, data_dir, ceiling_dir
        # one process per command at the full size; at the smoke size the commands go to long-lived worker
        # processes (worker.py), as importing torch would take most of the chain's time: a pool of idle ones,
        # at most one per run at a time, each kept for the whole sweep
        self.reuse = size == "smoke"
        self._idle, self._all, self._pool_lock = [], [], threading.Lock()
        self.s = config.settings(size)
        self.root, self.workers, self.log = root, workers, log
        self.hash = config.sweep_hash(size)
        self.grid = config.LR_GRID if size == "full" else config.SMOKE_LR_GRID
        self.val_sets = self._datasets("val_")
        self.dev_sets = self._datasets("dev_")
        self._specs = {}

    def _datasets(self, prefix):
        import csv
        with open(os.path.join(self.data, "t0_eval_tasks.tsv")) as f:
            return sorted({r["dataset"] for r in csv.DictReader(f, delimiter="\t") if r["dataset"].startswith(prefix)})

    def spec(self, name):
        if name not in self._specs:
            self._specs[name] = resolve(name, self.model)
        return self._specs[name]

    # ------------------------------------------------------------------ one run
    def _run(self, cmd, log_path):
        if not self.reuse:
            return _run(cmd, log_path)
        with self._pool_lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = Worker()
                self._all.append(worker)
        try:
            _run(cmd, log_path, worker)
        finally:
            if worker.alive:
                with self._pool_lock:
                    self._idle.append(worker)

    def close(self):
        """Ends the worker processes (the smoke size)."""
        with self._pool_lock:
            for w in self._all:
                w.close()
            self._all.clear()
            self._idle.clear()

    def _eval(self, args, out, log_path, datasets=None, routing=False):
        r = self.s["recipe"]
        cmd = [sys.executable, "evaluate.py", *args, "--out", out, "--dtype", "float32", "--device", "cpu",
               "--batch-size", "32", "--input-length", str(r["input_length"]), "--target-length",
               str(r["target_length"])]
        if datasets:
            cmd += ["--datasets", ",".join(datasets)]
        if routing:
            cmd += ["--routing"]
        if not os.path.exists(os.path.join(out, "eval.json")):
            self._run(cmd, log_path)
        return _read(os.path.join(out, "eval.json"))

    def train_run(self, name, method, lr, seed, stage, data=None, test=True, dev=False):
        """Train (or resume) one run, pick its step on held-in validation, evaluate it on the dev and / or test
        split; result.json accumulates, so a later call adds only the evaluations a run still lacks."""
        run_dir = os.path.join(self.root, "runs", f"{stage}-{name}-lr{lr:g}-s{seed}")
        result_path = os.path.join(run_dir, "result.json")
        result = _read(result_path) if os.path.exists(result_path) else {}
        if result.get("hash") != self.hash:
            result = {}
        if result and (not dev or "dev" in result) and (not test or "test" in result):
            return result
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, "sweep.log")
        spec, r = self.spec(method), self.s["recipe"]
        t0 = time.time()
        if not result:
            sentence = spec.get("router_input") == "sentence"
            cmd = [sys.executable, "train.py", "--model", self.model, "--data", data or self.data,
                   "--method", spec["method"], "--lr", f"{lr:g}", "--seed", str(seed), "--steps", str(r["steps"]),
                   "--save-every", str(r["save_every"]), "--keep", "100", "--log-every", "20", "--dtype", "float32",
                   "--device", "cpu", "--adafactor-step-offset", "0", "--out", os.path.join(run_dir, "train"),
                   "--batch-size", str(r["sentence_batch_size" if sentence else "batch_size"]),
                   "--input-length", str(r["sentence_input_length" if sentence else "input_length"]),
                   "--target-length", str(r["sentence_target_length" if sentence else "target_length"])]
            for key in ("experts", "rank", "top_k", "router_input"):
                if spec.get(key) is not None:
                    cmd += [f"--{key.replace('_', '-')}", str(spec[key])]
            self._run(cmd, log_path)
            train_s = time.time() - t0
            steps = list(range(r["save_every"], r["steps"] + 1, r["save_every"]))
            curve = {}
            for step in steps:
                res = self._eval(["--run", os.path.join(run_dir, "train"), "--step", str(step)],
                                 os.path.join(run_dir, f"val-{step}"), log_path, self.val_sets)
                curve[str(step)] = res["average"]
            best = max(steps, key=lambda k: (curve[str(k)], -k))
            result = {"hash": self.hash, "name": name, "method": method, "spec": spec, "lr": lr, "seed": seed,
                      "stage": stage, "data": os.path.basename(data or self.data), "val_curve": curve,
                      "best_step": best, "val": curve[str(best)], "train_seconds": train_s, "command": " ".join(cmd),
                      "wall_seconds": 0.0}
            _write(result_path, result)
        args = ["--run", os.path.join(run_dir, "train"), "--step", str(result["best_step"])]
        if dev and "dev" not in result:
            res = self._eval(args, os.path.join(run_dir, "dev"), log_path, self.dev_sets)
            result["dev"] = {"average": res["average"], "columns": res["columns"]}
        if test and "test" not in result:
            routed = spec["method"] in ("mov", "molora")
            res = self._eval(args, os.path.join(run_dir, "test"), log_path, routing=routed)
            result["test"] = {"average": res["average"], "columns": res["columns"], "tasks": res["tasks"]}
            if routed and "routing" in res:
                result["routing"] = res["routing"]
        result["wall_seconds"] = result.get("wall_seconds", 0.0) + time.time() - t0
        _write(result_path, result)
        self.log(f"{stage}-{name} lr {lr:g} seed {seed}: held-in val {result['val']:.1f}" +
                 (f", dev {result['dev']['average']:.1f}" if "dev" in result else "") +
                 (f", test {result['test']['average']:.1f}" if "test" in result else "") +
                 f" ({result['wall_seconds'] / 60:.1f} min)")
        return result

    def untuned(self):
        out = os.path.join(self.root, "runs", "control-untuned")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "result.json")
        if os.path.exists(path) and _read(path).get("hash") == self.hash:
            return _read(path)
        log_path = os.path.join(out, "sweep.log")
        args = ["--model", self.model, "--data", self.data]
        val = self._eval(args, os.path.join(out, "val"), log_path, self.val_sets)
        dev = self._eval(args, os.path.join(out, "dev"), log_path, self.dev_sets)
        test = self._eval(args, os.path.join(out, "test"), log_path)
        res = {"hash": self.hash, "name": "untuned", "val": val["average"],
               "dev": {"average": dev["average"], "columns": dev["columns"]},
               "test": {"average": test["average"], "columns": test["columns"], "tasks": test["tasks"]}}
        _write(path, res)
        return res

    # ------------------------------------------------------------------ stages
    def parallel(self, jobs):
        """Run jobs (callables) with at most `workers` at once; returns their results in order (errors logged)."""
        results, lock, queue = [None] * len(jobs), threading.Lock(), list(enumerate(jobs))

        def worker():
            while True:
                with lock:
                    if not queue:
                        return
                    i, job = queue.pop(0)
                try:
                    results[i] = job()
                except Exception as e:  # one failed run does not stop the sweep; the report lists it
                    self.log(f"run failed: {e}")
                    results[i] = {"error": str(e)}
        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def pilot(self):
        """MoV-10 and full fine-tuning, seed 0, on the dev split (the same runs serve the main table later)."""
        lr = self.s["sweep"]["pilot_lr"]
        jobs = [lambda: self.train_run("mov-10", "mov-10", lr["mov"], 0, "main", test=False, dev=True),
                lambda: self.train_run("full", "full", lr["full"], 0, "main", test=False, dev=True)]
        return self.parallel(jobs)

    def learning_rates(self):
        """{family: lr} from the representatives' held-in validation (seed 0); no held-out split is read."""
        jobs, keys = [], []
        for family, rep in config.REPRESENTATIVE.items():
            for lr in self.grid[family]:
                jobs.append(lambda rep=rep, lr=lr: self.train_run(rep, rep, lr, 0, "main", test=False))
                keys.append((family, lr))
        results = self.parallel(jobs)
        best = {}
        for (family, lr), res in zip(keys, results):
            if res and "val" in res and (family not in best or res["val"] > best[family][1]):
                best[family] = (lr, res["val"])
        return {f: v[0] for f, v in best.items()}

    def main_runs(self, lrs, seeds):
        jobs = []
        for seed in seeds:
            for name, spec in config.METHODS.items():
                lr = lrs.get(spec["family"])
                if lr is not None:
                    jobs.append(lambda name=name, lr=lr, seed=seed: self.train_run(name, name, lr, seed, "main"))
        return self.parallel(jobs)

    def ceiling(self, lrs):
        name = self.s["sweep"]["ceiling"]
        lr = lrs.get(config.METHODS[name]["family"])
        jobs = [lambda seed=seed: self.train_run(name, name, lr, seed, "ceiling", data=self.ceiling_data)
                for seed in self.s["sweep"]["ceiling_seeds"]]
        return self.parallel(jobs)

    def chosen_lrs(self, results):
        """{family: lr}: the representative's best held-in validation at seed 0 among the grid runs finished."""
        best = {}
        for r in results:
            fam = config.METHODS.get(r.get("name"), {}).get("family")
            if (r.get("stage") == "main" and r.get("seed") == 0 and config.REPRESENTATIVE.get(fam) == r["name"]
                    and r["lr"] in self.grid[fam] and (fam not in best or r["val"] > best[fam][1])):
                best[fam] = (r["lr"], r["val"])
        return {f: v[0] for f, v in best.items()}

    def read_untuned(self):
        path = os.path.join(self.root, "runs", "control-untuned", "result.json")
        return _read(path) if os.path.exists(path) and _read(path).get("hash") == self.hash else None

    def collect(self):
        """Every result.json of the current hash under runs/."""
        out = []
        base = os.path.join(self.root, "runs")
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            path = os.path.join(base, d, "result.json")
            if os.path.exists(path):
                res = _read(path)
                if res.get("hash") == self.hash:
                    out.append(res)
        return out
