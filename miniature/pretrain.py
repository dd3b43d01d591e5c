"""The backbone, pretrained here: a SentencePiece vocabulary, then T5 v1.1 with span corruption and an LM adaptation.

Mirrors how google/t5-*-lm-adapt were made (Raffel et al. 2020; Lester et al. 2021), the backbone the paper adapts
(Zadouri et al. 2023, section 3), at the scale of the world:
  1. vocabulary: SentencePiece BPE trained on corpus documents plus the task templates' text (pad / eos / unk =
     0 / 1 / 2, then seqio's 100 extra ids on top, as T5's);
  2. T5 v1.1 shape (t5.py: gated-GELU, untied head, no dropout in pretraining as T5.1.1), Adafactor (adafactor.py)
     at a constant 1e-2 (T5's inverse-square-root schedule is constant over its first 10k steps);
  3. span corruption (spans.py: seqio's noise mask, density 0.15, mean span 3, sentinels) for the first
     `span_fraction` of the steps, then the prefix-LM objective (LM adaptation) for the rest;
  4. written as a Hugging Face-layout directory (config.json, model.safetensors, spiece.model) that
     `train.py --model DIR` / `evaluate.py --model DIR` load through t5_weights.py.
Every batch is drawn from a seed derived from (seed, step), so a run resumes exactly from its newest checkpoint.
Reported before any method is tuned: a knowledge probe (cloze facts: the true value ranked against the relation's
other values by the backbone's prefix-LM score; chance 1/6) and the held-out-story loss against a unigram model's.
"""
import io
import json
import math
import os
import random
import time

import numpy as np
import torch

from . import corpus, spans
from .project import EOS, PAD, UNK, Tokenizer

import adafactor  # noqa: E402  (project root, on sys.path through .project)
import t5  # noqa: E402

EXTRA_IDS = 100


# ----------------------------------------------------------------------------------------------- vocabulary
def train_vocabulary(world, extra_text, path, vocab_size=1024, seed=0, docs=6000):
    """spiece.model at `path`: BPE on `docs` corpus documents plus `extra_text` (the templates' text)."""
    import sentencepiece as spm
    stream = corpus.documents(world, seed + 77)
    lines = [next(stream) for _ in range(docs)] + list(extra_text)
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
                                   hard_vocab_limit=False, num_threads=1, character_coverage=1.0, minloglevel=2,
                                   max_sentence_length=4096)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------- model
def model_config(vocab_size, d_model=256, d_ff=640, layers=4, heads=4, d_kv=64):
    return t5.T5Config(vocab_size, d_model, d_kv, d_ff, layers, layers, heads, dropout_rate=0.0)


def hf_config(cfg):
    """config.json in Hugging Face's T5 naming (t5_weights.read_config reads it back)."""
    return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance, "dropout_rate": 0.1,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": "gated-gelu",
            "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False,
            "scale_decoder_outputs": False, "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": 0}


def export(model, tok_path, out_dir):
    """Write the backbone in Hugging Face layout, atomically (temporary directory, then rename)."""
    from safetensors.torch import save_file
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(model.config), f, indent=1)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(tmp, "model.safetensors"))
    with open(tok_path, "rb") as src, open(os.path.join(tmp, "spiece.model"), "wb") as dst:
        dst.write(src.read())
    if os.path.isdir(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


# ----------------------------------------------------------------------------------------------- batches
def _rows(world, tok, seed, step, n_rows, length):
    """n_rows chunks of `length` tokens cut from documents drawn for this step only."""
    rng = random.Random(seed * 1_000_003 + step)
    ids = []
    while len(ids) < n_rows * length:
        ids += tok.encode(corpus.document(world, rng))
    return [ids[i * length:(i + 1) * length] for i in range(n_rows)]


def make_batch(world, tok, seed, step, batch_size, objective, input_length, target_length):
    """int64 tensors (inputs, input mask, decoder inputs, targets, target mask) for one step."""
    rng = np.random.default_rng([seed, step])
    pairs = []
    if objective == "span":
        for row in _rows(world, tok, seed, step, batch_size, spans.raw_length(input_length)):
            pairs.append(spans.span_corruption(row, tok.vocab_size, rng))
    else:
        for row in _rows(world, tok, seed, step, batch_size, input_length + target_length - 1):
            pairs.append(spans.prefix_lm(row, rng, min_prefix=8, max_prefix=input_length))
    return pad_pairs(pairs, input_length, target_length)


def pad_pairs(pairs, input_length, target_length):
    b = len(pairs)
    x = torch.zeros(b, input_length, dtype=torch.long)
    y = torch.zeros(b, target_length, dtype=torch.long)
    for i, (inp, tgt) in enumerate(pairs):
        inp, tgt = inp[:input_length], tgt[:target_length]
        x[i, :len(inp)] = torch.tensor(inp)
        y[i, :len(tgt)] = torch.tensor(tgt)
    dec = torch.zeros_like(y)
    dec[:, 1:] = y[:, :-1]
    return x, (x != 0).long(), dec, y, (y != 0).float()


def loss_of(model, batch, z_loss=1e-4):
    x, xm, dec, y, ym = batch
    logits = model(x, dec, attention_mask=xm, decoder_attention_mask=(y != 0).long())
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ce = (nll * ym).sum() / ym.sum()
    z = (logits.float().logsumexp(-1) ** 2 * ym).sum() / ym.sum()
    return ce, ce + z_loss * z


# ----------------------------------------------------------------------------------------------- gates
PROBE_RELATIONS = {  # relation -> three (prefix, continuation) phrasings the corpus uses, the value at the end
    "color": [("The color of the {s} is", " {v}."), ("A {s} is always", " {v}."), ("Every {s} you see is", " {v}.")],
    "place": [("You can find the {s} at the", " {v}."), ("The {s} is found at the", " {v}."),
              ("The {s} stays at the", " {v}.")],
    "kind": [("The {s} is one of the", " {v} kinds."), ("Every {s} is a", " {v}."), ("A {s} is a kind of", " {v}.")],
    "job": [("{s} works as a", " {v}."), ("By trade, {s} is a", " {v}."), ("{s} has a job as a", " {v}.")],
    "town": [("{s} comes from", " {v}."), ("{s} lives in", " {v}."), ("{s} has a house in", " {v}.")],
}


def probe_items(world):
    """(relation, [(prefix, [continuations])] per phrasing, label) per cloze fact: the true value against the
    relation's other values; a value's score is its summed log-probability over the three phrasings."""
    from .world import COLORS, JOBS, KINDS, PLACES, TOWNS
    values = {"color": COLORS, "place": PLACES, "kind": sorted(KINDS), "job": JOBS, "town": TOWNS}
    items = []
    for rel, phrasings in PROBE_RELATIONS.items():
        subjects = world.thing_names() if rel in ("color", "place", "kind") else world.person_names()
        for s in subjects:
            obj = world.things[s] if s in world.things else world.people[s]
            true = getattr(obj, rel)
            items.append((rel, [(pre.format(s=s), [cont.format(v=v) for v in values[rel]]) for pre, cont in phrasings],
                          values[rel].index(true)))
    return items


@torch.no_grad()
def score(model, tok, prefix_texts, choice_lists, batch=64):
    """Summed log-probability of each continuation (EOS included) given its prefix, as evaluate.py ranks."""
    out = []
    model.eval()
    for i in range(0, len(prefix_texts), batch):
        pairs, owner = [], []
        for j, (pre, chs) in enumerate(zip(prefix_texts[i:i + batch], choice_lists[i:i + batch])):
            for c in chs:
                pairs.append((tok.encode(pre), tok.encode(c) + [EOS]))
                owner.append(j)
        L = max(len(p) for p, _ in pairs)
        T = max(len(t) for _, t in pairs)
        x, xm, dec, y, ym = pad_pairs(pairs, L, T)
        logits = model(x, dec, attention_mask=xm)
        lp = logits.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        s = (lp * ym).sum(-1).tolist()
        k = 0
        for chs in choice_lists[i:i + batch]:
            out.append(s[k:k + len(chs)])
            k += len(chs)
    return out


def knowledge_probe(model, tok, world):
    items = probe_items(world)
    flat = [ph for _, phs, _ in items for ph in phs]
    scores = score(model, tok, [p for p, _ in flat], [c for _, c in flat])
    hits, by_rel, k = [], {}, 0
    for rel, phs, lab in items:
        total = np.sum(scores[k:k + len(phs)], axis=0)
        k += len(phs)
        hits.append(int(np.argmax(total)) == lab)
        by_rel.setdefault(rel, []).append(hits[-1])
    return {"accuracy": float(np.mean(hits)), "items": len(items), "chance": 1 / 6, "phrasings": 3,
            "by_relation": {r: float(np.mean(v)) for r, v in by_rel.items()}}


@torch.no_grad()
def story_loss(model, tok, world, train_seed, n=200):
    """Mean per-token NLL (nats) of held-out stories' second halves given their first halves, and a unigram
    model's on the same tokens (unigram counts from training documents, add-one smoothed)."""
    stories = corpus.held_out_stories(world, n)
    pairs = []
    for s in stories:
        ids = tok.encode(s)
        cut = len(ids) // 2
        pairs.append((ids[:cut], ids[cut:] + [EOS]))
    counts = np.ones(tok.vocab_size)
    stream = corpus.documents(world, train_seed + 5)
    for _ in range(3000):
        for t in tok.encode(next(stream)):
            counts[t] += 1
    counts[EOS] += 3000
    logq = np.log(counts / counts.sum())
    uni = float(np.mean([-logq[t] for _, tgt in pairs for t in tgt]))
    model.eval()
    tot, ntok = 0.0, 0
    for i in range(0, len(pairs), 32):
        chunk = pairs[i:i + 32]
        batch = pad_pairs(chunk, max(len(p) for p, _ in chunk), max(len(t) for _, t in chunk))
        ce, _ = loss_of(model, batch)
        k = float(batch[4].sum())
        tot, ntok = tot + float(ce) * k, ntok + k
    return {"model_nats": tot / ntok, "unigram_nats": uni, "tokens": int(ntok)}


# ----------------------------------------------------------------------------------------------- training
def lr_at(step, steps, lr, decay_fraction):
    """Constant, then a linear decay to lr / 10 over the last decay_fraction of the steps."""
    start = steps * (1 - decay_fraction)
    return lr if step < start else lr * (1 - 0.9 * (step - start) / max(steps - start, 1))


def pretrain(world, out_dir, tok_path, steps, seed=0, batch_size=32, span_fraction=0.7, lr=1e-2, decay_fraction=0.0,
             input_length=128, target_length=32, lm_input=80, lm_target=64, size=None, save_every=100,
             log=print, progress=True):
    """Train (or resume) the backbone in `out_dir`/work, export it to `out_dir`/model; returns the gate report."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    tok = Tokenizer(tok_path)
    cfg = model_config(tok.vocab_size, **(size or {}))
    work = os.path.join(out_dir, "work")
    os.makedirs(work, exist_ok=True)
    model = t5.T5(cfg)
    # T5X initialises the logits layer with std d_model**-0.5 (variance scaling, fan-in); t5.py keeps HF's 1.0,
    # which makes the first logits ~16x too large for a model trained from scratch
    torch.nn.init.normal_(model.lm_head.weight, std=cfg.d_model ** -0.5)
    opt = adafactor.Adafactor(model.parameters(), lr=lr, step_offset=0)
    step, ck = 0, os.path.join(work, "checkpoint.pt")
    if os.path.exists(ck):
        state = torch.load(ck, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"resuming pretraining from step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    switch = int(round(steps * span_fraction))
    logf = open(os.path.join(work, "log.jsonl"), "a")
    bar = tqdm(total=steps, initial=step, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    t0, tokens = time.time(), 0
    while step < steps:
        objective = "span" if step < switch else "prefix"
        shape = (input_length, target_length) if objective == "span" else (lm_input, lm_target)
        batch = make_batch(world, tok, seed, step, batch_size, objective, *shape)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, decay_fraction)
        ce, total = loss_of(model, batch)
        ce = ce.detach()
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int(batch[1].sum() + batch[4].sum())
        if step % 10 == 0 or step == steps:
            rate = tokens / (time.time() - t0)
            bar.set_postfix(obj=objective, loss=f"{float(ce):.3f}", tok_s=f"{rate:,.0f}")
            logf.write(json.dumps({"step": step, "objective": objective, "loss": float(ce), "tok_s": rate,
                                   "time": time.time()}) + "\n")
            logf.flush()
        bar.update(1)
        if step % save_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, ck + ".tmp")
            os.replace(ck + ".tmp", ck)
    bar.close()
    logf.close()
    report = {"params": n_params, "steps": steps, "config": hf_config(cfg),
              "probe": knowledge_probe(model, tok, world), "story": story_loss(model, tok, world, seed)}
    export(model, tok_path, os.path.join(out_dir, "model"))
    with open(os.path.join(out_dir, "gates.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
