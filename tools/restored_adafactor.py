"""Full fine-tuning without the pre-training optimizer state: which Adafactor step offset tracks a restored state?

The original's T0 baseline (for-ai/parameter-efficient-moe `configs/t0.gin`, `scripts/t0_train.sh`) restores the
whole T5X checkpoint strictly, the pre-training Adafactor second moments and step counter (1.1M) included, and
fine-tunes every weight from there. A Hugging Face checkpoint carries no optimizer state, so train.py's full
fine-tune starts from zero moments: with `--adafactor-step-offset 1100000` (T5X's counter) the decay 1 - (t+1)^-0.8
is ~1.5e-5, the fresh second moment stays tiny and every update sits at the clipping threshold; with offset 0 the
moments are rebuilt from the first steps, as a fresh Adam's would be.

This tool builds such a restored state on the demo's tiny T5: it pre-trains every weight with Adafactor for
--pretrain steps on half of the demo's training tasks (reviews and comparisons), then fine-tunes for --steps more on
the other half (categories and opposites) three ways: (a) with the pre-training optimizer restored (the original),
(b) fresh state, offset 0, (c) fresh state, offset = --pretrain steps (the counter T5X would continue). It reports how far (b) and (c) drift from (a): the mean
absolute difference of their per-step losses and the relative distance of their final weights.

    python -m tools.restored_adafactor --pretrain 1000 --steps 300       # about 3 minutes on two CPU cores
"""
import argparse
import copy
import dataclasses
import time

import torch
import torch.nn.functional as F

import adafactor
import data
import t5


def batches(prefixes, n, batch_size, input_length, target_length):
    """n packed batches of the demo's training tasks whose names start with `prefixes`."""
    tasks = [t for t in data.training_tasks("demo")[0] if t.startswith(prefixes)]
    mixture = data.Mixture("demo", seed=0, batch_size=batch_size, input_length=input_length,
                           target_length=target_length, tasks=tasks)
    return [{k: torch.from_numpy(v) for k, v in mixture.next_batch().items()} for _ in range(n)]


def run(model, optimizer, stream):
    """Losses (token-mean cross-entropy) of one Adafactor step per batch of `stream`; dropout off: the comparison sees
    the optimizer only."""
    losses = []
    for batch in stream:
        logits = model(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       encoder_segment_ids=batch["encoder_segment_ids"],
                       decoder_segment_ids=batch["decoder_segment_ids"])  # [B, T, V]
        weights = batch["decoder_loss_weights"].float()
        token = F.cross_entropy(logits.float().flatten(0, 1), batch["decoder_target_tokens"].long().flatten(),
                                reduction="none")
        loss = (token * weights.flatten()).sum() / weights.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain", type=int, default=1000, help="steps that build the restored optimizer state")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps compared")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (configs/t0.gin: 1e-3)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.time()
    config = t5.T5Config.preset("tiny")
    model = t5.T5(dataclasses.replace(config, dropout_rate=0.0)).train()
    opt = adafactor.Adafactor(model.parameters(), lr=1e-2)  # pre-training: offset 0, a larger lr
    pre = run(model, opt, batches(("demo_review", "demo_compare"), args.pretrain, args.batch_size, 128, 32))
    stream = batches(("demo_category", "demo_opposite"), args.steps, args.batch_size, 128, 32)
    results = {}
    for name, offset in (("restored", None), ("fresh, offset 0", 0), (f"fresh, offset {args.pretrain}", args.pretrain)):
        m = copy.deepcopy(model)
        if offset is None:
            o = adafactor.Adafactor(m.parameters(), lr=args.lr)
            o.load_state_dict(opt.state_dict())  # the pre-training moments and step counters
            for group in o.param_groups:
                group["lr"] = args.lr
        else:
            o = adafactor.Adafactor(m.parameters(), lr=args.lr, step_offset=offset)
        results[name] = (run(m, o, stream), torch.cat([q.detach().flatten() for q in m.parameters()]))
    ref_losses, ref_weights = results["restored"]
    start = torch.cat([q.detach().flatten() for q in model.parameters()])
    moved = (ref_weights - start).norm()
    print(f"pre-training: {args.pretrain} steps, loss {pre[0]:.3f} -> {pre[-1]:.3f}; fine-tuning {args.steps} steps "
          f"at lr {args.lr}, batch {args.batch_size} of 128 + 32 tokens; {time.time() - started:.0f} s")
    print("| fine-tuning start | mean loss | last 50 steps' loss | mean abs loss difference to restored | final weights: "
          "distance to restored / restored's distance moved |")
    print("|---|---|---|---|---|")
    for name, (losses, weights) in results.items():
        diff = sum(abs(a - b) for a, b in zip(losses, ref_losses)) / len(losses)
        print(f"| {name} | {sum(losses) / len(losses):.4f} | {sum(losses[-50:]) / len(losses[-50:]):.4f} | "
              f"{diff:.4f} | {(weights - ref_weights).norm() / moved:.3f} |")


if __name__ == "__main__":
    main()
