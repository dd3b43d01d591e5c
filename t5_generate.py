"""Greedy decoding for t5.T5 (`T5.generate` calls `greedy`): fixed shapes and no host sync, so it traces on XLA.

It re-runs the full-length decoder at each step instead of keeping a KV cache: the same tokens as HF's
generate(do_sample=False, num_beams=1), O(n^2) work, one compiled graph. Imports torch only.
"""
import torch


@torch.no_grad()
def greedy(model, input_ids, attention_mask=None, max_new_tokens=32):
    """[b, L] ids -> [b, max_new_tokens] greedy ids, pad_token_id after each row's EOS."""
    c, b = model.config, input_ids.shape[0]
    encoder_hidden = model.encode(input_ids, attention_mask)
    # column 0 = decoder start; step t writes column t + 1. The causal mask hides the not-yet-written columns,
    # so the full-length re-run at step t gives the same logits at position t as a growing prefix would.
    ids = torch.full((b, max_new_tokens + 1), c.pad_token_id, dtype=torch.long, device=input_ids.device)
    ids[:, 0] = c.decoder_start_token_id
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for t in range(max_new_tokens):
        next_id = model.decode(ids[:, :-1], encoder_hidden, attention_mask)[:, t].argmax(-1)  # [b]
        next_id = torch.where(done, c.pad_token_id, next_id)
        ids[:, t + 1] = next_id
        done = done | (next_id == c.eos_token_id)
    return ids[:, 1:]
