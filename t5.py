"""T5 encoder-decoder in plain PyTorch: the frozen backbone that MoV / MoLORA adapt.

Reproduces T5 (Raffel et al. 2020) in both families: v1.1 / LM-adapted (gated-GELU FFN, untied lm_head; Lester et
al. 2021), the checkpoints the paper adapts (google/t5-{small..xxl}-lm-adapt), and the original T5 (ReLU FFN, tied
embeddings). Module and parameter names equal HF's T5ForConditionalGeneration: HF checkpoints load by one key map.
T5's quirks, kept on purpose:
  - no 1/sqrt(d_kv) scaling of attention logits (Mesh TF folds it into the initialisation of q);
  - one relative position bias table per stack, held by block 0's self-attention and shared by all its blocks
    (bidirectional buckets in the encoder, causal buckets in the decoder, none in cross-attention);
  - RMSNorm without mean or bias, variance in fp32; pre-norm residual blocks; no biases anywhere;
  - tied embeddings (original T5) rescale the decoder output by d_model**-0.5 before the head; untied (v1.1) do not.
Packed rows (seqio's `EncDecFeatureConverter`) are supported through segment ids: no attention crosses examples.
As T5X trains T5.1.1 (for-ai/parameter-efficient-moe `configs/t5/architectures/t5_1_1_flaxformer.gin`): dropout
masks shared along the length (dropout_mask="broadcast": a row of hidden states [b, L, d] drops the same channels
at every position; attention weights: one mask per batch, head and key), and the logits layer in fp32 under autocast.

Usage:
    model = T5(T5Config.preset("xl"))              # random weights; sources/t5_weights.py loads HF checkpoints
    logits = model(input_ids, decoder_input_ids, attention_mask=mask)           # [b, T, vocab] float32
    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)     # [b, 32] greedy

Deviations from HF: broadcast dropout by default ("elementwise" is HF's); fp32 logits (HF: the compute dtype);
attention by F.scaled_dot_product_attention (HF's "sdpa"; under bf16 autocast the bias is cast to bf16 and the
softmax runs in the kernel: within 1% of fp32 attention); t5_weights.load(dtype=bf16) casts every tensor, `wo` too
(HF keeps it fp32: use fp32 weights and autocast); no fp16 (the mask value assumes bf16's range); generate() re-runs
the full decoder each step, no KV cache (same tokens, fixed shapes, O(n^2) work).
"""
import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" (v1.1) | "relu" (original T5)
    tie_word_embeddings: bool = False  # True: no lm_head, logits = x @ shared.weight.T
    scale_decoder_outputs: bool = False  # True: decoder output * d_model**-0.5 before the head (original T5)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dropout_mask: str = "broadcast"  # "broadcast": T5X's masks, shared along the length | "elementwise": HF's

    def __post_init__(self):
        if self.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(f"feed_forward_proj must be 'gated-gelu' or 'relu', got {self.feed_forward_proj!r}")
        if self.dropout_mask not in ("broadcast", "elementwise"):
            raise ValueError(f"dropout_mask must be 'broadcast' or 'elementwise', got {self.dropout_mask!r}")

    @classmethod
    def preset(cls, name):
        if name not in _PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(_PRESETS)}")
        return _PRESETS[name]

    @staticmethod
    def hub_name(preset):
        """The HF hub checkpoint of an LM-adapted preset: 'xl' -> 'google/t5-xl-lm-adapt'."""
        if preset not in ("small", "base", "large", "xl", "xxl"):
            raise ValueError(f"no hub checkpoint for preset {preset!r}; choose small, base, large, xl or xxl")
        return f"google/t5-{preset}-lm-adapt"


def _lm_adapt(d_model, d_ff, layers, heads):
    return T5Config(32128, d_model, 64, d_ff, layers, layers, heads)


_PRESETS = {  # T5 v1.1 LM-adapted shapes (the google/t5-<size>-lm-adapt config.json files)
    "tiny": T5Config(512, 64, 16, 128, 2, 2, 4),
    "small": _lm_adapt(512, 1024, 8, 6),
    "base": _lm_adapt(768, 2048, 12, 12),
    "large": _lm_adapt(1024, 2816, 24, 16),
    "xl": _lm_adapt(2048, 5120, 24, 32),
    "xxl": _lm_adapt(4096, 10240, 24, 64),
}


def num_parameters(config):
    """Parameter count of a config (or preset name), built on the meta device: no memory is allocated."""
    config = T5Config.preset(config) if isinstance(config, str) else config
    with torch.device("meta"):
        return sum(p.numel() for p in T5(config).parameters())


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucket of key_pos - query_pos (Mesh TF `_relative_position_bucket`): half the buckets hold exact
    distances, the other half log-spaced distances up to max_distance (beyond: the last bucket). Bidirectional
    splits the buckets between keys after (upper half) and before the query; causal maps keys after it to 0."""
    n = -relative_position  # > 0 when the key is before the query
    bucket = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where n is small; those entries take the exact branch
    large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


def allowed_pairs(q_len, k_len, q_segments, k_segments, k_mask, causal, device):
    """Which (query, key) pairs may attend, bool [b or 1, 1, q_len, k_len]. Segment ids (0 = padding) define the
    mask when given, so packed examples never see each other; else k_mask (1 = token, 0 = pad) masks keys."""
    ok = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        ok = torch.tril(ok)
    if k_segments is not None:
        same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
        ok = ok & same & (k_segments != 0)[:, None, None, :]
    elif k_mask is not None:
        ok = ok & k_mask.bool()[:, None, None, :]
    return ok


def _additive(ok):
    # large finite negative (not -inf), so a fully masked padding row gets a finite softmax instead of NaN; half of
    # bf16's (and fp32's) range, so it stays finite in bf16 and after any kernel's sums or log2(e) scaling
    return torch.where(ok, 0.0, torch.finfo(torch.bfloat16).min / 2)


class Dropout(nn.Dropout):
    """Dropout scaled by 1/(1-p), identity in eval or at p = 0, elementwise (HF's masks on the CPU) or with one mask
    shared along `broadcast_dim`, not the batch's (size 1 there): flax.linen.Dropout(broadcast_dims=(broadcast_dim,)).
    Under torchrun runner/distributed.py sets `rows` = (rank, world_size): every process draws the mask of world_size x
    its rows from the RNG stream they share and keeps rows rank*b:(rank+1)*b, so N processes drop what one process with
    the whole batch drops (one contiguous draw: neither thread count nor layout changes a mask)."""
    rows = (0, 1)

    def __init__(self, p, broadcast_dim=None):
        super().__init__(p)
        self.broadcast_dim = broadcast_dim

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        (rank, world), shape = self.rows, list(x.shape)
        if self.broadcast_dim is not None:
            shape[self.broadcast_dim] = 1
        keep = x.new_empty([shape[0] * world] + shape[1:]).bernoulli_(1 - self.p)
        if world > 1:  # a copy: the backward keeps this process's rows, not the whole batch's mask
            keep = keep[rank * shape[0]:(rank + 1) * shape[0]].clone()
        return x * keep * (1 / (1 - self.p))

    def extra_repr(self):
        return f"p={self.p}, broadcast_dim={self.broadcast_dim}"


class BroadcastDropout(Dropout):
    """Dropout with one mask shared along `broadcast_dim`, as T5X trains T5 (see `_dropout`)."""

    def __init__(self, p, broadcast_dim=-2):
        super().__init__(p, broadcast_dim)


def _dropout(cfg, broadcast_dim=-2):
    """T5X's DROPOUT_FACTORY = linen.Dropout(broadcast_dims=(-2,)): one mask for all positions of [b, L, features]."""
    broadcast = cfg.dropout_mask == "broadcast"
    return BroadcastDropout(cfg.dropout_rate, broadcast_dim) if broadcast else Dropout(cfg.dropout_rate)


def _no_autocast(device):  # autocast off on `device` (nothing to do where autocast does not exist, e.g. meta)
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight, no mean, no bias; variance in fp32, result cast to the weight dtype."""

    def __init__(self, d_model, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d_kv) scaling through F.scaled_dot_product_attention (scale=1); `bias`
    carries position bias and mask together. T5X drops the weights P [b, h, t, s] with one mask per (b, h, s) for all
    queries (Flaxformer `components/attention/dense_attention.py`, broadcast_dropout: dropout_shape[-2] = 1), and
    dropout(P) @ V = P @ (m[b, h, s] * V[b, h, s, :]): so `dropout` drops rows of V. Elementwise masks in training
    take the explicit path (softmax, dropout, matmul)."""

    def __init__(self, cfg, relative_bias=False, bidirectional=True):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg, self.bidirectional = cfg, bidirectional
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.dropout = _dropout(cfg, broadcast_dim=-1)  # broadcast: on V [b, h, s, d]; elementwise: on P

    def position_bias(self, q_len, k_len):
        """[1, H, q_len, k_len] fp32. Only relative positions enter, so inside a packed segment i - j (and the bias)
        equals running the example alone: packing needs no positions input."""
        device = self.relative_attention_bias.weight.device
        rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # [q_len, k_len]
        return self.relative_attention_bias(buckets).float().permute(2, 0, 1)[None]

    def forward(self, x, kv, bias):
        # b = batch, t = query positions, s = key positions, h = heads, d = d_kv
        b, t, s, h = x.shape[0], x.shape[1], kv.shape[1], self.cfg.num_heads
        q = self.q(x).view(b, t, h, -1).transpose(1, 2)  # [b, h, t, d]
        k = self.k(kv).view(b, s, h, -1).transpose(1, 2)  # [b, h, s, d]
        v = self.v(kv).view(b, s, h, -1).transpose(1, 2)  # [b, h, s, d]
        if self.training and self.dropout.p > 0 and not isinstance(self.dropout, BroadcastDropout):
            logits = (q @ k.transpose(-1, -2)).float() + bias  # [b, h, t, s]; no 1/sqrt(d): folded into q's init
            out = self.dropout(logits.softmax(-1).to(v.dtype)) @ v  # [b, h, t, d]
        else:  # bias [b or 1, h or 1, t, s] in q's dtype; dropout_p=0 (the dropout is on V)
            out = F.scaled_dot_product_attention(q, k, self.dropout(v), attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))  # [b, t, h * d] -> [b, t, d_model]


class FFN(nn.Module):
    """v1.1 ("gated-gelu"): wo(dropout(act(wi_0 x) * wi_1 x)), act = GELU with the tanh approximation (HF's
    gelu_new); original T5 ("relu"): wo(dropout(act(wi x))), act = ReLU."""

    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        for name in ("wi_0", "wi_1") if self.gated else ("wi",):
            setattr(self, name, nn.Linear(cfg.d_model, cfg.d_ff, bias=False))
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = nn.GELU(approximate="tanh") if self.gated else nn.ReLU()
        self.dropout = _dropout(cfg)  # [b, L, d_ff]: T5X's MlpBlock intermediate dropout, broadcast_dims=(-2,)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg, relative_bias, bidirectional):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias, bidirectional)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = _dropout(cfg)

    def forward(self, x, bias):
        h = self.layer_norm(x)
        return x + self.dropout(self.SelfAttention(h, h, bias))


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.EncDecAttention = Attention(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = _dropout(cfg)

    def forward(self, x, encoder_hidden, bias):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), encoder_hidden, bias))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = FFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = _dropout(cfg)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    """Encoder block: layer = [self-attention, FFN]; decoder block: [causal self-attention, cross-attention, FFN]."""

    def __init__(self, cfg, relative_bias, is_decoder):
        super().__init__()
        layers = [SelfAttentionLayer(cfg, relative_bias, bidirectional=not is_decoder)]
        layers += [CrossAttentionLayer(cfg)] if is_decoder else []
        self.layer = nn.ModuleList(layers + [FeedForwardLayer(cfg)])

    def forward(self, x, self_bias, encoder_hidden=None, cross_bias=None):
        x = self.layer[0](x, self_bias)
        if encoder_hidden is not None:
            x = self.layer[1](x, encoder_hidden, cross_bias)
        return self.layer[-1](x)


class Stack(nn.Module):
    """Encoder or decoder: dropout(embeddings) -> blocks -> final RMSNorm -> dropout. Block 0 holds the bias table."""

    def __init__(self, cfg, num_layers, is_decoder):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, i == 0, is_decoder) for i in range(num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = _dropout(cfg)

    def position_bias(self, q_len, k_len):
        return self.block[0].layer[0].SelfAttention.position_bias(q_len, k_len)

    def forward(self, x, self_bias, encoder_hidden=None, cross_bias=None):
        x = self.dropout(x)
        for block in self.block:
            x = block(x, self_bias, encoder_hidden, cross_bias)
        return self.dropout(self.final_layer_norm(x))


class T5(nn.Module):
    """T5 encoder-decoder; parameter names equal HF's T5ForConditionalGeneration (minus its embed_tokens aliases)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, config.num_layers, is_decoder=False)
        self.decoder = Stack(config, config.num_decoder_layers, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        """Mesh TF / HF initialisation (matters only for a model trained from scratch, e.g. the offline demo)."""
        c = self.config
        std = {"q": (c.d_model * c.d_kv) ** -0.5,  # carries the 1/sqrt(d_kv) that attention leaves out
               "k": c.d_model ** -0.5, "v": c.d_model ** -0.5, "o": (c.num_heads * c.d_kv) ** -0.5,
               "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5,
               "relative_attention_bias": c.d_model ** -0.5, "shared": 1.0, "lm_head": 1.0}
        for name, p in self.named_parameters():  # norms (leaf "layer_norm") keep their ones
            if name.split(".")[-2] in std:
                nn.init.normal_(p, std=std[name.split(".")[-2]])

    def encode(self, input_ids, attention_mask=None, segment_ids=None):
        """[b, L] ids -> [b, L, d_model]. segment_ids (0 = pad) confine attention to each packed example."""
        L = input_ids.shape[1]
        ok = allowed_pairs(L, L, segment_ids, segment_ids, attention_mask, False, input_ids.device)
        bias = self.encoder.position_bias(L, L) + _additive(ok)  # [b, H, L, L] fp32
        return self.encoder(self.shared(input_ids), bias)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask=None, decoder_attention_mask=None,
               encoder_segment_ids=None, decoder_segment_ids=None):
        """[b, T] decoder ids + [b, L, d_model] encoder output -> logits [b, T, vocab]."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("pass both encoder_segment_ids and decoder_segment_ids (packed rows), or neither")
        T, L, dev = decoder_input_ids.shape[1], encoder_hidden.shape[1], decoder_input_ids.device
        self_ok = allowed_pairs(T, T, decoder_segment_ids, decoder_segment_ids, decoder_attention_mask, True, dev)
        cross_ok = allowed_pairs(T, L, decoder_segment_ids, encoder_segment_ids, encoder_attention_mask, False, dev)
        self_bias = self.decoder.position_bias(T, T) + _additive(self_ok)  # [b, H, T, T]
        x = self.decoder(self.shared(decoder_input_ids), self_bias, encoder_hidden, _additive(cross_ok))
        head = self.shared.weight if self.lm_head is None else self.lm_head.weight  # [vocab, d_model]
        with _no_autocast(x.device):  # the head in fp32 whatever the autocast (T5X: output_logits dtype float32)
            x = x.float() * (self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else 1.0)
            return F.linear(x, head.float())  # rescaling: original T5 (tied head) only

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
                encoder_segment_ids=None, decoder_segment_ids=None):
        encoder_hidden = self.encode(input_ids, attention_mask, encoder_segment_ids)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                           encoder_segment_ids, decoder_segment_ids)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32):
        """Greedy decoding: [b, L] ids -> [b, max_new_tokens] ids, pad (0) after each row's EOS. Fixed shapes and no
        host sync, so it traces on XLA: the full-length decoder re-runs at each step instead of keeping a KV cache
        (the same tokens as HF's generate(do_sample=False, num_beams=1), O(n^2) work, one compiled graph)."""
        c, b = self.config, input_ids.shape[0]
        encoder_hidden = self.encode(input_ids, attention_mask)
        # column 0 = decoder start; step t writes column t + 1. The causal mask hides the not-yet-written columns,
        # so the full-length re-run at step t gives the same logits at position t as a growing prefix would.
        ids = torch.full((b, max_new_tokens + 1), c.pad_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, 0] = c.decoder_start_token_id
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            next_id = self.decode(ids[:, :-1], encoder_hidden, attention_mask)[:, t].argmax(-1)  # [b]
            next_id = torch.where(done, c.pad_token_id, next_id)
            ids[:, t + 1] = next_id
            done = done | (next_id == c.eos_token_id)
        return ids[:, 1:]
