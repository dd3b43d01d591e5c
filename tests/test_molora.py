"""MoLORA and LoRA (molora.py): identity at init, training touches only adapters, brute-force loop, peft's LoRA."""
import copy
import math

import pytest
import torch
import transformers
from torch import nn

import molora
import routing
from conftest import VOCAB, hf_t5, tiny_t5
from conftest import logits as hf_logits

MODELS = {"hf": hf_t5, "ours": tiny_t5}


class Toy(nn.Module):
    """A non-T5 MLP with biased Linears named fc1 / fc2."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)

    def forward(self, ids):
        x = self.embed(ids)
        return x + self.fc2(self.act(self.fc1(x)))


def toy_logits(model):
    return model(torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1)))


METHODS = {
    "lora": lambda m, **kw: molora.add_lora(m, **kw),
    "molora": lambda m, **kw: molora.add_molora(m, 3, **kw),
}


def randomise(model):
    """Give every adapter random values (B != 0), so the adapters actually act."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if molora.is_adapter_param(n):
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_init_leaves_logits_unchanged(method, kind):
    """At initialisation (B = 0) LoRA and MoLORA leave T5's logits (HF's, ours) and a toy model's outputs unchanged."""
    model, toy = MODELS[kind](), Toy()
    for p in (*model.parameters(), *toy.parameters()):  # same autograd state as after add_*: CPU SDPA picks its
        p.requires_grad_(False)  # kernel by it, and B = 0 then gives bit-identical logits
    ref, toy_ref = hf_logits(model), toy_logits(toy)
    torch.testing.assert_close(hf_logits(METHODS[method](model)), ref, rtol=0, atol=0)
    torch.testing.assert_close(toy_logits(METHODS[method](toy, targets=("fc1", "fc2"))), toy_ref, rtol=0, atol=0)


def test_sites_names_and_shapes():
    """add_molora wraps q, k, v, o, wi_0 and wo (not wi_1), keeps base names and weights, and freezes the rest."""
    model = hf_t5()
    base = dict(model.named_parameters())
    molora.add_molora(model, 5, rank=2)
    params = dict(model.named_parameters())
    assert all(params[n] is p for n, p in base.items())
    new = sorted(set(params) - set(base))
    # 6 attentions x (q, k, v, o) + 4 FFNs x (wi_0, wo) = 32 Linears, three parameters each
    assert len(new) == 96 and all(molora.is_adapter_param(n) for n in new)
    assert not any(".wi_1." in n for n in new)
    assert params["decoder.block.1.layer.1.EncDecAttention.o.lora_A"].shape == (5, 32, 2)  # [E, d_in, r]
    assert params["encoder.block.0.layer.1.DenseReluDense.wi_0.lora_B"].shape == (5, 2, 48)  # [E, r, d_out]
    assert params["encoder.block.0.layer.1.DenseReluDense.wo.lora_router"].shape == (48, 5)  # [d_in, E]
    assert {n for n, p in params.items() if p.requires_grad} == set(new)
    lora = dict(molora.add_lora(hf_t5(), rank=2).named_parameters())
    assert lora["encoder.block.0.layer.1.DenseReluDense.wi_0.lora_A"].shape == (32, 2)  # the original's [d_in, r]
    assert not any(n.endswith("lora_router") for n in lora)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_change_after_training(method, kind):
    """After a few Adam steps only A, B and routers have changed; frozen parameters have no .grad."""
    model = METHODS[method](MODELS[kind]()).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        hf_logits(model).logsumexp(-1).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == molora.is_adapter_param(n), n
        if not molora.is_adapter_param(n):
            assert p.grad is None, n


def loop_molora(x, weight, bias, A, B, router, scale):
    """Brute force in float64: per token, y = W x + b + scale * sum_e p_e * (B_e^T (A_e^T x)), p = softmax(x R)."""
    x, weight = x.double(), weight.double()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).tolist():
        vec = x[tuple(idx)]
        y = weight @ vec + (bias.double() if bias is not None else 0)
        if router is None:
            y = y + scale * (B.double().T @ (A.double().T @ vec))
        else:
            logits = [float(vec @ router[:, e].double()) for e in range(router.shape[1])]
            z = sum(math.exp(l) for l in logits)
            for e, l in enumerate(logits):
                y = y + scale * (math.exp(l) / z) * (B[e].double().T @ (A[e].double().T @ vec))
        out[tuple(idx)] = y
    return out


@pytest.mark.parametrize("num_experts,bias", [(None, False), (1, True), (4, False), (4, True)])
def test_layer_matches_loop(num_experts, bias):
    """MoLORA (and LoRA) equal a per-token, per-expert loop with random A, B and router; scale alpha / r."""
    linear = nn.Linear(10, 6, bias=bias)
    layer = randomise(molora.MoLoRALinear(linear, rank=3, alpha=12, num_experts=num_experts))
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        ref = loop_molora(x, linear.weight, linear.bias, layer.lora_A, layer.lora_B,
                          getattr(layer, "lora_router", None), 12 / 3)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MODELS)
def test_one_expert_molora_equals_lora(kind):
    """MoLORA with one expert (router softmax = 1) equals LoRA with the same A and B, on a whole T5 (HF's, ours)."""
    base = MODELS[kind]()
    one, lora = molora.add_molora(copy.deepcopy(base), 1), randomise(molora.add_lora(copy.deepcopy(base)))
    p_one = dict(one.named_parameters())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if molora.is_adapter_param(n):
                p_one[n].copy_(p.unsqueeze(0))
    torch.testing.assert_close(hf_logits(one), hf_logits(lora), rtol=1e-5, atol=1e-5)


def test_lora_matches_peft():
    """LoRA with random A and B equals peft's LoRA (r 4, alpha 16) on the same HF T5 modules."""
    import peft
    base = hf_t5()
    ours = randomise(molora.add_lora(copy.deepcopy(base)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=list(molora.TARGETS)))
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if molora.is_adapter_param(n):
                site, kind = n.rsplit(".", 1)  # peft stores nn.Linear weights: A [r, d_in], B [d_out, r]
                peft_params[f"base_model.model.{site}.{kind}.default.weight"].copy_(p.T)
    torch.testing.assert_close(hf_logits(ours.double()), hf_logits(theirs.double()), rtol=1e-10, atol=1e-10)


def test_routing_is_fp32_softmax_of_input_and_weights_experts_in_fp32():
    """Under bf16 autocast the router gives softmax(x @ W_r) of the layer's input in float32, and those
    probabilities weight each expert's A x in float32 (the original's fp32 probabilities promote the expert sum)."""
    layer = randomise(molora.MoLoRALinear(nn.Linear(8, 4, bias=False), num_experts=3))
    x = torch.randn(2, 3, 8)
    weighted = []  # dtypes of the product p_e * (A_e x): the only multiply by a [b, L, E, 1] operand

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.mul, torch.Tensor.__mul__) and any(
                    isinstance(a, torch.Tensor) and a.shape == (2, 3, 3, 1) for a in args):
                weighted.append(tuple(a.dtype for a in args))
            return func(*args, **(kwargs or {}))
    with torch.autocast("cpu", dtype=torch.bfloat16), routing.record(layer, [""]) as seen, Spy():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and seen[""].dtype == torch.float32
    torch.testing.assert_close(seen[""], torch.softmax(x @ layer.lora_router.detach(), -1))
    assert weighted == [(torch.float32, torch.float32)]


@pytest.mark.parametrize("kind", MODELS)
def test_bf16_autocast_and_bf16_weights(kind):
    """Under bf16 autocast and with bf16 base weights (fp32 adapters) MoLORA runs and stays near float32's output."""
    model = molora.add_molora(MODELS[kind](), 3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "lora_router")):
                p.normal_(0.0, 0.1)
    ref = hf_logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = hf_logits(model)
    for n, p in model.named_parameters():
        if not molora.is_adapter_param(n):
            p.data = p.data.to(torch.bfloat16)
    half = hf_logits(model)
    assert half.dtype == (torch.float32 if kind == "ours" else torch.bfloat16)  # t5.py's logits layer: fp32 (T5X)
    for out in (auto, half):  # bf16 keeps ~3 significant digits; through 4 blocks allow 5% of the logit range
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_works_on_meta_device():
    """add_molora builds on meta-device modules and creates its parameters there."""
    with torch.device("meta"):
        model = hf_t5()
    molora.add_molora(model, 3)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("call,match", [
    (lambda m: molora.add_molora(m, 0), "num_experts"),
    (lambda m: molora.add_molora(m, -1), "-1"),
    (lambda m: molora.add_lora(m, rank=0), "rank"),
    (lambda m: molora.add_molora(m, 2, rank=-3), "-3"),
    (lambda m: molora.add_lora(m, targets=("q", "query")), "query"),
    (lambda m: molora.add_lora(m, targets=("layer_norm",)), "expected nn.Linear"),
    (lambda m: molora.add_molora(molora.add_lora(m), 2), "once"),
])
def test_bad_arguments_raise(call, match):
    """Bad expert counts, ranks, targets that match nothing, non-Linear targets and a second application raise."""
    with pytest.raises(ValueError, match=match):
        call(hf_t5())
