"""T5's SentencePiece vocabulary with seqio's 100 extra ids: the ids every example of the data pipeline is made of.

Reproduces seqio's `SentencePieceVocabulary` (google/seqio, `seqio/vocabularies.py`) as the original code uses it:
for-ai/parameter-efficient-moe (`t0_data/tasks.py`, taken from bigscience-workshop/t-zero's
`t0/seqio_tasks/tasks.py`) tokenizes with `t5.data.get_default_vocabulary()`, T5's SentencePiece model plus 100
extra ids, with no EOS on `inputs` and EOS (id 1) appended to `targets`. The paper (Zadouri et al. 2023, "Pushing
Mixture of Experts to the Limit", arXiv 2309.05444, section 3) fine-tunes T5 v1.1 + LM adaptation, whose vocabulary
this is. P3 (`bigscience/P3`) already holds these ids; the tokenizer is needed only for configs that hold text
alone, for decoding, and for the offline demo (which ships its own spiece.model).
"""
import os
import re

PAD, EOS, UNK = 0, 1, 2
NUM_EXTRA_IDS = 100


class Tokenizer:
    """T5's SentencePiece vocabulary: pad 0, eos 1, unk 2, then `<extra_id_i>` = sp_size + 99 - i (as seqio and HF
    T5 number them: <extra_id_0> is the last id). `encode` appends no EOS; `decode` stops at the first EOS."""

    _SENTINEL = re.compile(r"<extra_id_(\d+)>")

    def __init__(self, model_file, extra_ids=NUM_EXTRA_IDS):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        specials = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if specials != (PAD, EOS, UNK):
            raise ValueError(f"{model_file}: T5 needs pad/eos/unk ids (0, 1, 2), the model has {specials}")
        self.sp_size, self.extra_ids = self.sp.get_piece_size(), extra_ids
        self.vocab_size = self.sp_size + extra_ids

    @classmethod
    def from_pretrained(cls, name_or_dir, filename="spiece.model"):
        """From a model directory or a hub repo holding `spiece.model` (as HF T5 repos ship it)."""
        path = os.path.join(name_or_dir, filename)
        if os.path.isdir(name_or_dir):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name_or_dir} has no {filename}; pass the directory of a T5 model")
            return cls(path)
        from huggingface_hub import hf_hub_download
        return cls(hf_hub_download(name_or_dir, filename))

    def encode(self, text):
        ids, start = [], 0
        for m in self._SENTINEL.finditer(text):
            if int(m.group(1)) >= self.extra_ids:
                raise ValueError(f"{m.group(0)} is beyond the {self.extra_ids} extra ids of this vocabulary")
            ids += self.sp.encode(text[start:m.start()]) if m.start() > start else []
            ids.append(self.sp_size + self.extra_ids - 1 - int(m.group(1)))
            start = m.end()
        return ids + (self.sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids):
        parts, run = [], []
        for t in (int(t) for t in ids):
            if t == EOS:
                break
            if t >= self.sp_size:
                parts += [self.sp.decode(run), f"<extra_id_{self.sp_size + self.extra_ids - 1 - t}>"]
                run = []
            elif t != PAD:
                run.append(t)
        return "".join(parts + [self.sp.decode(run)])
