"""The settings of a run, one place for every command line: what defines a model and its adapters (ModelSettings),
and what a training run adds to it (Config: the recipe, the hardware, the run).

The defaults are the paper's recipe (Zadouri et al. 2023, arXiv 2309.05444, section 3) as the original configures
it (for-ai/parameter-efficient-moe `configs/{mov,molora,ia3,lora,t0}.gin`, `scripts/*_train.sh`, T5X's finetune
defaults); train.py lays its per-method recipes and presets over them. Each field carries its --help text and the
same flag spelling in train.py, evaluate.py, generate.py, bench.py and tools/tpu_memory.py:

    parser = argparse.ArgumentParser(); ModelSettings.add_flags(parser, only=MODEL_FLAGS)
    settings = Config.from_dict(json.load(open("runs/mov-30/config.json")))   # any config.json written so far
    settings.validate()                                                       # ValueError naming the flag and fix

`from_dict` fills what older run directories did not record with the value those runs used, and names keys it
does not know (a newer version wrote them) in one warning.

Each field also says whether it is part of a run's identity (`identity=`: the methods for which another value makes
another run, which a resume refuses) or may change when a run resumes (applied from the resumed step on and
recorded in config.json's "changes"; runner/rundir.py). `out` is neither: it is the run directory itself.
"""
import argparse
import dataclasses
import math
import shlex
import warnings
from dataclasses import dataclass, field
from typing import Optional

METHODS = ("mov", "molora", "ia3", "lora", "full")
ROUTED, LORA = ("mov", "molora"), ("lora", "molora")
SIZES = ("small", "base", "large", "xl", "xxl")  # presets with released LM-adapted weights on the hub
SENTENCE_DIM = 384  # what --router-input sentence reads: data.SentenceEmbedder's all-MiniLM-L6-v2 embeddings


def setting(default, help, choices=None, identity=False):
    """A settings field with its --help text (and the values it may take). identity: True (every method) or the
    methods for which the setting defines the run (the tensors' shapes, the model, the data stream): a resume with
    another value is refused. False: it may change on resume, from the resumed step on, on the record."""
    methods = METHODS if identity is True else tuple(identity or ())
    return field(default=default, metadata={"help": help, "choices": choices, "identity": methods})


@dataclass
class ModelSettings:
    """What a model is built from (runner/build.py): the backbone, the method and its adapters' shapes and options."""
    # configs/mov.gin and mov_eval.gin release 30 experts, molora.gin 10; the paper's Table 1 has MoV-10, MoV-30 and
    # MoLORA-15. The default is MoV-10, the paper's smallest mixture and the base of its routing ablations (top-k,
    # sentence routing); --experts 30 is the released configs/mov.gin and the paper's best MoV row.
    method: str = setting("mov", "mov (mixture of (IA)3 vectors), molora (mixture of LoRA), ia3, lora, or full "
                                 "fine-tuning", METHODS, identity=True)
    experts: int = setting(10, "number of experts for mov / molora", identity=ROUTED)
    rank: int = setting(4, "LoRA rank for lora / molora (the paper: 4; the released configs/lora.gin: 16)",
                        identity=LORA)
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank", identity=LORA)
    top_k: Optional[int] = setting(None, "mov / molora: keep the k most probable experts (softmax over all, no "
                                   "renormalisation, as the original's routing.py)", identity=ROUTED)
    # router options of the original's src/routing.py, all off in its released configs (routing.py)
    router_jitter: float = setting(0.0, "training only: the router input times noise U[1-eps, 1+eps]")
    router_bias: bool = setting(False, "a zero-initialised trainable bias on the router logits (use_bias)",
                                identity=ROUTED)
    router_input: str = setting("token", "token: the router reads the activation it rescales; sentence: one "
                                         "embedding per example (an ablation)", ("token", "sentence"),
                                identity=ROUTED)
    model: str = setting("xl", "tiny (random, offline), small..xxl (google/t5-<size>-lm-adapt; xl: the paper's "
                               "T5-3B, large: the released scripts'), a directory or a hub name", identity=True)
    dropout: float = setting(0.1, "dropout rate of the backbone in training")
    dropout_mask: str = setting("broadcast", "broadcast: T5X's masks shared along the length; elementwise: HF's",
                                ("broadcast", "elementwise"))
    seed: int = setting(0, "seed of the data mixture, the adapter init, dropout and --model tiny's weights",
                        identity=True)

    @classmethod
    def add_flags(cls, parser, only=None, defaults=True):
        """One --flag per field (`only`: these field names), with its help; defaults=False gives None defaults, so
        a caller can tell what was typed (train.py lays recipes and presets under it)."""
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            flag, help, choices = "--" + f.name.replace("_", "-"), f.metadata["help"], f.metadata["choices"]
            default = f.default if defaults else None
            if f.type in (bool, "bool"):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
                continue
            kind = {int: int, Optional[int]: int, float: float}.get(f.type, str)
            parser.add_argument(flag, type=kind, choices=choices, default=default, help=help)
        return parser

    @classmethod
    def from_dict(cls, values, where="settings"):
        """An instance from a dict (a run's config.json): keys this class lacks are named in one warning, keys the
        dict lacks take the value older runs used (every field added since has the original's value as its
        default), and a value of the wrong type is a ValueError naming `where`."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names) - set(RESOLVED) - set(RECORD))
        if unknown:
            warnings.warn(f"{where} has settings this version does not know, ignored: {', '.join(unknown)} (written "
                          "by a newer version?)", stacklevel=2)
        kept = {k: v for k, v in values.items() if k in names}
        wrong = [f"{k}={v!r}" for k, v in kept.items() if not _fits(v, names[k])]
        if wrong:
            raise ValueError(f"{where} holds impossible settings ({', '.join(wrong)}); restore the file, or pass "
                             "the settings as flags instead")
        return cls(**kept)

    def applicable(self):
        """The settings as a dict without those the method does not use (experts and router options outside mov /
        molora, rank and alpha outside lora / molora, the router input outside mov)."""
        unused = set()
        if self.method not in ROUTED:
            unused |= {"experts", "top_k", "router_jitter", "router_bias", "router_input", "load_balance_weight"}
        if self.method not in LORA:
            unused |= {"rank", "alpha"}
        if self.method != "mov":
            unused.add("router_input")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}

    def validate(self):
        """Every setting checked before anything is built; ValueError names the flag and the fix."""
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])}, "
                                 f"got {getattr(self, f.name)!r}")
        for name in POSITIVE:
            value = getattr(self, name, None)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("dropout", "router_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be a positive number, got {self.alpha}")
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        routed = [f"--{n.replace('_', '-')}" for n in ("top_k", "router_jitter", "router_bias", "load_balance_weight")
                  if getattr(self, n, None) not in (None, 0.0, False)]
        if routed and self.method not in ROUTED:
            raise ValueError(f"{', '.join(routed)} applies to --method mov or molora only, got --method {self.method}")
        if self.router_input == "sentence" and self.method != "mov":
            raise ValueError(f"--router-input sentence applies to --method mov only, got {self.method}")


@dataclass
class Config(ModelSettings):
    """Everything a training run is (train.py): the model, then the recipe, the hardware and the run itself."""
    load_balance_weight: float = setting(0.0, "add this x Switch Transformer's load-balancing loss (mean over sites)")
    data: str = setting("bigscience/P3", "bigscience/P3 (hub), a local directory in P3's layout, or demo (offline)",
                        identity=True)  # the same tasks from elsewhere resume (data.check_same_mixture)
    # the recipe (configs/*.gin, scripts/*_train.sh; T5X's finetune defaults)
    steps: int = setting(500_000, "optimizer steps in all (a resumed run continues up to this count)")
    batch_size: int = setting(32, "packed rows per optimizer step", identity=True)
    grad_accum: int = setting(1, "split each batch into this many micro-batches (memory); 1 = the original")
    input_length: int = setting(1024, "encoder tokens per row (inputs keep their first tokens)", identity=True)
    target_length: int = setting(256, "decoder tokens per row", identity=True)
    lr: float = setting(3e-4, "constant learning rate (no warm-up, no decay)")
    adafactor_step_offset: int = setting(1_100_000, "Adafactor's decay counter starts here (T5X continues from the "
                                              "checkpoint's step 1.1M)")
    z_loss: float = setting(1e-4, "coefficient of the output-logit z-loss (t5x/losses.py)")
    # the hardware
    dtype: str = setting("auto", "activations: auto (bf16 autocast on a GPU or TPU, float32 on every CPU), float32 "
                                 "or bfloat16", ("auto", "float32", "bfloat16"))
    device: str = setting("auto", "auto (TPU through torch-xla, then CUDA, then CPU), cpu, cuda or xla",
                          ("auto", "cpu", "cuda", "xla"))
    threads: Optional[int] = setting(None, "CPU threads (default: 1 for a model under 10M parameters, else the cores "
                                           "no other process is busy on at the start; OMP_NUM_THREADS also sets it)")
    fsdp: int = setting(1, "XLA SPMD: devices along the axis that shards the frozen weights (the rest is data "
                           "parallel)")
    remat: bool = setting(False, "recompute each T5 block in the backward instead of keeping its activations")
    compile: bool = setting(False, "torch.compile the training forward and backward (CPU or CUDA, one process): the "
                                   "first step compiles for minutes, later steps run faster; same losses as eager")
    # the run
    out: str = setting("", "run directory; re-running with it resumes (default runs/[<preset>-]<method>[-<experts>])")
    save_every: int = setting(10_000, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)")
    keep: int = setting(3, "keep the newest N checkpoints (the original keeps 60; a full fine-tune's checkpoint of "
                           "T5-xl is about 12 GB)")
    log_every: int = setting(100, "write a log line and refresh the progress bar every N steps")
    evaluate: bool = setting(False, "after training, run the held-out rank-classification evaluation (evaluate.py)")
    eval_max_examples: Optional[int] = setting(None, "with --evaluate: at most this many examples per template")

    def validate(self):
        super().validate()
        for name in ("lr",):
            if not (math.isfinite(self.lr) and self.lr > 0):
                raise ValueError(f"--{name} must be a positive number, got {self.lr}")
        for name in ("z_loss", "load_balance_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)}")
        if self.adafactor_step_offset < 0:
            raise ValueError(f"--adafactor-step-offset must be >= 0, got {self.adafactor_step_offset}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        # a re-entrant checkpoint re-runs each block in the backward, without the forward's graph and contexts
        if self.remat and (self.load_balance_weight or self.router_input == "sentence"):
            raise ValueError("--remat cannot be combined with --load-balance-weight or --router-input sentence (the "
                             "recomputed blocks lack the forward's graph and embeddings); drop one of them")
        if self.compile and self.remat:
            raise ValueError("--compile applies to steps without --remat; drop --compile or --remat")


POSITIVE = ("experts", "rank", "steps", "batch_size", "grad_accum", "input_length", "target_length", "fsdp", "threads",
            "save_every", "keep", "log_every", "eval_max_examples")
# What a run directory's config.json records beside the settings: resolved at the start of the run (they may
# differ on resume, on the record), and the record of the settings changed on resume (runner/rundir.py).
RESOLVED = ("activations", "world_size", "cpu_threads")
RECORD = ("changes",)
MODEL_FLAGS = tuple(f.name for f in dataclasses.fields(ModelSettings))
# The identity settings, each with the methods whose runs it defines (setting(identity=...)): a resume with another
# value is refused. Every other setting but `out` may change on resume, on the record (runner/rundir.py).
IDENTITY = {f.name: f.metadata["identity"] for f in dataclasses.fields(Config) if f.metadata["identity"]}


def _fits(value, f):
    """Whether a JSON value has the type of field `f` (ints count as floats; bools are not numbers)."""
    kinds = {int: (int,), float: (int, float), bool: (bool,), str: (str,), Optional[int]: (int, type(None))}
    allowed = kinds.get(f.type, (object,))
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def run_name(method, experts):
    """mov-30, molora-15, ia3, lora, full: a run's short name (its default directory and table label), and the way
    bench.py and tools/tpu_memory.py name a configuration."""
    return f"{method}-{experts}" if method in ROUTED else method


def parse_run_name(name):
    """(method, experts) of a run_name: "mov-30" -> ("mov", 30), "ia3" -> ("ia3", None); ValueError otherwise."""
    method, _, experts = name.partition("-")
    if method not in METHODS or (method in ROUTED) != bool(experts) or (experts and not experts.isdigit()):
        raise ValueError(f"{name!r} is not a configuration: use mov-N, molora-N (N experts), ia3, lora or full")
    return method, int(experts) if experts else None


def flag_text(name, value):
    """The command-line words that set `name` to `value`: "--seed 0", "--router-bias" / "--no-router-bias", and
    "(no --top-k)" for None."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"(no {flag})" if value is None else f"{flag} {shlex.quote(str(value))}"
