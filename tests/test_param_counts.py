"""Trainable-parameter counts on T5-xl (built on the meta device) equal those of the original's tensor shapes."""
import pytest
import torch
import transformers

import molora
import mov

# Counted by hand from the original's tensor shapes (for-ai/parameter-efficient-moe src/mov.py, src/ia3.py,
# src/molora.py, src/lora.py; routers included) for T5-xl: d_model 2048, d_ff 5120, 32 heads of 64, 24 + 24 layers.
EXPECTED = {
    "ia3": (lambda m: mov.add_ia3(m), 540_672),
    "mov10": (lambda m: mov.add_mov(m, 10), 7_956_480),
    "mov30": (lambda m: mov.add_mov(m, 30), 23_869_440),
    "lora_r4": (lambda m: molora.add_lora(m, rank=4), 7_471_104),
    "molora15_r4": (lambda m: molora.add_molora(m, 15, rank=4), 126_074_880),
}


def count_trainable(model):
    """Number of parameters that an optimizer would update (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ours_xl():
    import t5
    return t5.T5(t5.T5Config.preset("xl"))


def hf_xl():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu"))


@pytest.mark.parametrize("kind,build", [("ours", ours_xl), ("hf", hf_xl)])
@pytest.mark.parametrize("method", EXPECTED)
def test_xl_trainable_counts_match_reference(method, kind, build):
    """add_* on T5-xl (ours and HF's, meta device) trains exactly the count of the original's shapes."""
    with torch.device("meta"):
        model = build()
    add, expected = EXPECTED[method]
    assert count_trainable(add(model)) == expected
