"""The pieces a run is made of, built from its settings: the device, the activation dtype, and the model.

One place for what train.py, evaluate.py, generate.py and bench.py all need, so that a model trained by one is
rebuilt identically by the others:

    device = build.resolve_device("auto")                     # TPU (torch-xla), then CUDA, then the CPU
    autocast = build.autocast_enabled("auto", device)         # bf16 autocast where the hardware has it
    on, line = build.activations("auto", device)              # the same, with the reason, for the log
    model = build.build_model(settings, device)               # backbone + adapters, base weights frozen

`settings` is a runner.settings.ModelSettings (or its Config, train.py's settings, or a run directory's config.json
read back with `Config.from_dict`). The backbone is T5 v1.1 + LM adaptation (`google/t5-<size>-lm-adapt`), the one the
paper adapts (Zadouri et al. 2023, section 3; the original's `configs/*.gin` load `t5_1_1_lm100k_<size>`).
"""
import dataclasses
import os
import time

import torch

import molora
import mov
import routing
import t5
from runner import rundir
from sources import t5_weights
from runner.settings import METHODS, SENTENCE_DIM, SIZES, Config


# ----------------------------------------------------------------------------------------------- device and dtype
def device_kind(name: str) -> str:
    """--device resolved to xla, cuda or cpu. auto: a TPU (through torch-xla), then CUDA, then the CPU."""
    if name == "auto":
        # A TPU VM exposes /dev/accel*; importing torch_xla elsewhere would cost seconds for nothing.
        tpu = os.path.exists("/dev/accel0") or os.environ.get("PJRT_DEVICE") == "TPU"
        name = "xla" if tpu else "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "xla"):
        raise ValueError(f"--device must be auto, cpu, cuda or xla, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    return name


def resolve_device(name: str) -> torch.device:
    """torch.device of --device; torch_xla is imported only for xla."""
    kind = device_kind(name)
    if kind == "xla":
        import torch_xla
        return torch_xla.device()
    return torch.device(kind)


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's native bf16 matmul instructions, "AMX-BF16" or "AVX512-BF16", or "" when it has neither (bf16
    matmuls would then be emulated, slower than fp32). Linux: /proc/cpuinfo's flags; elsewhere torch's cpuinfo."""
    if os.path.exists(cpuinfo):
        with open(cpuinfo) as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else ""
    cpu = getattr(torch._C, "_cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX-BF16"  # every CPU with AMX tiles so far also has AMX-BF16
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return ""


def activations(dtype: str, device: torch.device) -> tuple[bool, str]:
    """(bf16 autocast on?, a line saying what was picked and why) for --dtype on `device`.

    auto: bf16 autocast on an accelerator (CUDA, XLA), the original's precision; float32 on every CPU. On the two
    CPUs with native bf16 matmuls measured (150 demo steps, best of 2, quiet), bf16 autocast was slower on an Intel
    Xeon with AMX (11.1 s against 8.8 s in float32) and gained little on an AMD EPYC with AVX512-BF16 (12 s against
    14 s); without native bf16 it is emulated, several times slower; larger models in bf16 on such CPUs are not
    measured, so float32 stays the rule there too. The choice does not depend on the machine beyond its device, so
    a command picks the same dtype wherever it runs. Under autocast the router softmax, the losses, RMSNorm's
    variance, the logits and the optimizer stay float32 (mov.py, molora.py, t5.py, train.py, adafactor.py)."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype != "auto":
        on = dtype == "bfloat16"
        return on, f"activations: {'bf16 autocast' if on else 'float32'} (--dtype {dtype})"
    if device.type != "cpu":
        return True, f"activations: bf16 autocast (--dtype auto on {device.type})"
    native = cpu_native_bf16()
    why = f"this CPU's {native} matmuls gave the demo little or no gain" if native else "this CPU emulates bf16"
    return False, f"activations: float32 (--dtype auto on a CPU: {why}; --dtype bfloat16 forces bf16)"


def autocast_enabled(dtype: str, device: torch.device) -> bool:
    """Whether activations run under bf16 autocast: --dtype bfloat16, or auto on an accelerator (activations)."""
    return activations(dtype, device)[0]


# A model smaller than this gains at most about 1.5x from a second thread on a quiet machine (the demo's tiny T5:
# 1.0-1.8x) and loses 2-6x when another process holds a core: it runs on one (tools/threads_bench.py measures both).
ONE_THREAD_BELOW = 10_000_000  # parameters


def busy_cores(cpus=None, seconds=0.25, stat="/proc/stat"):
    """How many of the cores `cpus` (default: those this process may run on) other processes keep busy now: their
    non-idle time over `seconds`, from /proc/stat's per-core lines, in cores (rounded; 0 where /proc/stat does not
    exist). This process sleeps while it samples."""
    cpus = set(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)) \
        if cpus is None else set(cpus)

    def read():  # {core: (total, idle + iowait)}
        with open(stat) as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        return {int(r[0][3:]): (sum(map(int, r[1:])), int(r[4]) + int(r[5] if len(r) > 5 else 0)) for r in rows}
    if not os.path.exists(stat):
        return 0
    before, _ = read(), time.sleep(seconds)
    after = read()
    busy = 0.0
    for core in cpus & set(before) & set(after):
        total, idle = (after[core][i] - before[core][i] for i in (0, 1))
        busy += 1 - idle / max(total, 1)
    return round(busy)


def cpu_threads(model: torch.nn.Module, threads=None, kept=None) -> tuple[int, str]:
    """(threads, a line saying why) for training or scoring `model` on the CPU: --threads, else OMP_NUM_THREADS,
    else the count a resumed run used (`kept`: the thread count changes float sums, so a resume keeps it), else one
    thread for a model under ONE_THREAD_BELOW parameters, else the cores this process may use that no other process
    is busy on at the start (at least one). Torch's default, one thread per core, slows a step many times over when
    another process holds one of them: every parallel region waits at its barrier for the thread that shares a
    core."""
    if threads is not None:
        return threads, f"threads: {threads} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    if isinstance(kept, int) and kept > 0:
        return kept, f"threads: {kept} (kept from the run's earlier steps; --threads N)"
    params = sum(p.numel() for p in model.parameters())
    if params < ONE_THREAD_BELOW:
        return 1, (f"threads: 1 (a model of {params / 1e6:.1f}M parameters: more would slow 2-6x when a core is "
                   "busy; --threads N)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = min(busy_cores(), usable - 1)
    why = f"{usable} cores, {busy} busy with other work" if busy else f"{usable} cores"
    return usable - busy, f"threads: {usable - busy} ({why}; --threads N)"


def use_cpu_threads(model: torch.nn.Module, device: torch.device, threads=None, kept=None) -> str:
    """On the CPU, set torch's thread count by `cpu_threads` and return its line ("; threads: ..."); "" elsewhere."""
    if device.type != "cpu":
        return ""
    n, line = cpu_threads(model, threads, kept)
    torch.set_num_threads(n)
    return "; " + line


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model) (inductor) for training steps of fixed shapes; `model` itself stays eager (saved,
    evaluated). Two settings keep the compiled step the eager one: mov.py, molora.py and t5.py ask
    torch.amp.is_autocast_available in their float32 helpers, a constant per device that dynamo would otherwise
    treat as a graph break at every site; and inductor draws random numbers with ATen's generator as eager does
    (fallback_random; on the CPU it leaves t5.Dropout's bernoulli_ to ATen anyway), so dropout masks, and with them
    the losses and an exact resume, equal eager's."""
    import torch._inductor.config  # torch's compiler: loaded only for --compile
    torch.compiler.assume_constant_result(torch.amp.is_autocast_available)
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


# ----------------------------------------------------------------------------------------------- model
def hub_name(model: str) -> str:
    """--model as a checkpoint to load: a size means google/t5-<size>-lm-adapt; else a directory or hub name."""
    return t5.T5Config.hub_name(model) if model in SIZES else model


def model_files(settings):
    """The local directory of the backbone's checkpoint (fetched from the hub when it is a hub name), or None for the
    random tiny model; OSError / ValueError naming the model and the fix when it cannot be had."""
    return None if settings.model == "tiny" else t5_weights.resolve(hub_name(settings.model))


def model_config(settings) -> t5.T5Config:
    """The backbone's T5Config without loading weights: a preset, or a directory's config.json."""
    if settings.model == "tiny" or settings.model in SIZES:
        config = t5.T5Config.preset(settings.model)
    elif os.path.isfile(os.path.join(settings.model, "config.json")):
        config = t5_weights.read_config(os.path.join(settings.model, "config.json"))
    else:
        raise ValueError(f"--model {settings.model!r}: the shapes need a preset ({', '.join(('tiny',) + SIZES)}) or "
                         "a directory with config.json")
    return dataclasses.replace(config, **dropout(settings))


def dropout(settings) -> dict:
    """The run's dropout as T5Config fields."""
    return dict(dropout_rate=settings.dropout, dropout_mask=settings.dropout_mask)


def router(settings, layer_file):
    """A function making the router of each site of a mov / molora model: the layer file's paper router
    (`layer_file.Router` with top_k), inside routing.Router when an option of the original's routing.py is on."""
    sentence = SENTENCE_DIM if settings.router_input == "sentence" else None
    if not (settings.router_jitter or settings.router_bias or sentence):
        return lambda: layer_file.Router(top_k=settings.top_k)
    return lambda: routing.Router(layer_file.Router(top_k=settings.top_k), jitter=settings.router_jitter,
                                  bias=settings.router_bias, sentence_dim=sentence)


def add_adapters(model: torch.nn.Module, settings) -> torch.nn.Module:
    """Wrap the backbone's layers from outside (mov.py / molora.py); the base weights are frozen by the injector."""
    method = settings.method
    if method == "mov":
        return mov.add_mov(model, settings.experts, router=router(settings, mov))
    if method == "ia3":
        return mov.add_ia3(model)
    if method == "molora":
        return molora.add_molora(model, settings.experts, rank=settings.rank, alpha=settings.alpha,
                                 router=router(settings, molora))
    if method == "lora":
        return molora.add_lora(model, rank=settings.rank, alpha=settings.alpha)
    if method == "full":
        return model.requires_grad_(True)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build_model(settings, device: torch.device) -> torch.nn.Module:
    """Backbone (random for `tiny`, else pre-trained weights) with the method's adapters, on `device`."""
    torch.manual_seed(settings.seed)
    if settings.model == "tiny":
        model = t5.T5(model_config(settings))
    else:
        loaded = t5_weights.load(hub_name(settings.model))
        # the run's dropout (rate, mask) on the checkpoint's config: rebuilt on meta, the loaded tensors moved in
        with torch.device("meta"):
            model = t5.T5(dataclasses.replace(loaded.config, **dropout(settings)))
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.train(loaded.training)
    torch.manual_seed(settings.seed + 1)  # adapter init independent of how the backbone was made
    return add_adapters(model, settings).to(device)


def count_params(settings) -> str:
    """The backbone's and the adapters' parameter counts, on the meta device (nothing loaded or allocated)."""
    with torch.device("meta"):
        model = add_adapters(t5.T5(model_config(settings)), settings)
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    backbone = total - trainable if settings.method != "full" else total
    experts = f", {settings.experts} experts" if settings.method in ("mov", "molora") else ""
    return (f"model {settings.model}, method {settings.method}{experts}\nbackbone parameters  {backbone:,}\n"
            f"trainable parameters {trainable:,} ({100 * trainable / backbone:.3f}% of the backbone)\n"
            f"total parameters     {total:,}")


# Keys every config.json train.py has written holds; a file without them was not written by it.
_REQUIRED = ("method", "experts", "rank", "alpha", "top_k", "router_input", "model", "dropout", "seed")


def load_run(run_dir, step=None, device="cpu", log=print):
    """(model in eval mode, settings, step) of a training run: its backbone and the adapters of its newest checkpoint
    whose tensors pass the checks (rundir.check_trainable: names, shapes, dtypes, finite values), or of `step`.
    settings: the run's Config in effect at that step (config.json's first settings and changes)."""
    path = os.path.join(run_dir, "config.json")
    record = rundir.read_config(run_dir)
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise rundir.RunDirError(f"{path} lacks {missing}; it was not written by this train.py. Pass --model and "
                                 "--adapter instead of --run")
    settings = rundir.run_settings(record)
    try:
        settings.validate()
    except ValueError as e:
        raise rundir.RunDirError(f"{path} holds impossible settings ({e}); restore the file, or pass --model and "
                                 "--adapter instead of --run") from e
    found = dict(rundir.checkpoints(run_dir))
    if not found:
        raise rundir.RunDirError(f"run directory {run_dir} has no checkpoint yet (checkpoints/step_*); train first")
    if step is not None and step not in found:
        raise rundir.RunDirError(f"run directory {run_dir} has no checkpoint of step {step}; it has {sorted(found)}")
    model = build_model(settings, torch.device("cpu"))
    for s in [step] if step is not None else sorted(found, reverse=True):
        try:
            rundir.load_trainable(model, os.path.join(found[s], rundir.TRAINABLE_FILE))
        except rundir.RunDirError as e:
            if step is not None:
                raise
            log(f"skipping checkpoint {found[s]}: {e}")
            continue
        return model.to(device).eval(), rundir.run_settings(record, s), s
    raise rundir.RunDirError(f"no checkpoint of {run_dir} loads (see above); evaluate one with --step, or retrain")
