"""Tests for adafactor.py: T5X's Adafactor update against a float64 NumPy transcription of t5x/adafactor.py."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from adafactor import Adafactor

# (shape, init std): a vector, a zero-initialised small matrix (its scale floors at epsilon2, like LoRA B), a
# factored matrix, a square factored one (tie: row dim 0), a 3-D [H, E, d_kv] expert tensor (full state) and a
# 3-D tensor with two large dims (factored over dims 2 and 1, the largest coming first).
SHAPES = [((16,), 1.0), ((8, 12), 0.0), ((256, 130), 0.05), ((128, 128), 1.0), ((4, 3, 16), 1.0),
          ((3, 140, 128), 0.5)]
STEPS = 5


def t5x_reference(params, grads_per_step, *, lr, start_step=0, decay_rate=0.8, clipping_threshold=1.0,
                  multiply_by_parameter_scale=True, epsilon1=1e-30, epsilon2=1e-3, beta1=None,
                  min_dim_size_to_factor=128, weight_decay_rate=None, round_params=None):
    """T5X Adafactor.apply_param_gradient in float64, its step counter starting at start_step (step_offset 0).

    Factoring follows T5X's `_factored_dims` size rule. round_params, if given, is applied to each new parameter
    (T5X's `new_param.astype(param.dtype)`). Returns the final parameters and per-tensor state dicts.
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    states = []
    for p in params:
        state = {}
        order = np.argsort(p.shape, kind="stable")
        if p.ndim >= 2 and p.shape[order[-2]] >= min_dim_size_to_factor:
            d1, d0 = int(order[-2]), int(order[-1])  # row dim, column dim
            state["dims"] = (d1, d0)
            state["v_row"] = np.zeros(np.delete(p.shape, d0))
            state["v_col"] = np.zeros(np.delete(p.shape, d1))
        else:
            state["v"] = np.zeros(p.shape)
        if beta1 is not None:
            state["m"] = np.zeros(p.shape)
        states.append(state)

    for k, grads in enumerate(grads_per_step):
        step = start_step + k
        decay = 1.0 - (step + 1.0) ** (-decay_rate)
        mixing = 1.0 - decay
        for i, (param, state) in enumerate(zip(params, states)):
            grad = np.asarray(grads[i], dtype=np.float64)
            update_scale = lr
            if multiply_by_parameter_scale:
                update_scale = lr * max(np.sqrt(np.mean(param * param)), epsilon2)
            grad_sqr = grad * grad + epsilon1
            if "dims" in state:
                d1, d0 = state["dims"]
                state["v_row"] = decay * state["v_row"] + mixing * grad_sqr.mean(axis=d0)
                state["v_col"] = decay * state["v_col"] + mixing * grad_sqr.mean(axis=d1)
                reduced_d1 = d1 - 1 if d0 < d1 else d1
                row_col_mean = state["v_row"].mean(axis=reduced_d1, keepdims=True)
                row_factor = (state["v_row"] / row_col_mean) ** -0.5
                col_factor = state["v_col"] ** -0.5
                y = grad * np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
            else:
                state["v"] = decay * state["v"] + mixing * grad_sqr
                y = grad * state["v"] ** -0.5
            if clipping_threshold is not None:
                y = y / max(1.0, np.sqrt(np.mean(y * y)) / clipping_threshold)
            subtrahend = update_scale * y
            if beta1 is not None:
                state["m"] = beta1 * state["m"] + (1.0 - beta1) * subtrahend
                subtrahend = state["m"]
            if weight_decay_rate is not None:
                new_param = (1.0 - weight_decay_rate) * param - subtrahend
            else:
                new_param = param - subtrahend
            params[i] = new_param if round_params is None else round_params(new_param)
    return params, states


def make_problem(shapes, steps, seed=0):
    """Initial parameters and per-step gradients (float32 NumPy), gradients with uneven row/column scales."""
    rng = np.random.default_rng(seed)
    params = [(std * rng.standard_normal(shape)).astype(np.float32) for shape, std in shapes]
    grads = []
    for _ in range(steps):
        step_grads = []
        for shape, _ in shapes:
            g = 0.03 * rng.standard_normal(shape)
            for axis, n in enumerate(shape):  # uneven scales so that the factored estimate matters
                g = g * np.exp(rng.standard_normal(n)).reshape([n if a == axis else 1 for a in range(len(shape))])
            step_grads.append(g.astype(np.float32))
        grads.append(step_grads)
    return params, grads


def run_ours(params, grads_per_step, dtype=torch.float32, **hparams):
    """Our optimizer on torch copies of params, fed grads_per_step; returns (parameters, optimizer)."""
    tensors = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in params]
    opt = Adafactor(tensors, **hparams)
    for grads in grads_per_step:
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g).to(dtype)
        opt.step()
    return tensors, opt


def assert_close(actual, expected, rtol, what):
    """Max-abs error within rtol of the expected tensor's largest magnitude (elements near 0 have no own scale)."""
    actual = np.asarray(actual, dtype=np.float64)
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


CONFIGS = {
    "t5x_defaults": dict(ours=dict(lr=0.02), ref=dict(lr=0.02)),
    "momentum_and_weight_decay": dict(ours=dict(lr=0.02, beta1=0.9, weight_decay=0.01),
                                      ref=dict(lr=0.02, beta1=0.9, weight_decay_rate=0.01)),
    "tensor_lr_no_scale_no_clip_large_eps1": dict(
        ours=dict(lr=torch.tensor(0.02), multiply_by_parameter_scale=False, clipping_threshold=None, epsilon1=1e-3),
        ref=dict(lr=0.02, multiply_by_parameter_scale=False, clipping_threshold=None, epsilon1=1e-3)),
}


@pytest.mark.parametrize("step_offset", [0, 1_100_000])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_numpy_t5x_transcription(config, step_offset):
    """Five steps on every kind of tensor equal the float64 NumPy transcription of T5X to 1e-6 (params and state)."""
    params, grads = make_problem(SHAPES, STEPS)
    ours, opt = run_ours(params, grads, step_offset=step_offset, **CONFIGS[config]["ours"])
    ref_params, ref_states = t5x_reference(params, grads, start_step=step_offset, **CONFIGS[config]["ref"])
    for (shape, _), p, ref_p, ref_state in zip(SHAPES, ours, ref_params, ref_states):
        assert_close(p.detach().numpy(), ref_p, 1e-6, f"param {shape}")
        state = opt.state[p]
        assert state["step"].item() == STEPS
        for key in ("v", "v_row", "v_col", "m"):
            assert (key in state) == (key in ref_state), f"{shape}: state key {key}"
            if key in state:
                assert_close(state[key].numpy(), ref_state[key], 1e-6, f"{key} of {shape}")


def test_first_update_decay_with_and_without_offset():
    """At the first update beta2 is 0 without offset (v = g^2) and 1 - 1100001^-0.8 with offset 1.1M."""
    g = torch.tensor([0.5, -2.0, 3.0])
    for offset, mix in [(0, 1.0), (1_100_000, 1_100_001.0 ** -0.8)]:
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = g.clone()
        opt = Adafactor([p], step_offset=offset, epsilon1=0.0)
        opt.step()
        torch.testing.assert_close(opt.state[p]["v"], mix * g * g, rtol=1e-6, atol=0.0)


def test_factored_state_holds_row_and_column_only():
    """An [n, m] matrix with n, m >= 128 keeps n + m second-moment numbers; vectors, small, expert tensors keep all."""
    expected = {  # shape -> numbers of second-moment state
        (256, 130): 256 + 130,
        (130, 256): 130 + 256,
        (3, 140, 128): 3 * 128 + 3 * 140,  # the third dim is kept in both factors
        (16,): 16,
        (8, 12): 8 * 12,
        (4, 3, 16): 4 * 3 * 16,  # MoV attention [H, E, d_kv]
        (10, 1024): 10 * 1024,  # MoV feed-forward [E, d_ff]: E < 128
        (8, 512, 4): 8 * 512 * 4,  # MoLORA A [E, in, r]: second largest max(E, r) < 128
        (1024, 8): 1024 * 8,  # router [d, E]
    }
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in expected]
    opt = Adafactor(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p, n in zip(params, expected.values()):
        state = opt.state[p]
        second_moment = [k for k in ("v", "v_row", "v_col") if k in state]
        assert sum(state[k].numel() for k in second_moment) == n, f"{tuple(p.shape)}: {second_moment}"
        assert second_moment == (["v"] if n == p.numel() else ["v_row", "v_col"])
    never = torch.nn.Parameter(torch.zeros(256, 130))
    never.grad = torch.ones_like(never)
    opt = Adafactor([never], min_dim_size_to_factor=2**62)
    opt.step()
    assert opt.state[never]["v"].shape == (256, 130)


def test_resume_from_saved_state_continues_bitwise():
    """state_dict -> torch.save bytes -> fresh optimizer gives bitwise the same next updates as an unbroken run."""
    shapes = [((256, 130), 0.05), ((4, 3, 16), 1.0), ((16,), 1.0), ((8, 12), 1.0)]
    params, grads = make_problem(shapes, 6)
    hparams = dict(lr=0.02, beta1=0.9, weight_decay=0.01, step_offset=1_100_000)
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16]  # the bf16 one keeps fp32 state too

    def fresh(values):
        tensors = [torch.nn.Parameter(torch.as_tensor(v).to(d, copy=True)) for v, d in zip(values, dtypes)]
        return tensors, Adafactor(tensors, **hparams)

    def run(tensors, opt, step_grads):
        for grads_now in step_grads:
            for t, g in zip(tensors, grads_now):
                t.grad = torch.from_numpy(g).to(t.dtype)
            opt.step()

    unbroken, unbroken_opt = fresh(params)
    run(unbroken, unbroken_opt, grads)

    first, first_opt = fresh(params)
    run(first, first_opt, grads[:3])
    buffer = io.BytesIO()
    torch.save({"params": [t.detach() for t in first], "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, resumed_opt = fresh(saved["params"])
    resumed_opt.load_state_dict(saved["optimizer"])
    for t in resumed:
        assert all(v.dtype == torch.float32 for v in resumed_opt.state[t].values())
        assert resumed_opt.state[t]["step"].item() == 3
    run(resumed, resumed_opt, grads[3:])

    for a, b in zip(unbroken, resumed):
        assert torch.equal(a, b), f"param {tuple(a.shape)} differs after resuming"
        state_a, state_b = unbroken_opt.state[a], resumed_opt.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"state {key} of {tuple(a.shape)} differs"


def test_bf16_parameter_keeps_fp32_state():
    """bf16 parameters get fp32 state equal to the float64 reference to 1e-6 (bf16 state would be off ~1e-3)."""
    shapes = [((8, 12), 1.0), ((256, 130), 0.05), ((16,), 1.0)]
    params, grads = make_problem(shapes, STEPS)
    to_bf16 = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)  # noqa: E731
    params = [to_bf16(p).float().numpy() for p in params]
    grads = [[to_bf16(g).float().numpy() for g in step] for step in grads]
    ours, opt = run_ours(params, grads, dtype=torch.bfloat16, lr=0.02, beta1=0.9)
    round_bf16 = lambda a: to_bf16(a).double().numpy()  # noqa: E731
    ref_params, ref_states = t5x_reference(params, grads, lr=0.02, beta1=0.9, round_params=round_bf16)
    for (shape, _), p, ref_p, ref_state in zip(shapes, ours, ref_params, ref_states):
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())
        for key in ("v", "v_row", "v_col"):
            if key in ref_state:
                assert_close(opt.state[p][key].numpy(), ref_state[key], 1e-6, f"{key} of {shape}")
        assert_close(p.detach().float().numpy(), ref_p, 2.0 ** -7, f"bf16 param {shape}")


XLA_SCRIPT = textwrap.dedent("""
    import json
    import torch, torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    from adafactor import Adafactor

    torch.manual_seed(0)
    shapes = [(256, 130), (4, 3, 16), (16,), (8, 12)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]

    def run(device):
        params = [torch.nn.Parameter(x.clone().to(device)) for x in init]
        opt = Adafactor(params, lr=0.02, beta1=0.9, weight_decay=0.01, step_offset=1_100_000)
        device_grads = [[g.to(device) for g in step] for step in grads]
        counts = []
        for step in device_grads:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
            if device != "cpu":
                torch_xla.sync()
                xm.wait_device_ops()
                counts.append([met.counter_value("UncachedCompile"), met.counter_value("ExecuteComputation")])
        return [p.detach().cpu() for p in params], counts

    eager, _ = run("cpu")
    xla, counts = run(torch_xla.device())
    print(json.dumps(dict(counts=counts, fallbacks=met.executed_fallback_ops(),
                          scalar_reads=[n for n in met.counter_names() if "local_scalar" in n],
                          max_diff=max((a - b).abs().max().item() for a, b in zip(eager, xla)))))
""")


@pytest.mark.xla
@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch-xla is not installed (no wheel here)")
def test_step_traces_into_one_xla_graph():
    """On an XLA device each step is one graph, compiled once, with no .item()/CPU fallback, equal to eager CPU."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=repo)
    # Own process: SPMD tests in the same pytest run need to switch SPMD on before any XLA tensor exists.
    done = subprocess.run([sys.executable, "-c", XLA_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    compiles = [c for c, _ in result["counts"]]
    executions = [e for _, e in result["counts"]]
    assert compiles[1:] == [compiles[1]] * 3, f"recompiled after step 2: {result['counts']}"
    assert executions == [executions[0] + i for i in range(4)], f"not one graph per step: {result['counts']}"
    assert result["fallbacks"] == [] and result["scalar_reads"] == [], result
    assert result["max_diff"] < 1e-5, result
