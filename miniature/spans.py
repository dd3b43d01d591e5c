"""T5's pretraining objectives on token ids: seqio's span corruption and the prefix LM of the LM adaptation.

- `random_spans_noise_mask` follows the definition of seqio / T5 (`t5.data.preprocessors.random_spans_noise_mask`,
  used by `span_corruption`): num_noise_tokens = round(length * noise_density), clipped to [1, length - 1];
  num_noise_spans = max(round(num_noise_tokens / mean_noise_span_length), 1); noise and non-noise tokens are each
  cut into that many non-empty spans, every segmentation equally likely; spans alternate, beginning with non-noise.
  round() halves to even, as tf.round. Written here from the definition (numpy, no TensorFlow).
- `span_corruption`: inputs keep the non-noise tokens and replace each noise span by one sentinel, targets hold
  each noise span after its sentinel (seqio's `noise_span_to_unique_sentinel` / `nonnoise_span_to_unique_sentinel`);
  sentinels are <extra_id_0>, <extra_id_1>, ... = vocab_size - 1, vocab_size - 2, ... (seqio's vocabularies).
- `prefix_lm`: a chunk cut at a random point; the prefix is the input, the rest the target (T5's `prefix_lm`,
  the objective of the LM adaptation of google/t5-*-lm-adapt; Lester et al. 2021).
Inputs carry no EOS (as P3 stores them and data.py feeds them), targets end with EOS.
"""
import numpy as np

EOS = 1


def random_spans_noise_mask(length, rng, noise_density=0.15, mean_noise_span_length=3.0):
    """bool [length]: True where a token is noise."""
    orig, length = length, max(length, 2)
    num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise

    def segment(n_items, n_segments):
        # choose n_segments - 1 cut points among the n_items - 1 gaps, uniformly: segment lengths, all >= 1
        cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False)) + 1 if n_segments > 1 else []
        bounds = np.concatenate([[0], cuts, [n_items]]).astype(int)
        return np.diff(bounds)

    noise_lens, keep_lens = segment(num_noise, num_spans), segment(num_nonnoise, num_spans)
    mask = np.zeros(length, bool)
    pos = 0
    for k, n in zip(keep_lens, noise_lens):
        pos += k
        mask[pos:pos + n] = True
        pos += n
    return mask[:orig]


def raw_length(input_length, noise_density=0.15, mean_noise_span_length=3.0):
    """The longest chunk whose corrupted inputs fit input_length (T5's random_spans_helper, without EOS)."""
    n = input_length
    while True:
        noise = int(np.clip(round((n + 1) * noise_density), 1, n))
        spans = max(int(round(noise / mean_noise_span_length)), 1)
        if (n + 1) - noise + spans > input_length:
            return n
        n += 1


def span_corruption(tokens, vocab_size, rng, noise_density=0.15, mean_noise_span_length=3.0):
    """(inputs, targets) id lists for one chunk: sentinels count down from vocab_size - 1; targets end with EOS."""
    tokens = list(tokens)
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    inputs, targets, sentinel, prev = [], [], vocab_size - 1, False
    for tok, noise in zip(tokens, mask):
        if noise and not prev:
            inputs.append(sentinel)
            targets.append(sentinel)
            sentinel -= 1
        (targets if noise else inputs).append(tok)
        prev = noise
    return inputs, targets + [EOS]


def prefix_lm(tokens, rng, min_prefix=16, max_prefix=None):
    """(inputs, targets) for one chunk cut at a uniform point in [min_prefix, max_prefix]; targets end with EOS."""
    tokens = list(tokens)
    hi = min(max_prefix or len(tokens) - 1, len(tokens) - 1)
    cut = int(rng.integers(min(min_prefix, hi), hi + 1))
    return tokens[:cut], tokens[cut:] + [EOS]
