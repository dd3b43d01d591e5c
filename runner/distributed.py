"""Data-parallel training under torchrun: one process per device, each training on its share of every batch.

    torchrun --nproc_per_node 8 train.py --experts 30        # 8 GPUs of one host (or CPU processes: gloo)

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 train.py joins the
process group (gloo on the CPU, NCCL on CUDA with device cuda:LOCAL_RANK) and wraps the model in
DistributedDataParallel, which all-reduces only the gradients of parameters that require them (the adapters). The
training is the single-process one, exactly:
  - every process builds the same Mixture with the same seed and draws the same global batch (--batch-size rows);
    each keeps its own rows (`share`): of each of the --grad-accum micro-batches, its contiguous 1/world_size;
  - the loss stays T5X's AVERAGE_PER_SEQUENCE over the global (micro-)batch: each process's mean over its examples
    is scaled by its share of the global micro-batch's examples (`share`, counted from the global batch every
    process holds, no communication), which makes it its examples' summed losses / the global count; the backward
    multiplies by world_size to undo DDP's gradient averaging;
  - the logged loss is the global one (one all-reduce of the step's two loss numbers);
  - rank 0 alone writes config.json, log.jsonl and the checkpoints; the others wait at a barrier after each
    checkpoint, so none reads a half-written one. A checkpoint resumes on any number of processes that divides
    --batch-size / --grad-accum (world_size is recorded in config.json but is not part of the run's identity);
  - dropout and router jitter: every process draws from the same RNG stream (seed + 2, or the checkpoint's state)
    the masks (and --router-jitter noise) of the global micro-batch and keeps its own rows (`rows` of t5.Dropout
    and of routing.Router, set by `share_noise`), so they, and the losses, are the single process's
    exactly, also after resuming on another number of processes; each process draws the global batch's random
    numbers (cheap: a broadcast mask is one value per row and feature).
A SIGINT / SIGTERM on any process stops all of them after the same step (the flag is all-reduced every step over
a gloo group: no device synchronisation), with one checkpoint. XLA runs data parallel through SPMD in a single
process (sharding.py, --fsdp); torchrun with --device xla is refused.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from runner import build
import routing
import t5


@dataclass
class Group:
    """This process's place in the run: rank, world_size, local_rank; world_size 1 is a plain single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Optional[object] = None  # gloo group for barriers and the stop flag (CPU tensors, no device sync)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str, batch_size: int, grad_accum: int) -> tuple[Group, torch.device]:
    """(this process's Group, its device) for --device: from torchrun's environment when WORLD_SIZE > 1 (the
    process group joined, cuda:LOCAL_RANK on CUDA), else a single-process Group and build.resolve_device."""
    kind, world = build.device_kind(device), int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(), build.resolve_device(device)
    if kind == "xla":
        raise ValueError("torchrun (WORLD_SIZE > 1) with --device xla: on XLA data parallelism is SPMD in one "
                         "process; run `python train.py --device xla` (see --fsdp) without torchrun")
    if batch_size % (grad_accum * world):
        raise ValueError(f"--batch-size {batch_size} is the global batch: it must be divisible by --grad-accum "
                         f"{grad_accum} x {world} processes; pick a multiple of {grad_accum * world}")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return Group(rank, world, local, dist.new_group(backend="gloo")), torch.device("cuda", local)
    dist.init_process_group("gloo")  # the default group is gloo already: it serves as the control group
    return Group(rank, world, local), torch.device("cpu")


def describe(group: Group) -> str:
    return f"; data parallel over {group.world_size} processes" if group.world_size > 1 else ""


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (multi-process), else `model` itself."""
    if group.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: torch.nn.Module, group: Group, last: bool):
    """Around a micro-batch's forward and backward: DDP syncs the accumulated gradients in the last one only."""
    return model.no_sync() if group.world_size > 1 and not last else contextlib.nullcontext()


def example_counts(batch: dict, grad_accum: int) -> np.ndarray:
    """Per micro-batch of a numpy batch: its number of examples with loss weight (train.loss_fn's normaliser),
    counted as distinct (row, segment id > 0) pairs whose weights sum above zero."""
    segments, weights = batch["decoder_segment_ids"], batch["decoder_loss_weights"]  # [B, T]
    total = np.zeros((segments.shape[0], int(segments.max(initial=0)) + 1))
    np.add.at(total, (np.arange(segments.shape[0])[:, None], segments), weights)
    return (total[:, 1:] > 0).sum(1).reshape(grad_accum, -1).sum(1)  # [grad_accum]


def share(batch: dict, group: Group, grad_accum: int) -> tuple[dict, Optional[list]]:
    """(this process's rows of the global numpy batch, its share of each micro-batch's examples), or (batch, None)
    in a single process. Rows: of each micro-batch, the process's contiguous 1/world_size. train.loss_fn averages
    over the examples it is given; times the share it becomes the sum over them / the global micro-batch's count."""
    if group.world_size == 1:
        return batch, None
    rows = next(iter(batch.values())).shape[0]
    micro, part = rows // grad_accum, rows // grad_accum // group.world_size
    keep = np.concatenate([np.arange(i * micro + group.rank * part, i * micro + (group.rank + 1) * part)
                           for i in range(grad_accum)])
    local = {k: v[keep] for k, v in batch.items()}
    mine, every = example_counts(local, grad_accum), example_counts(batch, grad_accum)
    return local, [float(max(m, 1) / max(e, 1)) for m, e in zip(mine, every)]  # loss_fn divides by max(count, 1)


def all_sum(group: Group, *values: torch.Tensor) -> tuple:
    """The sums of scalar tensors over the processes (one all-reduce on the device, no host synchronisation)."""
    if group.world_size == 1:
        return values
    both = torch.stack(values)
    dist.all_reduce(both)
    return tuple(both)


def barrier(group: Group) -> None:
    if group.world_size > 1:
        dist.barrier(group=group.control)


def stop_signal(group: Group, stop: dict) -> Optional[int]:
    """stop["signal"] agreed by all processes (the largest signal number any received, else None), stored back."""
    if group.world_size > 1:
        flag = torch.tensor([stop["signal"] or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group.control)  # gloo, CPU: no device synchronisation
        stop["signal"] = int(flag) or None
    return stop["signal"]


def share_noise(model: torch.nn.Module, group: Group) -> None:
    """Each t5.Dropout and routing.Router (its jitter) of `model` draws the global micro-batch's random numbers and
    keeps this process's rows (see above)."""
    if group.world_size > 1:
        for m in model.modules():
            if isinstance(m, (t5.Dropout, routing.Router)):
                m.rows = (group.rank, group.world_size)


def close(group: Group) -> None:
    if group.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
