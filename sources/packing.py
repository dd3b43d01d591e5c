"""seqio's trimming and packing of encoder-decoder examples, and the feature names T5X trains on.

Reproduces google/seqio's `trim_and_pack_dataset` (`seqio/utils.py`, the `_pack_with_tf_ops` path) followed by
`EncDecFeatureConverter` (`seqio/feature_converters.py`), the converter T5X's encoder-decoder model declares
(google-research/t5x, `t5x/models.py`: `EncoderDecoderModel.FEATURE_CONVERTER_CLS`) and its trainer applies.
The original run (for-ai/parameter-efficient-moe, `scripts/mov_train.sh`) sets `TASK_FEATURE_LENGTHS =
{'inputs': 1024, 'targets': 256}` and `PACKING = True`; Zadouri et al. 2023 ("Pushing Mixture of Experts to the
Limit", arXiv 2309.05444, section 3) train with these lengths. Examples are trimmed to the lengths keeping their
first tokens, then packed greedily in order into rows, each example a segment with its own positions.

Deliberate deviations from seqio (none changes what an example contains):
- Segment ids number the examples of a row 1, 2, ...; seqio derives them from position-0 markers, which gives the
  same numbers except when an example has an empty input (seqio then numbers the encoder and decoder differently).
- Truncation is seqio's: the first 1024 / 256 tokens are kept, so a truncated target loses its EOS (counted in
  `data.Mixture`'s `stats["truncated_targets"]`); there is no option to re-append it because the original does not.
"""
import numpy as np

from sources.tokenizer import PAD

FIELDS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_target_tokens",
          "decoder_input_tokens", "decoder_loss_weights", "decoder_segment_ids", "decoder_positions")


class Packer:
    """seqio's greedy in-order packing (utils._pack_with_tf_ops), fed one trimmed example at a time.

    A row is flushed when the next example would overflow the inputs or the targets length. seqio packs inside
    `padded_batch(max(lengths))` chunks and flushes the partial row at the end of each chunk; `chunk` mirrors it."""

    def __init__(self, input_length, target_length, chunk=None):
        self.lengths = (input_length, target_length)
        self.chunk = chunk or max(input_length, target_length)
        self.row, self.used, self.seen = [], [0, 0], 0

    def add(self, inputs, targets):
        """Append one example; returns the rows it completed (zero, one or two)."""
        done = []
        if self.row and (self.used[0] + len(inputs) > self.lengths[0] or
                         self.used[1] + len(targets) > self.lengths[1]):
            done.append(self._flush())
        self.row.append([list(inputs), list(targets)])
        self.used = [self.used[0] + len(inputs), self.used[1] + len(targets)]
        self.seen += 1
        if self.seen == self.chunk:
            done.append(self._flush())
            self.seen = 0
        return done

    def finish(self):
        return [self._flush()] if self.row else []

    def _flush(self):
        row, self.row, self.used = self.row, [], [0, 0]
        return row


def rows_to_arrays(rows, input_length, target_length):
    """Rows (lists of [inputs, targets]) -> seqio's EncDecFeatureConverter fields, int32 [rows, length]."""
    n = len(rows)
    out = {k: np.zeros((n, input_length if k.startswith("encoder") else target_length), np.int32) for k in FIELDS}
    for r, row in enumerate(rows):
        e = d = 0
        for segment, (inputs, targets) in enumerate(row, start=1):
            li, lt = len(inputs), len(targets)
            out["encoder_input_tokens"][r, e:e + li] = inputs
            out["encoder_segment_ids"][r, e:e + li] = segment
            out["encoder_positions"][r, e:e + li] = np.arange(li)
            out["decoder_target_tokens"][r, d:d + lt] = targets
            # decoder input = targets shifted right within the segment, 0 at its first position
            out["decoder_input_tokens"][r, d + 1:d + lt] = targets[:-1]
            out["decoder_segment_ids"][r, d:d + lt] = segment
            out["decoder_positions"][r, d:d + lt] = np.arange(lt)
            e, d = e + li, d + lt
    out["decoder_loss_weights"] = (out["decoder_target_tokens"] != PAD).astype(np.int32)
    return out


def pack_examples(examples, input_length, target_length, pack=True):
    """Trim (keep the first tokens) and pack {"inputs", "targets"} id lists as seqio does; pack=False pads one
    example per row (segment ids 1 on tokens, 0 on padding). Returns FIELDS -> int32 [rows, length]."""
    packer, rows = Packer(input_length, target_length), []
    for ex in examples:
        inputs, targets = list(ex["inputs"])[:input_length], list(ex["targets"])[:target_length]
        rows += packer.add(inputs, targets) if pack else [[[inputs, targets]]]
    return rows_to_arrays(rows + packer.finish(), input_length, target_length)
