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
    python train.py --experts 30 --preset demo        # tiny model, offline synthetic tasks, a few CPU minutes
    python train.py --method full --print-config      # the settings a run would use, as JSON

Deviations from the original, each with the flag that restores it, are in the README's "Deviations from the
original". The run directory (`--out`) is described in runner/rundir.py; re-running the same command with the same --out
resumes exactly.
"""
from runner import cli as command_line

if __name__ == "__main__":  # before torch loads: Ctrl-C then ends with one line
    command_line.catch_early_interrupt()

import argparse  # noqa: E402  (the interrupt handler goes first)
import contextlib
import dataclasses
import json
import os
import sys
import textwrap
import warnings
from typing import Optional

import torch

import adafactor
import data
import routing
import sharding  # imports torch-xla only inside its XLA functions
from runner import build, distributed, rundir, train_log
from runner.settings import Config, run_name

# ----------------------------------------------------------------------------------------------- settings
# Config (runner/settings.py) holds every setting with its --help and the adapters' recipe as defaults: MoV on
# google/t5-xl-lm-adapt (the paper's T5-3B), P3's t0_train packed 1024 / 256, batch 32, Adafactor at a constant
# 3e-4, dropout 0.1, z-loss 1e-4, 500k steps, a checkpoint every 10k. Over it, per method, the released configs'
# recipe: the T0 baseline is a full fine-tune at batch 256 and lr 1e-3 for 10k steps, saved every 1k
# (configs/t0.gin, scripts/t0_train.sh); (IA)3 and LoRA save every 50k (configs/ia3.gin, lora.gin), MoV and MoLORA
# every 10k (mov.gin, molora.gin). The original keeps 60 checkpoints; --keep 3 here (see the README).
RECIPES = {"mov": {}, "molora": {}, "ia3": dict(save_every=50_000), "lora": dict(save_every=50_000),
           "full": dict(batch_size=256, lr=1e-3, steps=10_000, save_every=1_000)}
PRESETS = {
    "paper": {},  # the recipe of the method
    # Offline demo: a tiny random T5 and synthetic tasks in P3's layout, then the held-out evaluation.
    "demo": dict(model="tiny", data="demo", steps=1500, batch_size=8, input_length=128, target_length=32,
                 lr=1e-2, adafactor_step_offset=0, save_every=500, log_every=50, evaluate=True,
                 eval_max_examples=40),
}


def parse_args(argv=None) -> tuple[Config, str]:
    """(settings, action): action is "train", "count" (--count-params) or "print" (--print-config)."""
    wrap = lambda text: textwrap.fill(text, 116, initial_indent="  ", subsequent_indent="    ",  # noqa: E731
                                      break_on_hyphens=False)
    defaults = wrap(", ".join(f"--{f.name.replace('_', '-')} {f.default}" for f in dataclasses.fields(Config)
                              if f.default not in (None, "", False)))
    layers = "\n".join([wrap(f"--method {m}: {', '.join(f'{k}={v}' for k, v in r.items())}")
                        for m, r in RECIPES.items() if r] +
                       [wrap(f"--preset {n}: {', '.join(f'{k}={v}' for k, v in v.items()) or 'the recipe'}")
                        for n, v in PRESETS.items()])
    p = command_line.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog=f"defaults (the paper's recipe for the adapters):\n{defaults}\n"
                                           f"laid over them, in this order (flags given override both):\n{layers}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="base settings: paper or demo")
    p.add_argument("--count-params", action="store_true", help="print the parameter counts (no weights) and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    Config.add_flags(p, defaults=False)  # None: not given, so the recipe and preset apply
    args = p.parse_args(argv)
    method = args.method or Config.method
    values = {**dataclasses.asdict(Config()), **RECIPES[method], **PRESETS[args.preset]}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    if not values["out"]:
        prefix = "" if args.preset == "paper" else f"{args.preset}-"
        values["out"] = os.path.join("runs", prefix + run_name(values["method"], values["experts"]))
    cfg = Config(**values)
    validate(cfg)
    if args.eval_max_examples is not None and not cfg.evaluate:
        raise ValueError("--eval-max-examples applies with --evaluate only; add --evaluate or drop it")
    return cfg, "count" if args.count_params else "print" if args.print_config else "train"


def validate(cfg: Config) -> None:
    """Every setting checked before anything is built (Config.validate, and what needs the machine or the model
    directory); ValueError names the flag and the fix."""
    cfg.validate()
    if cfg.compile and cfg.device != "cuda" and build.device_kind(cfg.device) == "xla":
        raise ValueError("--compile applies to CPU or CUDA steps (on XLA every step is compiled already); drop "
                         "--compile")
    if os.path.isdir(cfg.model):  # a model directory's config.json, read before anything is built
        try:
            build.model_config(cfg)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{os.path.join(cfg.model, 'config.json')} is not a T5 config ({type(e).__name__}: "
                             f"{e}); download the model's config.json again") from e


# ----------------------------------------------------------------------------------------------- loss
# T5X's loss for the original's runs (`scripts/*_train.sh`: LOSS_NORMALIZING_FACTOR = AVERAGE_PER_SEQUENCE;
# `configs/t5/models/t5_1_1_*.gin`: Z_LOSS = 1e-4): t5x/losses.py `compute_weighted_cross_entropy` and
# `get_loss_normalizing_factor_and_weights`, on packed rows.
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


def train_step(model, optimizer, batch: dict, cfg: Config, autocast: bool, group=distributed.Group(),
               shares=None, monitor=None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Forward and backward per micro-batch, then one optimizer update; returns (loss, z-loss part, routing health:
    routing.Monitor.reduce's values or None), detached. The load-balancing loss (monitor's) is added to the optimised
    loss times --load-balance-weight, not to the returned loss. Data parallel (runner/distributed.py): `batch` holds
    this process's rows and `shares[i]` its fraction of micro-batch i's examples, so that the losses of all processes
    sum to the global one (the routing health is this process's)."""
    device, micro = batch["encoder_input_tokens"].device, batch["encoder_input_tokens"].shape[0] // cfg.grad_accum
    total, total_z = torch.zeros((), device=device), torch.zeros((), device=device)
    monitor, collected = monitor if monitor is not None else routing.Monitor(None), []
    for i in range(cfg.grad_accum):
        part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        route = (routing.sentence_routing(model, part["sentence_embeddings"]) if "sentence_embeddings" in part
                 else contextlib.nullcontext())
        with distributed.no_sync(model, group, last=i == cfg.grad_accum - 1):  # DDP: one all-reduce, at the end
            with route, monitor.masks(part), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(**model_inputs(part))
            loss, _, z = loss_fn(logits, part, cfg.z_loss)
            if shares is not None:  # sum over this process's examples / the global micro-batch's count
                loss, z = loss * shares[i], z * shares[i]
            balance = monitor.balance_loss() if cfg.load_balance_weight else None  # mean over this process's rows
            objective = loss if balance is None else loss + cfg.load_balance_weight * balance / group.world_size
            collected.append(monitor.collect(balance))  # before the backward, which --remat makes run blocks again
            (objective * (group.world_size / cfg.grad_accum)).backward()  # x world_size: DDP averages the gradients
        total, total_z = total + loss.detach() / cfg.grad_accum, total_z + z.detach() / cfg.grad_accum
    total, total_z = distributed.all_sum(group, total, total_z)  # data parallel: the global loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, total_z, monitor.reduce(collected)


# ----------------------------------------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    """Train (or resume) the run of `cfg` in its run directory, which this process alone writes while it runs
    (rundir.writer: a second train.py on it is refused); under torchrun rank 0 writes and holds it."""
    validate(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # distributed.setup's rank, known before the process group
    with rundir.writer(cfg.out) if rank0 else contextlib.nullcontext():
        return run(cfg)


def run(cfg: Config) -> dict:
    """main's run, once the run directory is this process's: {"step", "last" log line, "signal", "eval"}."""
    # --- setup: device, run directory (refuse another run's directory before writing anything)
    xla = build.device_kind(cfg.device) == "xla"
    if xla:
        sharding.enable_spmd()  # before the first XLA tensor of the process
    if cfg.compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--compile under torchrun is not supported (untested with DDP); run without --compile")
    group, device = distributed.setup(cfg.device, cfg.batch_size, cfg.grad_accum)  # torchrun: data parallel
    say = print if group.main else lambda *args: None  # rank 0 alone prints and writes the run directory
    if not group.main:
        warnings.simplefilter("ignore")  # the data's warnings too: once, from rank 0
    autocast, activations = build.activations(cfg.dtype, device)
    settings = {**dataclasses.asdict(cfg), "activations": "bfloat16" if autocast else "float32",
                "world_size": group.world_size}  # resolved, recorded; neither is part of the run's identity
    record = rundir.check_same_run(settings, cfg.out)  # another method, model, experts, seed, ...: refused
    earlier = rundir.settings_at(record) if record else {}  # the settings of the run's latest steps, if any
    before = earlier.get("activations")
    if cfg.dtype == "auto" and before in ("float32", "bfloat16") and before != settings["activations"]:
        autocast, settings["activations"] = before == "bfloat16", before  # a resumed run keeps its precision
        activations = f"activations: {'bf16 autocast' if autocast else 'float32'} (--dtype auto: kept from {cfg.out})"
    tasks = rundir.trained_tasks(cfg.out)
    if tasks:  # another mixture is refused; the same tasks from elsewhere resume with a note
        data.check_same_mixture(tasks, earlier.get("data"), cfg.data, cfg.out, say)

    # --- what the run reads, the backbone's files and the data source, both looked up before either is loaded, so
    #     that one run of the command names every missing input
    problems = []
    for check in (lambda: build.model_files(cfg), lambda: data.training_tasks(cfg.data)):
        try:
            check()
        except (OSError, ValueError) as e:
            problems.append(e)
    if problems:
        raise problems[0] if len(problems) == 1 else OSError(". Also: ".join(str(e).rstrip(".") for e in problems))

    # --- model: backbone, adapters (base weights frozen), sharded over the mesh on XLA
    model = build.build_model(cfg, device if not xla else torch.device("cpu"))  # unwrapped: saved, evaluated
    say(activations + build.use_cpu_threads(model, device, cfg.threads, kept=earlier.get("cpu_threads")) +
        distributed.describe(group))
    settings["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
    if xla:
        mesh = sharding.make_mesh(cfg.fsdp)
        model = sharding.shard_model(model, mesh, cfg.method, device, remat=cfg.remat)
    elif cfg.remat:
        sharding.apply_remat(model, checkpoint=sharding.torch_checkpoint)
    distributed.share_noise(model, group)  # torchrun: the single process's dropout masks and router jitter

    # --- optimizer: Adafactor over the trainable tensors only (the frozen backbone holds no state)
    optimizer = adafactor.Adafactor([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                    step_offset=cfg.adafactor_step_offset)

    # --- data: the mixture, packed to fixed shapes (sentence routing: one example per row with its embedding)
    mixture = data.Mixture(cfg.data, seed=cfg.seed, batch_size=cfg.batch_size, input_length=cfg.input_length,
                           target_length=cfg.target_length, pack=cfg.router_input != "sentence",
                           sentence_embedder=data.SentenceEmbedder() if cfg.router_input == "sentence" else None,
                           notice_dir=cfg.out if group.main else None)  # the table configs the source lacks

    # --- resume from the newest checkpoint that loads and passes the checks; the settings are written only now,
    # once all checks passed: the first ones and every change, with the step it applies after
    if group.main:
        rundir.clear_temporaries(cfg.out)
        rundir.set_aside_incomplete(cfg.out, log=say)
    step, resumed = rundir.resume(cfg.out, model, optimizer, mixture.load_state_dict, log=say)
    for param_group in optimizer.param_groups:  # the checkpoint's values give way to this command's settings
        param_group["lr"], param_group["step_offset"] = cfg.lr, cfg.adafactor_step_offset
    record = rundir.resumed_record(record, settings, step)
    if group.main:
        rundir.write_config(cfg.out, record)
        rundir.prune(cfg.out, cfg.keep, step)  # a smaller --keep, or a kill while pruning
    if step:
        change = record["changes"][-1] if record["changes"] and record["changes"][-1]["step"] == step else None
        was = rundir.settings_at(record, step)
        news = "" if change is None else f"; from step {step + 1} on: " + ", ".join(
            f"{k} {v} (was {was.get(k, 'not recorded')})" for k, v in change["settings"].items())
        say(f"resuming {cfg.out} from step {step}{news}")
        if step >= cfg.steps:
            say(f"note: {cfg.out} is at step {step}" + (f", past --steps {cfg.steps}" if step > cfg.steps else "") +
                ": nothing to train (pass a larger --steps to train on)")
    else:
        torch.manual_seed(cfg.seed + 2)  # dropout stream

    def to_device(batch: dict) -> dict:
        cuda = device.type == "cuda"  # pinned and non-blocking: the copy does not wait for the queued steps
        out = {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) if cuda else
               torch.from_numpy(v).to(device) for k, v in batch.items()}
        return sharding.shard_batch(out, mesh) if xla else out

    stepped = distributed.wrap(model, group, device)  # DDP all-reduces the trainable parameters' gradients
    if cfg.compile:
        stepped = build.compiled(stepped)  # the first step compiles; `model` stays eager
    monitor = routing.Monitor(model, aux_loss=cfg.load_balance_weight > 0)  # mov / molora: routing health
    step_fn = lambda batch, shares: train_step(stepped, optimizer, batch, cfg, autocast, group, shares,  # noqa: E731
                                               monitor)
    if xla:
        import torch_xla
        step_fn = torch_xla.compile(step_fn)

    def checkpoint():
        if xla:
            torch_xla.sync()  # run the pending step closures (log lines and their NaN check) first
        if group.main:
            rundir.save_checkpoint(cfg.out, step, model, optimizer, mixture.state_dict(), record, cfg.keep)
        distributed.barrier(group)  # no process goes on (or reads it) before the checkpoint is complete

    # --- loop: step, log, checkpoint; SIGINT/SIGTERM end it with a checkpoint
    log, last_saved = train_log.StepLog(cfg, step, xla, group.main, monitor, resumed), step
    model.train()
    try:
        with train_log.stop_on_signals() as stop:
            while step < cfg.steps and distributed.stop_signal(group, stop) is None:  # a signal to any process
                batch = mixture.next_batch()
                tokens = int((batch["encoder_segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum())
                batch, shares = distributed.share(batch, group, cfg.grad_accum)  # this process's rows
                loss, z, health = step_fn(to_device(batch), shares)
                step += 1
                log.add(step, loss, z, mixture.stats["examples"], tokens, health)
                if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == cfg.steps:
                    log.flush()
                if step % cfg.save_every == 0 or step == cfg.steps:
                    checkpoint()
                    last_saved = step
            if step != last_saved:  # stopped by a signal between checkpoints
                log.flush()
                checkpoint()
    finally:
        log.close()
        monitor.close()  # the routers' hooks: an evaluation after training (or a caller) runs without them
    distributed.close(group)
    result = {"step": step, "last": log.last, "signal": stop["signal"]}
    if stop["signal"] is not None:
        say(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {cfg.out}/checkpoints; "
            f"run the same command to resume")
        return result

    # --- evaluation of the trained adapters on the held-out tasks
    if cfg.evaluate and group.main:
        import evaluate
        from runner import report
        model.eval()
        sets = data.load_eval(cfg.data, max_examples=cfg.eval_max_examples, notice_dir=cfg.out)
        meta = dict(method=cfg.method, experts=cfg.experts, rank=cfg.rank, model=cfg.model, data=cfg.data,
                    router_input=cfg.router_input, step=step,
                    label=f"{run_name(cfg.method, cfg.experts)} step {step}")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            result["eval"] = evaluate.evaluate(model, sets, input_length=cfg.input_length,
                                               target_length=cfg.target_length, device=device, out_dir=cfg.out,
                                               meta=meta, name=report.output_name(cfg.eval_max_examples))
        print(report.format_table(result["eval"]))
        if cfg.data == "demo":
            import generate  # the demo ends by asking its model two held-out prompts (generate.py)
            generate.show_demo_answers(model, cfg, device, autocast)
    return result


def command(argv) -> int:
    """What the command line does: count, print the settings, or train (exit status 128 + a stopping signal)."""
    cfg, action = parse_args(argv)
    if action != "train":
        print(build.count_params(cfg) if action == "count" else json.dumps(cfg.applicable(), indent=1))
        return 0
    result = main(cfg)
    return 128 + result["signal"] if result["signal"] is not None else 0


def cli(argv=None) -> int:
    """The command line: errors end with one `error: ...` line (cli.py), a signal with exit status 128 + its number."""
    return command_line.run(command, argv, interrupted="error: interrupted outside the training loop; every "
                            "checkpoint is intact, run the same command to resume")


if __name__ == "__main__":
    sys.exit(cli())
