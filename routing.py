"""Which experts a task's tokens go to: the routing analysis behind the paper's expert-specialisation figure.

Zadouri et al. 2023 (arXiv 2309.05444), section 5 and Figure 5: the mean routing probability of each expert per
held-out task, at chosen router sites, shows experts specialising by task although routing never sees a task id.
The original code publishes no such tool; this one reads the probabilities that mov.py / molora.py layers keep when
their `record_routing` is set.

    layers = routing.routed_layers(model, ["decoder.block.1.layer.2.DenseReluDense.act"])
    sums, tokens = routing.token_sums(name, probs, enc_mask, tok_mask, rows, num_choices)
    routing.write_routing(results, "runs/mov-30")         # routing.csv and routing.png
"""
import csv
import os

import numpy as np

import report


def default_sites(model):
    """The last decoder block's FFN activation: the site evaluate.py --routing and generate.py --routing use."""
    return (f"decoder.block.{len(model.decoder.block) - 1}.layer.2.DenseReluDense.act",)


def routed_layers(model, sites):
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


def write_routing(results, out_dir):
    """routing.csv (site, dataset, template, tokens, expert_0..) with a template '*' row per dataset (token-weighted
    over its templates), and routing.png: one heatmap per site, datasets x experts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sites = list(results["routing"])
    per_dataset = {}
    tmp = os.path.join(out_dir, f"routing.csv.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = None
        for site in sites:
            for dataset in report.ordered(results["routing"][site]):
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
    os.replace(tmp, os.path.join(out_dir, "routing.csv"))
    num_experts = len(next(iter(per_dataset[sites[0]].values())))
    fig, axes = plt.subplots(len(sites), 1, squeeze=False,
                             figsize=(3.5 + 0.4 * num_experts, sum(1.2 + 0.3 * len(per_dataset[s]) for s in sites)))
    for ax, site in zip(axes[:, 0], sites):
        names = list(per_dataset[site])
        grid = np.stack([per_dataset[site][d] for d in names])  # [datasets, E]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(names)), [report.COLUMN_NAMES.get(d, d) for d in names])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(site, fontsize=8)
        fig.colorbar(image, ax=ax).set_label("mean routing prob.", fontsize=8)
    fig.tight_layout()
    fig.savefig(tmp.replace("routing.csv", "routing.png"), dpi=120, format="png")
    os.replace(tmp.replace("routing.csv", "routing.png"), os.path.join(out_dir, "routing.png"))
    plt.close(fig)
