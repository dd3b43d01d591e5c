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
original". The run directory (`--out`) is described in rundir.py; re-running the same command with the same --out
resumes exactly.
"""
import cli as command_line

if __name__ == "__main__":  # before torch loads: Ctrl-C then ends with one line
    command_line.catch_early_interrupt()

import argparse  # noqa: E402  (the interrupt handler goes first)
import contextlib
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

import adafactor
import build
import data
import distributed
import mov
import routing as routing_health
import rundir
from losses import loss_fn, model_inputs  # noqa: F401  (train.loss_fn: part of this module's interface)
import sharding  # imports torch-xla only inside its XLA functions
import train_log


def setting(default, help):
    """A Config field with its --help text."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Config:
    # what is trained (configs/mov.gin, molora.gin: 10 experts released; the paper's table also has 30 and 15)
    method: str = setting("mov", "mov (mixture of (IA)3 vectors), molora (mixture of LoRA), ia3, lora, or full "
                                 "fine-tuning")
    experts: int = setting(10, "number of experts for mov / molora")
    rank: int = setting(4, "LoRA rank for lora / molora (the paper: 4; the released configs/lora.gin: 16)")
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    top_k: Optional[int] = setting(None, "mov / molora: keep the k most probable experts (softmax over all, no "
                                   "renormalisation, as the original's routing.py)")
    # router options of the original's src/routing.py, all off in its released configs
    router_jitter: float = setting(0.0, "training only: the router input times noise U[1-eps, 1+eps] (jitter_noise)")
    router_bias: bool = setting(False, "a zero-initialised trainable bias on the router logits (use_bias)")
    load_balance_weight: float = setting(0.0, "add this x Switch Transformer's load-balancing loss (mean over sites)")
    router_input: str = setting("token", "token: the router reads the activation it rescales; sentence: one embedding "
                                   "per example (an ablation)")
    model: str = setting("xl", "tiny (random, offline), small..xxl (google/t5-<size>-lm-adapt), a directory or a "
                               "hub name")
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
    dropout_mask: str = setting("broadcast", "broadcast: T5X's masks shared along the length; elementwise: HF's")
    z_loss: float = setting(1e-4, "coefficient of the output-logit z-loss (t5x/losses.py)")
    # the hardware
    dtype: str = setting("auto", "activations: auto (bf16 autocast on accelerators and CPUs with native bf16, else "
                                 "fp32), float32 or bfloat16")
    device: str = setting("auto", "auto (TPU through torch-xla, then CUDA, then CPU), cpu, cuda or xla")
    fsdp: int = setting(1, "XLA SPMD: devices along the axis that shards the frozen weights (the rest is data "
                           "parallel)")
    remat: bool = setting(False, "recompute each T5 block in the backward instead of keeping its activations")
    compile: bool = setting(False, "torch.compile the training forward and backward (CPU or CUDA, one process): the "
                                   "first step compiles for minutes, later steps run faster; same losses as eager")
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
           "device": ("auto", "cpu", "cuda", "xla"), "dropout_mask": ("broadcast", "elementwise")}


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
    if args.eval_max_examples is not None and not cfg.evaluate:
        raise ValueError("--eval-max-examples applies with --evaluate only; add --evaluate or drop it")
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
    for name in ("z_loss", "load_balance_weight"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(cfg, name)}")
    for name in ("dropout", "router_jitter"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.adafactor_step_offset < 0:
        raise ValueError(f"--adafactor-step-offset must be >= 0, got {cfg.adafactor_step_offset}")
    if cfg.top_k is not None and not 1 <= cfg.top_k <= cfg.experts:
        raise ValueError(f"--top-k must be between 1 and --experts ({cfg.experts}), got {cfg.top_k}")
    routed = [f"--{n.replace('_', '-')}" for n in ("top_k", "router_jitter", "router_bias", "load_balance_weight")
              if getattr(cfg, n) not in (None, 0.0, False)]
    if routed and cfg.method not in ("mov", "molora"):
        raise ValueError(f"{', '.join(routed)} applies to --method mov or molora only, got --method {cfg.method}")
    if cfg.router_input == "sentence" and cfg.method != "mov":
        raise ValueError(f"--router-input sentence applies to --method mov only, got {cfg.method}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")
    # a re-entrant checkpoint re-runs each block in the backward, without the forward's graph and contexts
    if cfg.remat and (cfg.load_balance_weight or cfg.router_input == "sentence"):
        raise ValueError("--remat cannot be combined with --load-balance-weight or --router-input sentence (the "
                         "recomputed blocks lack the forward's graph and embeddings); drop one of them")
    if cfg.compile and cfg.remat:
        raise ValueError("--compile applies to steps without --remat; drop --compile or --remat")
    if cfg.compile and cfg.device != "cuda" and build.device_kind(cfg.device) == "xla":
        raise ValueError("--compile applies to CPU or CUDA steps (on XLA every step is compiled already); drop "
                         "--compile")
    if os.path.isdir(cfg.model):  # a model directory's config.json, read before anything is built
        try:
            build.model_config(cfg)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{os.path.join(cfg.model, 'config.json')} is not a T5 config ({type(e).__name__}: "
                             f"{e}); download the model's config.json again") from e


def train_step(model, optimizer, batch: dict, cfg: Config, autocast: bool, group=distributed.Group(),
               shares=None, monitor=None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Forward and backward per micro-batch, then one optimizer update; returns (loss, z-loss part, routing health:
    routing.Monitor.reduce's values or None), detached. The load-balancing loss (monitor's) is added to the optimised
    loss times --load-balance-weight, not to the returned loss. Data parallel (distributed.py): `batch` holds this
    process's rows and `shares[i]` its fraction of micro-batch i's examples, so that the losses of all processes
    sum to the global one (the routing health is this process's)."""
    device, micro = batch["encoder_input_tokens"].device, batch["encoder_input_tokens"].shape[0] // cfg.grad_accum
    total, total_z = torch.zeros((), device=device), torch.zeros((), device=device)
    monitor, collected = monitor if monitor is not None else routing_health.Monitor(None), []
    for i in range(cfg.grad_accum):
        part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        routing = (mov.sentence_routing(model, part["sentence_embeddings"]) if "sentence_embeddings" in part
                   else contextlib.nullcontext())
        with distributed.no_sync(model, group, last=i == cfg.grad_accum - 1):  # DDP: one all-reduce, at the end
            with routing, monitor.masks(part), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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
    # --- setup: device, run directory (refuse another run's directory before writing anything)
    validate(cfg)
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
    rundir.check_same_run(settings, cfg.out, log=say)
    say(activations + distributed.describe(group))

    # --- model: backbone, adapters (base weights frozen), sharded over the mesh on XLA
    model = build.build_model(cfg, device if not xla else torch.device("cpu"))  # unwrapped: saved, evaluated
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

    # --- resume from the newest loadable checkpoint; the settings are written only now, once all checks passed
    if group.main:
        rundir.clear_temporaries(cfg.out)
    step = rundir.resume(cfg.out, model, optimizer, mixture.load_state_dict, log=say)
    if group.main:
        rundir.write_config(cfg.out, settings)
    if step:
        say(f"resuming {cfg.out} from step {step}")
    else:
        torch.manual_seed(cfg.seed + 2)  # dropout stream

    def to_device(batch: dict) -> dict:
        cuda = device.type == "cuda"  # pinned and non-blocking: the copy does not wait for the queued steps
        out = {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) if cuda else
               torch.from_numpy(v).to(device) for k, v in batch.items()}
        return sharding.shard_batch(out, mesh) if xla else out

    trained = distributed.wrap(model, group, device)  # DDP all-reduces the trainable parameters' gradients
    if cfg.compile:
        trained = build.compiled(trained)  # the first step compiles; `model` stays eager
    monitor = routing_health.Monitor(model, aux_loss=cfg.load_balance_weight > 0)  # mov / molora: routing health
    step_fn = lambda batch, shares: train_step(trained, optimizer, batch, cfg, autocast, group, shares,  # noqa: E731
                                               monitor)
    if xla:
        import torch_xla
        step_fn = torch_xla.compile(step_fn)

    def checkpoint():
        if xla:
            torch_xla.sync()  # run the pending step closures (log lines and their NaN check) first
        if group.main:
            rundir.save_checkpoint(cfg.out, step, model, optimizer, mixture.state_dict(), settings, cfg.keep)
        distributed.barrier(group)  # no process goes on (or reads it) before the checkpoint is complete

    # --- loop: step, log, checkpoint; SIGINT/SIGTERM end it with a checkpoint
    log, saved = train_log.StepLog(cfg, step, xla, group.main, monitor), step
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
                    saved = step
            if step != saved:  # stopped by a signal between checkpoints
                log.flush()
                checkpoint()
    finally:
        log.close()
    distributed.close(group)
    result = {"step": step, "last": log.last, "signal": stop["signal"]}
    if stop["signal"] is not None:
        say(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {cfg.out}/checkpoints; "
            f"run the same command to resume")
        return result

    # --- evaluation of the trained adapters on the held-out tasks
    monitor.close()
    if cfg.evaluate and group.main:
        import evaluate
        import report
        model.eval()
        sets = data.load_eval(cfg.data, max_examples=cfg.eval_max_examples, notice_dir=cfg.out)
        meta = dict(method=cfg.method, experts=cfg.experts, rank=cfg.rank, model=cfg.model, data=cfg.data,
                    router_input=cfg.router_input, step=step,
                    label=f"{build.run_name(cfg.method, cfg.experts)} step {step}")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            result["eval"] = evaluate.evaluate(model, sets, input_length=cfg.input_length,
                                               target_length=cfg.target_length, device=device, out_dir=cfg.out,
                                               meta=meta, name=report.output_name(cfg.eval_max_examples))
        print(evaluate.format_table(result["eval"]))
        if cfg.data == "demo":
            import generate  # the demo ends by asking its model two held-out prompts (generate.py)
            generate.show_demo_answers(model, cfg, device)
    return result


def command(argv) -> int:
    """What the command line does: count, print the settings, or train (exit status 128 + a stopping signal)."""
    cfg, action = parse_args(argv)
    if action != "train":
        print(build.count_params(cfg) if action == "count" else json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    result = main(cfg)
    return 128 + result["signal"] if result["signal"] is not None else 0


def cli(argv=None) -> int:
    """The command line: errors end with one `error: ...` line (cli.py), a signal with exit status 128 + its number."""
    return command_line.run(command, argv, interrupted="error: interrupted outside the training loop; every "
                            "checkpoint is intact, run the same command to resume")


if __name__ == "__main__":
    sys.exit(cli())
