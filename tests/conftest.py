"""Shared test setup: one thread (two busy cores slow OpenMP 20-50x, and exact-resume tests compare sums that the
thread count changes), deterministic seeds, and the tiny models and runs the tests build.

    from conftest import tiny_t5, hf_t5, logits, demo_args
    model = tiny_t5()                                   # t5.py's "tiny" preset, random, eval mode
    out = logits(mov.add_mov(hf_t5(), 3))               # [2, 5, 64] for fixed random ids, either implementation
    cfg, _ = train.parse_args(demo_args(tmp_path / "run", "--method", "molora"))   # a 2-step demo run, float32

Tests marked `slow` (whole training runs in subprocesses, kills, full disks, torchrun, the hub at P3's size,
--compile) are left out of the quick suite: `pytest -m "not slow and not xla"` runs in about 35 s on two cores.
"""
import dataclasses

import pytest
import torch

torch.set_num_threads(1)

VOCAB = 64  # hf_t5's vocabulary: the ids `logits` draws


def tiny_t5(**config):
    """Our T5 (t5.py) at its "tiny" preset (4 heads of 16, d_model 64, 2 + 2 layers, vocab 512), random weights
    from the current seed, eval mode (no dropout); keyword arguments replace config fields."""
    import t5
    return t5.T5(dataclasses.replace(t5.T5Config.preset("tiny"), **config)).eval()


def hf_t5(feed_forward_proj="gated-gelu"):
    """A tiny random Hugging Face T5 (vocab 64, 4 heads of 8, d_model 32, d_ff 48, 2 + 2 layers), eval mode."""
    import transformers
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def logits(model, batch=2):
    """The logits of `model` (ours or Hugging Face's) for fixed random ids in [2, 64): [batch, 5, vocab]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, VOCAB, (batch, 7), generator=g)
    y = torch.randint(2, VOCAB, (batch, 5), generator=g)
    out = model(input_ids=x, decoder_input_ids=y)
    return getattr(out, "logits", out)  # HF returns an output object, our T5 the logits


def demo_args(out, *flags):
    """train.py's command line for a short demo run (2 steps of 4 rows, 32 + 8 tokens, CPU, float32 whatever the
    CPU, no end-of-run evaluation) into `out`; later flags override earlier ones."""
    return ["--preset", "demo", "--out", str(out), "--steps", "2", "--batch-size", "4", "--input-length", "32",
            "--target-length", "8", "--log-every", "1", "--save-every", "2", "--no-evaluate", "--device", "cpu",
            "--dtype", "float32", *flags]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
