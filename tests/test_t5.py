"""t5.py against transformers' T5ForConditionalGeneration on checkpoints that transformers itself wrote."""
import dataclasses
import json
import os
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import t5

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
    ours, hf = t5.T5.from_pretrained(ckpt[name]), _hf(ckpt[ref])
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
    ours, hf = t5.T5.from_pretrained(ckpt[name]), _hf(ckpt[name])
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
    ours, hf = t5.T5.from_pretrained(ckpt[name]), _hf(ckpt[name])
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
        t5.T5.from_pretrained(_broken(ckpt, tmp_path, edit))


def test_unknown_path_and_unreachable_hub(tmp_path, monkeypatch):
    """A missing directory and an unreachable hub name raise errors saying what was tried and the fix."""
    with pytest.raises(FileNotFoundError, match="no such directory.*not a hub name.*Fix: pass a local directory"):
        t5.T5.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    with pytest.raises(OSError, match="google/t5-none-lm-adapt.*Hugging Face hub.*Fix: pass a local directory"):
        t5.T5.from_pretrained("google/t5-none-lm-adapt")


def test_dropout_matches_transformers_in_train_mode_and_is_off_in_eval(ckpt):
    """Train mode, dropout_mask="elementwise": dropout at HF's places (same seed, same logits); eval: deterministic."""
    loaded = t5.T5.from_pretrained(ckpt["v11"])
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
        want = t5.T5.from_pretrained(ckpt["v11"])(ids, dec, mask, dmask)
        got = t5.T5.from_pretrained(ckpt["v11"], dtype=torch.bfloat16)(ids, dec, mask, dmask)
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
    assert not t5.T5Config.from_hf(hub).scale_decoder_outputs
    assert t5.T5Config.from_hf(dict(TINY, feed_forward_proj="relu")).scale_decoder_outputs  # HF default: tied
    v5 = dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=True, scale_decoder_outputs=False)
    assert not t5.T5Config.from_hf(v5).scale_decoder_outputs
    with pytest.raises(ValueError, match="gated-silu"):
        t5.T5Config.from_hf(dict(TINY, feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match="'huge'"):
        t5.T5Config.preset("huge")
