"""The original's router options, the load-balancing loss, routing statistics, and reading a model's routing.

mov.py and molora.py each hold the paper's layer and the paper's router and take any other router through their
`router=` argument; this file holds what the original's `src/routing.py` adds around that router (for-ai/
parameter-efficient-moe; its `Router`, `RouterWeights`, `_load_balancing_loss`), all off in its released configs
(`configs/*.gin`), and the tools that read routing from outside the layers through forward hooks on their routers.
It needs only torch: copy it beside mov.py or molora.py.

    mov.add_mov(model, 10, router=lambda: routing.Router(mov.Router(top_k=2), jitter=0.01, bias=True))  # per site
    with routing.record(model, routing.default_sites(model)) as probs: model(...)   # {site: probs}, detached
    monitor = routing.Monitor(model, aux_loss=True)                          # training: health and balance loss

Options (`Router`), each as the original's `Router` / `RouterWeights` fields:
  - jitter=eps: in training only, the router input is multiplied by noise U[1-eps, 1+eps] per element before the
    kernel (`_compute_router_probabilities`, `jitter_noise`). The original cannot run a nonzero jitter at all: T5X
    provides no 'jitter' RNG stream, so `make_rng('jitter')` fails; flaxformer's MoE layers pass
    apply_jitter=enable_dropout, which is what this one does.
  - bias=True: a zero-initialised trainable bias on the logits (`RouterWeights.use_bias`); the layer creates it as
    `mov_router_bias` / `lora_router_bias`. The one option that runs in the original.
  - renormalize=True: with the inner router's top_k, the kept probabilities are divided by their sum (an option of
    ours: the original never renormalises).
  - sentence_dim=D: the router reads one embedding per example (the paper's ablation used Sentence-T5; not in the
    original's code) given by `with routing.sentence_routing(model, embeddings):`, and every token (and head) of an
    example shares its routing.
Under data parallelism `rows` = (rank, world size): each process draws the jitter of the whole batch from the RNG
stream they share and keeps its rows, so N processes draw what one does (runner/distributed.py sets it).
"""
import contextlib
import re
import sys

import torch
from torch import nn

COLLAPSED = 0.9  # a site whose busiest expert takes more than this mean routing probability is reported once
# Sites that route encoder positions: encoder layers and the decoder's cross-attention keys / values.
_ENCODER_SIDE = re.compile(r"^encoder\.|\.EncDecAttention\.(k|v)(\.|$)")


def jitter_noise(x, jitter, rows=(0, 1)):
    """u ~ U[1 - jitter, 1 + jitter] of x's shape. With rows = (rank, world_size) for a batch (x's first dim) split
    over processes: the whole batch's noise is drawn from the shared RNG stream and this process's rows kept."""
    (rank, world), b = rows, x.shape[0]
    u = x.new_empty((b * world, *x.shape[1:])).uniform_(1.0 - jitter, 1.0 + jitter)
    return u if world == 1 else u[rank * b:(rank + 1) * b].clone()


class Router(nn.Module):
    """The original's router options around a layer file's paper router (`mov.Router` or `molora.Router`, which
    computes the float32 softmax and the top-k mask): the same contract, router(x, kernel, bias) -> (probs,
    softmax), so any mov / molora layer takes it (add_mov / add_molora: `router=lambda: routing.Router(...)`, one per
    site; sentence_dim: MoV layers only, MoLORA routes on its layer's input)."""
    rows = (0, 1)

    def __init__(self, router, *, jitter=0.0, bias=False, renormalize=False, sentence_dim=None):
        super().__init__()
        if not 0 <= jitter < 1:
            raise ValueError(f"router jitter must be in [0, 1) (noise U[1 - eps, 1 + eps]), got {jitter!r}")
        if sentence_dim is not None and not (isinstance(sentence_dim, int) and sentence_dim > 0):
            raise ValueError(f"sentence_dim must be a positive int (the embedding width), got {sentence_dim!r}")
        self.router, self.jitter, self.bias, self.renormalize = router, jitter, bool(bias), renormalize
        self.input_dim = sentence_dim  # the kernel's input width: the embedding's, or None for the activation's
        self.sentence_embedding = None  # [b, D], set only inside `sentence_routing`

    @property
    def top_k(self):
        return self.router.top_k

    def forward(self, x, kernel, bias=None):
        source = x if self.input_dim is None else self._embedding(x)  # [..., d] or [b, D]
        if self.training and self.jitter:  # noise drawn in float32, as the original converts before drawing
            source = source.float()
            source = source * jitter_noise(source, self.jitter, self.rows)
        probs, full = self.router(source, kernel, bias)
        if self.renormalize and self.top_k is not None:
            probs = probs / probs.sum(-1, keepdim=True)
        if self.input_dim is not None:  # one routing per example, shared by its tokens (and heads): [b, 1, .., E]
            shape = (x.shape[0], *[1] * (x.dim() - 2), probs.shape[-1])
            probs, full = (p.view(shape).expand(*x.shape[:-1], p.shape[-1]) for p in (probs, full))
        return probs, full

    def _embedding(self, x):
        emb = self.sentence_embedding
        if emb is None:
            raise RuntimeError("this router reads sentence embeddings but none was given; run the model inside "
                               "`with routing.sentence_routing(model, embeddings):` with embeddings [batch, dim]")
        if emb.shape[0] != x.shape[0]:
            raise ValueError(f"sentence embeddings have batch {emb.shape[0]} but the activation has batch "
                             f"{x.shape[0]}; pass one embedding per example of this forward")
        return emb

    def extra_repr(self):
        return f"jitter={self.jitter}, bias={self.bias}, renormalize={self.renormalize}, sentence_dim={self.input_dim}"


@contextlib.contextmanager
def sentence_routing(model, embeddings):
    """Within the block, every sentence-reading router of `model` routes row i by embeddings[i] ([batch, D])."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.input_dim is not None]
    if not routers:
        raise ValueError("the model has no sentence-routed layers; build it with "
                         "router=lambda: routing.Router(mov.Router(), sentence_dim=D)")
    if embeddings.dim() != 2 or embeddings.shape[1] != routers[0].input_dim:
        raise ValueError(f"sentence embeddings must be [batch, {routers[0].input_dim}], got {list(embeddings.shape)}")
    for r in routers:
        r.sentence_embedding = embeddings
    try:
        yield model
    finally:
        for r in routers:
            r.sentence_embedding = None


def sentence_routed(model):
    """Whether any router of `model` reads sentence embeddings (then every forward needs `sentence_routing`)."""
    return any(isinstance(m, Router) and m.input_dim is not None for m in model.modules())


# ----------------------------------------------------------------------------------------------- statistics
def balance_loss(full, top_k=None):
    """Switch Transformer's load-balancing loss of one router site (Fedus et al. 2021, eq. 4-6), as the original's
    `_load_balancing_loss` with an expert mask: E^2 * the mean over example rows b and experts e of f_be * P_be, i.e.
    E * sum_e f_e P_e per row, averaged over rows (1 when balanced). full: [b, L, (H,) E] router softmax; P_be = its
    mean over row b's tokens (and heads: at attention sites they are pooled per row, where the original's
    [b, L, H, E] call would average over heads only); f_be = the fraction routed to e (in its top_k set; the argmax
    for soft routing). The original defines it but never calls it (without a mask its formula is the constant E)."""
    E = full.shape[-1]
    p = full.float().reshape(full.shape[0] if full.dim() > 2 else 1, -1, E)  # [rows, tokens (x heads), E]
    routed = torch.zeros_like(p).scatter(-1, p.topk(top_k or 1, dim=-1).indices, 1.0)  # no gradient
    return (routed.mean(1) * p.mean(1)).mean() * E ** 2


def routing_stats(full, mask=None):
    """One site's routing health, detached and on the device, [2 + E] float32: the sum of the routing entropies in
    nats, the number of routing distributions, and each expert's summed probability, over the tokens (x heads at
    attention sites) that `mask` (full's leading shape, 1 = real token) marks; every token when mask is None."""
    p = full.detach().float()
    if mask is None:
        mask = torch.ones(p.shape[:-1], device=p.device)
    elif tuple(p.shape[:mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"routing-statistics mask {list(mask.shape)} does not lead the routing {list(p.shape)}")
    p = p.reshape(*mask.shape, -1, p.shape[-1])  # [..., H or 1, E]
    w = mask.to(p.device, torch.float32).unsqueeze(-1).expand(p.shape[:-1])  # [..., H or 1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [..., H or 1]
    return torch.cat([(entropy * w).sum().view(1), w.sum().view(1), (p * w.unsqueeze(-1)).flatten(0, -2).sum(0)])


# ----------------------------------------------------------------------------------------------- sites
def is_routed(module):
    """The one test of "a routed layer": a mov.py / molora.py layer with experts (it has a `router` submodule)."""
    return getattr(module, "num_experts", None) is not None and isinstance(getattr(module, "router", None), nn.Module)


def routed_layers(model, sites=None):
    """{name: layer} of the routed layers of `model`, all of them or those named by `sites` (ValueError naming a
    site that is not one, with the routed layers there are)."""
    every = {n: m for n, m in model.named_modules() if is_routed(m)}
    if sites is None:
        return every
    wrong = [s for s in sites if s not in every]
    if wrong and not every:
        raise ValueError("this model has no routed layers ((IA)3, LoRA and full fine-tuning have no router); routing "
                         "needs a mov or molora model")
    if wrong:
        raise ValueError(f"routing site {wrong[0]!r} is not a routed MoV/MoLORA layer of this model; routed layers "
                         f"are {list(every)[:4]}{' ...' if len(every) > 4 else ''} ({len(every)} in all)")
    return {s: every[s] for s in sites}


def default_sites(model):
    """The last decoder block's routed FFN layer (evaluate.py / generate.py --routing): MoV's activation (`act`) or
    MoLORA's first FFN projection (`wi_0`)."""
    ffn = f"decoder.block.{len(model.decoder.block) - 1}.layer.2.DenseReluDense"
    for leaf in ("act", "wi_0"):
        if is_routed(getattr(model.get_submodule(ffn), leaf, None)):
            return (f"{ffn}.{leaf}",)
    return (f"{ffn}.act",)  # no router there: routed_layers names the routed layers in its error


@contextlib.contextmanager
def record(model, sites):
    """Within the block, {site: routing probabilities of the site's last forward [..., (H,) E], detached}."""
    seen, layers = {}, routed_layers(model, sites)
    handles = [layer.router.register_forward_hook(lambda m, args, out, site=site: seen.__setitem__(site,
                                                                                                  out[0].detach()))
               for site, layer in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- training health
class Monitor:
    """Routing health of a training run, computed on the device (no host sync per step), for train.py's log.

    A forward hook on each routed layer's router keeps, per forward, the statistics of its softmax (entropy sum,
    token count, per-expert probability sums over the real tokens that `masks` sets from the batch's segment ids,
    encoder or decoder side by the site's name) and, with aux_loss, its load-balancing loss. Per step:
      router_entropy   mean over sites of the mean routing entropy in nats over real tokens (each head's
                       distribution counts as one at attention sites); ln E when uniform
      expert_load_max  max over sites of max_e (mean routing probability of expert e over real tokens); 1/E when
                       balanced, 1 when collapsed onto one expert
      load_balance_loss  mean over sites of `balance_loss`, as T5X's MoE models average the per-layer auxiliary
                       losses (t5x/contrib/moe/models.py); like the original (ignore_padding_tokens=False) it counts
                       every position, padding included.
    Statistics use the full softmax, before any top-k mask. A model without routed layers gives nothing (None).
    """

    def __init__(self, model, aux_loss=False):
        self.sites = list(routed_layers(model).items()) if model is not None else []
        self.aux_loss, self.warned = aux_loss, set()
        self.encoder_side = [bool(_ENCODER_SIDE.search(n)) for n, _ in self.sites]
        self.stats, self.aux, self.mask = [None] * len(self.sites), [None] * len(self.sites), {}
        self.handles = [layer.router.register_forward_hook(self._hook(i)) for i, (_, layer) in enumerate(self.sites)]

    def _hook(self, i):
        def keep(router, args, out):
            full = out[1]
            self.stats[i] = routing_stats(full, self.mask.get(self.encoder_side[i]))
            if self.aux_loss:
                self.aux[i] = balance_loss(full, router.top_k)
        return keep

    def close(self):
        """Stop recording: the layers' forwards (an evaluation after training) then compute nothing extra."""
        for h in self.handles:
            h.remove()
        self.handles, self.stats, self.aux = [], [None] * len(self.sites), [None] * len(self.sites)

    @contextlib.contextmanager
    def masks(self, batch):
        """Within the block, each site's statistics cover the real tokens of `batch` (segment id > 0)."""
        if self.sites:
            self.mask = {True: (batch["encoder_segment_ids"] > 0).float(),
                         False: (batch["decoder_segment_ids"] > 0).float()}
        try:
            yield
        finally:
            self.mask = {}

    def balance_loss(self):
        """This forward's load-balancing loss, the mean over sites (with its graph); None without routed sites."""
        return torch.stack(self.aux).mean() if self.sites else None

    def collect(self, balance=None):
        """This forward's per-site statistics (and its detached balance loss), to pass to `reduce`."""
        return list(self.stats), None if balance is None else balance.detach()

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
