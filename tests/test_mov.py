"""MoV and (IA)3 (mov.py): identity at init, training touches only adapters, brute-force loops, peft's (IA)3."""
import copy
import math

import pytest
import torch
import transformers
from torch import nn

import mov
import routing
from conftest import VOCAB, hf_t5, tiny_t5
from conftest import logits as hf_logits

MODELS = {"hf": hf_t5, "ours": tiny_t5}


class Toy(nn.Module):
    """A non-T5 block: multi-head attention (query/key/value/out, with biases) and an MLP (up, act, down)."""

    def __init__(self, d=16, heads=2, ff=24):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential()
        self.mlp.up, self.mlp.act, self.mlp.down = nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d)

    def forward(self, ids):
        x = self.embed(ids)  # [b, L, d]
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.query, self.key, self.value))
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # [b, H, L, d/H]
        x = x + self.out(a.transpose(1, 2).flatten(-2))
        return x + self.mlp(x)


def toy_logits(model):
    return model(torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1)))


TOY = dict(attention_targets=("key", "value"), ffn_targets=("mlp.act",), num_heads=2, ffn_dim=24)

METHODS = {
    "ia3": lambda m, **kw: mov.add_ia3(m, **kw),
    "mov": lambda m, **kw: mov.add_mov(m, 3, **kw),
    "mov_top2_renorm": lambda m, **kw: mov.add_mov(m, 3, router=lambda: renormalized(2), **kw),
}


def renormalized(top_k):
    """routing.py's option around the paper's top-k router: the kept probabilities rescaled to sum 1."""
    return routing.Router(mov.Router(top_k=top_k), renormalize=True)


def sentence_router(dim):
    return routing.Router(mov.Router(), sentence_dim=dim)


def routed(layer, *inputs):
    """(output, routing probabilities) of one forward of a routed layer, read through a hook on its router."""
    with routing.record(layer, [""]) as seen:
        out = layer(*inputs)
    return out, seen[""]


def frozen(model):
    """The model with requires_grad off everywhere, the autograd state add_* leaves the base in (CPU SDPA picks
    its kernel by it, which moves HF T5's logits by ~1e-6)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_init_leaves_t5_logits_unchanged(method, kind):
    """At initialisation (vectors = ones) every MoV variant and (IA)3 leave T5's logits unchanged (HF's and ours)."""
    model = frozen(MODELS[kind]())
    ref = hf_logits(model)
    torch.testing.assert_close(hf_logits(METHODS[method](model)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_init_leaves_toy_model_unchanged(method):
    """At initialisation every MoV variant and (IA)3 leave a non-T5 model's outputs unchanged (custom targets)."""
    model = Toy()
    ref = toy_logits(model)
    torch.testing.assert_close(toy_logits(METHODS[method](model, **TOY)), ref, rtol=1e-5, atol=1e-5)


def test_init_sentence_routing_and_relu_ffn_unchanged():
    """Sentence-routed MoV on a ReLU-FFN T5 (act after `wi`) also starts as the identity."""
    model = frozen(hf_t5("relu"))
    ref = hf_logits(model)
    mov.add_mov(model, 4, router=lambda: sentence_router(6))
    with routing.sentence_routing(model, torch.randn(2, 6)):
        torch.testing.assert_close(hf_logits(model), ref, rtol=1e-5, atol=1e-5)


def test_sites_names_and_freezing():
    """add_mov wraps k, v and act of every attention/FFN, keeps base names and weight objects, freezes the rest."""
    model = hf_t5()
    base = dict(model.named_parameters())
    mov.add_mov(model, 5)
    params = dict(model.named_parameters())
    assert all(params[n] is p for n, p in base.items())  # same names, same Parameter objects
    new = sorted(set(params) - set(base))
    # 2 enc self + 2 dec self + 2 cross attentions x (k, v) + 4 FFNs = 16 sites, two parameters each
    assert len(new) == 32 and all(mov.is_adapter_param(n) for n in new)
    assert "decoder.block.1.layer.1.EncDecAttention.v.mov_experts" in new
    assert "encoder.block.0.layer.1.DenseReluDense.act.mov_router" in new
    assert params["encoder.block.0.layer.0.SelfAttention.k.mov_experts"].shape == (4, 5, 8)  # [H, E, d_kv]
    assert params["encoder.block.0.layer.0.SelfAttention.k.mov_router"].shape == (8, 5)  # [d_kv, E]
    assert params["decoder.block.0.layer.2.DenseReluDense.act.mov_experts"].shape == (5, 48)  # [E, d_ff]
    assert params["decoder.block.0.layer.2.DenseReluDense.act.mov_router"].shape == (48, 5)  # [d_ff, E]
    assert {n for n, p in params.items() if p.requires_grad} == set(new)


@pytest.mark.parametrize("kind", MODELS)
def test_only_adapters_change_after_training(kind):
    """After a few Adam steps only MoV vectors and routers have changed; frozen parameters have no .grad."""
    model = mov.add_mov(MODELS[kind](), 3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        hf_logits(model).logsumexp(-1).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == mov.is_adapter_param(n), n
        if not mov.is_adapter_param(n):
            assert p.grad is None, n


def loop_mov(h, router, experts, top_k=None, renormalize=False):
    """Brute force in float64: for each token (and head), p = softmax(h @ R), s = sum_e p_e v_e, h * s."""
    h, router, experts = h.detach().double(), router.double(), experts.double()
    out = torch.empty_like(h)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in h.shape[:-1]]).tolist():
        vec = h[tuple(idx)]
        logits = [float(vec @ router[:, e]) for e in range(router.shape[1])]
        z = sum(math.exp(l) for l in logits)
        p = [math.exp(l) / z for l in logits]
        if top_k is not None:
            kept = sorted(range(len(p)), key=lambda e: -p[e])[:top_k]
            p = [p[e] if e in kept else 0.0 for e in range(len(p))]
            if renormalize:
                p = [x / sum(p) for x in p]
        head = experts[idx[-1]] if experts.dim() == 3 else experts  # [E, d]
        out[tuple(idx)] = vec * sum(p[e] * head[e] for e in range(len(p)))
    return out


@pytest.mark.parametrize("top_k,renormalize", [(None, False), (2, False), (2, True), (1, False)])
def test_attention_site_matches_loop(top_k, renormalize):
    """A per-head MoV key projection equals a per-token, per-head, per-expert loop (random router and vectors)."""
    linear = nn.Linear(12, 3 * 4, bias=False)  # H = 3 heads of d_kv = 4
    router = renormalized(top_k) if renormalize else mov.Router(top_k=top_k)
    layer = mov.MoVLinear(linear, heads=3, num_experts=4, router=router)
    nn.init.normal_(layer.mov_experts, 1.0, 0.5)
    nn.init.normal_(layer.mov_router, 0.0, 1.0)
    x = torch.randn(2, 5, 12)
    h = (x @ linear.weight.T).unflatten(-1, (3, 4))  # [b, L, H, d_kv]
    ref = loop_mov(h, layer.mov_router.detach(), layer.mov_experts.detach(), top_k, renormalize).flatten(-2)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 2])
def test_ffn_site_matches_loop(top_k):
    """The FFN-activation MoV equals a per-token, per-expert loop over gelu(wi_0 x) (router reads the activation)."""
    act = nn.GELU(approximate="tanh")
    layer = mov.MoVActivation(act, dim=10, num_experts=3, router=mov.Router(top_k=top_k))
    nn.init.normal_(layer.mov_experts, 1.0, 0.5)
    nn.init.normal_(layer.mov_router, 0.0, 1.0)
    x = torch.randn(2, 4, 10)
    ref = loop_mov(act(x), layer.mov_router.detach(), layer.mov_experts.detach(), top_k)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_top_k_zeroes_all_but_k_without_renormalising():
    """Top-k keeps the k largest softmax probabilities unchanged and zeroes the rest; renormalize rescales to 1."""
    for renormalize in (False, True):
        router = renormalized(2) if renormalize else mov.Router(top_k=2)
        layer = mov.MoVActivation(nn.Identity(), dim=6, num_experts=5, router=router)
        nn.init.normal_(layer.mov_router, 0.0, 1.0)
        x = torch.randn(3, 4, 6)
        _, got = routed(layer, x)
        full = torch.softmax(x @ layer.mov_router.detach(), -1)
        top2 = full.sort(-1, descending=True).values[..., :2]
        assert ((got > 0).sum(-1) == 2).all()
        kept = got.sort(-1, descending=True).values[..., :2]
        torch.testing.assert_close(kept, top2 / top2.sum(-1, keepdim=True) if renormalize else top2)


def test_top_k_without_renormalising_shrinks_at_init():
    """As in the original, top-k without renormalisation is not the identity at init: h * (kept probability mass)."""
    layer = mov.MoVActivation(nn.Identity(), dim=6, num_experts=4, router=mov.Router(top_k=1))
    nn.init.normal_(layer.mov_router, 0.0, 1.0)
    x = torch.randn(3, 6)
    top1 = torch.softmax(x @ layer.mov_router.detach(), -1).max(-1).values  # [3]
    torch.testing.assert_close(layer(x), x * top1[:, None])


@pytest.mark.parametrize("kind", MODELS)
def test_one_expert_mov_equals_ia3(kind):
    """MoV with one expert equals (IA)3 holding the same (random) vectors, on a whole T5 (HF's and ours)."""
    base = MODELS[kind]()
    m1, m2 = mov.add_mov(copy.deepcopy(base), 1), mov.add_ia3(copy.deepcopy(base))
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    with torch.no_grad():
        for n, p in p2.items():
            if n.endswith("ia3_scale"):
                p.normal_(1.0, 0.3)
                p1[n.replace("ia3_scale", "mov_experts")].copy_(p.unsqueeze(-2))  # [.., 1, d]
    torch.testing.assert_close(hf_logits(m1), hf_logits(m2), rtol=1e-5, atol=1e-5)


def test_ia3_matches_peft():
    """(IA)3 with random vectors equals peft's IA3 on HF T5 (k, v outputs; wo input = gelu(wi_0 x) * wi_1 x)."""
    import peft
    base = hf_t5()
    ours = mov.add_ia3(copy.deepcopy(base))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["k", "v", "wo"], feedforward_modules=["wo"], init_ia3_weights=True))
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("ia3_scale"):
                p.normal_(1.0, 0.3)
                target = n.replace(".act.ia3_scale", ".wo") if ".act." in n else n.replace(".ia3_scale", "")
                peft_params[f"base_model.model.{target}.ia3_l.default"].copy_(p.reshape(
                    peft_params[f"base_model.model.{target}.ia3_l.default"].shape))
    torch.testing.assert_close(hf_logits(ours.double()), hf_logits(theirs.double()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_sentence_routing_is_per_example(kind):
    """Sentence routing gives every token (and head) of an example the softmax of its embedding, in every layer."""
    model = mov.add_mov(MODELS[kind](), 3, router=lambda: sentence_router(6))
    layers = routing.routed_layers(model)
    for m in layers.values():
        nn.init.normal_(m.mov_router, 0.0, 1.0)
    emb = torch.randn(2, 6)
    with routing.sentence_routing(model, emb), routing.record(model, layers) as seen:
        hf_logits(model)
    assert all(m.router.sentence_embedding is None for m in layers.values())  # cleared on exit
    for name, m in layers.items():
        expected = torch.softmax(emb @ m.mov_router.detach(), -1)  # [b, E]
        got = seen[name].flatten(1, -2)  # [b, tokens (x heads), E]
        torch.testing.assert_close(got, expected[:, None].expand_as(got))
        assert not torch.allclose(got[0], got[1])


def test_sentence_routing_errors():
    """A sentence-routed layer outside the context, a wrong embedding size or batch all raise clear errors."""
    model = mov.add_mov(hf_t5(), 3, router=lambda: sentence_router(6))
    with pytest.raises(RuntimeError, match="sentence_routing"):
        hf_logits(model)
    with pytest.raises(ValueError, match=r"\[batch, 6\]"):
        with routing.sentence_routing(model, torch.randn(2, 5)):
            pass
    with pytest.raises(ValueError, match="batch 3"):
        with routing.sentence_routing(model, torch.randn(3, 6)):
            hf_logits(model, batch=2)
    with pytest.raises(ValueError, match="no sentence-routed"):
        with routing.sentence_routing(mov.add_mov(hf_t5(), 3), torch.randn(2, 6)):
            pass


@pytest.mark.parametrize("kind", MODELS)
def test_bf16_autocast_and_bf16_weights(kind):
    """Under bf16 autocast and with bf16 base weights, routing stays float32 and outputs stay near float32's."""
    model = mov.add_mov(MODELS[kind](), 3, top_k=2)
    for m in routing.routed_layers(model).values():
        nn.init.normal_(m.mov_experts, 1.0, 0.2)
    probe = ["encoder.block.0.layer.1.DenseReluDense.act"]
    ref = hf_logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), routing.record(model, probe) as seen:
        auto = hf_logits(model)
    assert seen[probe[0]].dtype == torch.float32
    for n, p in model.named_parameters():
        if not mov.is_adapter_param(n):
            p.data = p.data.to(torch.bfloat16)
    with routing.record(model, probe) as seen:
        half = hf_logits(model)
    head_dtype = torch.float32 if kind == "ours" else torch.bfloat16  # t5.py's logits layer runs in fp32 (T5X)
    assert half.dtype == head_dtype and seen[probe[0]].dtype == torch.float32
    for out in (auto, half):  # bf16 keeps ~3 significant digits; through 4 blocks allow 5% of the logit range
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_works_on_meta_device():
    """add_mov builds on meta-device modules and creates its parameters there."""
    with torch.device("meta"):
        model = hf_t5()
    mov.add_mov(model, 3)
    assert all(p.is_meta for p in model.parameters())


def test_toy_model_targets_and_inference_errors():
    """On a non-T5 model, heads and FFN width must come from arguments; missing ones raise naming the fix."""
    with pytest.raises(ValueError, match="num_heads="):
        mov.add_mov(Toy(), 2, attention_targets=("key",), ffn_targets=())
    with pytest.raises(ValueError, match="ffn_dim="):
        mov.add_mov(Toy(), 2, attention_targets=(), ffn_targets=("mlp.act",))
    with pytest.raises(ValueError, match="num_heads 3 x head_dim"):
        mov.add_mov(Toy(), 2, attention_targets=("key",), ffn_targets=(), num_heads=3, head_dim=5)
    model = mov.add_mov(Toy(), 2, **TOY)
    assert isinstance(model.key, mov.MoVLinear) and model.key.heads == 2 and model.key.bias is not None
    assert isinstance(model.mlp.act, mov.MoVActivation) and model.mlp.act.mov_experts.shape == (2, 24)


@pytest.mark.parametrize("call,match", [
    (lambda m: mov.add_mov(m, 0), "num_experts"),
    (lambda m: mov.add_mov(m, -2), "-2"),
    (lambda m: mov.add_mov(m, 3, top_k=4), "top_k"),
    (lambda m: mov.add_mov(m, 3, top_k=2, router=lambda: mov.Router(top_k=2)), "not to add_mov"),
    (lambda m: mov.add_mov(m, 3, router=mov.Router()), "makes each site's router"),
    (lambda m: mov.add_mov(m, 3, router=lambda: routing.Router(mov.Router(), sentence_dim=0)), "sentence_dim"),
    (lambda m: mov.add_mov(m, 3, attention_targets=("k", "key_proj")), "key_proj"),
    (lambda m: mov.add_ia3(m, ffn_targets=("gelu",)), "gelu"),
    (lambda m: mov.add_mov(mov.add_mov(m, 3), 3), "once"),
    (lambda m: mov.add_ia3(mov.add_mov(m, 3)), "once"),
    (lambda m: mov.add_ia3(m, attention_targets=("layer_norm",), ffn_targets=()), "expected nn.Linear"),
])
def test_bad_arguments_raise(call, match):
    """Bad expert counts, top_k (twice, or too large), routers, unmatched targets, a second application raise."""
    with pytest.raises(ValueError, match=match):
        call(hf_t5())
