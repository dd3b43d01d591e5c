"""Data-parallel training under torchrun (runner/distributed.py): two CPU processes (gloo) train exactly as one process with
the same global batch, dropout masks included, and their checkpoint resumes on one process or two. Tiny model, demo
data with its dropout (0.1, T5X's broadcast masks)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from runner import distributed
import train

pytestmark = pytest.mark.slow  # torchrun: process groups of two CPU processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# global batch 4 in 2 micro-batches: each of 2 processes holds 1 row of each (the no_sync path is exercised too)
ARGS = ["--preset", "demo", "--batch-size", "4", "--grad-accum", "2", "--input-length", "32", "--target-length", "8",
        "--log-every", "1", "--save-every", "2", "--no-evaluate", "--device", "cpu", "--dtype", "float32"]


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "train.py", *ARGS, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def single(out, steps):
    cfg, _ = train.parse_args([*ARGS, "--steps", str(steps), "--out", str(out)])
    return train.main(cfg)


def test_two_processes_train_as_one_and_resume_on_one_or_two(tmp_path):
    """torchrun with 2 processes logs the single-process losses (1e-5) and writes world_size 2 in config.json; its
    step-2 checkpoint resumed with 1 process and with 2 processes continues with the single-process losses."""
    single(tmp_path / "one", steps=4)
    reference = losses(tmp_path / "one")
    torchrun(tmp_path / "two", steps=2)
    got = losses(tmp_path / "two")
    assert sorted(got) == [1, 2]
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    with open(tmp_path / "two" / "config.json") as f:
        assert json.load(f)["world_size"] == 2
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    single(tmp_path / "two_then_one", steps=4)
    torchrun(tmp_path / "two", steps=4)
    for out in ("two_then_one", "two"):
        got = losses(tmp_path / out)
        assert sorted(got) == [1, 2, 3, 4], out
        for step in (3, 4):
            assert got[step] == pytest.approx(reference[step], rel=1e-5), (out, step)


def test_process_shares_sum_to_the_global_loss():
    """Each process's loss_fn on its rows times its share, summed over 4 processes, equals loss_fn on the whole
    micro-batch, for packed rows with uneven example counts; every row is used by exactly one process."""
    rng = np.random.default_rng(0)
    rows, length, vocab, accum, world = 8, 6, 7, 2, 4
    segments = np.array([[1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6], [1, 1, 1, 0, 0, 0],
                         [1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0], [1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 2, 0]])
    batch = {"decoder_segment_ids": segments, "decoder_loss_weights": (segments > 0).astype(np.float32),
             "decoder_target_tokens": rng.integers(1, vocab, (rows, length)), "row": np.arange(rows)}
    logits = torch.tensor(rng.normal(size=(rows, length, vocab)), dtype=torch.float32)
    as_torch = lambda b: {k: torch.from_numpy(v) for k, v in b.items()}  # noqa: E731
    seen = []
    for i in range(accum):
        micro = {k: v[i * 4:(i + 1) * 4] for k, v in batch.items()}
        expected = train.loss_fn(logits[i * 4:(i + 1) * 4], as_torch(micro), z_loss=1e-2)[0]
        total = 0.0
        for rank in range(world):
            local, shares = distributed.share(batch, distributed.Group(rank, world), accum)
            part = {k: v[i:i + 1] for k, v in local.items()}  # 1 row per micro-batch and process
            seen += part["row"].tolist()
            total += shares[i] * train.loss_fn(logits[part["row"]], as_torch(part), z_loss=1e-2)[0]
        assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert sorted(seen) == list(range(rows))


def step_gradients(args):
    """The trainable gradients of one train.train_step (optimizer.step replaced by a recorder) on a fixed packed
    batch of 4 rows, in this process; under torchrun's variables, its share of a data-parallel step."""
    from runner import build
    cfg, _ = train.parse_args(args)
    group, device = distributed.setup("cpu", cfg.batch_size, cfg.grad_accum)
    model = build.build_model(cfg, device)
    distributed.share_noise(model, group)  # every process draws the whole batch's masks and keeps its rows
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # B = 0 at init would leave A and the router without gradient
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 2, 3, 3, 3], [1, 1, 1, 0, 0, 0]], dtype=np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, 100, (4, 8)), "encoder_segment_ids": np.ones((4, 8), np.int32),
             "decoder_input_tokens": rng.integers(2, 100, (4, 6)),
             "decoder_target_tokens": rng.integers(2, 100, (4, 6)), "decoder_segment_ids": seg,
             "decoder_loss_weights": (seg > 0).astype(np.float32)}
    batch, shares = distributed.share(batch, group, cfg.grad_accum)

    class Record:  # the optimizer: keeps the gradients instead of stepping
        def step(self):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        def zero_grad(self, set_to_none=True):
            pass
    optimizer = Record()
    train.train_step(distributed.wrap(model, group, device), optimizer,
                     {k: torch.from_numpy(v) for k, v in batch.items()}, cfg, False, group, shares)
    distributed.close(group)
    return optimizer.grads


CHILD = ("import sys, torch; sys.path[:0] = ['tests', '.']; import test_distributed as t; "
         "grads = t.step_gradients(sys.argv[2:]); int(__import__('os').environ['RANK']) or torch.save(grads, sys.argv[1])")


@pytest.mark.parametrize("extra", [["--dropout-mask", "broadcast"], ["--dropout-mask", "elementwise"],
                                   ["--router-jitter", "0.5"]], ids=["broadcast", "elementwise", "jitter"])
def test_data_parallel_gradients_equal_one_process(tmp_path, extra):
    """The adapters' gradients after DDP's all-reduce (2 processes, 2 micro-batches, dropout 0.2 with either mask,
    or router jitter) equal one process's on the whole batch: the loss of each process is scaled so that DDP's
    averaging gives the global gradient, and each process drops (and jitters) its rows as the single process does."""
    args = ["--preset", "demo", "--method", "molora", "--experts", "3", "--batch-size", "4", "--grad-accum", "2",
            "--dropout", "0.2", *extra, "--device", "cpu"]
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "grads.pt"), *args], cwd=ROOT,
                                      env=env, stderr=subprocess.PIPE, text=True))
    one = step_gradients(args)  # meanwhile, the reference: one process, the whole batch
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert one[name].abs().max() > 0, name
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5 * float(one[name].abs().max()), msg=name)


@pytest.mark.parametrize("device, batch, message", [("xla", 4, "torchrun"), ("cpu", 3, "divisible")])
def test_refusals_name_the_problem(monkeypatch, device, batch, message):
    """Under torchrun, --device xla and a global batch not divisible by grad_accum x processes are clear errors."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=message):
        distributed.setup(device, batch, 1)
