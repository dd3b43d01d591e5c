"""Which experts a task's tokens go to: the routing analysis behind the paper's expert-specialisation figure.

Zadouri et al. 2023 (arXiv 2309.05444), section 5 and Figure 5: the mean routing probability of each expert per
held-out task, at chosen router sites, shows experts specialising by task although routing never sees a task id.
The original code publishes no such tool; this one reads the probabilities that mov.py / molora.py layers keep when
their `record_routing` is set.

    layers = routing.routed_layers(model, ["decoder.block.1.layer.2.DenseReluDense.act"])
    sums, tokens = routing.token_sums(name, probs, enc_mask, tok_mask, rows, num_choices)
    routing.write_routing(results, "runs/mov-30")         # routing.csv and routing.png

`Monitor` is the training-time side: routing health (entropy, expert load) and the load-balancing loss, on device.
"""
import contextlib
import csv
import os
import re
import sys

import numpy as np
import torch

import report

COLLAPSED = 0.9  # a site whose busiest expert takes more than this mean routing probability is reported once
# Sites that route encoder positions: encoder layers and the decoder's cross-attention keys / values.
_ENCODER_SIDE = re.compile(r"^encoder\.|\.EncDecAttention\.(k|v)(\.|$)")


def default_sites(model):
    """The last decoder block's routed FFN layer, the site evaluate.py --routing and generate.py --routing use:
    MoV's activation (`act`), or MoLORA's first FFN projection (`wi_0`)."""
    ffn = f"decoder.block.{len(model.decoder.block) - 1}.layer.2.DenseReluDense"
    for leaf in ("act", "wi_0"):
        module = getattr(model.get_submodule(ffn), leaf, None)
        if getattr(module, "num_experts", None) is not None:
            return (f"{ffn}.{leaf}",)
    return (f"{ffn}.act",)  # no router there: routed_layers names the routed layers in its error


def routed_layers(model, sites):
    """The modules named by `sites` that record routing (mov.py / molora.py set `record_routing`)."""
    layers = {}
    for name in sites:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "record_routing") or getattr(module, "num_experts", None) is None:
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


# ----------------------------------------------------------------------------------------------- training health
class Monitor:
    """Routing health of a training run, computed on the device (no host sync per step), for train.py's log.

    Every routed layer (mov.py / molora.py) of `model` records per-forward statistics (`record_stats`: entropy sum,
    token count, per-expert probability sums of the router softmax, over real tokens only: `masks` sets each
    layer's mask from the batch's segment ids, encoder or decoder side by the layer's name) and, with aux_loss, its
    load-balancing loss (`aux_loss`). Per step:
      router_entropy   mean over router sites of the mean over real tokens of the routing entropy in nats
                       (attention sites route per head: each head's distribution counts as one); ln E when uniform
      expert_load_max  max over router sites of max_e (mean routing probability of expert e over real tokens);
                       1/E when balanced, 1 when collapsed onto one expert
      load_balance_loss  mean over sites of Switch Transformer's loss (mov.balance_loss): T5X's MoE models average
                       the per-layer auxiliary losses (t5x/contrib/moe/models.py `_extract_diversity_metrics`). As
                       the original (ignore_padding_tokens=False) it counts every position, padding included.
    Statistics use the full softmax, before any top-k mask. A model without routed layers gives nothing (None).
    """

    def __init__(self, model, aux_loss=False):
        modules = model.named_modules() if model is not None else ()  # None: a monitor of nothing
        self.sites = [(n, m) for n, m in modules if getattr(m, "num_experts", None) is not None
                      and hasattr(m, "record_stats")]
        self.aux_loss, self.warned = aux_loss, set()
        self.encoder_side = [bool(_ENCODER_SIDE.search(n)) for n, _ in self.sites]
        for _, m in self.sites:
            m.record_stats, m.aux_loss = True, aux_loss

    def close(self):
        """Stop recording: the layers' forwards (an evaluation after training) then compute nothing extra."""
        for _, m in self.sites:
            m.record_stats, m.aux_loss, m.last_stats, m.last_aux_loss = False, False, None, None

    @contextlib.contextmanager
    def masks(self, batch):
        """Within the block, each site's statistics cover the real tokens of `batch` (segment id > 0)."""
        if self.sites:
            enc, dec = ((batch[k] > 0).float() for k in ("encoder_segment_ids", "decoder_segment_ids"))
            for (_, m), encoder in zip(self.sites, self.encoder_side):
                m.stats_mask = enc if encoder else dec
        try:
            yield
        finally:
            for _, m in self.sites:
                m.stats_mask = None

    def balance_loss(self):
        """This forward's load-balancing loss, the mean over sites (with its graph); None without routed sites."""
        return torch.stack([m.last_aux_loss for _, m in self.sites]).mean() if self.sites else None

    def collect(self, balance=None):
        """This forward's per-site statistics (and its detached balance loss), to pass to `reduce`."""
        return [m.last_stats for _, m in self.sites], None if balance is None else balance.detach()

    def reduce(self, collected):
        """One step's values from its micro-batches' `collect`s, a 1-D tensor on the device: [load_balance_loss
        (with aux_loss), router_entropy, expert_load_max, each site's expert load max]; None without sites."""
        if not self.sites:
            return None
        per_site = [sum(parts) for parts in zip(*(stats for stats, _ in collected))]  # [2 + E] each, summed
        entropy = torch.stack([s[0] / s[1].clamp_min(1.0) for s in per_site])  # [sites]
        load = torch.stack([s[2:].max() / s[1].clamp_min(1.0) for s in per_site])  # [sites]
        head = [entropy.mean(), load.max()]
        if self.aux_loss:
            head.insert(0, torch.stack([b for _, b in collected]).mean())
        return torch.cat([torch.stack(head), load])

    def fields(self, step, values):
        """The log line's fields from `reduce`'s values (floats, on the host); warns once per site on stderr when its
        expert load passes COLLAPSED."""
        values = list(values)
        out = {"load_balance_loss": values.pop(0)} if self.aux_loss else {}
        out.update(router_entropy=values[0], expert_load_max=values[1])
        for (name, _), load in zip(self.sites, values[2:]):
            if load > COLLAPSED and name not in self.warned:
                self.warned.add(name)
                print(f"warning: router site {name} collapsed at step {step}: one expert takes {load:.3f} of the "
                      f"routing (> {COLLAPSED}); try --load-balance-weight or --router-jitter", file=sys.stderr)
        return out
