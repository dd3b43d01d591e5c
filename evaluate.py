"""Zero-shot evaluation by rank classification on T0's held-out tasks, and the routing analysis of the paper.

Reproduces the evaluation of Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv 2309.05444,
Table 1 and the expert-specialisation figure). The original runs `t5x.eval` on seqio's `t0_eval_score_eval`
mixture (for-ai/parameter-efficient-moe `scripts/*_eval.sh`, T0's `t0_data/tasks.py`, inputs 1024 / targets 256
tokens); REFERENCE.md section 8:

    score(choice) = sum of log p(target token) over the choice's tokens, EOS included, no length normalisation
    prediction    = argmax over the example's choices, ties to the first choice (np.argmax returns the first max)
    accuracy per template (P3 `*_score_eval` config); a dataset's number = median over its templates;
    ANLI = mean of R1/R2/R3; average = mean over ANLI, CB, RTE, WSC, WiC, COPA, WinoGrande, HellaSwag

Usage:
    python evaluate.py --run runs/mov --compare paper          # a train.py run: newest checkpoint, its data source
    python evaluate.py --model xl                              # the backbone alone (google/t5-xl-lm-adapt)
    python evaluate.py --run runs/demo --routing --max-examples 20   # + routing.csv / routing.png

Differences from the original, on purpose:
  - The encoder runs once per example and every choice is decoded against that one encoding (T5X's rank
    classification repeats the input once per choice); the scores are the same, the work smaller.
  - Inputs and choices are padded to per-template lengths rounded up to a power of two (at most --input-length /
    --target-length, whose defaults 1024 / 256 are the original's feature lengths), so XLA compiles a handful of
    shapes; the original pads everything to 1024 / 256. Scores do not depend on padding.
  - The median over templates is computed here (the original's eval writes per-task accuracy only).
  - Routing analysis: per-task mean routing probability over real tokens; at decoder sites over the tokens of all
    choices of an example (the model reads every choice, whatever the label), at encoder sites over input tokens.
"""
import argparse
import contextlib
import csv
import json
import os
import statistics
import sys

import numpy as np
import torch

import data

ANLI_ROUNDS = ("anli_r1", "anli_r2", "anli_r3")
# The paper's eight held-out datasets, ANLI counted once (the mean of its rounds), in Table 1's column order.
PAPER_DATASETS = ("anli", "cb", "rte", "wsc", "wic", "copa", "winogrande", "hellaswag")
P3_EVAL_KEYS = ANLI_ROUNDS + PAPER_DATASETS[1:]
# Column titles: the paper's datasets and the demo's, as data.py names them.
COLUMN_NAMES = {**dict(data.EVAL_DATASETS), "anli": "ANLI", **dict(data.DEMO_EVAL_DATASETS)}
# Table 1 of the paper (T5-3B), averages only (REFERENCE.md section 9). The per-dataset cells were not found in a
# source we could check, so they are not reproduced here.
PAPER_AVERAGES = {"T0-3B": 60.06, "(IA)3": 52.90, "LoRA r4": 57.51, "MoV-10": 59.93, "MoV-30": 60.61,
                  "MoLORA-15": 60.79}


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


def _routing_layers(model, sites):
    """The modules named by `sites` that record routing (mov.py / molora.py set `record_routing`)."""
    layers = {}
    for name in sites:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "record_routing"):
            routed = [n for n, m in model.named_modules() if getattr(m, "num_experts", None) is not None
                      and hasattr(m, "record_routing")]
            raise ValueError(f"routing site {name!r} is not a routed MoV/MoLORA layer of this model; routed layers "
                             f"are {routed[:4]}{' ...' if len(routed) > 4 else ''} ({len(routed)} in all)")
        layers[name] = module
    return layers


def _routing_sums(name, probs, enc_mask, tok_mask, rows, num_choices):
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
        import mov
        emb = torch.as_tensor(np.asarray(sentence_embeddings), dtype=torch.float32)  # [n, D]
        if emb.shape[0] != n:
            raise ValueError(f"sentence_embeddings has {emb.shape[0]} rows for {n} examples; give one per example")
    layers = _routing_layers(model, routing_sites)
    was_training, recording = model.training, {name: m.record_routing for name, m in layers.items()}
    model.eval()
    for m in layers.values():
        m.record_routing = True
    pending = []  # per batch: (scores [B, C], {site: (sums [B, E], counts [B])}) on device (XLA) or host
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            arrays = _pad_batch(inputs[start:stop], choices[start:stop], batch_size, input_length, target_length,
                                num_choices)
            ids, enc_mask, dec_in, targets, tok_mask = (torch.from_numpy(a).to(device) for a in arrays)
            route_enc = route_dec = contextlib.nullcontext()
            if sentence_embeddings is not None:
                emb_b = torch.zeros(batch_size, emb.shape[1])  # [B, D]; dummy rows route on zeros
                emb_b[:stop - start] = emb[start:stop]
                emb_b = emb_b.to(device)
                route_enc = mov.sentence_routing(model, emb_b)
                route_dec = mov.sentence_routing(model, emb_b.repeat_interleave(num_choices, 0))  # [B*C, D]
            with torch.no_grad():
                with route_enc:
                    enc = model.encode(ids, attention_mask=enc_mask)  # [B, L, D]
                enc_routing = {k: m.last_routing for k, m in layers.items() if k.startswith("encoder.")}
                with route_dec:
                    logits = model.decode(dec_in, enc.repeat_interleave(num_choices, 0),  # [B*C, L, D]
                                          encoder_attention_mask=enc_mask.repeat_interleave(num_choices, 0))
                logits = logits.float()  # [B*C, T, V]; log-softmax in fp32 whatever the compute dtype
                token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [B*C, T]
                scores = (token_logp * tok_mask).sum(-1).view(batch_size, num_choices)  # [B, C]
                routed = {name: _routing_sums(name, enc_routing.get(name, m.last_routing), enc_mask.float(),
                                              tok_mask, batch_size, num_choices) for name, m in layers.items()}
            if xla:
                import torch_xla
                torch_xla.sync()  # cut the lazy graph per batch; values stay on the device until the end
                pending.append((stop - start, scores, routed))
            else:
                pending.append((stop - start, scores.cpu(), {k: (s.cpu(), c.cpu()) for k, (s, c) in routed.items()}))
            if progress is not None:
                progress.update(stop - start)
    finally:
        model.train(was_training)
        for name, m in layers.items():
            m.record_routing, m.last_routing = recording[name], None
    scores = np.concatenate([s.cpu().double().numpy()[:k] for k, s, _ in pending])  # [n, C]
    out = [scores[i, :len(chs)] for i, chs in enumerate(choices)]
    routing = {name: (np.concatenate([r[name][0].cpu().double().numpy()[:k] for k, _, r in pending]),
                      np.concatenate([r[name][1].cpu().double().numpy()[:k] for k, _, r in pending]))
               for name in layers}
    return out, routing


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


# ----------------------------------------------------------------------------------------------- aggregation
def summarize(task_accuracy):
    """Per-dataset medians over templates, ANLI, and the average, from {dataset: {template: accuracy %}}.

    Returns {"datasets": {dataset: median}, "columns": {column: value}, "average": mean of the columns,
    "average_over": [columns]}. Columns are ANLI (the mean of whichever rounds are present) and every other
    dataset; when all of P3's keys are present the average is the paper's 8-dataset average.
    """
    datasets = {}
    for name, templates in task_accuracy.items():
        if not templates:
            raise ValueError(f"dataset {name!r} has no templates; remove it or give it at least one")
        datasets[name] = float(statistics.median(templates.values()))
    columns = {}
    rounds = [datasets[r] for r in ANLI_ROUNDS if r in datasets]
    if rounds:
        columns["anli"] = float(np.mean(rounds))
    columns.update({k: v for k, v in datasets.items() if k not in ANLI_ROUNDS})
    average = float(np.mean(list(columns.values())))
    return {"datasets": datasets, "columns": columns, "average": average, "average_over": list(columns)}


def _ordered(keys):
    """Table 1's column order for the paper's datasets (then the demo's), then any others sorted."""
    order = ANLI_ROUNDS + PAPER_DATASETS + tuple(k for k, _ in data.DEMO_EVAL_DATASETS)
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def paper_row(meta):
    """The Table 1 row of the same method (from meta: method, experts, rank), or None."""
    method, experts, rank = meta.get("method"), meta.get("experts"), meta.get("rank")
    name = {"full": "T0-3B", "ia3": "(IA)3", "lora": f"LoRA r{rank}", "mov": f"MoV-{experts}",
            "molora": f"MoLORA-{experts}"}.get(method)
    return name if name in PAPER_AVERAGES else None


def format_table(results, compare=None):
    """A Markdown table of `results` (from evaluate): one row for us, and with compare="paper" the Table 1 row of
    the same method (every Table 1 row when the method has none), or compare=<row name> that row."""
    if compare not in (None, "paper") and compare not in PAPER_AVERAGES:
        raise ValueError(f"compare must be None, 'paper' or one of {list(PAPER_AVERAGES)}, got {compare!r}")
    keys = _ordered(set(results["datasets"]) | set(results["columns"]))
    head = [COLUMN_NAMES.get(k, k) for k in keys] + ["Avg"]
    values = {**results["datasets"], **results["columns"]}
    label = results.get("meta", {}).get("label", "ours")
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
             f"| {label} | " + " | ".join(f"{values[k]:.2f}" for k in keys) + f" | {results['average']:.2f} |"]
    notes = []
    if compare is not None:
        rows = [compare] if compare != "paper" else [paper_row(results.get("meta", {}))]
        rows = list(PAPER_AVERAGES) if rows == [None] else rows
        for row in rows:
            lines.append(f"| paper: {row} | " + " | ".join("-" for _ in keys) + f" | {PAPER_AVERAGES[row]:.2f} |")
        notes.append("Paper rows: Table 1 of arXiv 2309.05444 (T5-3B), averages only; its per-dataset cells are "
                     "not reproduced (REFERENCE.md section 9).")
    missing = [k for k in PAPER_DATASETS if k not in results["columns"]]
    if missing and set(PAPER_DATASETS) & set(results["columns"]):
        notes.append(f"Average over {len(results['columns'])} columns; missing from the paper's eight: {missing}.")
    notes.append("Accuracy in %, median over templates" + ("; ANLI = mean of R1-R3" if "anli" in results["columns"]
                  else "") + f"; Avg = mean over {', '.join(COLUMN_NAMES.get(k, k) for k in results['average_over'])}.")
    return "\n".join(lines + [""] + notes)


# ----------------------------------------------------------------------------------------------- evaluation
def _bucket(n, cap):
    """Smallest power of two >= n (at least 8), capped: few distinct shapes, so XLA compiles few graphs."""
    return min(cap, max(8, 1 << (int(n) - 1).bit_length()))


def evaluate(model, eval_sets, *, batch_size=16, input_length=1024, target_length=256, device=None,
             sentence_embedder=None, routing_sites=(), out_dir=None, meta=None, compare=None, progress=True):
    """Rank-classification accuracy of `model` on `eval_sets` ({dataset: {template: [items]}}, data.load_eval).

    Returns {"tasks": {dataset: {template: {"accuracy": %, "examples": n}}}, "datasets", "columns", "average",
    "average_over", "meta", and with routing_sites "routing": {site: {dataset: {template: [mean prob per
    expert]}}}}. With out_dir, writes eval.json, eval.md (and routing.csv, routing.png). Sentence-routed MoV
    models route on `sentence_embedder(texts)` -> [n, D] of the items' "text" (default: data.SentenceEmbedder()).
    `meta` (method, experts, rank, label, ...) is stored in the results and picks the paper row of format_table.
    """
    from tqdm import tqdm
    if not eval_sets:
        raise ValueError("eval_sets is empty; pass data.load_eval(source)")
    sentence_routed = any(getattr(m, "router_input", None) == "sentence" for m in model.modules())
    if sentence_routed and sentence_embedder is None:
        sentence_embedder = data.SentenceEmbedder()
    total = sum(len(items) for templates in eval_sets.values() for items in templates.values())
    bar = tqdm(total=total, desc="evaluate", unit="ex", dynamic_ncols=True, disable=not progress)
    tasks, routing = {}, {site: {} for site in routing_sites}
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
                    input_length=_bucket(max(len(x) for x in inputs), input_length),
                    target_length=_bucket(max(len(c) for chs in choices for c in chs), target_length),
                    routing_sites=routing_sites, progress=bar)
                correct = [predict(s) == it["label"] for s, it in zip(scores, items)]
                tasks[dataset][template] = {"accuracy": 100.0 * float(np.mean(correct)), "examples": len(items)}
                for site, (sums, counts) in routed.items():
                    routing[site].setdefault(dataset, {})[template] = {
                        "sums": sums.sum(0).tolist(), "tokens": float(counts.sum())}
    finally:
        bar.close()
    results = summarize({d: {t: r["accuracy"] for t, r in ts.items()} for d, ts in tasks.items()})
    results = {"tasks": tasks, **results, "meta": dict(meta or {})}
    if routing_sites:
        results["routing"] = {site: {d: {t: (np.array(r["sums"]) / max(r["tokens"], 1.0)).tolist()
                                         for t, r in ts.items()} for d, ts in per.items()}
                              for site, per in routing.items()}
        results["routing_tokens"] = {site: {d: {t: r["tokens"] for t, r in ts.items()} for d, ts in per.items()}
                                     for site, per in routing.items()}
    if out_dir is not None:
        write_outputs(results, out_dir, compare)
    return results


def write_outputs(results, out_dir, compare=None):
    """eval.json, eval.md (summary table and per-template accuracies), and routing.csv / routing.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# Held-out evaluation (rank classification)", "", format_table(results, compare), "",
             "## Per template", "", "| dataset | template | examples | accuracy |", "|---|---|---|---|"]
    for dataset in _ordered(results["tasks"]):
        for template, r in sorted(results["tasks"][dataset].items()):
            lines.append(f"| {dataset} | {template} | {r['examples']} | {r['accuracy']:.2f} |")
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if "routing" in results:
        write_routing(results, out_dir)


def write_routing(results, out_dir):
    """routing.csv (site, dataset, template, tokens, expert_0..) with a template '*' row per dataset (token-weighted
    over its templates), and routing.png: one heatmap per site, datasets x experts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sites = list(results["routing"])
    per_dataset = {}
    with open(os.path.join(out_dir, "routing.csv"), "w", newline="") as f:
        writer = None
        for site in sites:
            for dataset in _ordered(results["routing"][site]):
                probs = results["routing"][site][dataset]
                tokens = results["routing_tokens"][site][dataset]
                if writer is None:
                    num_experts = len(next(iter(probs.values())))
                    writer = csv.writer(f)
                    writer.writerow(["site", "dataset", "template", "tokens"] +
                                    [f"expert_{e}" for e in range(num_experts)])
                for template in sorted(probs):
                    writer.writerow([site, dataset, template, int(tokens[template])] +
                                    [f"{p:.6f}" for p in probs[template]])
                weight = np.array([tokens[t] for t in probs])
                mean = (np.array([probs[t] for t in probs]) * weight[:, None]).sum(0) / max(weight.sum(), 1.0)
                per_dataset.setdefault(site, {})[dataset] = mean
                writer.writerow([site, dataset, "*", int(weight.sum())] + [f"{p:.6f}" for p in mean])
    num_experts = len(next(iter(per_dataset[sites[0]].values())))
    fig, axes = plt.subplots(len(sites), 1, squeeze=False,
                             figsize=(3.5 + 0.4 * num_experts, sum(1.2 + 0.3 * len(per_dataset[s]) for s in sites)))
    for ax, site in zip(axes[:, 0], sites):
        names = list(per_dataset[site])
        grid = np.stack([per_dataset[site][d] for d in names])  # [datasets, E]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(names)), [COLUMN_NAMES.get(d, d) for d in names])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(site, fontsize=8)
        fig.colorbar(image, ax=ax).set_label("mean routing prob.", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "routing.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command line
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        return action.help if "(default" in action.help else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=_Help)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a train.py run directory: its base model with the adapters of its newest "
                       "checkpoint (or --step) (default: none; give --run or --model)")
    which.add_argument("--model", help="a backbone: tiny (random), small..xxl (google/t5-<size>-lm-adapt), a "
                       "directory or a hub name; add --adapter for trained adapters (default: none)")
    p.add_argument("--step", type=int, default=None, help="with --run: the checkpoint step (default: the newest)")
    p.add_argument("--adapter", default=None, help="with --model: a safetensors file of adapter tensors (or a "
                   "checkpoint directory holding trainable.safetensors), built with --method/--experts/... "
                   "(default: none, the backbone alone)")
    p.add_argument("--method", default="mov", choices=("mov", "molora", "ia3", "lora"),
                   help="with --adapter: the adapter type")
    p.add_argument("--experts", type=int, default=10, help="with --adapter: experts of mov / molora")
    p.add_argument("--rank", type=int, default=4, help="with --adapter: LoRA rank of lora / molora")
    p.add_argument("--alpha", type=float, default=16.0, help="with --adapter: LoRA alpha")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --adapter: top-k routing of mov (default: none, soft routing)")
    p.add_argument("--router-input", default="token", choices=("token", "sentence"),
                   help="with --adapter: what the mov router reads")
    p.add_argument("--seed", type=int, default=0, help="seed of --model tiny's random weights")
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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "xla"),
                   help="auto: TPU through torch-xla, then CUDA, then CPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="activations: auto = bf16 autocast on accelerators, fp32 on CPU (scores always in fp32)")
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
    if args.run is None and args.step is not None:
        p.error("--step needs --run")
    if args.model is None and args.adapter is not None:
        p.error("--adapter needs --model (a run directory already holds its adapters)")
    for name in ("batch_size", "input_length", "target_length", "max_examples", "experts", "rank"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.run is not None and not os.path.isdir(args.run):
        p.error(f"--run {args.run}: no such directory; pass the --out of a train.py run")
    if args.routing_sites is not None and not args.routing:
        p.error("--routing-sites needs --routing")
    return args


def load_model(args, device):
    """(model, meta) for --run or --model [--adapter]; meta holds method, experts, rank, model, data, label."""
    import train
    if args.run is not None:
        model, cfg = train.load_run(args.run, step=args.step, device=device)
        meta = {k: getattr(cfg, k) for k in ("method", "experts", "rank", "model", "data", "router_input")}
        step = args.step if args.step is not None else max(s for s, _ in train.checkpoints(args.run))
        name = train.run_name(cfg.method, cfg.experts)
        return model, {**meta, "step": step, "label": f"{name} step {step}"}
    # the backbone alone is built as train.py's "full" (no adapters) and labelled "none": it has no Table 1 row
    build = args.method if args.adapter is not None else "full"
    method = args.method if args.adapter is not None else "none"
    cfg = train.Config(method=build, experts=args.experts, rank=args.rank, alpha=args.alpha, top_k=args.top_k,
                       router_input=args.router_input, model=args.model, seed=args.seed, dropout=0.0)
    model = train.build_model(cfg, torch.device("cpu"))
    if args.adapter is not None:
        path = args.adapter
        if os.path.isdir(path):
            path = os.path.join(path, train.TRAINABLE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--adapter {args.adapter}: no such safetensors file (or checkpoint directory)")
        train.load_trainable(model, path)
    label = args.model if args.adapter is None else f"{args.model} + {os.path.basename(args.adapter)}"
    return model.to(device).eval(), {"method": method, "experts": args.experts, "rank": args.rank,
                                     "model": args.model, "data": None, "label": label}


def main(argv=None):
    """Command line entry point; returns the results dict."""
    args = parse_args(argv)
    import train
    device = train.pick_device(args.device)
    try:
        model, meta = load_model(args, device)
    except FileNotFoundError as e:  # no run / checkpoint / adapter file: the message says which
        raise SystemExit(f"error: {e}") from e
    source = args.data or meta.get("data") or "bigscience/P3"
    wanted = args.datasets.split(",") if args.datasets else None
    sets = data.load_eval(source, datasets=wanted, max_examples=args.max_examples)
    expected = wanted or (list(P3_EVAL_KEYS) if source == "bigscience/P3" else [])
    absent = [k for k in expected if not sets.get(k)]
    if absent:
        raise SystemExit(f"error: {source} has no evaluation tasks for {absent}; it has {sorted(sets)}. "
                         "Pass --datasets with the ones to evaluate.")
    sites = ()
    if args.routing:
        last = len(model.decoder.block) - 1
        sites = tuple(args.routing_sites.split(",")) if args.routing_sites else \
            (f"decoder.block.{last}.layer.2.DenseReluDense.act",)
    autocast = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type != "cpu")
    out = args.out or args.run or os.path.join("runs", "eval_" + os.path.basename(os.path.normpath(args.model)))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        results = evaluate(model, sets, batch_size=args.batch_size, input_length=args.input_length,
                           target_length=args.target_length, device=device,
                           routing_sites=sites, out_dir=out, meta={**meta, "data": source}, compare=args.compare)
    print(format_table(results, args.compare))
    print(f"wrote {os.path.join(out, 'eval.json')} and eval.md" + (" and routing.csv / routing.png" if sites else ""))
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as err:  # bad input or unreachable files: the message, no traceback
        sys.exit(f"error: {err}")
