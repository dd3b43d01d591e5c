"""t5.py against transformers' T5ForConditionalGeneration on checkpoints that transformers itself wrote (loaded by
sources/t5_weights.py), and T5X's training numerics: broadcast dropout, float32 logits, SDPA attention."""
import dataclasses
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from safetensors.torch import load_file, save_file

import t5
from sources import t5_weights

TINY = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0)


def _hf(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def _write_bin(state, path, shards):
    """transformers 5.23 ignores safe_serialization=False (always writes safetensors), so the .bin files of older
    hub checkpoints are written here with torch.save, in HF's file and index layout, aliases included."""
    names = list(state)
    if shards == 1:
        return torch.save(state, os.path.join(path, "pytorch_model.bin"))
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: state[k] for k in part}, os.path.join(path, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """v11: gated-gelu, own lm_head, hub config keys; orig: relu, tied + rescale (transformers 5.x config form)."""
    torch.manual_seed(0)
    root, dirs = tmp_path_factory.mktemp("t5"), {}
    v11_config = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY)
    v11 = transformers.T5ForConditionalGeneration(v11_config)
    head = torch.randn(512, 64)
    head[1] *= 32 / head[1].norm()  # a strong EOS row, so greedy rows end at different steps
    v11.lm_head.weight = torch.nn.Parameter(head)
    orig = transformers.T5ForConditionalGeneration(transformers.T5Config(feed_forward_proj="relu", **TINY))
    for name, model, kw in [("v11", v11, {}), ("orig", orig, {}), ("orig_sharded", orig, {"max_shard_size": "100KB"})]:
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name], **kw)
    # the hub's v1.1 config.json says tie_word_embeddings false and has no scale_decoder_outputs key
    cfg_file = os.path.join(dirs["v11"], "config.json")
    cfg = json.load(open(cfg_file))
    assert cfg["tie_word_embeddings"] is True and cfg["scale_decoder_outputs"] is False  # what 5.23 writes
    cfg["tie_word_embeddings"] = False
    del cfg["scale_decoder_outputs"]
    json.dump(cfg, open(cfg_file, "w"))
    for name, shards in [("v11_bin", 1), ("v11_bin_sharded", 3)]:
        dirs[name] = str(root / name)
        os.makedirs(dirs[name])
        json.dump(cfg, open(os.path.join(dirs[name], "config.json"), "w"))
        _write_bin(v11.state_dict(), dirs[name], shards)
    return dirs


def _batch(b=3, L=9, T=6):
    """Random ids with right padding of different lengths (row 0 full)."""
    ids, dec = torch.randint(2, 512, (b, L)), torch.randint(2, 512, (b, T))
    dec[:, 0] = 0
    mask = (torch.arange(L)[None] < torch.tensor([L, L - 3, 4][:b])[:, None]).long()
    dmask = (torch.arange(T)[None] < torch.tensor([T, 3, T - 1][:b])[:, None]).long()
    return ids * mask, dec * dmask, mask, dmask


@pytest.mark.parametrize("name,ref", [("v11", "v11"), ("v11_bin", "v11"), ("v11_bin_sharded", "v11"),
                                      ("orig", "orig"), ("orig_sharded", "orig")])
def test_logits_match_transformers(ckpt, name, ref):
    """Logits equal HF's on padded batches, for both families and every file layout (fp32, 1e-4)."""
    ours, hf = t5_weights.load(ckpt[name]), _hf(ckpt[ref])
    assert ours.config.tie_word_embeddings == (ref == "orig") == ours.config.scale_decoder_outputs
    ids, dec, mask, dmask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        got = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dmask)
    valid = dmask.bool()  # HF and we both give finite junk at padded decoder queries; compare real positions
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    enc = ours.encode(ids, mask)
    torch.testing.assert_close(ours.decode(dec, enc, mask, dmask)[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_bucket_function_matches_transformers():
    """Our transcription of T5's bucket function equals HF's for distances -300..300, both directions."""
    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(t5.relative_position_bucket(rel, bidirectional, 32, 128), want)


@pytest.mark.parametrize("name", ["v11", "orig"])
def test_packed_row_equals_examples_alone(ckpt, name):
    """A packed row of two examples gives each the logits it gets alone (ours unpacked, and HF)."""
    ours, hf = t5_weights.load(ckpt[name]), _hf(ckpt[name])
    a_in, b_in = torch.randint(2, 512, (1, 5)), torch.randint(2, 512, (1, 4))
    a_dec, b_dec = torch.randint(2, 512, (1, 3)), torch.randint(2, 512, (1, 4))
    a_dec[:, 0] = b_dec[:, 0] = 0  # decoder inputs restart at 0 in each segment
    pad = torch.zeros(1, 1, dtype=torch.long)
    ids, dec = torch.cat([a_in, b_in, pad], 1), torch.cat([a_dec, b_dec, pad], 1)
    eseg = torch.tensor([[1] * 5 + [2] * 4 + [0]])
    dseg = torch.tensor([[1] * 3 + [2] * 4 + [0]])
    with torch.no_grad():
        packed = ours(ids, dec, encoder_segment_ids=eseg, decoder_segment_ids=dseg)[0]
        for x, d, rows in [(a_in, a_dec, slice(0, 3)), (b_in, b_dec, slice(3, 7))]:
            torch.testing.assert_close(packed[rows], ours(x, d)[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(packed[rows], hf(input_ids=x, decoder_input_ids=d).logits[0],
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["v11", "orig"])
def test_greedy_generate_matches_transformers(ckpt, name):
    """Greedy ids equal HF generate(do_sample=False, num_beams=1) token for token, pad after EOS."""
    ours, hf = t5_weights.load(ckpt[name]), _hf(ckpt[name])
    ids, mask = torch.randint(2, 512, (6, 7)), torch.ones(6, 7, dtype=torch.long)
    mask[1, 4:] = mask[4, 2:] = 0
    n = 8
    want = hf.generate(ids * mask, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1)[:, 1:]
    want = torch.nn.functional.pad(want, (0, n - want.shape[1]))  # HF stops once every row has ended
    got = ours.generate(ids * mask, mask, max_new_tokens=n)
    assert got.shape == (6, n) and torch.equal(got, want)
    if name == "v11":  # the strong EOS row makes some rows end early and others run on: EOS masking is exercised
        ended = (got[:, :-1] == 1).any(1)
        assert ended.any() and not ended.all()


def _broken(ckpt, tmp_path, edit):
    state = load_file(os.path.join(ckpt["v11"], "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(ckpt["v11"], "config.json")).read())
    return str(tmp_path)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("decoder.block.1.layer.0.SelfAttention.k.weight"), "decoder.block.1.layer.0.SelfAttention.k"),
    (lambda s: s.update({"encoder.block.0.layer.1.DenseReluDense.wo.weight": torch.zeros(64, 64)}),
     "encoder.block.0.layer.1.DenseReluDense.wo.weight (64, 64)"),
    (lambda s: s.update({"encoder.block.0.extra.weight": torch.zeros(3)}), "encoder.block.0.extra.weight"),
])
def test_bad_checkpoint_errors_name_the_tensor(ckpt, tmp_path, edit, needle):
    """A missing, mis-shaped or unexpected tensor raises an error naming it."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        t5_weights.load(_broken(ckpt, tmp_path, edit))


def test_unknown_path_and_unreachable_hub(tmp_path, monkeypatch):
    """A missing directory and an unreachable hub name raise errors saying what was tried and the fix."""
    with pytest.raises(FileNotFoundError, match="no such directory.*not a hub name.*Fix: pass a local directory"):
        t5_weights.load(str(tmp_path / "no" / "such" / "dir"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    with pytest.raises(OSError, match="google/t5-none-lm-adapt.*Hugging Face hub.*Fix: pass a local directory"):
        t5_weights.load("google/t5-none-lm-adapt")


def test_dropout_matches_transformers_in_train_mode_and_is_off_in_eval(ckpt):
    """Train mode, dropout_mask="elementwise": dropout at HF's places (same seed, same logits); eval: deterministic."""
    loaded = t5_weights.load(ckpt["v11"])
    ours = t5.T5(dataclasses.replace(loaded.config, dropout_mask="elementwise"))
    ours.load_state_dict(loaded.state_dict())
    ours.train()
    hf = _hf(ckpt["v11"]).train()
    ids, dec, mask, dmask = _batch()
    torch.manual_seed(1)
    want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    torch.manual_seed(1)
    got = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dmask)
    valid = dmask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, ours(ids, dec, attention_mask=mask, decoder_attention_mask=dmask))
    ours.eval()
    assert torch.equal(ours(ids, dec, mask, dmask), ours(ids, dec, mask, dmask))


def test_bf16_close_to_fp32(ckpt):
    """A bf16 model runs (RMSNorm in fp32 inside, the head in fp32) and its logits stay close to fp32's."""
    ids, dec, mask, dmask = _batch()
    with torch.no_grad():
        want = t5_weights.load(ckpt["v11"])(ids, dec, mask, dmask)
        got = t5_weights.load(ckpt["v11"], dtype=torch.bfloat16)(ids, dec, mask, dmask)
    assert got.dtype == torch.float32
    valid = dmask.bool()
    err = (got.float() - want)[valid].abs().max() / want[valid].abs().max()
    assert err < 0.03, f"bf16 relative error {err:.4f}"


def test_configs_presets_and_hub_config_forms():
    """Presets have the released checkpoints' parameter counts; from_hf reads hub (4.x) and transformers 5.x config forms."""
    table = {"small": 76.96, "base": 247.58, "large": 783.15, "xl": 2849.76, "xxl": 11135.33}  # google/t5-<size>-lm-adapt, millions
    for name, millions in table.items():
        assert round(t5.num_parameters(name) / 1e6, 2) == millions
    assert t5.T5Config.hub_name("xl") == "google/t5-xl-lm-adapt"
    hub = dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    assert not t5_weights.read_config(hub).scale_decoder_outputs
    assert t5_weights.read_config(dict(TINY, feed_forward_proj="relu")).scale_decoder_outputs  # HF default: tied
    v5 = dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=True, scale_decoder_outputs=False)
    assert not t5_weights.read_config(v5).scale_decoder_outputs
    with pytest.raises(ValueError, match="gated-silu"):
        t5_weights.read_config(dict(TINY, feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match="'huge'"):
        t5.T5Config.preset("huge")


# ----------------------------------------------------------------------------------------------- training numerics
# t5.py's T5X-style training numerics: broadcast dropout masks, the float32 logits layer, SDPA attention.
# 
# T5X trains T5.1.1 with flax.linen.Dropout(broadcast_dims=(-2,)) everywhere and broadcast_dropout=True in attention
# (for-ai/parameter-efficient-moe `configs/t5/architectures/t5_1_1_flaxformer.gin`; Flaxformer
# `components/attention/dense_attention.py` `dot_product_attention_weights`: dropout_shape[-2] = 1), and its
# `output_logits` layer has dtype float32. References here are brute-force computations written out in the tests.

P = 0.3
CFG = dataclasses.replace(t5.T5Config.preset("tiny"), dropout_rate=P)  # d_model 64, 4 heads of 16, d_ff 128


def _padded_batch(b=3, L=9, T=7):
    """Random ids with right padding of different lengths (row 0 full)."""
    ids, dec = torch.randint(2, 512, (b, L)), torch.randint(2, 512, (b, T))
    mask = (torch.arange(L)[None] < torch.tensor([L, L - 3, 4][:b])[:, None]).long()
    dmask = (torch.arange(T)[None] < torch.tensor([T, 3, T - 1][:b])[:, None]).long()
    return ids * mask, dec * dmask, mask, dmask


def _hidden_dropout_calls(model, run):
    """(name, input, output) of every call of a hidden-state dropout module (all nn.Dropout but attention's)."""
    calls, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and not name.endswith("Attention.dropout"):
            handles.append(m.register_forward_hook(lambda m, a, out, name=name: calls.append((name, a[0], out))))
    run()
    for h in handles:
        h.remove()
    return calls


def _dropped_and_kept(x, y):
    """Per element of [b, L, features]: zeroed by dropout (input nonzero, output zero), and kept (output nonzero)."""
    return (y == 0) & (x != 0), y != 0


def test_hidden_dropouts_share_one_mask_along_the_length():
    """Broadcast mode, training: every hidden-state dropout (embeddings, residual branches, FFN intermediate, final
    output) zeroes the same channels at every position of a row, at rate ~p, and scales the rest by 1/(1-p)."""
    model = t5.T5(CFG).train()
    ids, dec, mask, dmask = _padded_batch()
    calls = _hidden_dropout_calls(model, lambda: model(ids, dec, mask, dmask))
    # encoder: input + output, 2 blocks x (attention residual, FFN intermediate, FFN residual); decoder: + cross
    assert len(calls) == 2 + 2 * 3 + 2 + 2 * 4
    dropped_rows = total_rows = 0
    for name, x, y in calls:
        dropped, kept = _dropped_and_kept(x, y)
        assert not (dropped.any(1) & kept.any(1)).any(), f"{name}: a channel dropped at some positions only"
        torch.testing.assert_close(y[kept], x[kept] / (1 - P), rtol=1e-6, atol=0)
        dropped_rows += dropped.all(1).sum().item()
        total_rows += x.shape[0] * x.shape[2]
    rate = dropped_rows / total_rows  # ~4300 Bernoulli(p) draws: standard deviation ~0.007
    assert abs(rate - P) < 0.03, rate


def test_elementwise_masks_are_independent_per_position():
    """dropout_mask="elementwise" (transformers' masks): the same channel is dropped at some positions of a row and
    kept at others, and no dropout module broadcasts its mask."""
    model = t5.T5(dataclasses.replace(CFG, dropout_mask="elementwise")).train()
    assert not any(isinstance(m, t5.BroadcastDropout) or getattr(m, "broadcast_dim", None) is not None
                   for m in model.modules())
    ids, dec, mask, dmask = _padded_batch()
    calls = _hidden_dropout_calls(model, lambda: model(ids, dec, mask, dmask))
    for name, x, y in calls:
        dropped, kept = _dropped_and_kept(x, y)
        assert (dropped.any(1) & kept.any(1)).any(), name


def _one_hot_attention(cfg, s):
    """An Attention whose output is its dropped-out weights, twice: V at key j of every head is e_j + e_(s+j) and o
    is the identity, so out[b, t, h * d_kv + j] and out[b, t, h * d_kv + s + j] are P'[b, h, t, j] (kv[b, j] = e_j).
    A mask that varied along the features of V would make the two copies differ."""
    att = t5.Attention(cfg)
    d, h = cfg.d_kv, cfg.num_heads
    assert 2 * s <= d and h * d == cfg.d_model
    with torch.no_grad():
        att.v.weight.zero_()
        for head in range(h):
            att.v.weight[head * d:head * d + s, :s] = torch.eye(s)
            att.v.weight[head * d + s:head * d + 2 * s, :s] = torch.eye(s)
        att.o.weight.copy_(torch.eye(cfg.d_model))
    return att


def _effective_weights(att, x, kv, bias):
    """(P' from the module's two copies, brute-force P = softmax(q k^T + bias) in float64), each [b, h, t, s]."""
    b, t, s, h, d = x.shape[0], x.shape[1], kv.shape[1], att.cfg.num_heads, att.cfg.d_kv
    out = att(x, kv, bias).view(b, t, h, d).permute(0, 2, 1, 3).double()
    q = (x.double() @ att.q.weight.double().T).view(b, t, h, d)
    k = (kv.double() @ att.k.weight.double().T).view(b, s, h, d)
    probs = (torch.einsum("bthd,bshd->bhts", q, k) + bias.double()).softmax(-1)
    return out[..., :s], out[..., s:2 * s], probs


@pytest.mark.parametrize("mode", ["broadcast", "elementwise"])
def test_attention_weight_dropout_masks(mode):
    """Training: broadcast mode drops attention weights with one mask per (batch, head, key) shared by every query
    (rate ~p, kept weights x 1/(1-p)); elementwise mode draws a mask per query; eval mode drops nothing."""
    cfg = dataclasses.replace(CFG, dropout_mask=mode)
    b, t, s = 8, 10, 8
    att = _one_hot_attention(cfg, s).train()
    kv = torch.eye(cfg.d_model)[:s].expand(b, s, cfg.d_model)
    bias = torch.randn(1, cfg.num_heads, t, s)
    ratios = []
    for _ in range(6):
        first, second, probs = _effective_weights(att, torch.randn(b, t, cfg.d_model), kv, bias)
        torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-7)  # one mask per key, whatever the feature
        ratios.append(first / probs)  # [b, h, t, s]
    r = torch.cat(ratios)
    dropped = r.abs() < 1e-5
    assert (dropped | ((r - 1 / (1 - P)).abs() < 1e-4)).all()
    shared = (dropped == dropped[:, :, :1]).all()
    assert shared if mode == "broadcast" else not shared
    rate = dropped.float().mean().item()  # broadcast: 1536 independent draws, standard deviation ~0.012
    assert abs(rate - P) < 0.05, rate
    att.eval()
    first, second, probs = _effective_weights(att, torch.randn(b, t, cfg.d_model), kv, bias)
    torch.testing.assert_close(first, probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["broadcast", "elementwise"])
def test_eval_disables_every_dropout(mode):
    """Training mode is random (two calls differ); eval mode is deterministic and equals the model with p = 0."""
    model = t5.T5(dataclasses.replace(CFG, dropout_mask=mode)).train()
    no_dropout = t5.T5(dataclasses.replace(CFG, dropout_mask=mode, dropout_rate=0.0)).train()
    no_dropout.load_state_dict(model.state_dict())
    ids, dec, mask, dmask = _padded_batch()
    assert not torch.allclose(model(ids, dec, mask, dmask), model(ids, dec, mask, dmask))
    model.eval()
    first = model(ids, dec, mask, dmask)
    assert torch.equal(first, model(ids, dec, mask, dmask))
    torch.testing.assert_close(first, no_dropout(ids, dec, mask, dmask), rtol=1e-6, atol=1e-6)


def test_broadcast_dropout_module_and_config():
    """BroadcastDropout is an nn.Dropout (p, eval, repr), masks shape-1 along its dim; bad dropout_mask is refused."""
    m = t5.BroadcastDropout(0.5, broadcast_dim=1)
    assert isinstance(m, nn.Dropout) and m.p == 0.5 and "broadcast_dim=1" in repr(m)
    x = torch.ones(64, 5, 8)
    y = m(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and (y == y[:, :1]).all()
    assert torch.equal(m.eval()(x), x) and torch.equal(t5.BroadcastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout_mask.*'bogus'"):
        dataclasses.replace(CFG, dropout_mask="bogus")


@pytest.mark.parametrize("family", ["v11", "orig"])
def test_logits_are_float32_under_bf16_autocast(family):
    """Under bf16 autocast the logits are float32 and equal the float32 head applied to the final decoder state
    (original T5: tied head, state * d_model**-0.5), computed here in float64."""
    cfg = CFG if family == "v11" else dataclasses.replace(CFG, feed_forward_proj="relu", tie_word_embeddings=True,
                                                          scale_decoder_outputs=True)
    model = t5.T5(cfg).eval()
    seen = []
    model.decoder.register_forward_hook(lambda m, a, out: seen.append(out))
    ids, dec, mask, dmask = _padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, dec, mask, dmask)
        bf16_head = F.linear(seen[0], model.shared.weight if model.lm_head is None else model.lm_head.weight)
    assert logits.dtype == torch.float32
    head = (model.shared.weight if model.lm_head is None else model.lm_head.weight).double()
    scale = cfg.d_model ** -0.5 if family == "orig" else 1.0
    want = (seen[0].double() * scale) @ head.T
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-5)
    assert bf16_head.dtype == torch.bfloat16  # the check above can tell: a bf16 head is ~100x further off
    assert (bf16_head.double() * scale - want).abs().max() > 1e-3


def _attention_bias(att, L, segments=None, mask=None):
    """Position bias + additive mask, as T5.encode builds them: [b, H, L, L]."""
    ok = t5.allowed_pairs(L, L, segments, segments, mask, False, "cpu")
    return att.position_bias(L, L) + t5._additive(ok)


def _brute_force(att, x, bias):
    """Attention written out: einsum logits + bias, softmax over keys, weighted sum of values, o; float32."""
    b, L, h = x.shape[0], x.shape[1], att.cfg.num_heads
    q, k, v = (w(x).view(b, L, h, -1) for w in (att.q, att.k, att.v))
    probs = (torch.einsum("bthd,bshd->bhts", q, k) + bias).softmax(-1)
    return att.o(torch.einsum("bhts,bshd->bthd", probs, v).reshape(b, L, -1))


def test_sdpa_attention_equals_brute_force_with_padding_and_packing():
    """Eval-mode attention (SDPA) equals the written-out einsum/softmax attention in float32, values and gradients
    (position-bias table included), on padded rows and packed rows; fully masked padding rows stay finite."""
    att = t5.Attention(CFG, relative_bias=True).eval()
    L = 10
    segments = torch.tensor([[1] * 4 + [2] * 5 + [0], [1] * 10, [1] * 3 + [0] * 7])
    mask = (torch.arange(L)[None] < torch.tensor([[10], [6], [2]])).long()
    for seg, msk in [(segments, None), (None, mask)]:
        x = torch.randn(3, L, CFG.d_model, requires_grad=True)
        got = att(x, x, _attention_bias(att, L, seg, msk))
        want = _brute_force(att, x, _attention_bias(att, L, seg, msk))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(got)
        params = [x, att.q.weight, att.k.weight, att.v.weight, att.relative_attention_bias.weight]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_under_bf16_autocast_stays_close_to_float32():
    """Under bf16 autocast SDPA attention (bias rounded to bf16, softmax in the kernel) stays within 2% of the output
    range of the float32 written-out attention, and no further off than the eager path with an fp32 softmax (bf16
    projections dominate: both ~0.5-1% on this layer); fully masked padding rows stay finite in bf16 too."""
    att = t5.Attention(CFG, relative_bias=True).eval()
    L, h = 16, CFG.num_heads
    x = torch.randn(2, L, CFG.d_model)
    mask = (torch.arange(L)[None] < torch.tensor([[16], [9]])).long()
    bias = _attention_bias(att, L, None, mask)
    with torch.no_grad():
        want = _brute_force(att, x, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = att(x, x, bias)
            q, k, v = (w(x).view(2, L, h, -1) for w in (att.q, att.k, att.v))
            probs = (torch.einsum("bthd,bshd->bhts", q, k).float() + bias).softmax(-1).to(v.dtype)
            eager = att.o(torch.einsum("bhts,bshd->bthd", probs, v).reshape(2, L, -1))
    assert got.dtype == torch.bfloat16
    segments = torch.tensor([[1] * 10 + [0] * 6, [1] * 4 + [2] * 4 + [0] * 8])  # padding rows see no key at all
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = att(x, x, _attention_bias(att, L, segments))
    assert torch.isfinite(padded).all()
    err, err_eager = (((y.float() - want).abs().max() / want.abs().max()).item() for y in (got, eager))
    assert err < 0.02 and err <= 1.5 * err_eager + 1e-3, (err, err_eager)


@pytest.mark.parametrize("make", [lambda: t5.BroadcastDropout(P), lambda: t5.BroadcastDropout(P, broadcast_dim=-1),
                                  lambda: t5.Dropout(P)], ids=["broadcast-length", "broadcast-last", "elementwise"])
def test_process_rows_of_the_mask_equal_the_single_process_mask(make):
    """With rows = (rank, 3) and the same RNG state, each of 3 processes applied to its third of a batch gives that
    third of what one process gives on the whole batch (torchrun data parallelism, distributed.share_noise)."""
    x = torch.randn(6, 5, 8)
    torch.manual_seed(7)
    whole = make().train()(x)
    parts = []
    for rank in range(3):
        m = make().train()
        m.rows = (rank, 3)
        torch.manual_seed(7)
        parts.append(m(x[2 * rank:2 * rank + 2]))
    assert (whole == 0).any() and (whole != 0).any()
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
