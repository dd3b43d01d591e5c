"""What a training run shows while it runs: log.jsonl and the progress bar, and the signals that end it cleanly.

T5X writes its training summaries every `log_every_steps` (the original's `scripts/*_train.sh`); here each logged
step (every --log-every, each checkpoint's, the last) is one JSON line in the run directory (runner/rundir.py's
log.jsonl): step, loss (that step's), loss_mean (the mean since the line before, as T5X's summaries average),
z_loss, lr, tokens_per_s, examples_seen, and for mov / molora that step's routing health (routing.Monitor:
router_entropy, expert_load_max, load_balance_loss). A non-finite loss at any step stops the run before its next
checkpoint.

    log = train_log.StepLog(cfg, step, xla=False)
    log.add(step, loss, z, examples, tokens); log.flush(); log.close()
    with train_log.stop_on_signals() as stop: ...          # stop["signal"] is set by SIGINT / SIGTERM
"""
import contextlib
import json
import math
import os
import signal
import time

import torch

from runner import rundir


class StepLog:
    """log.jsonl and the progress bar. Pending steps reach the host once per interval; on XLA through a step
    closure, which runs once the queued graphs have executed, so the loop never waits for the device."""

    def __init__(self, cfg, step: int, xla: bool, main: bool = True, monitor=None, resumed=None):
        from tqdm import tqdm
        self.cfg, self.xla, self.pending, self.tokens, self.t0, self.last = cfg, xla, [], 0, time.perf_counter(), None
        self.monitor = monitor  # routing.Monitor: names the routing-health values (and warns on a collapse)
        self.resumed = resumed  # the checkpoint this run resumed from (None: step 0), named if the loss goes NaN
        self.file = rundir.open_log(cfg.out, step) if main else open(os.devnull, "w")  # data parallel: rank 0 writes
        self.bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.method} {cfg.model}", dynamic_ncols=True,
                        disable=not main)

    def add(self, step, loss, z, examples, tokens, health=None):
        self.pending.append((step, loss, z, examples, health))
        self.tokens += tokens
        self.bar.update(1)

    def flush(self):
        if not self.pending:
            return
        elapsed, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        entries, rate, self.pending, self.tokens = self.pending, self.tokens / max(elapsed, 1e-9), [], 0
        if self.xla:
            import torch_xla.core.xla_model as xm
            xm.add_step_closure(self._write, args=(entries, rate))
        else:
            self._write(entries, rate)

    def _write(self, entries, rate):
        values = torch.stack([torch.cat([torch.stack([l, z]).float()] + ([] if h is None else [h.float()]))
                              for _, l, z, _, h in entries]).cpu().tolist()  # one transfer
        for (s, *_), (l, *_) in zip(entries, values):  # every step is checked, only the logged one written
            if not math.isfinite(l):
                found = rundir.checkpoints(self.cfg.out)
                start = f"resumed from {self.resumed}" if self.resumed else "started from step 0"
                raise FloatingPointError(
                    f"loss is {l} at step {s}; stopping before the next checkpoint (this run {start}; the newest "
                    f"checkpoint is {found[-1][1] if found else 'none yet'}). The same command with a lower --lr "
                    "or --dtype float32 resumes from the newest checkpoint with them")
        (s, _, _, seen, _), (l, z, *health) = entries[-1], values[-1]
        self.last = {"step": s, "loss": l, "loss_mean": sum(v[0] for v in values) / len(values), "z_loss": z,
                     "lr": self.cfg.lr, "tokens_per_s": round(rate, 1), "examples_seen": seen,
                     **(self.monitor.fields(s, health) if health else {})}
        self.file.write(json.dumps(self.last) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", tok_s=f"{rate:,.0f}")

    def close(self):
        self.bar.close()
        self.file.close()


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM set `stop["signal"]` instead of killing the process: the loop ends with a checkpoint."""
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
