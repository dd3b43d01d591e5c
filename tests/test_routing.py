"""routing.py: the original's router options around the paper's routers (jitter, bias, renormalisation), the
load-balancing loss against a NumPy transcription of the original's, routing statistics and the training monitor
against brute force, and reading routing through hooks (`record`)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import molora
import mov
import routing
from conftest import tiny_t5

E = 3


def add(method):
    return mov.add_mov if method == "mov" else molora.add_molora


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
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_balance_loss_equals_numpy_transcription_of_the_original(top_k):
    """balance_loss on a fixed routing equals the original's _load_balancing_loss with the top-k (top-1 for soft
    routing) expert mask; attention sites [b, L, H, E] count each head's distribution as one token of the row."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np_load_balancing_loss(probs, np_top_k_mask(probs, top_k or 1))
    got = routing.balance_loss(torch.tensor(probs, dtype=torch.float32), top_k)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    heads = probs.reshape(3, 5, 1, 4).repeat(2, axis=2) ** np.array([1.0, 2.0])[:, None]  # two different heads
    heads = heads / heads.sum(-1, keepdims=True)
    flat = heads.reshape(3, 10, 4)
    expected = np_load_balancing_loss(flat, np_top_k_mask(flat, top_k or 1))
    assert routing.balance_loss(torch.tensor(heads, dtype=torch.float32), top_k).item() == pytest.approx(expected,
                                                                                                        rel=1e-5)


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_monitor_balance_loss_is_the_mean_over_sites(method):
    """The monitor's load-balancing loss equals the mean over every routed layer of the NumPy transcription applied
    to the probabilities that layer's router gave (read through routing.record), and it carries a gradient to the
    routers."""
    model = randomise_routers(add(method)(tiny_t5(), E))
    monitor = routing.Monitor(model, aux_loss=True)
    with routing.record(model, routing.routed_layers(model)) as seen:
        model(**padded_batch())
    expected = np.mean([np_load_balancing_loss(p, np_top_k_mask(p, 1)) for p in
                        (q.double().numpy().reshape(q.shape[0], -1, E) for q in seen.values())])
    loss = monitor.balance_loss()
    assert len(seen) == len(monitor.sites) > 0 and loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    router = "mov_router" if method == "mov" else "lora_router"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.endswith(router))


# ----------------------------------------------------------------------------------------------- jitter and bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda router: mov.MoVActivation(nn.Identity(), dim=6, num_experts=4, router=router(mov)),
    lambda router: molora.MoLoRALinear(nn.Linear(6, 5), num_experts=4, router=router(molora)),
])
def test_jitter_is_multiplicative_uniform_noise_in_training_only(make, dtype):
    """With jitter=eps the router reads x * u, u ~ U[1-eps, 1+eps] per element drawn in float32 (as the original
    converts the input before drawing), in train mode only: in eval mode the output equals the jitter-free layer's,
    in train mode the routing is softmax((x * u) @ W_r) in float32, for a float32 and a bf16 activation."""
    plain, jittered = make(lambda f: f.Router()), make(lambda f: routing.Router(f.Router(), jitter=0.3))
    router = "mov_router" if hasattr(plain, "mov_router") else "lora_router"
    with torch.no_grad():
        for p in plain.parameters():  # experts / B away from their identity init, so that routing matters
            p.normal_(0.0, 1.0)
    jittered.load_state_dict(plain.state_dict())
    plain, jittered = plain.to(dtype), jittered.to(dtype)
    x = torch.randn(2, 7, 6).to(dtype)
    jittered.eval()
    assert torch.equal(jittered(x), plain.eval()(x))
    jittered.train()
    torch.manual_seed(5)
    u = torch.empty(2, 7, 6).uniform_(0.7, 1.3)  # float32
    torch.manual_seed(5)
    with routing.record(jittered, [""]) as seen:
        out = jittered(x)
    expected = torch.softmax((x.float() * u) @ getattr(plain, router).detach().float(), -1)
    torch.testing.assert_close(seen[""], expected)
    assert not torch.allclose(out, plain(x))


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_router_bias_starts_at_zero_and_trains(method):
    """bias=True adds a zero-initialised [E] bias per router, recognised as an adapter parameter (trainable, listed
    by its layer); at init the logits equal the bias-free model's, and one optimizer step moves the bias."""
    base = tiny_t5()
    layer_file = mov if method == "mov" else molora
    torch.manual_seed(1)
    plain = add(method)(copy.deepcopy(base), E)
    torch.manual_seed(1)
    biased = add(method)(copy.deepcopy(base), E, router=lambda: routing.Router(layer_file.Router(), bias=True))
    name = "mov_router_bias" if method == "mov" else "lora_router_bias"
    biases = {n: p for n, p in biased.named_parameters() if n.endswith(name)}
    assert len(biases) == sum(1 for n, _ in plain.named_parameters() if n.endswith(name.rsplit("_", 1)[0]))
    for n, p in biases.items():
        layer = biased.get_submodule(n.rsplit(".", 1)[0])
        assert p.shape == (E,) and not p.any() and p.requires_grad and name in layer.adapter_param_names
        assert layer_file.is_adapter_param(n)
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
    layer = molora.MoLoRALinear(nn.Linear(8, 5, bias=False), rank=2, alpha=6, num_experts=4,
                                 router=molora.Router(top_k=k))
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
    """routing.Router with every option off around the paper's router, with the training monitor attached
    (statistics and the load-balancing loss recorded), gives bitwise the logits of the paper's router alone, in
    train mode too (same dropout draws)."""
    base = tiny_t5()
    layer_file = mov if method == "mov" else molora
    torch.manual_seed(3)
    plain = randomise_routers(add(method)(copy.deepcopy(base), E))
    torch.manual_seed(3)
    watched = randomise_routers(add(method)(copy.deepcopy(base), E, router=lambda: routing.Router(layer_file.Router())))
    assert all(isinstance(m.router, routing.Router) for m in routing.routed_layers(watched).values())
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
    """router_entropy and expert_load_max from each routed layer's probabilities (routing.record), by loops: encoder
    layers and cross-attention keys/values over the real input tokens, the rest over the real target tokens; each
    head's distribution counts as one."""
    enc, dec = batch["encoder_segment_ids"] > 0, batch["decoder_segment_ids"] > 0
    entropies, loads = [], []
    with torch.no_grad(), routing.record(model, routing.routed_layers(model)) as seen:
        model(**batch)
    for name, probs in seen.items():
        parts = name.split(".")
        encoder = parts[0] == "encoder" or ("EncDecAttention" in parts and parts[-1] in ("k", "v"))
        mask, p = (enc if encoder else dec), probs.double().numpy()
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
    randomise_routers(add(method)(model, E), std=3.0)
    monitor = routing.Monitor(model)
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
        layer_file = mov if method == "mov" else molora
        model = add(method)(tiny_t5(), E, router=lambda: routing.Router(layer_file.Router(), bias=True))
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    specs = sharding.plan(shapes, sharding.table_for(method, router_bias=True))
    biases = [n for n in specs if n.endswith("_router_bias")]
    assert biases and all(specs[n] == (None,) for n in biases) and len(specs) == len(shapes)
    with pytest.raises(ValueError, match="matching no pattern"):
        sharding.plan(shapes, sharding.table_for(method))


def test_jitter_rows_of_three_processes_equal_one_process_noise():
    """jitter_noise with rows = (rank, 3), each from the same RNG state on its third of the batch, gives that third
    of one process's noise for the whole batch (torchrun data parallelism, distributed.share_noise)."""
    x = torch.randn(6, 4, 5)
    torch.manual_seed(11)
    whole = routing.jitter_noise(x, 0.3)
    parts = []
    for rank in range(3):
        torch.manual_seed(11)
        parts.append(routing.jitter_noise(x[2 * rank:2 * rank + 2], 0.3, rows=(rank, 3)))
    assert whole.min() >= 0.7 and whole.max() <= 1.3 and whole.std() > 0.1
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
