"""The training loss, as T5X computes it for the original's runs (`scripts/*_train.sh`:
LOSS_NORMALIZING_FACTOR = AVERAGE_PER_SEQUENCE; `configs/t5/models/t5_1_1_*.gin`: Z_LOSS = 1e-4): t5x/losses.py
`compute_weighted_cross_entropy` and `get_loss_normalizing_factor_and_weights`, on packed rows. train.py adds the
optional router load-balancing term (routing.Monitor) on top.

    loss, ce, z = losses.loss_fn(logits, batch, z_loss=1e-4)     # batch: the packed arrays of packing.py, as tensors
    logits = model(**losses.model_inputs(batch))
"""
import torch


def loss_fn(logits: torch.Tensor, batch: dict, z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5X's weighted cross-entropy with LOSS_NORMALIZING_FACTOR = AVERAGE_PER_SEQUENCE, plus z-loss.

    Each example (a segment of a packed row) gets its token losses averaged over its own target tokens; the batch
    loss is the mean over examples. z-loss = z * logsumexp(logits)^2 per token, weighted the same way (t5x/losses.py).
    Returns (loss, cross-entropy part, z-loss part). Static shapes throughout (scatter/gather, no masking by index).
    """
    logits = logits.float()                                                   # [B, T, V]
    targets = batch["decoder_target_tokens"].long()                          # [B, T]
    segments = batch["decoder_segment_ids"].long()                           # [B, T], 0 = padding
    weights = batch["decoder_loss_weights"].float()                          # [B, T]
    log_z = torch.logsumexp(logits, dim=-1)                                  # [B, T]
    ce = log_z - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)        # [B, T]
    zl = z_loss * log_z.square()                                             # [B, T]
    # Sum of weights of each token's segment: scatter per (row, segment), gather back to the tokens.
    per_segment = torch.zeros(segments.shape[0], segments.shape[1] + 1, device=weights.device)
    per_segment = per_segment.scatter_add(1, segments, weights)              # [B, T+1]
    norm = per_segment.gather(1, segments)                                   # [B, T]
    w = torch.where(norm > 0, weights / norm.clamp_min(1e-9), torch.zeros_like(weights))
    examples = w.sum().clamp_min(1.0)                                        # = number of examples with targets
    ce_part, z_part = (ce * w).sum() / examples, (zl * w).sum() / examples
    return ce_part + z_part, ce_part, z_part


def model_inputs(batch: dict) -> dict:
    return dict(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                encoder_segment_ids=batch["encoder_segment_ids"], decoder_segment_ids=batch["decoder_segment_ids"])
