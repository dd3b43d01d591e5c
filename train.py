"""Instruction-tune a frozen T5 with MoV / MoLORA on the T0 mixture: the paper's recipe as one flat script.

Reproduces the training runs of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444,
sections 3-4), whose original is T5X + gin: for-ai/parameter-efficient-moe `configs/mov.gin`, `configs/molora.gin`,
`configs/ia3.gin`, `configs/lora.gin`, `configs/t0.gin` and the `scripts/*_train.sh` that run `t5x.train`.

    model   google/t5-xl-lm-adapt (T5 v1.1 + LM adaptation, 3B), frozen; only adapters and routers train
    data    the P3 `t0_train` mixture (313 template tasks, examples-proportional, capped at 500k), packed 1024/256
    optim   Adafactor as T5X configures it, constant lr 3e-4, no warm-up, 500k steps of 32 packed rows
    loss    per-example mean token cross-entropy averaged over examples + z-loss 1e-4 * logsumexp^2 per token

Usage:
    python train.py --experts 30                      # the paper's MoV-30 run (needs the hub or local copies)
    python train.py --experts 30 --preset demo        # tiny model, offline synthetic tasks, about a CPU minute
    python train.py --method full --print-config      # the settings a run would use, as JSON

Deviations from the original, each with the flag that restores it, are listed in the README. The run directory
(`--out`) is described in rundir.py; re-running the same command with the same --out resumes exactly.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import adafactor
import build
import data
import mov
import rundir
import sharding  # imports torch-xla only inside its XLA functions


def setting(default, help):
    """A Config field with its --help text."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Config:
    # what is trained (configs/mov.gin, molora.gin: 10 experts released; the paper's table also has 30 and 15)
    method: str = setting("mov", "mov (mixture of (IA)3 vectors), molora (mixture of LoRA), ia3, lora, or full fine-tuning")
    experts: int = setting(10, "number of experts for mov / molora")
    rank: int = setting(4, "LoRA rank for lora / molora (the paper: 4; the released configs/lora.gin: 16)")
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    top_k: Optional[int] = setting(None, "keep the k most probable experts (softmax over all, no renormalisation, as the "
                                   "original's routing.py)")
    router_input: str = setting("token", "token: the router reads the activation it rescales; sentence: one embedding "
                                   "per example (an ablation)")
    model: str = setting("xl", "tiny (random, offline), small..xxl (google/t5-<size>-lm-adapt), a directory or a hub name")
    data: str = setting("bigscience/P3", "bigscience/P3 (hub), a local directory in P3's layout, or demo (offline)")
    # the recipe (configs/*.gin, scripts/*_train.sh; T5X's finetune defaults)
    steps: int = setting(500_000, "optimizer steps in all (a resumed run continues up to this count)")
    batch_size: int = setting(32, "packed rows per optimizer step")
    grad_accum: int = setting(1, "split each batch into this many micro-batches (memory); 1 = the original")
    input_length: int = setting(1024, "encoder tokens per row (inputs keep their first tokens)")
    target_length: int = setting(256, "decoder tokens per row")
    lr: float = setting(3e-4, "constant learning rate (no warm-up, no decay)")
    adafactor_step_offset: int = setting(1_100_000, "Adafactor's decay counter starts here (T5X continues from the "
                                              "checkpoint's step 1.1M)")
    dropout: float = setting(0.1, "dropout rate of the backbone in training")
    z_loss: float = setting(1e-4, "coefficient of the output-logit z-loss (t5x/losses.py)")
    # the hardware
    dtype: str = setting("auto", "activations: auto (bf16 autocast on accelerators, fp32 on CPU), float32 or bfloat16")
    device: str = setting("auto", "auto (TPU through torch-xla, then CUDA, then CPU), cpu, cuda or xla")
    fsdp: int = setting(1, "XLA SPMD: devices along the axis that shards the frozen weights (the rest is data parallel)")
    remat: bool = setting(False, "recompute each T5 block in the backward instead of keeping its activations")
    # the run
    out: str = setting("", "run directory; re-running with it resumes (default runs/[<preset>-]<method>[-<experts>])")
    seed: int = setting(0, "seed of the data mixture, the adapter init and dropout")
    save_every: int = setting(10_000, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)")
    keep: int = setting(3, "keep the newest N checkpoints")
    log_every: int = setting(100, "write a log line and refresh the progress bar every N steps")
    evaluate: bool = setting(False, "after training, run the held-out rank-classification evaluation (evaluate.py)")
    eval_max_examples: Optional[int] = setting(None, "with --evaluate: at most this many examples per template")


# The paper's recipe per method, over the dataclass defaults (the adapters' recipe): the T0 baseline is a full
# fine-tune at batch 256 and lr 1e-3 for 10k steps (configs/t0.gin, scripts/t0_train.sh).
RECIPES = {"mov": {}, "molora": {}, "ia3": {}, "lora": {},
           "full": dict(batch_size=256, lr=1e-3, steps=10_000)}
PRESETS = {
    "paper": {},  # the recipe of the method
    # Offline demo: a tiny random T5 and synthetic tasks in P3's layout, then the held-out evaluation.
    "demo": dict(model="tiny", data="demo", steps=1500, batch_size=8, input_length=128, target_length=32,
                 lr=1e-2, adafactor_step_offset=0, save_every=500, log_every=50, evaluate=True,
                 eval_max_examples=40),
}
CHOICES = {"method": build.METHODS, "router_input": ("token", "sentence"), "dtype": ("auto", "float32", "bfloat16"),
           "device": ("auto", "cpu", "cuda", "xla")}


def parse_args(argv=None) -> tuple[Config, str]:
    """(settings, action): action is "train", "count" (--count-params) or "print" (--print-config)."""
    presets = "\n".join(f"  {name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the method recipe'}"
                        for name, values in PRESETS.items())
    recipes = "\n".join(f"  {m}: {', '.join(f'{k}={v}' for k, v in r.items())}" for m, r in RECIPES.items() if r)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"method recipes (over the defaults below):\n{recipes}\n"
                                       f"presets (over the recipe; explicit flags override both):\n{presets}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="base settings: paper or demo")
    p.add_argument("--count-params", action="store_true", help="print the parameter counts (no weights) and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    for f in dataclasses.fields(Config):
        flag, default, help = "--" + f.name.replace("_", "-"), f.default, f.metadata["help"]
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        kind = int if f.type in (int, Optional[int]) else float if f.type is float else str
        p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), default=None,
                       help=f"{help} (default: {default}, or the recipe's or preset's)")
    args = p.parse_args(argv)
    method = args.method or Config.method
    values = {**dataclasses.asdict(Config()), **RECIPES[method], **PRESETS[args.preset]}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    if not values["out"]:
        prefix = "" if args.preset == "paper" else f"{args.preset}-"
        values["out"] = os.path.join("runs", prefix + build.run_name(values["method"], values["experts"]))
    cfg = Config(**values)
    validate(cfg)
    return cfg, "count" if args.count_params else "print" if args.print_config else "train"


def validate(cfg: Config) -> None:
    """Every setting checked before anything is built; ValueError names the flag and the fix."""
    positive = ("experts", "rank", "steps", "batch_size", "grad_accum", "input_length", "target_length", "fsdp",
                "save_every", "keep", "log_every", "eval_max_examples")
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("lr", "alpha"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"--{name} must be a positive number, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.z_loss) and cfg.z_loss >= 0):
        raise ValueError(f"--z-loss must be a number >= 0, got {cfg.z_loss}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.adafactor_step_offset < 0:
        raise ValueError(f"--adafactor-step-offset must be >= 0, got {cfg.adafactor_step_offset}")
    if cfg.top_k is not None and not 1 <= cfg.top_k <= cfg.experts:
        raise ValueError(f"--top-k must be between 1 and --experts ({cfg.experts}), got {cfg.top_k}")
    if cfg.top_k is not None and cfg.method != "mov":
        raise ValueError(f"--top-k applies to --method mov only, got --method {cfg.method}")
    if cfg.router_input == "sentence" and cfg.method != "mov":
        raise ValueError(f"--router-input sentence applies to --method mov only, got {cfg.method}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")


# ----------------------------------------------------------------------------------------------- loss
def loss_fn(logits: torch.Tensor, batch: dict, z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5X's weighted cross-entropy with LOSS_NORMALIZING_FACTOR = AVERAGE_PER_SEQUENCE, plus z-loss.

    Each example (a segment of a packed row) gets its token losses averaged over its own target tokens; the batch
    loss is the mean over examples. z-loss = z * logsumexp(logits)^2 per token, weighted the same way (t5x/losses.py).
    Returns (loss, cross-entropy part, z-loss part). Static shapes throughout (scatter/gather, no masking by index).
    """
    logits = logits.float()                                                   # [B, T, V]
    targets = batch["decoder_target_tokens"].long()                          # [B, T]
    segments = batch["decoder_segment_ids"].long()                           # [B, T], 0 = padding
    weights = batch["decoder_loss_weights"].float()                          # [B, T]
    log_z = torch.logsumexp(logits, dim=-1)                                  # [B, T]
    ce = log_z - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)        # [B, T]
    zl = z_loss * log_z.square()                                             # [B, T]
    # Sum of weights of each token's segment: scatter per (row, segment), gather back to the tokens.
    per_segment = torch.zeros(segments.shape[0], segments.shape[1] + 1, device=weights.device)
    per_segment = per_segment.scatter_add(1, segments, weights)              # [B, T+1]
    norm = per_segment.gather(1, segments)                                   # [B, T]
    w = torch.where(norm > 0, weights / norm.clamp_min(1e-9), torch.zeros_like(weights))
    examples = w.sum().clamp_min(1.0)                                        # = number of examples with targets
    ce_part, z_part = (ce * w).sum() / examples, (zl * w).sum() / examples
    return ce_part + z_part, ce_part, z_part


def model_inputs(batch: dict) -> dict:
    return dict(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                encoder_segment_ids=batch["encoder_segment_ids"], decoder_segment_ids=batch["decoder_segment_ids"])


def train_step(model, optimizer, batch: dict, cfg: Config, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward per micro-batch, then one optimizer update; returns (loss, z-loss part), detached."""
    device, micro = batch["encoder_input_tokens"].device, cfg.batch_size // cfg.grad_accum
    total, total_z = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(cfg.grad_accum):
        part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        routing = (mov.sentence_routing(model, part["sentence_embeddings"]) if "sentence_embeddings" in part
                   else contextlib.nullcontext())
        with routing, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(**model_inputs(part))
        loss, _, z = loss_fn(logits, part, cfg.z_loss)
        (loss / cfg.grad_accum).backward()
        total, total_z = total + loss.detach() / cfg.grad_accum, total_z + z.detach() / cfg.grad_accum
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, total_z


class StepLog:
    """log.jsonl and the progress bar. Pending steps reach the host once per interval; on XLA through a step
    closure, which runs once the queued graphs have executed, so the loop never waits for the device."""

    def __init__(self, cfg: Config, step: int, xla: bool):
        from tqdm import tqdm
        self.cfg, self.xla, self.pending, self.tokens, self.t0, self.last = cfg, xla, [], 0, time.perf_counter(), None
        self.file = rundir.open_log(cfg.out, step)
        self.bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.method} {cfg.model}", dynamic_ncols=True)

    def add(self, step, loss, z, examples, tokens):
        self.pending.append((step, loss, z, examples))
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
        values = torch.stack([torch.stack([l, z]) for _, l, z, _ in entries]).float().cpu().tolist()  # one transfer
        for (s, _, _, seen), (l, z) in zip(entries, values):
            if not math.isfinite(l):
                found = rundir.checkpoints(self.cfg.out)
                raise FloatingPointError(f"loss is {l} at step {s}; stopping. The newest checkpoint, "
                                         f"{found[-1][1] if found else '(none yet)'}, is intact; try a lower --lr "
                                         "or --dtype float32")
            self.last = {"step": s, "loss": l, "z_loss": z, "lr": self.cfg.lr, "tokens_per_s": round(rate, 1),
                         "examples_seen": seen}
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


# ----------------------------------------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    # --- setup: device, run directory (refuse another run's directory before writing anything)
    validate(cfg)
    xla = build.device_kind(cfg.device) == "xla"
    if xla:
        sharding.enable_spmd()  # before the first XLA tensor of the process
    device = build.resolve_device(cfg.device)
    autocast = build.autocast_enabled(cfg.dtype, device)
    settings = dataclasses.asdict(cfg)
    rundir.check_same_run(settings, cfg.out)

    # --- model: backbone, adapters (base weights frozen), sharded over the mesh on XLA
    model = build.build_model(cfg, device if not xla else torch.device("cpu"))
    if xla:
        mesh = sharding.make_mesh(cfg.fsdp)
        model = sharding.shard_model(model, mesh, cfg.method, device, remat=cfg.remat)
    elif cfg.remat:
        sharding.apply_remat(model, checkpoint=sharding.torch_checkpoint)

    # --- optimizer: Adafactor over the trainable tensors only (the frozen backbone holds no state)
    optimizer = adafactor.Adafactor([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                    step_offset=cfg.adafactor_step_offset)

    # --- data: the mixture, packed to fixed shapes (sentence routing: one example per row with its embedding)
    mixture = data.Mixture(cfg.data, seed=cfg.seed, batch_size=cfg.batch_size, input_length=cfg.input_length,
                           target_length=cfg.target_length, pack=cfg.router_input != "sentence",
                           sentence_embedder=data.SentenceEmbedder() if cfg.router_input == "sentence" else None)

    # --- resume from the newest loadable checkpoint; the settings are written only now, once all checks passed
    rundir.clear_temporaries(cfg.out)
    step = rundir.resume(cfg.out, model, optimizer, mixture.load_state_dict)
    rundir.write_config(cfg.out, settings)
    if step:
        print(f"resuming {cfg.out} from step {step}")
    else:
        torch.manual_seed(cfg.seed + 2)  # dropout stream

    def to_device(batch: dict) -> dict:
        out = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        return sharding.shard_batch(out, mesh) if xla else out

    step_fn = lambda batch: train_step(model, optimizer, batch, cfg, autocast)  # noqa: E731
    if xla:
        import torch_xla
        step_fn = torch_xla.compile(step_fn)

    def checkpoint():
        if xla:
            torch_xla.sync()  # run the pending step closures (log lines and their NaN check) first
        rundir.save_checkpoint(cfg.out, step, model, optimizer, mixture.state_dict(), settings, cfg.keep)

    # --- loop: step, log, checkpoint; SIGINT/SIGTERM end it with a checkpoint
    log, saved = StepLog(cfg, step, xla), step
    model.train()
    try:
        with stop_on_signals() as stop:
            while step < cfg.steps and stop["signal"] is None:
                batch = mixture.next_batch()
                tokens = int((batch["encoder_segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum())
                loss, z = step_fn(to_device(batch))
                step += 1
                log.add(step, loss, z, mixture.stats["examples"], tokens)
                if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == cfg.steps:
                    log.flush()
                if step % cfg.save_every == 0 or step == cfg.steps:
                    checkpoint()
                    saved = step
            if step != saved:  # stopped by a signal between checkpoints
                log.flush()
                checkpoint()
    finally:
        log.close()
    result = {"step": step, "last": log.last, "signal": stop["signal"]}
    if stop["signal"] is not None:
        print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {cfg.out}/checkpoints; "
              f"run the same command to resume")
        return result

    # --- evaluation of the trained adapters on the held-out tasks
    if cfg.evaluate:
        import evaluate
        import report
        model.eval()
        sets = data.load_eval(cfg.data, max_examples=cfg.eval_max_examples)
        meta = dict(method=cfg.method, experts=cfg.experts, rank=cfg.rank, model=cfg.model, data=cfg.data,
                    router_input=cfg.router_input, step=step,
                    label=f"{build.run_name(cfg.method, cfg.experts)} step {step}")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            result["eval"] = evaluate.evaluate(model, sets, input_length=cfg.input_length,
                                               target_length=cfg.target_length, device=device, out_dir=cfg.out,
                                               meta=meta, name=report.output_name(cfg.eval_max_examples))
        print(evaluate.format_table(result["eval"]))
    return result


def cli(argv=None) -> int:
    """The command line: errors end with one `error: ...` line, a signal with exit status 128 + its number."""
    try:
        cfg, action = parse_args(argv)
        if action == "count":
            print(build.count_params(cfg))
        elif action == "print":
            print(json.dumps(dataclasses.asdict(cfg), indent=1))
        else:
            result = main(cfg)
            return 128 + result["signal"] if result["signal"] is not None else 0
    except (OSError, ValueError, FloatingPointError) as err:  # bad input, unreachable or damaged files, NaN loss
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal: nothing was written yet
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
