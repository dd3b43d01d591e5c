"""The original's router options (jitter, bias, load-balancing loss, MoLORA top-k), the routing health of train.py's
log, the method recipes, and evaluation items without a correct choice (mov.py, molora.py, routing.py, train.py,
data.py, evaluate.py)."""
import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import data
import evaluate
import molora
import mov
import routing
import t5
import train
from test_data import write_config

E = 3


def tiny_t5():
    return t5.T5(t5.T5Config.preset("tiny")).eval()


def randomise_routers(model, std=1.0):
    """Routers far from uniform (and MoLORA's B non-zero), so that routing and the adapters matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("mov_router", "lora_router", "lora_B")):
                p.normal_(0.0, std)
    return model


def padded_batch(seed=0):
    """Two rows with trailing padding (segment id 0) on both sides, as the packed training batch has."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(2, 100, (2, 9), generator=g), torch.randint(2, 100, (2, 6), generator=g)
    enc = torch.tensor([[1] * 9, [1] * 4 + [2] * 2 + [0] * 3])
    dec = torch.tensor([[1] * 4 + [0] * 2, [1] * 3 + [2] * 3])
    return dict(input_ids=x * (enc > 0), decoder_input_ids=y * (dec > 0), encoder_segment_ids=enc,
                decoder_segment_ids=dec)


def np_load_balancing_loss(router_probs, expert_mask):
    """NumPy transcription of the original's src/routing.py `_load_balancing_loss(router_probs, expert_mask)`."""
    num_experts = router_probs.shape[-1]
    router_prob_per_expert = np.mean(router_probs, axis=-2)
    tokens_per_expert = np.mean(expert_mask, axis=-2)
    return np.mean(tokens_per_expert * router_prob_per_expert) * num_experts ** 2


def np_top_k_mask(probs, k):
    """The original's `_top_k_mask`: one-hot of the k largest, summed over k."""
    idx = np.argsort(-probs, axis=-1)[..., :k]
    return (np.arange(probs.shape[-1]) == idx[..., None]).sum(-2).astype(np.float64)


# ----------------------------------------------------------------------------------------------- load balancing
@pytest.mark.parametrize("module", [mov, molora])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_balance_loss_equals_numpy_transcription_of_the_original(module, top_k):
    """balance_loss on a fixed routing equals the original's _load_balancing_loss with the top-k (top-1 for soft
    routing) expert mask; attention sites [b, L, H, E] count each head's distribution as one token of the row."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np_load_balancing_loss(probs, np_top_k_mask(probs, top_k or 1))
    got = module.balance_loss(torch.tensor(probs, dtype=torch.float32), top_k)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    heads = probs.reshape(3, 5, 1, 4).repeat(2, axis=2) ** np.array([1.0, 2.0])[:, None]  # two different heads
    heads = heads / heads.sum(-1, keepdims=True)
    flat = heads.reshape(3, 10, 4)
    expected = np_load_balancing_loss(flat, np_top_k_mask(flat, top_k or 1))
    assert module.balance_loss(torch.tensor(heads, dtype=torch.float32), top_k).item() == pytest.approx(expected,
                                                                                                        rel=1e-5)


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_model_load_balance_loss_is_the_mean_over_sites(method):
    """load_balance_loss(model) equals the mean over every routed layer of the NumPy transcription applied to the
    probabilities that layer recorded (record_routing), and it carries a gradient to the routers."""
    model = tiny_t5()
    add = mov.add_mov if method == "mov" else molora.add_molora
    randomise_routers(add(model, E))
    layers = [m for m in model.modules() if getattr(m, "num_experts", None) is not None]
    for m in layers:
        m.aux_loss = m.record_routing = True
    model(**padded_batch())
    expected = np.mean([np_load_balancing_loss(p, np_top_k_mask(p, 1)) for p in
                        (m.last_routing.double().numpy().reshape(m.last_routing.shape[0], -1, E) for m in layers)])
    loss = (mov if method == "mov" else molora).load_balance_loss(model)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    router = "mov_router" if method == "mov" else "lora_router"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.endswith(router))


# ----------------------------------------------------------------------------------------------- jitter and bias
@pytest.mark.parametrize("make", [
    lambda **kw: mov.MoVActivation(nn.Identity(), dim=6, num_experts=4, **kw),
    lambda **kw: molora.MoLoRALinear(nn.Linear(6, 5), num_experts=4, **kw),
])
def test_jitter_is_multiplicative_uniform_noise_in_training_only(make):
    """With router_jitter=eps the router reads x * u, u ~ U[1-eps, 1+eps] per element, in train mode only: in eval
    mode the output equals the jitter-free layer's, in train mode the routing is softmax((x * u) @ W_r)."""
    plain, jittered = make(), make(router_jitter=0.3)
    router = "mov_router" if hasattr(plain, "mov_router") else "lora_router"
    with torch.no_grad():
        for p in plain.parameters():  # experts / B away from their identity init, so that routing matters
            p.normal_(0.0, 1.0)
    jittered.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 6)
    jittered.record_routing = True
    jittered.eval()
    assert torch.equal(jittered(x), plain.eval()(x))
    jittered.train()
    torch.manual_seed(5)
    u = torch.empty_like(x).uniform_(0.7, 1.3)
    torch.manual_seed(5)
    out = jittered(x)
    expected = torch.softmax((x * u) @ getattr(plain, router).detach(), -1)
    torch.testing.assert_close(jittered.last_routing, expected)
    assert not torch.allclose(out, plain(x))


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_router_bias_starts_at_zero_and_trains(method):
    """router_bias adds a zero-initialised [E] bias per router, recognised as an adapter parameter (trainable,
    listed by its layer); at init the logits equal the bias-free model's, and one optimizer step moves the bias."""
    base = tiny_t5()
    add = mov.add_mov if method == "mov" else molora.add_molora
    torch.manual_seed(1)
    plain = add(copy.deepcopy(base), E)
    torch.manual_seed(1)
    biased = add(copy.deepcopy(base), E, router_bias=True)
    name = "mov_router_bias" if method == "mov" else "lora_router_bias"
    biases = {n: p for n, p in biased.named_parameters() if n.endswith(name)}
    assert len(biases) == sum(1 for n, _ in plain.named_parameters() if n.endswith(name.rsplit("_", 1)[0]))
    for n, p in biases.items():
        layer = biased.get_submodule(n.rsplit(".", 1)[0])
        assert p.shape == (E,) and not p.any() and p.requires_grad and name in layer.adapter_param_names
        assert (mov if method == "mov" else molora).is_adapter_param(n)
    batch = padded_batch()
    randomise_routers(plain)  # B != 0 for MoLORA, so that the router matters
    with torch.no_grad():
        for (n, p), q in zip(plain.named_parameters(), (q for n, q in biased.named_parameters() if name not in n)):
            q.copy_(p)
    torch.testing.assert_close(biased(**batch), plain(**batch), rtol=0, atol=0)
    opt = torch.optim.SGD([p for p in biased.parameters() if p.requires_grad], lr=0.1)
    biased(**batch).logsumexp(-1).mean().backward()
    opt.step()
    assert all(p.abs().sum() > 0 for p in biases.values())


# ----------------------------------------------------------------------------------------------- MoLORA top-k
def loop_molora_top_k(x, weight, A, B, router, scale, k):
    """Brute force in float64: per token, p = softmax(x R), all but the k largest zeroed (no renormalisation),
    y = W x + scale * sum_e p_e B_e^T (A_e^T x)."""
    x = x.double()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).tolist():
        vec = x[tuple(idx)]
        logits = [float(vec @ router[:, e].double()) for e in range(router.shape[1])]
        p = [math.exp(l) / sum(math.exp(m) for m in logits) for l in logits]
        kept = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        y = weight.double() @ vec
        for e in kept:
            y = y + scale * p[e] * (B[e].double().T @ (A[e].double().T @ vec))
        out[tuple(idx)] = y
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_molora_top_k_matches_loop(k):
    """MoLORA with top_k equals a per-token loop that keeps the k most probable experts without renormalising."""
    layer = molora.MoLoRALinear(nn.Linear(8, 5, bias=False), rank=2, alpha=6, num_experts=4, top_k=k)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_router):
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = loop_molora_top_k(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_router, 6 / 2, k)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- options off
@pytest.mark.parametrize("method", ["mov", "molora"])
def test_options_off_and_observation_leave_the_logits_bit_identical(method):
    """All options off (the defaults), with the training monitor attached (statistics and the load-balancing loss
    recorded), the logits are bitwise those of the model without it, in train mode too (same dropout draws)."""
    add = mov.add_mov if method == "mov" else molora.add_molora
    base = tiny_t5()
    torch.manual_seed(3)
    plain = randomise_routers(add(copy.deepcopy(base), E))
    torch.manual_seed(3)
    watched = randomise_routers(add(copy.deepcopy(base), E, top_k=None, router_jitter=0.0, router_bias=False))
    with torch.no_grad():
        for p, q in zip(plain.parameters(), watched.parameters()):
            q.copy_(p)
    monitor = routing.Monitor(watched, aux_loss=True)
    batch = padded_batch()
    for mode in ("eval", "train"):
        getattr(plain, mode)(), getattr(watched, mode)()
        torch.manual_seed(7)
        ref = plain(**batch)
        torch.manual_seed(7)
        with monitor.masks(batch):
            got = watched(**batch)
        assert torch.equal(got, ref), mode


# ----------------------------------------------------------------------------------------------- routing health
def brute_force_health(model, batch):
    """router_entropy and expert_load_max from each routed layer's recorded probabilities (record_routing), by
    loops: encoder layers and cross-attention keys/values over the real input tokens, the rest over the real
    target tokens; each head's distribution counts as one."""
    enc, dec = batch["encoder_segment_ids"] > 0, batch["decoder_segment_ids"] > 0
    entropies, loads = [], []
    for name, m in model.named_modules():
        if getattr(m, "num_experts", None) is None:
            continue
        parts = name.split(".")
        encoder = parts[0] == "encoder" or ("EncDecAttention" in parts and parts[-1] in ("k", "v"))
        mask, p = (enc if encoder else dec), m.last_routing.double().numpy()
        ent, total, n = [], np.zeros(p.shape[-1]), 0
        for b in range(p.shape[0]):
            for t in range(p.shape[1]):
                if mask[b, t]:
                    for dist in (p[b, t] if p.ndim == 4 else [p[b, t]]):
                        ent.append(-sum(q * math.log(q) for q in dist if q > 0))
                        total, n = total + dist, n + 1
        entropies.append(np.mean(ent))
        loads.append(max(total / n))
    return np.mean(entropies), max(loads), loads


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_router_health_equals_brute_force(method):
    """The monitor's router_entropy and expert_load_max (computed on device from per-layer sums, padding left out)
    equal loops over the recorded routing probabilities; so do the per-site loads."""
    model = tiny_t5()
    randomise_routers((mov.add_mov if method == "mov" else molora.add_molora)(model, E), std=3.0)
    monitor = routing.Monitor(model)
    for _, m in monitor.sites:
        m.record_routing = True
    batch = padded_batch()
    with torch.no_grad(), monitor.masks(batch):
        model(**batch)
    values = monitor.reduce([monitor.collect()]).tolist()
    entropy, load, per_site = brute_force_health(model, batch)
    assert values[0] == pytest.approx(entropy, rel=1e-5) and values[1] == pytest.approx(load, rel=1e-5)
    assert values[2:] == pytest.approx(per_site, rel=1e-5)
    assert len(per_site) == len(monitor.sites) > 0


def test_collapse_warning_once_per_site(capsys):
    """A site whose expert load passes 0.9 is named once on stderr with the step; later steps stay silent."""
    model = mov.add_mov(tiny_t5(), E)
    monitor = routing.Monitor(model)
    first, second = monitor.sites[0][0], monitor.sites[1][0]
    loads = [0.5] * len(monitor.sites)
    loads[0] = 0.95
    fields = monitor.fields(12, [1.0, 0.95] + loads)
    assert fields == {"router_entropy": 1.0, "expert_load_max": 0.95}
    loads[1] = 0.97
    monitor.fields(13, [1.0, 0.97] + loads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and first in err[0] and "step 12" in err[0] and second in err[1] and "step 13" in err[1]


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_sharding_table_covers_router_biases(method):
    """On XLA, table_for(method, router_bias=True) gives every parameter of a model with router biases one spec of
    its rank (the [E] biases replicated); the table without them reports the biases as unmatched."""
    import sharding
    with torch.device("meta"):
        model = (mov.add_mov if method == "mov" else molora.add_molora)(tiny_t5(), E, router_bias=True)
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    specs = sharding.plan(shapes, sharding.table_for(method, router_bias=True))
    biases = [n for n in specs if n.endswith("_router_bias")]
    assert biases and all(specs[n] == (None,) for n in biases) and len(specs) == len(shapes)
    with pytest.raises(ValueError, match="matching no pattern"):
        sharding.plan(shapes, sharding.table_for(method))


# ----------------------------------------------------------------------------------------------- train.py
def short_demo(out, *flags):
    cfg, _ = train.parse_args(["--preset", "demo", "--out", str(out), "--steps", "2", "--batch-size", "4",
                               "--input-length", "32", "--target-length", "8", "--log-every", "1", "--save-every",
                               "2", "--no-evaluate", "--device", "cpu", "--experts", "3", *flags])
    return cfg


@pytest.mark.parametrize("flags,balance", [(("--method", "mov"), False),
                                           (("--method", "molora", "--top-k", "2", "--router-bias",
                                             "--router-jitter", "0.01", "--load-balance-weight", "0.01"), True)])
def test_demo_run_logs_routing_health(tmp_path, flags, balance):
    """A short demo run of mov / molora writes router_entropy and expert_load_max on every log line (and
    load_balance_loss when --load-balance-weight > 0); the values lie in their ranges."""
    cfg = short_demo(tmp_path / "run", *flags)
    train.main(cfg)
    with open(os.path.join(cfg.out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert 0 < line["router_entropy"] <= math.log(E) + 1e-6 and 1 / E - 1e-6 <= line["expert_load_max"] <= 1
        assert ("load_balance_loss" in line) == balance
        if balance:
            assert line["load_balance_loss"] > 0


@pytest.mark.parametrize("method", ["mov", "molora", "ia3", "lora", "full"])
def test_print_config_shows_each_methods_recipe(method, capsys):
    """`train.py --method M --print-config` prints the recipe as JSON: the adapters' (batch 32, lr 3e-4, 500k steps,
    LoRA rank 4, 1024/256 tokens, dropout 0.1) and, for full, the T0 baseline of configs/t0.gin and
    scripts/t0_train.sh (batch 256, lr 1e-3, 10k steps)."""
    assert train.cli(["--method", method, "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    recipe = dict(batch_size=32, lr=3e-4, steps=500_000) if method != "full" else \
        dict(batch_size=256, lr=1e-3, steps=10_000)
    assert {k: cfg[k] for k in recipe} == recipe
    assert (cfg["rank"], cfg["input_length"], cfg["target_length"], cfg["dropout"]) == (4, 1024, 256, 0.1)
    assert (cfg["router_jitter"], cfg["router_bias"], cfg["load_balance_weight"], cfg["dropout_mask"]) == \
        (0.0, False, 0.0, "broadcast")


@pytest.mark.parametrize("argv,match", [
    (["--method", "lora", "--router-jitter", "0.1"], "--router-jitter applies to --method mov or molora"),
    (["--method", "ia3", "--load-balance-weight", "0.01"], "--load-balance-weight applies"),
    (["--method", "full", "--router-bias"], "--router-bias applies"),
    (["--method", "molora", "--top-k", "11"], "--top-k must be between 1 and --experts"),
    (["--router-jitter", "1.5"], "--router-jitter must be in"),
    (["--load-balance-weight", "-1"], "--load-balance-weight must be"),
])
def test_router_flags_are_validated(argv, match):
    """Router options outside mov/molora, a top-k above the experts, and out-of-range values are refused."""
    with pytest.raises(ValueError, match=match):
        train.parse_args(argv)


def test_molora_accepts_top_k_and_dropout_mask_reaches_the_model():
    """--top-k is accepted for molora and reaches every MoLORA layer; --dropout-mask reaches the T5 config."""
    cfg, _ = train.parse_args(["--method", "molora", "--top-k", "2", "--model", "tiny", "--dropout-mask",
                               "elementwise"])
    import build
    model = build.build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, molora.MoLoRALinear)]
    assert layers and all(m.top_k == 2 for m in layers)
    assert model.config.dropout_mask == "elementwise"


def test_loaded_checkpoint_gets_the_runs_dropout(tmp_path):
    """A checkpoint directory (HF layout) built with --dropout-mask elementwise --dropout 0.2 holds elementwise (HF's)
    dropout modules of rate 0.2 everywhere (no broadcast dimension), its config says so, and its weights are the
    files'."""
    import dataclasses
    import types
    from safetensors.torch import save_file
    import build
    source = tiny_t5()
    c = source.config
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    hf = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "dropout_mask"}
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "t5"}))
    settings = types.SimpleNamespace(method="full", experts=1, rank=4, alpha=16.0, top_k=None, router_input="token",
                                     model=str(tmp_path), dropout=0.2, seed=0, dropout_mask="elementwise")
    model = build.build_model(settings, torch.device("cpu"))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(getattr(m, "broadcast_dim", None) is None and m.p == 0.2 for m in drops)  # elementwise
    assert model.config.dropout_mask == "elementwise" and model.config.dropout_rate == 0.2
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- no correct choice
def test_item_without_correct_choice_counts_wrong(tmp_path):
    """An eval example with no choice marked is_correct loads with label None (no error), counts as wrong in the
    accuracy (a brute-force count over the scores), and the results / eval.md report how many there were."""
    rng = random.Random(0)
    rows = []
    for example in range(4):
        inputs = [rng.randrange(3, 100) for _ in range(5)]
        for choice in range(2):
            correct = example != 1 and choice == example % 2  # example 1: no correct choice
            rows.append({"idx": [example, choice], "inputs": inputs, "targets": [10 + choice, 1],
                         "is_correct": correct, "weight": 1.0})
    config = "super_glue_rte_does_this_imply_score_eval"
    write_config(str(tmp_path / "p3"), config, "validation", rows)
    with pytest.warns(UserWarning, match="left out"):
        sets = data.load_eval(str(tmp_path / "p3"), datasets=["rte"])
    items = sets["rte"][config]
    assert [it["label"] for it in items] == [0, None, 0, 1]
    model = tiny_t5()
    results = evaluate.evaluate(model, sets, input_length=16, target_length=8, device=torch.device("cpu"),
                                out_dir=str(tmp_path / "out"), progress=False)
    scores = evaluate.score_choices(model, [it["inputs"] for it in items], [it["choices"] for it in items],
                                    input_length=8, target_length=8)
    right = sum(it["label"] is not None and int(np.argmax(s)) == it["label"] for s, it in zip(scores, items))
    task = results["tasks"]["rte"][config]
    assert task["no_correct"] == 1 and task["accuracy"] == pytest.approx(100.0 * right / 4)
    assert "1 examples have no choice marked is_correct" in (tmp_path / "out" / "eval.md").read_text()


@pytest.mark.parametrize("module", [mov, molora])
def test_jitter_rows_of_three_processes_equal_one_process_noise(module):
    """jitter_noise with rows = (rank, 3), each from the same RNG state on its third of the batch, gives that third
    of one process's noise for the whole batch (torchrun data parallelism, distributed.share_noise)."""
    x = torch.randn(6, 4, 5)
    torch.manual_seed(11)
    whole = module.jitter_noise(x, 0.3)
    parts = []
    for rank in range(3):
        torch.manual_seed(11)
        parts.append(module.jitter_noise(x[2 * rank:2 * rank + 2], 0.3, rows=(rank, 3)))
    assert whole.min() >= 0.7 and whole.max() <= 1.3 and whole.std() > 0.1
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
