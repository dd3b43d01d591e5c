"""One configuration of the benchmark, measured: our T5 with one adapter method, or transformers' T5 with peft's
adapters (the peer), timed over training steps with its peak memory probed; or rank classification timed with one
encoder pass per example against one forward per choice. bench.py runs the configurations and writes the report.

    record = bench_measure.run_spec({"kind": "train", "impl": "ours", "name": "mov-30", "model": "small",
                                     "batch_size": 2, "input_length": 256, "target_length": 64, "warmup": 2, "steps": 5,
                                     "threads": 2, "device": "cpu", "seed": 0, "dtype": "bfloat16"})

What is measured, per configuration, each in a fresh `python bench.py --worker SPEC` process (configurations
interleaved ours / peer, the first of each pair alternating), with random tokens from a fixed seed, dropout 0.1 as
in T5's config, no padding, loss = mean token cross-entropy, and adafactor.Adafactor over the trainable
(requires_grad) parameters for every implementation, in the spec's dtype: float32, or bfloat16 = the forward under
torch.autocast(bfloat16) with float32 weights, gradients and optimizer (ours and the peer alike):
  - step time: wall time of forward + backward + optimizer step (device synchronised), median over --steps timed
    steps after --warmup steps; throughput = batch * (input_length + target_length) / median step time; the table flags
    a configuration whose slowest timed step (or evaluation round) took over 1.3x its fastest (another process
    took the cores);
  - peak memory: on CUDA torch.cuda.max_memory_allocated growth over the memory held before the model was built;
    on CPU (and XLA's host) the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs once
    the model and optimizer exist) minus the RSS before the model was built: weights + gradients + optimizer state
    + activations + allocator slack, imports excluded (each worker first runs one step of the `tiny` preset so
    that lazy imports and thread pools do not count);
  - model FLOPs: bench_flops.train_step_flops (matmuls only, forward + the backward's needed gradients) per step,
    and their rate; bench.py divides it by the matmul peak that a "peak" spec measured (bench_flops.matmul_peak:
    the best of a few 2048^3 matmuls in the same dtype, threads and device, in a worker of its own);
  - on XLA, the number of compilations (torch_xla.debug.metrics 'UncachedCompile') over the timed steps (the
    first two steps compile: Adafactor creates its state in the first; keep --warmup >= 2);
  - evaluation: evaluate.score_choices (one encoder pass per example, every choice decoded against it) against
    score_naive below (a full encoder + decoder forward per (example, choice) pair, as T5X's rank classification
    does), on 4-choice items with the same padding (longest input / longest choice), in eval mode; --batch-size
    examples per batch for score_choices, 4x as many (example, choice) pairs per forward for the naive scorer.
Peers (--peer): transformers.T5ForConditionalGeneration from an equivalent HF T5Config (same sizes, gated-gelu,
untied: transformers 5 ties lm_head to the embedding whatever the config says, so the peer's lm_head gets its own
copy here; its default attention implementation), full fine-tuning, peft IA3 (k, v, wo; feedforward wo: peft's T5
default; it rescales wo's input where ours rescales the gated-GELU factor, a vector of the same size d_ff) and peft
LoRA (rank 4, alpha 16, dropout 0, on q, k, v, o, wi_0, wo: our targets). MoV and MoLORA have no peer; they are
compared with our (IA)3 and LoRA.
"""
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F

import adafactor
from tools import bench_flops
from runner import build
from runner.settings import ModelSettings, parse_run_name
import evaluate
import t5

# The configurations, named as train.py names runs (runner.settings.run_name); LoRA and MoLORA use rank 4 as in the
# paper (the original's configs/molora.gin: rank 4) and alpha 16 (molora.py's default).
CONFIGS = ("full", "ia3", "mov-10", "mov-30", "lora", "molora-10", "molora-15")
PEERS = ("full", "ia3", "lora")  # configurations transformers + peft also have
RANK, ALPHA = 4, 16
NUM_CHOICES = 4
PEER_LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wo"]
PEER_IA3_TARGETS, PEER_IA3_FEEDFORWARD = ["k", "v", "wo"], ["wo"]


# ----------------------------------------------------------------------------------------------- models
def hf_config(cfg):
    """The transformers T5Config with the same shapes and choices as our t5.T5Config."""
    from transformers import T5Config as HFT5Config
    return HFT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                      num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                      relative_attention_max_distance=cfg.relative_attention_max_distance,
                      dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.layer_norm_epsilon,
                      feed_forward_proj=cfg.feed_forward_proj, tie_word_embeddings=cfg.tie_word_embeddings,
                      pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
                      decoder_start_token_id=cfg.decoder_start_token_id, use_cache=False)


def make_model(impl, name, cfg):
    """A randomly initialised model with configuration `name`'s adapters, trainable = requires_grad, on the CPU."""
    method, experts = parse_run_name(name)
    if impl == "ours":
        return build.add_adapters(t5.T5(cfg), ModelSettings(method=method, experts=experts or 1, rank=RANK,
                                                            alpha=ALPHA))
    if name not in PEERS:
        raise ValueError(f"configuration {name!r} has no peer; peers exist for {PEERS}")
    import peft
    from transformers import T5ForConditionalGeneration
    model = T5ForConditionalGeneration(hf_config(cfg))
    if not cfg.tie_word_embeddings:  # transformers 5 always ties lm_head to shared: give it its own weight, as ours
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    if method == "ia3":
        model = peft.get_peft_model(model, peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=PEER_IA3_TARGETS,
                                                          feedforward_modules=PEER_IA3_FEEDFORWARD))
    elif method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=RANK, lora_alpha=ALPHA,
                                                           lora_dropout=0.0, target_modules=PEER_LORA_TARGETS))
    return model


def logits_of(impl, model, input_ids, decoder_input_ids):
    """[b, L] ids, [b, T] decoder ids -> logits [b, T, vocab] from either implementation."""
    if impl == "ours":
        return model(input_ids, decoder_input_ids)
    return model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, use_cache=False).logits


def random_batch(cfg, batch_size, input_length, target_length, seed, device):
    """Random ids in [2, vocab) (no pad, no EOS): inputs [b, L], targets [b, T], decoder inputs = targets shifted."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, cfg.vocab_size, (batch_size, input_length), generator=g)
    targets = torch.randint(2, cfg.vocab_size, (batch_size, target_length), generator=g)
    start = torch.full((batch_size, 1), cfg.decoder_start_token_id)
    decoder_input_ids = torch.cat([start, targets[:, :-1]], 1)
    return input_ids.to(device), decoder_input_ids.to(device), targets.to(device)


# ----------------------------------------------------------------------------------------------- device, memory
def xla_compiles():
    """Compilations so far in this process (torch_xla.debug.metrics 'UncachedCompile' counter)."""
    import torch_xla.debug.metrics as met
    return met.counter_value("UncachedCompile") or 0


def _proc_kb(field):
    """A kB field (VmRSS, VmHWM) of /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory on CPU needs Linux")


class PeakMemory:
    """Peak memory growth since `baseline()`: CUDA allocator statistics, else the process's peak RSS (Linux)."""

    def __init__(self, device, in_process):
        if device.type == "cuda":
            self.kind, self.method = "cuda", "torch.cuda.max_memory_allocated growth (tensor memory on the GPU)"
        elif os.path.exists("/proc/self/clear_refs"):
            where = "host memory of the XLA process" if device.type == "xla" else "process"
            self.kind = "rss"
            self.method = f"peak RSS growth of the {where} (VmHWM after a clear_refs reset, minus RSS before build)"
            if in_process:
                self.method += "; in-process run: freed memory of earlier configurations may be reused"
        else:
            self.kind, self.method = None, "not measured (peak RSS needs Linux /proc/self/clear_refs)"
        self.base = 0

    def baseline(self):
        """Remember what is held now (before the model is built)."""
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.kind == "rss":
            self.base = _proc_kb("VmRSS") * 1024

    def reset_peak(self):
        """Forget transient peaks so far (model construction); what is resident now still counts."""
        if self.kind == "rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)

    def peak_mb(self):
        """Peak since baseline() in MiB, or None where it cannot be measured."""
        if self.kind == "cuda":
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        if self.kind == "rss":
            return (_proc_kb("VmHWM") * 1024 - self.base) / 2 ** 20
        return None


# ----------------------------------------------------------------------------------------------- training
def train_run(impl, name, cfg, device, batch_size, input_length, target_length, warmup, steps, seed, memory=None,
              dtype="float32", compile=False):
    """Build, then time `steps` training steps after `warmup` (dtype bfloat16: under bf16 autocast, fp32 weights;
    compile: the forward and backward through build.compiled, compiled during warm-up); returns a dict of
    measurements."""
    gc.collect()
    if memory is not None:
        memory.baseline()
    torch.manual_seed(seed)
    model = make_model(impl, name, cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adafactor.Adafactor(params, lr=3e-4)
    if compile:
        torch._dynamo.reset()  # a fresh compile per model (--in-process: no recompile limit across configurations)
    forward = build.compiled(model) if compile else model
    input_ids, decoder_input_ids, targets = random_batch(cfg, batch_size, input_length, target_length, seed, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    bench_flops.synchronize(device)
    if memory is not None:
        memory.reset_peak()

    def step():
        with autocast:
            logits = logits_of(impl, forward, input_ids, decoder_input_ids)  # [b, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # XLA traces one graph per step between syncs, and a graph whose loss is kept differs from one whose loss is
    # dropped: warm-up steps keep it too. Adafactor's first step (state creation) is a graph of its own.
    for _ in range(warmup):
        loss = step()
        bench_flops.synchronize(device)
    compiles = xla_compiles() if device.type == "xla" else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        bench_flops.synchronize(device)
        times.append(time.perf_counter() - t0)
    record = {"step_s": statistics.median(times), "step_s_all": times, "spread": max(times) / min(times),
              "loss": float(loss.detach().float().cpu()),
              "trainable_params": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters())}
    if compiles is not None:
        record["compiles_timed"] = xla_compiles() - compiles
    if memory is not None:
        record["peak_mem_mb"] = memory.peak_mb()
    if impl == "peer":
        record["peer_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    del model, forward, optimizer, params
    return record


# ----------------------------------------------------------------------------------------------- evaluation
def random_items(cfg, n, input_length, target_length, seed):
    """n random rank-classification items: inputs of input_length/2..input_length tokens, NUM_CHOICES choices of
    1..target_length/8 tokens plus EOS (short answers, as in most of T0's held-out tasks)."""
    g = torch.Generator().manual_seed(seed)
    def ids(lo, hi):
        return torch.randint(2, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                             generator=g).tolist()
    inputs = [ids(max(1, input_length // 2), input_length) for _ in range(n)]
    choices = [[ids(1, max(1, target_length // 8)) + [cfg.eos_token_id] for _ in range(NUM_CHOICES)] for _ in range(n)]
    return inputs, choices


@torch.no_grad()
def score_naive(model, inputs, choices, batch_size, device):
    """Summed log-prob of each choice with one full forward (encoder and decoder) per (example, choice) pair,
    `batch_size` pairs per forward, padded like evaluate.score_choices (longest input, longest choice)."""
    cfg = model.config
    pairs = [(x, c) for x, cs in zip(inputs, choices) for c in cs]
    L, T = max(len(x) for x in inputs), max(len(c) for cs in choices for c in cs)
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids = torch.full((len(chunk), L), cfg.pad_token_id)  # [P, L], P = pairs in this forward
        tgt = torch.full((len(chunk), T), cfg.pad_token_id)  # [P, T]
        for i, (x, c) in enumerate(chunk):
            ids[i, :len(x)], tgt[i, :len(c)] = torch.tensor(x), torch.tensor(c)
        mask, tok_mask = (ids != cfg.pad_token_id).long(), (tgt != cfg.pad_token_id).float()
        dec_in = torch.cat([torch.full((len(chunk), 1), cfg.decoder_start_token_id), tgt[:, :-1]], 1)
        logits = model(ids.to(device), dec_in.to(device), attention_mask=mask.to(device)).float()  # [P, T, V]
        tgt = tgt.to(device)
        logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [P, T]
        scores.append((logp * tok_mask.to(device)).sum(-1).cpu())
    flat = torch.cat(scores).double()
    out, k = [], 0
    for cs in choices:
        out.append(flat[k:k + len(cs)].numpy())
        k += len(cs)
    return out


def eval_run(cfg, device, batch_size, examples, input_length, target_length, steps, seed, dtype="float32"):
    """Median wall time of scoring `examples` items, one encoder pass per example vs one forward per choice."""
    torch.manual_seed(seed)
    model = t5.T5(cfg).to(device).eval()
    inputs, choices = random_items(cfg, examples, input_length, target_length, seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    runs = {"one_pass": lambda: evaluate.score_choices(model, inputs, choices, batch_size=batch_size, device=device),
            "naive": lambda: score_naive(model, inputs, choices, batch_size * NUM_CHOICES, device)}
    times, scores = {k: [] for k in runs}, {}
    for i in range(steps + 1):  # round 0 is the warm-up; the two methods alternate
        for k, fn in runs.items():
            t0 = time.perf_counter()
            with autocast:
                scores[k] = fn()
            bench_flops.synchronize(device)
            if i > 0:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = max(max(v) / min(v) for v in times.values())
    diff = max(float(abs(a - b).max()) for a, b in zip(scores["one_pass"], scores["naive"]))
    return {"examples": examples, "choices": NUM_CHOICES, "one_pass_s": med["one_pass"], "naive_s": med["naive"],
            "one_pass_examples_per_s": examples / med["one_pass"], "naive_examples_per_s": examples / med["naive"],
            "speedup": med["naive"] / med["one_pass"], "spread": spread, "max_abs_score_diff": diff}


# ----------------------------------------------------------------------------------------------- one configuration
def run_spec(spec, in_process=False):
    """Measure one configuration (a dict: kind, impl, name, sizes...) in this process; returns its JSON record."""
    torch.set_num_threads(spec["threads"])
    device = build.resolve_device(spec["device"])
    cfg = t5.T5Config.preset(spec["model"])
    sizes = {k: spec[k] for k in ("batch_size", "input_length", "target_length")}
    t0 = time.perf_counter()
    dtype = spec.get("dtype", "float32")
    if spec["kind"] == "peak":
        best, times = bench_flops.matmul_peak(getattr(torch, dtype), device, n=spec.get("peak_n", 2048))
        measured = {"peak_flops_per_s": best, "times": times, "spread": max(times) / min(times)}
    elif spec["kind"] == "eval":
        measured = eval_run(cfg, device, spec["batch_size"], spec["eval_examples"], spec["input_length"],
                            spec["target_length"], spec["steps"], spec["seed"], dtype)
    else:
        # prime on `tiny`: lazy imports, kernels and thread pools load here, not inside the measurement
        train_run(spec["impl"], spec["name"], t5.T5Config.preset("tiny"), device, 2, 8, 4, 0, 1, spec["seed"],
                  dtype=dtype)
        memory = PeakMemory(device, in_process)
        measured = train_run(spec["impl"], spec["name"], cfg, device, warmup=spec["warmup"], steps=spec["steps"],
                             seed=spec["seed"], memory=memory, dtype=dtype, compile=spec.get("compile", False),
                             **sizes)
        measured["tokens_per_s"] = spec["batch_size"] * (spec["input_length"] + spec["target_length"]) / measured["step_s"]
        method, experts = parse_run_name(spec["name"])  # the peer's model is the same model: the same FLOPs
        measured["model_flops"] = bench_flops.train_step_flops(cfg, method, experts, RANK, **sizes)["total"]
        measured["model_flops_per_s"] = measured["model_flops"] / measured["step_s"]
        measured["mem_method"] = memory.method
    return {**spec, **measured, "wall_s": time.perf_counter() - t0}

