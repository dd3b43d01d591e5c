"""Instruction-tune a frozen T5 with MoV / MoLORA on the T0 mixture: the paper's recipe as one flat script.

Reproduces the training runs of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444),
whose original is T5X + gin (for-ai/parameter-efficient-moe: `configs/mov.gin`, `configs/molora.gin` and the
`t5x.train` scripts). The recipe (REFERENCE.md section 5):

    model   google/t5-xl-lm-adapt (T5 v1.1 + LM adaptation, 3B), frozen; only adapters and routers train
    data    the P3 `t0_train` mixture (313 template tasks, examples-proportional, capped at 500k), packed 1024/256
    optim   Adafactor as T5X configures it, constant lr 3e-4, no warm-up, 500k steps of 32 packed rows
    loss    per-example mean token cross-entropy averaged over examples + z-loss 1e-4 * logsumexp^2 per token

Usage:
    python train.py --experts 30                      # the paper's MoV-30 run (needs the hub or local copies)
    python train.py --experts 30 --preset demo        # tiny model, offline synthetic tasks, a few CPU minutes
    python train.py --model xl --method molora --experts 15 --count-params

Deviations from the original, each with the flag that restores it:
- Adafactor's decay counter: T5X keeps counting from the checkpoint's step 1,100,000, so beta2 starts near
  1 - 1.5e-5. That is our default too (`--adafactor-step-offset 1100000`); the demo starts at 0.
- Gradient accumulation (`--grad-accum`) averages the micro-batches' losses; T5X's per-sequence average over the
  whole batch differs when micro-batches hold different numbers of examples. `--grad-accum 1` is the original.
- Sentence routing (an ablation the original never released) trains without packing: one example per row.

The run directory (`--out`) holds config.json, log.jsonl (one line per logged step), checkpoints/step_NNNNNNNN/
(trainable tensors as safetensors, optimizer and RNG state, data-pipeline position), and after an evaluation
eval.json / eval.md. Re-running the same command with the same --out resumes from the newest checkpoint.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint

import adafactor
import data
import molora
import mov
import sharding  # imports torch-xla only inside its XLA functions
import t5

METHODS = ("mov", "molora", "ia3", "lora", "full")
SIZES = ("small", "base", "large", "xl", "xxl")  # presets with released LM-adapted weights on the hub
# The fields that make a checkpoint belong to a run: another value refuses to load it.
TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's adapter (or, for full, all) tensors
IDENTITY = ("method", "experts", "rank", "alpha", "top_k", "router_input", "model")


@dataclass
class Config:
    method: str = "mov"
    experts: int = 10
    rank: int = 4
    alpha: float = 16.0
    top_k: Optional[int] = None
    router_input: str = "token"
    model: str = "xl"
    data: str = "bigscience/P3"
    steps: int = 500_000
    batch_size: int = 32
    grad_accum: int = 1
    input_length: int = 1024
    target_length: int = 256
    lr: float = 3e-4
    adafactor_step_offset: int = 1_100_000
    dropout: float = 0.1
    z_loss: float = 1e-4
    dtype: str = "auto"
    device: str = "auto"
    fsdp: int = 1
    remat: bool = False
    out: str = ""  # empty: runs/[<preset>-]<method>[-<experts>]
    seed: int = 0
    save_every: int = 10_000
    keep: int = 3
    log_every: int = 100
    evaluate: bool = False
    eval_max_examples: Optional[int] = None


PRESETS = {
    # The paper's run: the dataclass defaults.
    "paper": {},
    # Offline demo: a tiny random T5 and synthetic tasks in P3's layout, then the held-out evaluation.
    "demo": dict(model="tiny", data="demo", steps=1500, batch_size=8, input_length=128, target_length=32,
                 lr=1e-2, adafactor_step_offset=0, save_every=500, log_every=50, evaluate=True,
                 eval_max_examples=40),
}

HELP = {
    "method": "adapter: mov (mixture of (IA)3 vectors), molora (mixture of LoRA), ia3, lora, or full fine-tuning",
    "experts": "number of experts for mov / molora",
    "rank": "LoRA rank for lora / molora",
    "alpha": "LoRA alpha (scale alpha/rank)",
    "top_k": "keep the k most probable experts (softmax over all, no renormalisation, as the original)",
    "router_input": "token: the router reads the activation it rescales; sentence: a per-example embedding",
    "model": "tiny (random, offline), a size (small..xxl = google/t5-<size>-lm-adapt), a directory or a hub name",
    "data": "bigscience/P3 (hub), a local directory in P3's layout, or demo (offline synthetic tasks)",
    "steps": "optimizer steps in all (a resumed run continues up to this count)",
    "batch_size": "packed rows per optimizer step",
    "grad_accum": "split each batch into this many micro-batches (memory); 1 = the original",
    "input_length": "encoder tokens per row (inputs truncated to their first tokens)",
    "target_length": "decoder tokens per row",
    "lr": "constant learning rate (no warm-up, no decay)",
    "adafactor_step_offset": "Adafactor's decay counter starts here (T5X continues from the checkpoint's 1.1M)",
    "dropout": "dropout rate of the backbone in training",
    "z_loss": "coefficient of the output-logit z-loss",
    "dtype": "activations: auto (bf16 autocast on accelerators, fp32 on CPU), float32 or bfloat16",
    "device": "auto (TPU through torch-xla, then CUDA, then CPU), cpu, cuda or xla",
    "fsdp": "XLA SPMD: devices along the axis that shards the frozen weights (the rest is data parallel)",
    "remat": "recompute each T5 block in the backward instead of keeping its activations (memory for time)",
    "out": "run directory (config, log, checkpoints, evaluation); re-running with it resumes; "
           "default runs/[<preset>-]<method>[-<experts>]",
    "seed": "seed of the data mixture, the adapter init and dropout",
    "save_every": "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)",
    "keep": "keep the newest N checkpoints",
    "log_every": "write a log line and refresh the progress bar every N steps",
    "evaluate": "after training, run the held-out rank-classification evaluation (evaluate.py)",
    "eval_max_examples": "with --evaluate: at most this many examples per template",
}


# ----------------------------------------------------------------------------------------------- config
def parse_args(argv=None) -> tuple[Config, bool]:
    presets = "\n".join(f"  {name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the dataclass defaults'}"
                        for name, values in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"presets (explicit flags override them):\n{presets}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="base settings: paper (default) or demo; explicit flags override them")
    p.add_argument("--count-params", action="store_true",
                   help="print total and trainable parameters (no weights loaded) and exit")
    defaults = Config()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool" or isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
            continue
        kind = {"experts": int, "rank": int, "top_k": int, "steps": int, "batch_size": int, "grad_accum": int,
                "input_length": int, "target_length": int, "adafactor_step_offset": int, "fsdp": int, "seed": int,
                "save_every": int, "keep": int, "log_every": int, "eval_max_examples": int}.get(f.name, None)
        kind = kind or (float if isinstance(default, float) else str)
        choices = {"method": METHODS, "router_input": ("token", "sentence"),
                   "dtype": ("auto", "float32", "bfloat16"), "device": ("auto", "cpu", "cuda", "xla")}.get(f.name)
        p.add_argument(flag, type=kind, choices=choices, default=None,
                       help=f"{HELP[f.name]} (default: {default}, or the preset's)")
    args = p.parse_args(argv)
    values = {**dataclasses.asdict(defaults), **PRESETS[args.preset]}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    if not values["out"]:
        prefix = "" if args.preset == "paper" else f"{args.preset}-"
        values["out"] = os.path.join("runs", prefix + run_name(values["method"], values["experts"]))
    cfg = Config(**values)
    validate(cfg)
    return cfg, args.count_params


def validate(cfg: Config) -> None:
    positive = ("experts", "rank", "steps", "batch_size", "grad_accum", "input_length", "target_length",
                "fsdp", "save_every", "keep", "log_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise SystemExit(f"error: --lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise SystemExit(f"error: --dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.top_k is not None and not 1 <= cfg.top_k <= cfg.experts:
        raise SystemExit(f"error: --top-k must be between 1 and --experts ({cfg.experts}), got {cfg.top_k}")
    if cfg.top_k is not None and cfg.method != "mov":
        raise SystemExit(f"error: --top-k applies to --method mov only, got --method {cfg.method}")
    if cfg.router_input == "sentence" and cfg.method != "mov":
        raise SystemExit(f"error: --router-input sentence applies to --method mov only, got {cfg.method}")
    if cfg.batch_size % cfg.grad_accum:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")


def run_name(method: str, experts: int) -> str:
    return f"{method}-{experts}" if method in ("mov", "molora") else method


# ----------------------------------------------------------------------------------------------- model
def model_config(cfg: Config) -> t5.T5Config:
    """The backbone's T5Config without loading weights: a preset, or a directory's config.json."""
    if cfg.model == "tiny" or cfg.model in SIZES:
        config = t5.T5Config.preset(cfg.model)
    elif os.path.isfile(os.path.join(cfg.model, "config.json")):
        config = t5.T5Config.from_hf(os.path.join(cfg.model, "config.json"))
    else:
        raise SystemExit(f"error: --count-params needs a preset ({', '.join(('tiny',) + SIZES)}) or a directory "
                         f"with config.json, got --model {cfg.model!r}")
    return dataclasses.replace(config, dropout_rate=cfg.dropout)


def add_adapters(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap the backbone's layers from outside (mov.py / molora.py) and freeze everything else."""
    if cfg.method == "mov":
        sentence_dim = data.SENTENCE_DIM if cfg.router_input == "sentence" else None
        return mov.add_mov(model, cfg.experts, top_k=cfg.top_k, router_input=cfg.router_input,
                           sentence_dim=sentence_dim)
    if cfg.method == "ia3":
        return mov.add_ia3(model)
    if cfg.method == "molora":
        return molora.add_molora(model, cfg.experts, rank=cfg.rank, alpha=cfg.alpha)
    if cfg.method == "lora":
        return molora.add_lora(model, rank=cfg.rank, alpha=cfg.alpha)
    return model.requires_grad_(True)  # full fine-tuning


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """Backbone (random for `tiny`, else pre-trained weights) with the method's adapters, on `device`."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "tiny":
        model = t5.T5(model_config(cfg))
    else:
        name = f"google/t5-{cfg.model}-lm-adapt" if cfg.model in SIZES else cfg.model
        model = t5.T5.from_pretrained(name)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
    torch.manual_seed(cfg.seed + 1)  # adapter init independent of how the backbone was made
    return add_adapters(model, cfg).to(device)


def count_params(cfg: Config) -> str:
    with torch.device("meta"):
        model = add_adapters(t5.T5(model_config(cfg)), cfg)
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    backbone = total - trainable if cfg.method != "full" else total
    return (f"model {cfg.model}, method {cfg.method}" + (f", {cfg.experts} experts" if cfg.method in ("mov", "molora")
            else "") + f"\nbackbone parameters  {backbone:,}\ntrainable parameters {trainable:,} "
            f"({100 * trainable / backbone:.3f}% of the backbone)\ntotal parameters     {total:,}")


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


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first (a checkpoint exists only once its directory is renamed)."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n))
             for n in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", n))]
    return sorted(found)


def to_host(obj):
    """A copy of nested dicts / lists of tensors with every tensor on the CPU (from CUDA, or gathered from XLA)."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu")
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def save_checkpoint(cfg: Config, step: int, model, optimizer, mixture) -> str:
    """Trainable tensors, optimizer + RNG state, data position and config, to a temporary directory then renamed.

    Everything is gathered to the host first (on XLA, sharded tensors become whole CPU tensors)."""
    from safetensors.torch import save_file
    root = os.path.join(cfg.out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:08d}"), os.path.join(root, f".tmp-step_{step:08d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, os.path.join(tmp, TRAINABLE_FILE))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": to_host(optimizer.state_dict()), "rng": rng}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "data": mixture.state_dict(), "config": dataclasses.asdict(cfg)}, f)
    for name in os.listdir(tmp):  # make the bytes durable before the rename publishes them
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for _, old in checkpoints(cfg.out)[:-cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainable(model: torch.nn.Module, path: str) -> None:
    """Load a safetensors file of trainable tensors (a checkpoint's, or an adapter file) into `model`, strictly."""
    from safetensors.torch import load_file
    saved = load_file(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model (check the method, experts and rank): missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model expects "
                                 f"{tuple(p.shape)} (check the experts and rank)")
            p.copy_(saved[name])


def truncate_log(path: str, step: int) -> None:
    """Drop the log lines past `step` (a run killed after its last checkpoint logged steps it will redo)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def check_same_run(cfg: Config, out: str) -> None:
    """Refuse to resume a run directory that holds another method, expert count or model."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    diff = [f"{k}: saved {saved.get(k)!r}, asked {getattr(cfg, k)!r}"
            for k in IDENTITY if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"error: run directory {out} holds another run ({'; '.join(diff)}). "
                         f"Use another --out, or the saved settings to resume it.")


def load_run(run_dir: str, step: Optional[int] = None, device="cpu") -> tuple[torch.nn.Module, Config]:
    """The model of a training run (backbone + adapters from its newest, or given, checkpoint), in eval mode."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); pass the --out of train.py")
    with open(path) as f:
        cfg = Config(**json.load(f))
    found = dict(checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"run directory {run_dir} has no checkpoint yet (checkpoints/step_*)")
    if step is not None and step not in found:
        raise FileNotFoundError(f"run directory {run_dir} has no checkpoint of step {step}; it has {sorted(found)}")
    model = build_model(cfg, torch.device(device))
    load_trainable(model, os.path.join(found[max(found) if step is None else step], TRAINABLE_FILE))
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------- device
def device_kind(name: str) -> str:
    """--device resolved to xla, cuda or cpu. auto: a TPU (through torch-xla), then CUDA, then the CPU."""
    if name == "auto":
        # A TPU VM exposes /dev/accel*; importing torch_xla elsewhere would cost seconds for nothing.
        tpu = os.path.exists("/dev/accel0") or os.environ.get("PJRT_DEVICE") == "TPU"
        name = "xla" if tpu else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device; use --device cpu or auto")
    return name


def pick_device(name: str) -> torch.device:
    kind = device_kind(name)
    if kind == "xla":
        import torch_xla
        return torch_xla.device()
    return torch.device(kind)


# ----------------------------------------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    # --- setup: device, run directory, resume point
    if device_kind(cfg.device) == "xla":
        sharding.enable_spmd()  # before the first XLA tensor of the process
    device = pick_device(cfg.device)
    xla = device.type == "xla"
    autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type != "cpu")
    os.makedirs(cfg.out, exist_ok=True)
    check_same_run(cfg, cfg.out)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    resume = checkpoints(cfg.out)[-1] if checkpoints(cfg.out) else None

    # --- model: backbone, adapters, freeze (sharded over the mesh on XLA)
    model = build_model(cfg, device if not xla else torch.device("cpu"))
    if xla:
        mesh = sharding.make_mesh(cfg.fsdp)
        if cfg.remat:
            sharding.apply_remat(model)  # torch-xla's checkpoint: XLA would merge torch's back into the forward
        model = model.to(device)
        table = sharding.table_for(cfg.method, tie_word_embeddings=model.config.tie_word_embeddings)
        sharding.apply_sharding(model, mesh, sharding.mark_sharding, table=table)
    elif cfg.remat:
        sharding.apply_remat(model, checkpoint=functools.partial(torch.utils.checkpoint.checkpoint,
                                                                 use_reentrant=True))
    params = [p for p in model.parameters() if p.requires_grad]

    # --- optimizer: Adafactor over the trainable tensors only (the frozen backbone holds no state)
    optimizer = adafactor.Adafactor(params, lr=cfg.lr, step_offset=cfg.adafactor_step_offset)

    # --- data: the mixture, packed to fixed shapes (sentence routing: one example per row with its embedding)
    mixture = data.Mixture(cfg.data, seed=cfg.seed, batch_size=cfg.batch_size, input_length=cfg.input_length,
                           target_length=cfg.target_length, pack=cfg.router_input != "sentence",
                           sentence_embedder=data.SentenceEmbedder() if cfg.router_input == "sentence" else None)
    step = 0
    if resume is not None:
        step, path = resume
        load_trainable(model, os.path.join(path, TRAINABLE_FILE))
        state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        with open(os.path.join(path, "state.json")) as f:
            mixture.load_state_dict(json.load(f)["data"])
        truncate_log(os.path.join(cfg.out, "log.jsonl"), step)
        print(f"resuming {cfg.out} from step {step}")
    else:
        torch.manual_seed(cfg.seed + 2)  # dropout stream

    # --- one training step: forward and backward per micro-batch, then one optimizer update
    def train_step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        micro = cfg.batch_size // cfg.grad_accum
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

    if xla:
        import torch_xla
        train_step = torch_xla.compile(train_step)

    def to_device(batch: dict) -> dict:
        out = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        if xla:
            sharding.shard_batch(out, mesh)
        return out

    # --- loop: step, log, checkpoint; SIGINT/SIGTERM end it with a checkpoint
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.method} {cfg.model}", dynamic_ncols=True)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a")
    pending, tokens, t0, last, saved = [], 0, time.perf_counter(), None, step

    def write_log(entries, rate):
        """Write the log lines of `entries` [(step, loss, z, examples)]: one host transfer for all of them."""
        nonlocal last
        values = torch.stack([torch.stack([l, z]) for _, l, z, _ in entries]).float().cpu().tolist()
        for (s, _, _, seen), (l, z) in zip(entries, values):
            if not math.isfinite(l):
                newest = checkpoints(cfg.out)[-1][1] if checkpoints(cfg.out) else "(none yet)"
                raise FloatingPointError(f"loss is {l} at step {s}; stopping. The newest checkpoint, {newest}, is "
                                         f"intact; try a lower --lr or --dtype float32")
            last = {"step": s, "loss": l, "z_loss": z, "lr": cfg.lr, "tokens_per_s": round(rate, 1),
                    "examples_seen": seen}
            log.write(json.dumps(last) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate:,.0f}")

    def flush_log():
        """Log the pending steps. On XLA through a step closure: it runs once the queued graphs have executed, so
        the loop itself never waits for the device."""
        nonlocal pending, tokens, t0
        elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
        entries, rate, pending, tokens = pending, tokens / max(elapsed, 1e-9), [], 0
        if xla:
            import torch_xla.core.xla_model as xm
            xm.add_step_closure(write_log, args=(entries, rate))
        else:
            write_log(entries, rate)

    def checkpoint():
        if xla:
            torch_xla.sync()  # run the pending step closures (log lines and their NaN check) first
        save_checkpoint(cfg, step, model, optimizer, mixture)

    model.train()
    try:
        while step < cfg.steps and stop["signal"] is None:
            batch = mixture.next_batch()
            tokens += int((batch["encoder_segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum())
            loss, z = train_step(to_device(batch))
            step += 1
            bar.update(1)
            pending.append((step, loss, z, mixture.stats["examples"]))
            if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == cfg.steps:
                flush_log()
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint()
                saved = step
        if step != saved:  # stopped by a signal between checkpoints
            if pending:
                flush_log()
            checkpoint()
    finally:
        bar.close()
        log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {cfg.out}/checkpoints; "
              f"run the same command to resume")
        raise SystemExit(128 + stop["signal"])

    # --- evaluation of the trained adapters on the held-out tasks
    result = {"step": step, "last": last}
    if cfg.evaluate:
        import evaluate
        model.eval()
        sets = data.load_eval(cfg.data, max_examples=cfg.eval_max_examples)
        name = run_name(cfg.method, cfg.experts)
        meta = dict(method=cfg.method, experts=cfg.experts, rank=cfg.rank, model=cfg.model, data=cfg.data,
                    router_input=cfg.router_input, step=step, label=f"{name} step {step}")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            result["eval"] = evaluate.evaluate(model, sets, input_length=cfg.input_length,
                                               target_length=cfg.target_length, device=device, out_dir=cfg.out,
                                               meta=meta)
        print(evaluate.format_table(result["eval"]))
    return result


if __name__ == "__main__":
    config, only_count = parse_args()
    try:
        if only_count:
            print(count_params(config))
        else:
            main(config)
    except (OSError, ValueError, FloatingPointError) as err:  # bad input, unreachable files, a non-finite loss
        sys.exit(f"error: {err}")
