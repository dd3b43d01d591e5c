"""Zero-shot evaluation by rank classification on T0's held-out tasks.

Reproduces the evaluation of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444,
section 3 and Table 1). The original runs `t5x.eval` on seqio's `t0_eval_score_eval` mixture
(for-ai/parameter-efficient-moe `scripts/*_eval.sh`; bigscience-workshop/t-zero `t0/seqio_tasks/tasks.py`; T5's
`rank_classification` in `t5/evaluation/metrics.py`), inputs 1024 / targets 256 tokens:

    score(choice) = sum of log p(target token) over the choice's tokens, EOS included, no length normalisation
    prediction    = argmax over the example's choices, ties to the first choice (np.argmax returns the first max)
    accuracy per template (P3 `*_score_eval` config); the table is runner/report.py's (median over templates)

Usage:
    python evaluate.py --run runs/mov-30 --compare paper       # a train.py run: newest checkpoint, its data source
    python evaluate.py --model xl                              # the backbone alone (google/t5-xl-lm-adapt)
    python evaluate.py --run runs/demo-mov-30 --routing        # + routing.csv / routing.png (routing.py)

Differences from the original, on purpose:
  - The encoder runs once per example and every choice is decoded against that one encoding (T5X's rank
    classification repeats the input once per choice); the scores are the same, the work smaller.
  - Inputs and choices are padded to per-template lengths rounded up to a power of two (at most --input-length /
    --target-length, whose defaults 1024 / 256 are the original's feature lengths), so XLA compiles a handful of
    shapes; the original pads everything to 1024 / 256. Scores do not depend on padding.
  - Routing analysis: per-task mean routing probability over real tokens; at decoder sites over the tokens of all
    choices of an example (the model reads every choice, whatever the label), at encoder sites over input tokens.
"""
if __name__ == "__main__":  # before the imports below: Ctrl-C while torch loads ends with one line
    from runner import cli
    cli.catch_early_interrupt()

import argparse
import contextlib
import os
import sys

import numpy as np
import torch

import data
import routing
from runner import build, cli, report, rundir
from runner.settings import Config, ModelSettings, run_name
from sources.p3 import P3_HUB


# ----------------------------------------------------------------------------------------------- scoring
# B = examples per batch, C = choices per example (padded), L = input length, T = target length, V = vocab,
# D = d_model, H = heads, E = experts, n = examples in all.
def _pad_batch(inputs, choices, rows, input_length, target_length, num_choices):
    """Fixed-shape int64/float32 arrays for one batch; rows past len(inputs) are dummy examples.

    Returns ids, enc_mask [rows, L]; dec_in, targets, tok_mask [rows * C, T]. Inputs and choices longer than their
    length keep their first tokens (seqio's truncation). Dummy examples and choices hold one EOS token (a row with
    no real token could turn masked attention into NaN) and get tok_mask 0, so they never add to a score.
    """
    ids = np.zeros((rows, input_length), np.int64)
    enc_mask = np.zeros((rows, input_length), np.int64)
    targets = np.zeros((rows * num_choices, target_length), np.int64)
    tok_mask = np.zeros((rows * num_choices, target_length), np.float32)
    ids[:, 0], enc_mask[:, 0] = 1, 1
    for i, (inp, chs) in enumerate(zip(inputs, choices)):
        inp = inp[:input_length]
        ids[i, :len(inp)], enc_mask[i, :len(inp)] = inp, 1
        for j, ch in enumerate(chs):
            ch = ch[:target_length]
            targets[i * num_choices + j, :len(ch)] = ch
            tok_mask[i * num_choices + j, :len(ch)] = 1.0
    dec_in = np.zeros_like(targets)
    dec_in[:, 1:] = targets[:, :-1]  # shift right; decoder start token 0
    return ids, enc_mask, dec_in, targets, tok_mask


def score_and_route(model, inputs, choices, batch_size=16, input_length=None, target_length=None, device=None,
                    sentence_embeddings=None, routing_sites=(), progress=None):
    """score_choices, plus the routing of `routing_sites`: {site: (sums [n, E], token counts [n])} per example.

    `progress` is an optional tqdm bar, advanced by the number of real examples of each batch.
    """
    n = len(inputs)
    if len(choices) != n:
        raise ValueError(f"{n} inputs but {len(choices)} lists of choices; give one list of choices per input")
    if n == 0:
        return [], {}
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for i, (inp, chs) in enumerate(zip(inputs, choices)):
        if len(inp) == 0 or len(chs) == 0 or any(len(c) == 0 for c in chs):
            raise ValueError(f"example {i} has an empty input, no choices or an empty choice; each needs tokens")
    input_length = input_length or max(len(x) for x in inputs)
    target_length = target_length or max(len(c) for chs in choices for c in chs)
    num_choices = max(len(chs) for chs in choices)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    xla = device.type == "xla"
    if sentence_embeddings is not None:
        emb = torch.as_tensor(np.asarray(sentence_embeddings), dtype=torch.float32)  # [n, D]
        if emb.shape[0] != n:
            raise ValueError(f"sentence_embeddings has {emb.shape[0]} rows for {n} examples; give one per example")
    was_training = model.training
    model.eval()
    pending = []  # per batch: (scores [B, C], {site: (sums [B, E], counts [B])}) on device (XLA) or host
    try:
        with routing.record(model, routing_sites) as seen:  # {site: the last forward's probabilities}
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                arrays = _pad_batch(inputs[start:stop], choices[start:stop], batch_size, input_length,
                                    target_length, num_choices)
                ids, enc_mask, dec_in, targets, tok_mask = (torch.from_numpy(a).to(device) for a in arrays)
                route_enc = route_dec = contextlib.nullcontext()
                if sentence_embeddings is not None:
                    emb_b = torch.zeros(batch_size, emb.shape[1])  # [B, D]; dummy rows route on zeros
                    emb_b[:stop - start] = emb[start:stop]
                    emb_b = emb_b.to(device)
                    route_enc = routing.sentence_routing(model, emb_b)
                    route_dec = routing.sentence_routing(model, emb_b.repeat_interleave(num_choices, 0))  # [B*C, D]
                with torch.no_grad():
                    with route_enc:
                        enc = model.encode(ids, attention_mask=enc_mask)  # [B, L, D]
                    enc_routing = {k: v for k, v in seen.items() if k.startswith("encoder.")}
                    with route_dec:
                        logits = model.decode(dec_in, enc.repeat_interleave(num_choices, 0),  # [B*C, L, D]
                                              encoder_attention_mask=enc_mask.repeat_interleave(num_choices, 0))
                    logits = logits.float()  # [B*C, T, V]; log-softmax in fp32 whatever the compute dtype
                    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
                    scores = (token_logp * tok_mask).sum(-1).view(batch_size, num_choices)  # [B, C]
                    routed = {site: token_sums(site, enc_routing.get(site, seen.get(site)), enc_mask.float(),
                                               tok_mask, batch_size, num_choices) for site in routing_sites}
                if xla:
                    import torch_xla
                    torch_xla.sync()  # cut the lazy graph per batch; values stay on the device until the end
                    pending.append((stop - start, scores, routed))
                else:
                    pending.append((stop - start, scores.cpu(), {k: (s.cpu(), c.cpu()) for k, (s, c) in
                                                                 routed.items()}))
                if progress is not None:
                    progress.update(stop - start)
    finally:
        model.train(was_training)
    scores = np.concatenate([s.cpu().double().numpy()[:k] for k, s, _ in pending])  # [n, C]
    out = [scores[i, :len(chs)] for i, chs in enumerate(choices)]
    routed = {name: (np.concatenate([r[name][0].cpu().double().numpy()[:k] for k, _, r in pending]),
                     np.concatenate([r[name][1].cpu().double().numpy()[:k] for k, _, r in pending]))
              for name in routing_sites}
    return out, routed


def token_sums(name, probs, enc_mask, tok_mask, rows, num_choices):
    """A site's routing probabilities summed over its real tokens per example: (sums [B, E], token counts [B]).

    Encoder sites cover the input tokens; decoder cross-attention K/V (projected from the encoder output) the input
    tokens once per real choice; other decoder sites the choice tokens. probs: [B or B*C, len, (H,) E].
    """
    if probs is None:
        raise ValueError(f"routing site {name!r} recorded nothing: it has no router ((IA)3 / LoRA)")
    probs = probs.float()
    if probs.dim() == 4:  # attention sites route per head: [rows, len, H, E] -> mean over heads
        probs = probs.mean(2)
    if name.startswith("encoder."):
        mask = enc_mask  # [B, L]
    elif ".EncDecAttention." in name:
        real_choice = (tok_mask.sum(-1, keepdim=True) > 0).float()  # [B*C, 1]
        mask = enc_mask.repeat_interleave(num_choices, 0) * real_choice  # [B*C, L]
    else:
        mask = tok_mask  # [B*C, T]
    sums, counts = (probs * mask.unsqueeze(-1)).sum(1), mask.sum(1)  # [rows, E], [rows]
    # [B*C, ...] -> [B, ...]: all choices of an example together (a no-op for encoder sites)
    return sums.view(rows, -1, sums.shape[-1]).sum(1), counts.view(rows, -1).sum(1)


def score_choices(model, inputs, choices, batch_size=16, input_length=None, target_length=None, device=None,
                  sentence_embeddings=None):
    """Summed log-probability of every choice given its input: a list (one per input) of float64 arrays [choices].

    inputs: list of token-id lists (no EOS, as P3 stores them); choices: for each input, a list of token-id lists
    (EOS included). `batch_size` examples are encoded at once and all their choices decoded against that encoding;
    inputs are padded to `input_length`, choices to `target_length` (defaults: the longest given) and the number of
    choices to the largest over all inputs, so every batch has one shape. `sentence_embeddings` [n, D] is needed
    for sentence-routed MoV models. The model runs in eval mode; its train/eval mode is restored afterwards.
    """
    return score_and_route(model, inputs, choices, batch_size, input_length, target_length, device,
                           sentence_embeddings)[0]


def predict(scores):
    """Index of the best choice; ties go to the first choice (np.argmax returns the first maximum)."""
    return int(np.argmax(scores))


# ----------------------------------------------------------------------------------------------- evaluation
def padded_length(n, cap):
    """Smallest power of two >= n (at least 8), capped: few distinct shapes, so XLA compiles few graphs."""
    return min(cap, max(8, 1 << (int(n) - 1).bit_length()))


def evaluate(model, eval_sets, *, batch_size=16, input_length=1024, target_length=256, device=None,
             sentence_embedder=None, routing_sites=(), out_dir=None, meta=None, compare=None, progress=True,
             name="eval"):
    """Rank-classification accuracy of `model` on `eval_sets` ({dataset: {template: [items]}}, data.load_eval).

    Returns {"tasks": {dataset: {template: {"accuracy": %, "examples": n, "no_correct": examples without a correct
    choice (label None: counted wrong, as T5's rank_classification)}}}, "datasets", "columns", "average",
    "average_over", "meta", and with routing_sites "routing": {site: {dataset: {template: [mean prob per
    expert]}}}}. With out_dir, writes eval.json, eval.md (and routing.csv, routing.png). Sentence-routed MoV
    models route on `sentence_embedder(texts)` -> [n, D] of the items' "text" (default: data.SentenceEmbedder()).
    `meta` (method, experts, rank, label, ...) is stored in the results and picks the paper row of format_table.
    """
    from tqdm import tqdm
    if not eval_sets:
        raise ValueError("eval_sets is empty; pass data.load_eval(source)")
    sentence_routed = routing.sentence_routed(model)
    if sentence_routed and sentence_embedder is None:
        sentence_embedder = data.SentenceEmbedder()
    total = sum(len(items) for templates in eval_sets.values() for items in templates.values())
    bar = tqdm(total=total, desc="evaluate", unit="ex", dynamic_ncols=True, disable=not progress)
    tasks, routed_sums = {}, {site: {} for site in routing_sites}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        for dataset, templates in eval_sets.items():
            if not templates:
                raise ValueError(f"dataset {dataset!r} has no templates in eval_sets")
            tasks[dataset] = {}
            for template, items in templates.items():
                if not items:
                    raise ValueError(f"template {template!r} of {dataset!r} has no examples")
                inputs = [list(it["inputs"]) for it in items]
                choices = [[list(c) for c in it["choices"]] for it in items]
                top = max(max(x) for x in inputs + [c for chs in choices for c in chs])
                if vocab is not None and top >= vocab:
                    raise ValueError(f"{template}: token id {top} is outside the model's vocabulary of {vocab}; "
                                     "the data was tokenized with another vocabulary than this model's")
                emb = None
                if sentence_routed:
                    texts = [it.get("text") for it in items]
                    if any(t is None for t in texts):
                        raise ValueError(f"{template}: sentence routing needs each item's input text ('text'); "
                                         "this source has no inputs_pretokenized")
                    emb = sentence_embedder(texts)
                scores, routed = score_and_route(
                    model, inputs, choices, batch_size=batch_size, device=device, sentence_embeddings=emb,
                    input_length=padded_length(max(len(x) for x in inputs), input_length),
                    target_length=padded_length(max(len(c) for chs in choices for c in chs), target_length),
                    routing_sites=routing_sites, progress=bar)
                correct = [it["label"] is not None and predict(s) == it["label"] for s, it in zip(scores, items)]
                tasks[dataset][template] = {"accuracy": 100.0 * float(np.mean(correct)), "examples": len(items),
                                            "no_correct": sum(it["label"] is None for it in items)}
                for site, (sums, counts) in routed.items():
                    routed_sums[site].setdefault(dataset, {})[template] = {
                        "sums": sums.sum(0).tolist(), "tokens": float(counts.sum())}
    finally:
        bar.close()
    results = report.summarize({d: {t: r["accuracy"] for t, r in ts.items()} for d, ts in tasks.items()})
    results = {"tasks": tasks, **results, "meta": dict(meta or {})}
    if routing_sites:
        results["routing"] = {site: {d: {t: (np.array(r["sums"]) / max(r["tokens"], 1.0)).tolist()
                                         for t, r in ts.items()} for d, ts in per.items()}
                              for site, per in routed_sums.items()}
        results["routing_tokens"] = {site: {d: {t: r["tokens"] for t, r in ts.items()} for d, ts in per.items()}
                                     for site, per in routed_sums.items()}
    if out_dir is not None:
        report.write_outputs(results, out_dir, compare, name)
        if routing_sites:
            report.write_routing(results, out_dir)
    return results


# ----------------------------------------------------------------------------------------------- command line
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        return action.help if "(default" in action.help else super()._get_help_string(action)


# the settings that shape a model's adapters: with --adapter they must be those it was trained with
ADAPTER_FLAGS = ("method", "experts", "rank", "alpha", "top_k", "router_bias", "router_input", "seed")


def add_model_flags(p):
    """The flags that pick a model (--run, or --model [--adapter] with its settings) and the device: shared by
    evaluate.py and generate.py, spelled as train.py's; load_model reads them, check_model_flags checks them."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a train.py run directory: its base model with the adapters of its newest "
                       "checkpoint (or --step) (default: none; give --run or --model)")
    which.add_argument("--model", help="a backbone: tiny (random), small..xxl (google/t5-<size>-lm-adapt), a "
                       "directory or a hub name; add --adapter for trained adapters (default: none)")
    p.add_argument("--step", type=int, default=None, help="with --run: the checkpoint step (default: the newest)")
    p.add_argument("--adapter", default=None, help="with --model: a safetensors file of adapter tensors (or a "
                   "checkpoint directory holding trainable.safetensors), built with --method/--experts/... "
                   "(default: none, the backbone alone)")
    ModelSettings.add_flags(p.add_argument_group("with --adapter, the adapters' settings (as train.py's)"),
                            only=ADAPTER_FLAGS)
    Config.add_flags(p, only=("device", "dtype", "threads"))


def check_model_flags(args):
    """ValueError (one `error:` line) for model flags that do not go together or are out of range."""
    if args.run is None and args.step is not None:
        raise ValueError("--step needs --run")
    if args.model is None and args.adapter is not None:
        raise ValueError("--adapter needs --model (a run directory already holds its adapters)")
    if args.adapter is not None and args.method == "full":
        raise ValueError("--adapter with --method full: a full fine-tune has no adapter file; pass --method mov, "
                         "molora, ia3 or lora")
    if args.run is not None and not os.path.isdir(args.run):
        raise ValueError(f"--run {args.run}: no such directory; pass the --out of a train.py run")
    adapter_settings(args).validate()


def adapter_settings(args):
    """The ModelSettings of --model [--adapter]: the backbone alone is built as "full" (no adapters)."""
    values = {k: getattr(args, k) for k in ADAPTER_FLAGS}
    return ModelSettings(**{**values, "method": values["method"] if args.adapter is not None else "full"},
                         model=args.model or "tiny", dropout=0.0)


def positive(args, names):
    """ValueError naming the first of `names` (flags) whose value is given and not positive."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                           formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--data", default=None, help="bigscience/P3 (hub), a local P3-layout directory, or demo "
                   "(default: the run's data source with --run, else bigscience/P3)")
    p.add_argument("--datasets", default=None, help="comma-separated dataset keys to evaluate (default: all; "
                   "P3's are anli_r1,anli_r2,anli_r3,cb,rte,wsc,wic,copa,winogrande,hellaswag)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="at most N examples per template, for quick runs (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward (all their choices at once)")
    p.add_argument("--input-length", type=int, default=1024, help="longest input; longer ones keep their first "
                   "tokens")
    p.add_argument("--target-length", type=int, default=256, help="longest choice; longer ones keep their first "
                   "tokens")
    p.add_argument("--out", default=None, help="where eval.json / eval.md go (default: the run directory with "
                   "--run, else runs/eval_<model>)")
    p.add_argument("--compare", default=None, choices=("paper",), help="add the paper's Table 1 row of the same "
                   "method, averages only (default: no comparison)")
    p.add_argument("--routing", action="store_true", help="record the mean routing probability per expert and "
                   "task at --routing-sites; write routing.csv and routing.png")
    p.add_argument("--routing-sites", default=None, help="comma-separated module names of routed layers "
                   "(default: the last decoder block's FFN activation, decoder.block.<last>.layer.2."
                   "DenseReluDense.act)")
    args = p.parse_args(argv)
    check_model_flags(args)
    positive(args, ("step", "threads", "batch_size", "input_length", "target_length", "max_examples"))
    if args.routing_sites is not None and not args.routing:
        raise ValueError("--routing-sites needs --routing")
    return args


def load_model(args, device):
    """(model, meta) for --run or --model [--adapter]; meta holds method, experts, rank, model, data, label."""
    if args.run is not None:
        model, cfg, step = build.load_run(args.run, step=args.step, device=device)
        meta = {k: getattr(cfg, k) for k in ("method", "experts", "rank", "model", "data", "router_input")}
        return model, {**meta, "step": step, "label": f"{run_name(cfg.method, cfg.experts)} step {step}"}
    settings = adapter_settings(args)
    model = build.build_model(settings, torch.device("cpu"))
    if args.adapter is not None:
        path = args.adapter
        if os.path.isdir(path):
            path = os.path.join(path, rundir.TRAINABLE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--adapter {args.adapter}: no such safetensors file (or checkpoint directory)")
        rundir.load_trainable(model, path)
    # the backbone alone is labelled method "none": it has no Table 1 row
    label = args.model if args.adapter is None else f"{args.model} + {os.path.basename(args.adapter)}"
    return model.to(device).eval(), {"method": settings.method if args.adapter is not None else "none",
                                     "experts": args.experts, "rank": args.rank, "model": args.model, "data": None,
                                     "label": label}


def main(argv=None):
    """Command line entry point; returns the results dict."""
    args = parse_args(argv)
    device = build.resolve_device(args.device)
    model, meta = load_model(args, device)
    source = args.data or meta.get("data") or P3_HUB
    wanted = args.datasets.split(",") if args.datasets else None
    sets = data.load_eval(source, datasets=wanted, max_examples=args.max_examples)
    expected = wanted or (list(report.HELD_OUT) if source == P3_HUB else [])
    absent = [k for k in expected if not sets.get(k)]
    if absent or not sets:
        raise ValueError(f"--data {source} has no evaluation tasks for {absent or 'any dataset'}; it has "
                         f"{sorted(sets) or 'none'}. Pass --datasets with the ones to evaluate, or a --data that "
                         "holds the held-out *_score_eval configs")
    sites = ()
    if args.routing:
        sites = tuple(args.routing_sites.split(",")) if args.routing_sites else routing.default_sites(model)
    autocast, activations = build.activations(args.dtype, device)
    print(activations + build.use_cpu_threads(model, device, args.threads), file=sys.stderr)
    out = args.out or args.run or os.path.join("runs", "eval_" + os.path.basename(os.path.normpath(args.model)))
    name = report.output_name(args.max_examples)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        results = evaluate(model, sets, batch_size=args.batch_size, input_length=args.input_length,
                           target_length=args.target_length, device=device, routing_sites=sites, out_dir=out,
                           meta={**meta, "data": source}, compare=args.compare, name=name)
    print(report.format_table(results, args.compare))
    print(f"wrote {os.path.join(out, name)}.json and {name}.md" + (" and routing.csv / routing.png" if sites else ""))
    return results


if __name__ == "__main__":
    sys.exit(cli.run(main, interrupted="error: interrupted before the results were written (each result file is "
                                       "written atomically at the end)"))
