"""torch-xla SPMD: sharded MoV training equals eager CPU, compiles once, and the sharding table fits every method.

The tests marked `xla` run in their own process with 4 virtual CPU devices (see .ci/run):
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python -m pytest -q -m xla tests/test_xla.py
SPMD must be on before the first XLA tensor of a process: the session fixture `xla` switches it on, and every
xla test takes it first. Run this module in its own process: switching SPMD on also sets XLA_USE_SPMD=1 in
os.environ, which subprocess-based XLA tests of other modules would inherit, and other modules' in-process XLA
tensors made before it would have to be force-replicated. The table and memory-model tests need no torch-xla
and run with the eager suite.

`xla_train_step` below is the step structure train.py's `--device xla` path follows: forward, backward, optimizer
step and zero_grad inside one `torch_xla.compile` region; the loss comes back as a device tensor, read on the host
only by a step closure (or every N steps), never by `.item()` inside the step.
"""
import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import adafactor
import molora
import mov
import sharding
import t5
from tools import tpu_memory

BATCH, INPUT_LEN, TARGET_LEN = 8, 16, 8  # 8 rows split over 4 (or 8) devices
METHODS = {
    "full": lambda m: m.requires_grad_(True),
    "ia3": mov.add_ia3,
    "mov": lambda m: mov.add_mov(m, 4),
    "lora": lambda m: molora.add_lora(m, rank=4),
    "molora": lambda m: molora.add_molora(m, 4, rank=4),
}


def tiny_model(method="mov", seed=0):
    """A tiny random T5 without dropout, with `method`'s adapters (MoV routers and vectors perturbed off init)."""
    torch.manual_seed(seed)
    config = dataclasses.replace(t5.T5Config.preset("tiny"), dropout_rate=0.0)
    model = METHODS[method](t5.T5(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("mov_router"):
                p.add_(0.1 * torch.randn_like(p))  # experts != ones, LoRA B != 0: every path carries signal
    return model


def make_batch(seed):
    """Fixed-shape packed batch: random tokens, two segments per row (encoder 10+6, decoder 5+3), int32."""
    g = torch.Generator().manual_seed(seed)
    enc_seg = torch.tensor([1] * 10 + [2] * 6, dtype=torch.int32).repeat(BATCH, 1)
    dec_seg = torch.tensor([1] * 5 + [2] * 3, dtype=torch.int32).repeat(BATCH, 1)
    enc_seg[0, -2:] = 0  # some padding
    dec_seg[0, -1:] = 0
    targets = torch.randint(2, 512, (BATCH, TARGET_LEN), generator=g, dtype=torch.int32) * (dec_seg > 0)
    dec_in = torch.roll(targets, 1, dims=1)
    dec_in[:, 0] = 0
    dec_in[:, 5] = 0  # each segment starts from the decoder start token
    return {"input_ids": torch.randint(2, 512, (BATCH, INPUT_LEN), generator=g, dtype=torch.int32) * (enc_seg > 0),
            "decoder_input_ids": dec_in, "targets": targets,
            "encoder_segment_ids": enc_seg, "decoder_segment_ids": dec_seg}


def loss_fn(model, batch):
    """Mean token cross-entropy over non-padding target tokens (float32)."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], encoder_segment_ids=batch["encoder_segment_ids"],
                   decoder_segment_ids=batch["decoder_segment_ids"]).float()
    weights = (batch["decoder_segment_ids"] > 0).float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].long().flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum()


def eager_step(model, optimizer, batch):
    """The reference: one eager CPU training step, loss as a float."""
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def xla_train_step(model, optimizer):
    """train.py's XLA step: one compiled region holding forward, backward and the optimizer update."""
    import torch_xla

    def step(batch):
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # a device tensor; no .item() here
    return torch_xla.compile(step)


def trainable(model):
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- table (no XLA)
def record(model, table):
    """apply_sharding with a recording fake mark_sharding: {name: spec} in call order."""
    calls = {}
    ids = {id(p): n for n, p in model.named_parameters()}

    def fake(tensor, mesh, spec):
        assert mesh == "mesh" and id(tensor) in ids and ids[id(tensor)] not in calls
        calls[ids[id(tensor)]] = spec
    sharding.apply_sharding(model, "mesh", fake, table=table)
    return calls


@pytest.mark.parametrize("method", sorted(METHODS))
def test_table_covers_every_parameter(method):
    """table_for(method) marks each parameter of T5 + method exactly once, with a spec of the tensor's rank."""
    with torch.device("meta"):
        model = METHODS[method](t5.T5(t5.T5Config.preset("small")))
    params = dict(model.named_parameters())
    calls = record(model, sharding.table_for(method))
    assert sorted(calls) == sorted(params)
    for name, spec in calls.items():
        assert len(spec) == params[name].dim(), name


def test_table_shards_the_largest_dim_of_every_backbone_matrix():
    """On T5-small (d_model 512 != heads*d_kv 384) 'fsdp' splits each frozen matrix's largest dim, never 'data'."""
    with torch.device("meta"):
        model = mov.add_mov(t5.T5(t5.T5Config.preset("small")), 30)
    calls = record(model, sharding.table_for("mov"))
    for name, p in model.named_parameters():
        spec = calls[name]
        assert "data" not in spec, name
        if not p.requires_grad and p.dim() == 2 and min(p.shape) > 32:  # all but the [32, H] position tables
            assert spec[max(range(2), key=lambda i: p.shape[i])] == "fsdp" and spec.count("fsdp") == 1, name
        else:
            assert set(spec) == {None}, name  # norms, position tables and MoV tensors are replicated


def test_table_for_a_tied_head():
    """A T5 with tied embeddings (no lm_head) is covered by table_for(..., tie_word_embeddings=True) and not without."""
    config = dataclasses.replace(t5.T5Config.preset("tiny"), tie_word_embeddings=True)
    with torch.device("meta"):
        model = mov.add_mov(t5.T5(config), 2)
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert len(record(model, sharding.table_for("mov", tie_word_embeddings=True))) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"lm_head"):
        record(model, sharding.table_for("mov"))


def test_table_errors_name_the_misfit():
    """A parameter without pattern, or a pattern without parameter, raises naming it."""
    with torch.device("meta"):
        model = mov.add_mov(t5.T5(t5.T5Config.preset("tiny")), 2)
    with pytest.raises(ValueError, match=r"matching no pattern: \[.*mov_router"):
        record(model, sharding.BASE_TABLE)
    with pytest.raises(ValueError, match=r"matching no parameter: \[.*lora_A"):
        record(model, sharding.table_for("mov") + sharding.ADAPTER_TABLES["lora"])


def test_memory_model_counts_match_the_reference():
    """The memory table's T5-xl trainable counts equal those of the original's tensor shapes; frozen bytes split by
    fsdp (for-ai/parameter-efficient-moe `src/mov.py`, `src/ia3.py`, `src/molora.py`)."""
    parts = tpu_memory.memory_per_chip("xl", "mov", experts=10, data=1, fsdp=4, batch=4)
    assert parts["trainable_params"] == 7_956_480
    assert tpu_memory.memory_per_chip("xl", "ia3", data=4, fsdp=1, batch=4)["trainable_params"] == 540_672
    assert tpu_memory.memory_per_chip("xl", "molora", experts=15, data=4, fsdp=1, batch=4)["trainable_params"] \
        == 126_074_880
    # fp32 weights, a quarter per chip: 4 bytes * 2,849.76M / 4 (norms and position tables replicated: +0.03%)
    assert abs(parts["frozen"] - 2_849.76e6) / 2_849.76e6 < 1e-3



@pytest.mark.parametrize("method", sorted(METHODS))
def test_activation_model_matches_what_autograd_saves(method):
    """The memory table's activation bytes per row are within -25%/+10% of what eager autograd saves (bf16 autocast)."""
    config = t5.T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=384, num_layers=2, num_decoder_layers=2,
                         num_heads=4, dropout_rate=0.1)
    torch.manual_seed(0)
    model = METHODS[method](t5.T5(config)).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    saved = {}

    def pack(t):  # count each saved storage once; skip parameters and their bf16 / transposed copies
        if t.untyped_storage().data_ptr() not in weights and tuple(t.shape) not in shapes:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    li, lt = 256, 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(2, 512, (1, li)), torch.randint(2, 512, (1, lt)))
        F.cross_entropy(logits.float().flatten(0, 1), torch.randint(2, 512, (lt,)))
    experts = 4 if method in ("mov", "molora") else 1
    model_bytes = tpu_memory.activation_bytes_per_row(config, method, experts, 4, li, lt)
    assert 0.75 < model_bytes / sum(saved.values()) < 1.1, (model_bytes, sum(saved.values()))


@pytest.mark.parametrize("method", ["mov", "full"])
def test_remat_keeps_every_gradient(method):
    """With apply_remat (re-entrant checkpoint per block) the loss and every trainable gradient equal the plain run."""
    import functools
    import torch.utils.checkpoint
    plain = tiny_model(method)
    remat = sharding.apply_remat(copy.deepcopy(plain), functools.partial(torch.utils.checkpoint.checkpoint,
                                                                         use_reentrant=True))
    batch = make_batch(0)
    losses = [loss_fn(m, batch) for m in (plain, remat)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == losses[1].item()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, remat)]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-5), name

# ----------------------------------------------------------------------------------------------- on XLA devices
@pytest.fixture(scope="session")
def xla():
    """SPMD on 4 virtual CPU devices (unless PJRT_DEVICE says otherwise), then a ('data', 'fsdp') = (n/2, 2) mesh."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("CPU_NUM_DEVICES", "4")
    # LLVM at -O0: a step's compile drops from ~27 s to ~5 s on 2 busy cores; the numbers are the same
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    pytest.importorskip("torch_xla", reason="torch-xla is not installed (it has Linux wheels only)")
    sharding.enable_spmd()  # before the first XLA tensor of this process
    import torch_xla
    import torch_xla.backends
    import torch_xla.debug.metrics as met
    torch_xla.backends.set_mat_mul_precision("highest")  # fp32 matmuls on TPU too (CPU is fp32 anyway)
    return {"device": torch_xla.device(), "mesh": sharding.make_mesh(2), "metrics": met}


def to_xla(model, xla, method):
    """The model on the XLA device with `method`'s sharding table applied; returns it and its {name: spec}."""
    model = model.to(xla["device"])
    return model, sharding.apply_sharding(model, xla["mesh"], sharding.mark_sharding, sharding.table_for(method))


def batch_to_xla(batch, xla):
    return sharding.shard_batch({k: v.to(xla["device"]) for k, v in batch.items()}, xla["mesh"])


@pytest.mark.xla
def test_mov_training_on_a_mesh_matches_eager_cpu(xla):
    """Three Adafactor steps of a MoV T5 sharded on a (data, fsdp) mesh give eager CPU's losses and adapters (1e-5)."""
    import torch_xla
    cpu_model = tiny_model("mov")
    model, specs = to_xla(copy.deepcopy(cpu_model), xla, "mov")
    spec = torch_xla._XLAC._get_xla_sharding_spec(model.shared.weight)
    assert specs["shared.weight"] == ("fsdp", None) and spec.startswith("{devices=["), spec  # really sharded
    cpu_opt = adafactor.Adafactor([p for p in cpu_model.parameters() if p.requires_grad], lr=1e-2)
    opt = adafactor.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = xla_train_step(model, opt)
    batches = [make_batch(seed) for seed in range(3)]
    losses = [step(batch_to_xla(b, xla)) for b in batches]
    expected = [eager_step(cpu_model, cpu_opt, b) for b in batches]
    assert torch.allclose(torch.stack(losses).cpu(), torch.tensor(expected), rtol=0, atol=1e-5), (losses, expected)
    got, want, start = trainable(model), trainable(cpu_model), trainable(tiny_model("mov"))
    for name in want:
        assert not torch.equal(want[name], start[name]), f"{name} did not train"
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-5), name


def assert_one_step_matches_cpu(model, cpu_model, xla):
    """One Adafactor step of the XLA `model` and of its eager CPU twin give the same loss and trainable tensors."""
    cpu_opt = adafactor.Adafactor([p for p in cpu_model.parameters() if p.requires_grad], lr=1e-2)
    opt = adafactor.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = xla_train_step(model, opt)(batch_to_xla(make_batch(0), xla))
    assert abs(loss.item() - eager_step(cpu_model, cpu_opt, make_batch(0))) < 1e-5
    got, want = trainable(model), trainable(cpu_model)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-5), name


@pytest.mark.xla
@pytest.mark.parametrize("method", ["molora", "lora", "full"])
def test_sharded_adapters_train_like_eager_cpu(xla, method):
    """One Adafactor step with fsdp-sharded LoRA/MoLORA tensors (or a fully trainable sharded backbone) equals CPU."""
    cpu_model = tiny_model(method)
    model, _ = to_xla(copy.deepcopy(cpu_model), xla, method)
    assert_one_step_matches_cpu(model, cpu_model, xla)


@pytest.mark.xla
def test_training_step_compiles_once(xla):
    """Over ten steps only the first two compile (the second has Adafactor's state as inputs); none reads the host."""
    import torch_xla.core.xla_model as xm
    met = xla["metrics"]
    model, _ = to_xla(tiny_model("mov"), xla, "mov")
    opt = adafactor.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = xla_train_step(model, opt)
    logged = []
    compiles, reads = [], []
    for i in range(10):
        loss = step(batch_to_xla(make_batch(i), xla))
        # logging as train.py should: a closure run after the step's graph is launched (no sync inside the step)
        xm.add_step_closure(lambda value, i=i: logged.append((i, value.cpu().item())), args=(loss,))
        compiles.append(met.counter_value("UncachedCompile") or 0)
        reads.append(met.counter_value("aten::_local_scalar_dense") or 0)
    import torch_xla
    torch_xla.sync()  # runs the last closure
    assert compiles[-1] == compiles[1], f"recompiled after step 2: UncachedCompile per step {compiles}"
    assert reads[-1] == reads[0], f"a step read a device value on the host (.item()): {reads}"
    cpu_model = tiny_model("mov")
    cpu_opt = adafactor.Adafactor([p for p in cpu_model.parameters() if p.requires_grad], lr=1e-2)
    expected = [eager_step(cpu_model, cpu_opt, make_batch(i)) for i in range(10)]
    assert [i for i, _ in logged] == list(range(10))
    assert max(abs(v - e) for (_, v), e in zip(logged, expected)) < 1e-5, (logged, expected)


@pytest.mark.xla
def test_score_choices_on_xla_equals_cpu(xla):
    """evaluate.score_choices of a MoV T5 sharded on the mesh equals the same call on CPU (two equal-shape batches)."""
    import evaluate
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(2, 512, (n,), generator=g).tolist()  # noqa: E731
    inputs = [rand(n) for n in (5, 9, 3, 7, 6)]
    choices = [[rand(k) + [1] for k in ks] for ks in ((2, 3), (1, 4, 2), (3,), (2, 2), (4, 1, 1))]
    cpu_model = tiny_model("mov")
    model, _ = to_xla(copy.deepcopy(cpu_model), xla, "mov")
    want = evaluate.score_choices(cpu_model, inputs, choices, batch_size=4, device="cpu")
    got = evaluate.score_choices(model, inputs, choices, batch_size=4, device=xla["device"])
    assert len(got) == len(want) == 5
    for g_, w in zip(got, want):
        assert len(g_) == len(w) and max(abs(a - b) for a, b in zip(g_, w)) < 1e-4, (g_, w)


@pytest.mark.xla
def test_remat_on_xla_trains_like_eager_cpu(xla):
    """A MoV step with torch-xla's block rematerialisation on the mesh equals the plain eager CPU step."""
    cpu_model = tiny_model("mov")
    model, _ = to_xla(sharding.apply_remat(copy.deepcopy(cpu_model)), xla, "mov")
    assert_one_step_matches_cpu(model, cpu_model, xla)


@pytest.mark.xla
def test_train_script_on_a_mesh_logs_the_cpu_losses(xla, tmp_path):
    """`train.py --device xla --fsdp 2` (demo data, MoV, fp32, no dropout) logs the CPU run's losses, resumed too."""
    import json

    from runner import rundir
    import train

    def run(device, out, steps=3):
        cfg, _ = train.parse_args(["--preset", "demo", "--out", str(out), "--steps", str(steps), "--batch-size", "8",
                                   "--input-length", "32", "--target-length", "8", "--log-every", "1",
                                   "--experts", "4", "--dropout", "0", "--dtype", "float32", "--no-evaluate",
                                   "--device", device, "--fsdp", "2"])
        train.main(cfg)
        with open(os.path.join(out, "log.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f)]
    cpu, tpu_like = run("cpu", tmp_path / "cpu"), run("xla", tmp_path / "xla")
    assert len(cpu) == 3
    assert tpu_like == pytest.approx(cpu, rel=1e-5, abs=1e-6)
    assert len(rundir.checkpoints(str(tmp_path / "xla"))) == 1  # gathered to the host and written
    # resumed on XLA from a step-2 checkpoint, step 3 logs the uninterrupted loss
    run("xla", tmp_path / "resumed", steps=2)
    assert run("xla", tmp_path / "resumed") == pytest.approx(cpu, rel=1e-5, abs=1e-6)
