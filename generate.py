"""Ask a trained model: greedy answers to typed instructions, ranked answer choices, and the experts a prompt uses.

Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444) instruction-tune T5 with MoV /
MoLORA on P3's prompted tasks and find that the router sends each task's tokens to its own experts although it never
sees a task id (section 5, Figure 5). This script puts that in a user's hands: type an instruction the way P3's
templates phrase theirs, read the answer, and see which experts it routes to.

    python generate.py --run runs/demo-mov-30 "Someone said: the movie was fun. Is the feeling positive or negative?"
    python generate.py --run runs/mov-30 --choices "yes,no" "Is this review positive? Review: ..."   # ranked
    python generate.py --model xl --input-file prompts.txt > answers.jsonl       # the backbone alone, JSONL out
    python generate.py --run runs/demo-mov-30 --routing "prompt one" "prompt two"  # one routing table per prompt

Answers are decoded greedily (t5.T5.generate: the most probable token at each step, up to EOS or
--max-new-tokens), as T0's released inference examples decode (bigscience-workshop/t-zero
`inference/model_parallelism.py`: transformers' `generate()` with its defaults, greedy). T0's and this paper's
evaluation scores held-out tasks by rank classification instead (t-zero `evaluation/run_eval.py` and `t0/model.py`:
argmax of the summed log-probability of each answer choice): `--choices` does that, with evaluate.py's scoring.
T5X's own inference default is a beam search of width one with length penalty 0.6 (`t5x/models.py`
EncoderDecoderModel, `t5x/decoding.py` beam_search), which can differ from greedy where an early EOS loses to a
longer answer.
"""
if __name__ == "__main__":  # before the imports below: Ctrl-C while torch loads ends with one line
    from runner import cli
    cli.catch_early_interrupt()

import contextlib
import json
import os
import re
import sys

import numpy as np
import torch

import data
import evaluate
import routing
from runner import build, cli, rundir
from sources import demo
from sources.tokenizer import EOS, UNK, Tokenizer


# ----------------------------------------------------------------------------------------------- vocabulary
def vocab_file(args):
    """The spiece.model for the chosen model: --vocab; the demo's for a run on the demo data; the model directory's
    or a run's local data directory's; the demo's for the random tiny model; the hub repository's. ValueError says
    where it looked."""
    if args.vocab is not None:
        path = os.path.join(args.vocab, "spiece.model") if os.path.isdir(args.vocab) else args.vocab
        if not os.path.isfile(path):
            raise ValueError(f"--vocab {args.vocab}: no such file; pass a T5 spiece.model (or its directory)")
        return path
    saved = rundir.settings_at(rundir.read_config(args.run)) if args.run is not None else {}
    model, source = saved.get("model", args.model), saved.get("data")
    if not isinstance(model, str):
        raise rundir.RunDirError(f"{os.path.join(args.run, 'config.json')} names no model; it was not written by "
                                 "this train.py. Pass --model and --adapter instead of --run")
    if source == "demo":
        return os.path.join(demo.demo_dir(), "spiece.model")
    name = build.hub_name(model)
    looked = [os.path.join(d, "spiece.model") for d in (name, source) if isinstance(d, str) and os.path.isdir(d)]
    for path in looked:
        if os.path.isfile(path):
            return path
    if model == "tiny":  # the random tiny model trained on data without its own vocabulary: the demo's
        return os.path.join(demo.demo_dir(), "spiece.model")
    if not os.path.isdir(name):
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(name, "spiece.model")
        except Exception as e:  # offline, no such repository, or one without spiece.model
            looked.append(f"the hub repository {name} ({type(e).__name__}; not a local directory either)")
    raise ValueError(f"no vocabulary found (spiece.model): looked at {' and '.join(looked)}; pass --vocab PATH "
                     "(the model's spiece.model)")


def text(tok, ids):
    """The text of generated ids; ids past the vocabulary (the model's embedding table is padded beyond it, e.g.
    32128 rows for 32100 ids) read as <unk>."""
    return tok.decode([t if t < tok.vocab_size else UNK for t in ids])


# ----------------------------------------------------------------------------------------------- answers
def _sentence_embeddings(model, texts):
    """[n, D] embeddings of the prompts for sentence-routed MoV models (data.SentenceEmbedder), else None."""
    if not routing.sentence_routed(model):
        return None
    return np.asarray(data.SentenceEmbedder()(texts), np.float32)


def greedy(model, inputs, max_new_tokens=32, batch_size=16, input_length=1024, device=None,
           sentence_embeddings=None):
    """Greedy answers (t5.T5.generate) to token-id prompts: one list of ids each, up to and including the first EOS.

    Batches of min(batch_size, n) rows, inputs padded to a power-of-two length (at most input_length; longer inputs
    keep their first tokens); the last batch is filled with one-token dummy rows, so every batch has one shape.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = min(batch_size, len(inputs))
    length = evaluate.padded_length(max(len(x) for x in inputs), input_length)
    was_training, answers = model.training, []
    model.eval()
    try:
        for start in range(0, len(inputs), rows):
            chunk = [x[:length] for x in inputs[start:start + rows]]
            ids = torch.zeros(rows, length, dtype=torch.long)
            mask = torch.zeros(rows, length, dtype=torch.long)
            ids[:, 0], mask[:, 0] = EOS, 1  # dummy rows: one real token (a row without any would be NaN)
            for i, x in enumerate(chunk):
                ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
            route = contextlib.nullcontext()
            if sentence_embeddings is not None:
                emb = torch.zeros(rows, sentence_embeddings.shape[1])
                emb[:len(chunk)] = torch.as_tensor(sentence_embeddings[start:start + len(chunk)])
                route = routing.sentence_routing(model, emb.to(device))
            with route:
                out = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens).cpu()
            for row in out[:len(chunk)].tolist():
                answers.append(row[:row.index(EOS) + 1] if EOS in row else row)
    finally:
        model.train(was_training)
    return answers


# ----------------------------------------------------------------------------------------------- routing table
def site_kind(name):
    """('decoder ffn', 1) for decoder.block.1.layer.2.DenseReluDense.act; ('encoder self-attn k', 0) etc."""
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.(.+)", name)
    if m is None:
        return name, None
    rest = m.group(3).replace("DenseReluDense.act", "ffn").replace("DenseReluDense.", "ffn ")
    rest = rest.replace("EncDecAttention.", "cross-attn ").replace("SelfAttention.", "self-attn ")
    return f"{m.group(1)} {rest}", int(m.group(2))


def routing_rows(routed, index):
    """{row label: mean probability per expert [E]} of prompt `index`: the sites of one kind pooled over their
    tokens (score_and_route's {site: (sums [n, E], counts [n])})."""
    groups = {}
    for site, (sums, counts) in routed.items():
        kind, block = site_kind(site)
        g = groups.setdefault(kind, [[], np.zeros_like(sums[index], dtype=np.float64), 0.0])
        g[0].append(block)
        g[1] += sums[index]
        g[2] += float(counts[index])
    rows = {}
    for kind, (blocks, total, tokens) in groups.items():
        blocks = sorted(b for b in blocks if b is not None)
        where = "" if not blocks else f" (block {blocks[0]})" if len(blocks) == 1 else \
            f" (blocks {blocks[0]}-{blocks[-1]})" if blocks == list(range(blocks[0], blocks[-1] + 1)) else \
            f" (blocks {','.join(map(str, blocks))})"
        rows[kind + where] = (total / max(tokens, 1.0)).tolist()
    return rows


def format_routing(rows):
    """A text table: one row per site kind, one column per expert (mean probability in %), then the top 3."""
    header = "routing, % per expert"
    width = max(len(header), *(len(k) for k in rows))
    num_experts = len(next(iter(rows.values())))
    lines = [f"{header:<{width}} " + " ".join(f"{'e' + str(e):>4}" for e in range(num_experts))
             + "  top 3"]
    for label, probs in rows.items():
        top = np.argsort(-np.asarray(probs), kind="stable")[:3]
        lines.append(f"{label:<{width}} " + " ".join(f"{100 * p:4.1f}" for p in probs) + "  "
                     + ", ".join(f"e{e} {100 * probs[e]:.1f}" for e in top))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the demo's end
def show_demo_answers(model, cfg, device, autocast, count=2):
    """Print `count` held-out demo prompts (the first example of the first template of each of the first `count`
    held-out datasets), the model's greedy answer and the expected one: what train.py's demo ends with, at the
    run's precision (`autocast`: bf16 autocast or float32)."""
    sets = data.load_eval("demo", max_examples=1)
    items = [next(iter(templates.values()))[0] for templates in list(sets.values())[:count]]
    tok = Tokenizer(os.path.join(demo.demo_dir(), "spiece.model"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        answers = greedy(model, [it["inputs"] for it in items], max_new_tokens=8, input_length=cfg.input_length,
                         device=device, sentence_embeddings=_sentence_embeddings(model, [it["text"] for it in items]))
    print("Held-out prompts, answered greedily (python generate.py --run " + cfg.out + " \"...\"):")
    for it, answer in zip(items, answers):
        expected = repr(tok.decode(it["choices"][it["label"]])) if it["label"] is not None else "(none marked)"
        print(f"  {it['text']}\n    answer: {text(tok, answer)!r}   expected: {expected}")


# ----------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                           formatter_class=evaluate.HelpFormatter)
    p.add_argument("prompts", nargs="*", help="instructions to answer, each one argument (default: none; give "
                   "prompts or --input-file)")
    evaluate.add_model_flags(p)
    p.add_argument("--input-file", default=None, help="a text file with one prompt per line (- for stdin); the "
                   "answers are written to stdout as JSON lines: prompt, answer, tokens (default: none)")
    p.add_argument("--vocab", default=None, help="the spiece.model to read and write text with (default: the "
                   "demo's for demo runs and --model tiny, else the model directory's or hub repository's)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (greedy decoding)")
    p.add_argument("--choices", default=None, help="comma-separated answers to rank instead of generating: each "
                   "one's summed token log-probability, EOS included (evaluate.py's rank classification) "
                   "(default: none, generate)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    p.add_argument("--input-length", type=int, default=1024, help="longest prompt; longer ones keep their first "
                   "tokens")
    p.add_argument("--routing", action="store_true", help="print each prompt's mean routing probability per "
                   "expert at --routing-sites: at encoder sites (and decoder cross-attention K/V) over the prompt's "
                   "tokens, at other decoder sites over the generated answer's tokens, EOS included (with --choices: "
                   "over every choice's tokens); sites of one kind "
                   "(e.g. all decoder FFNs) are pooled into one row")
    p.add_argument("--routing-sites", default=None, help="comma-separated module names of routed layers, or all "
                   "(default: the last decoder block's FFN activation, as evaluate.py --routing)")
    args = p.parse_args(argv)
    evaluate.check_model_flags(args)
    evaluate.positive(args, ("step", "threads", "max_new_tokens", "batch_size", "input_length"))
    if args.routing_sites is not None and not args.routing:
        raise ValueError("--routing-sites needs --routing")
    return args


def read_prompts(args):
    """The prompts of the command line or of --input-file; ValueError for none, both, or an empty one."""
    if args.prompts and args.input_file:
        raise ValueError("give prompts as arguments or --input-file, not both")
    if args.input_file is not None:
        try:
            f = sys.stdin.buffer if args.input_file == "-" else open(args.input_file, "rb")
            with f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"--input-file {args.input_file}: {e.strerror}; pass a text file, one prompt a line")
        where = f"--input-file {args.input_file} line"
        prompts = []
        for number, line in enumerate(raw.split(b"\n"), 1):  # bytes: a bad line is named by its number
            try:
                prompts.append(line.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{where} {number} is not UTF-8 text (byte {line[e.start]:#04x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
        while prompts and not prompts[-1]:  # trailing blank lines (an editor's final newline) are no prompts
            prompts.pop()
    else:
        prompts, where = args.prompts, "prompt"
    if not prompts:
        raise ValueError("no prompt: give the instruction as an argument (in quotes) or --input-file FILE")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"{where} {i + 1} is empty; each prompt needs some text")
    return prompts


def main(argv=None, out=None):
    """Command line entry point; returns one dict per prompt: prompt, answer, tokens (+ scores, routing)."""
    args, out = parse_args(argv), out or sys.stdout
    prompts = read_prompts(args)
    device = build.resolve_device(args.device)
    model, _ = evaluate.load_model(args, device)  # first: a missing model is the first thing to fix
    build.use_cpu_threads(model, device, args.threads)  # generate.py's stdout is the answers: no line
    tok = Tokenizer(vocab_file(args))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the vocabulary has {tok.vocab_size} ids, the model {model.config.vocab_size}: it is not "
                         "this model's; pass --vocab with the model's spiece.model")
    inputs = [tok.encode(p) for p in prompts]
    for i, x in enumerate(inputs):
        if len(x) > args.input_length:
            print(f"note: prompt {i + 1} has {len(x)} tokens; its first {args.input_length} are read "
                  "(--input-length)", file=sys.stderr)
    emb = _sentence_embeddings(model, prompts)
    sites = ()
    if args.routing:
        if args.routing_sites == "all":
            sites = tuple(routing.routed_layers(model))
        else:
            sites = tuple(args.routing_sites.split(",")) if args.routing_sites else routing.default_sites(model)
        if not sites:
            raise ValueError("--routing-sites all: this model has no routed layers (no MoV / MoLORA experts)")
        routing.routed_layers(model, sites)  # a wrong site name fails before any work
    choices = [c.strip() for c in args.choices.split(",")] if args.choices is not None else None
    if choices is not None and (not all(choices) or len(set(choices)) < len(choices)):
        raise ValueError(f"--choices {args.choices!r} has an empty or repeated choice; give distinct "
                         "comma-separated answers")
    length = evaluate.padded_length(max(len(x) for x in inputs), args.input_length)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=build.autocast_enabled(args.dtype, device)):
        if choices is not None:
            targets = [[tok.encode(c) + [EOS] for c in choices]] * len(inputs)
        else:
            answers = greedy(model, inputs, args.max_new_tokens, args.batch_size, args.input_length, device, emb)
            targets = [[a] for a in answers]
        scores, routed = [None] * len(inputs), {}
        if choices is not None or sites:
            scores, routed = evaluate.score_and_route(
                model, [x[:length] for x in inputs], targets, batch_size=args.batch_size, input_length=length,
                target_length=evaluate.padded_length(max(len(t) for ts in targets for t in ts), 1 << 30), device=device,
                sentence_embeddings=emb, routing_sites=sites)
    results = []
    for i, prompt in enumerate(prompts):
        best = evaluate.predict(scores[i]) if choices is not None else 0
        r = {"prompt": prompt, "answer": text(tok, targets[i][best]), "tokens": targets[i][best]}
        if choices is not None:
            r["scores"] = {c: float(s) for c, s in zip(choices, scores[i])}
        if sites:
            r["routing"] = routing_rows(routed, i)
        results.append(r)
        if args.input_file is not None:
            print(json.dumps(r, ensure_ascii=False), file=out)
            continue
        lines = [f"prompt: {prompt}"] if len(prompts) > 1 else []
        lines += [f"score {c!r}: {s:.4f}" for c, s in r.get("scores", {}).items()]
        lines += [f"answer: {r['answer']}"] + ([format_routing(r["routing"])] if sites else [])
        print("\n".join(lines) + ("\n" if i + 1 < len(prompts) else ""), file=out)
    return results


if __name__ == "__main__":
    sys.exit(cli.run(main, interrupted="error: interrupted"))
