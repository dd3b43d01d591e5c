"""Matmul FLOPs of one training step of T5 with an adapter method, and the measured matmul peak to compare them to.

bench.py reports each configuration's achieved matmul throughput (model FLOPs per step / step time) as a fraction
of the best matmul throughput the same device reaches in the same dtype with the same threads (a roofline: on a GPU
in bf16 this fraction is the MFU). Counted, per step:

  - every matmul of the model, forward: 2*m*k*n for [m, k] @ [k, n]; Linear layers (q, k, v, o, wi_0, wi_1 / wi,
    wo, lm_head), attention (scores q k^T and P v, per batch row and head), and the adapters' matmuls: LoRA's A x
    and B(.), MoLORA's router x W_r and its stacked [E*r] A and B, MoV's router h W_r and its expert mixing p V
    (float32 under autocast, counted the same);
  - backward: 2*m*k*n more for each operand that needs a gradient, nothing else: the input's gradient when the input
    depends on a trainable tensor (autograd skips it otherwise, e.g. in the first block of each stack, whose input
    is the frozen embedding), the weight's gradient only for trainable weights (full fine-tuning, adapters). So a
    frozen Linear deep in the model costs 2 + 2 (forward, input gradient) per m*k*n, a trained one 2 + 4, and the
    query projection of block 0 of a frozen stack with (IA)3 costs 2 only.
Not counted: elementwise work (norms, softmax, GELU, dropout, (IA)3's rescaling, the loss), embeddings, the
optimizer. A fused attention kernel's backward may compute a gradient that nothing needs (block 0's query
gradient): that work is not counted either. tests/test_bench.py checks the count against torch's FlopCounterMode
on one real step.
"""
import time

import torch

import molora
import mov


class _Count:
    def __init__(self):
        self.forward = self.backward = 0

    def mm(self, m, k, n, a_grad, b_grad, times=1):
        """[m, k] @ [k, n], `times` times; a_grad / b_grad: whether each operand needs its gradient."""
        flops = 2 * m * k * n * times
        self.forward += flops
        self.backward += flops * (int(a_grad) + int(b_grad))


def train_step_flops(cfg, method, experts, rank, batch_size, input_length, target_length):
    """{"forward", "backward", "total"} matmul FLOPs of one training step of t5.T5(cfg) with `method`'s adapters
    (build.METHODS; experts for mov / molora, rank for lora / molora) on [batch, input_length] -> [batch, target_length]."""
    c, full = _Count(), method == "full"
    inner, heads, d_kv, d, d_ff = cfg.num_heads * cfg.d_kv, cfg.num_heads, cfg.d_kv, cfg.d_model, cfg.d_ff
    lora_sites = molora.TARGETS if method in ("lora", "molora") else ()
    mov_sites = mov.ATTENTION_TARGETS + mov.FFN_TARGETS if method in ("mov", "ia3") else ()
    routed = method in ("mov", "molora")

    def rescale(n, dim, heads_, h_grad, name):
        """MoV at site `name` on h [n, (heads,) dim]: router and mixing matmuls; returns whether h' needs a grad."""
        if name not in mov_sites:
            return h_grad
        if routed:
            c.mm(n * heads_, dim, experts, h_grad, True)  # router logits h W_r
            c.mm(n, experts, dim, True, True, times=heads_)  # sum_e p_e v_e: [n, E] @ [E, dim] per head
        return True  # the (IA)3 / MoV vectors train

    def linear(n, d_in, d_out, x_grad, name):
        """A Linear on [n, d_in] (with its LoRA / MoLORA); returns whether its output needs a gradient."""
        c.mm(n, d_in, d_out, x_grad, full)
        if name not in lora_sites:
            return x_grad or full
        width = rank * (experts if method == "molora" else 1)
        if method == "molora":
            c.mm(n, d_in, experts, x_grad, True)  # router x W_r
        c.mm(n, d_in, width, x_grad, True)  # A x (stacked experts)
        c.mm(n, width, d_out, True, True)  # B (.)
        return True

    def attention(b, t, s, x_grad, kv_grad):
        q = linear(b * t, d, inner, x_grad, "q")
        k = rescale(b * s, d_kv, heads, linear(b * s, d, inner, kv_grad, "k"), "k")
        v = rescale(b * s, d_kv, heads, linear(b * s, d, inner, kv_grad, "v"), "v")
        c.mm(t, d_kv, s, q, k, times=b * heads)  # scores q k^T
        p = q or k
        c.mm(t, s, d_kv, p, v, times=b * heads)  # P v
        out = linear(b * t, inner, d, p or v, "o")
        return x_grad or out  # the residual stream

    def ffn(n, x_grad):
        if cfg.feed_forward_proj == "gated-gelu":
            h0 = rescale(n, d_ff, 1, linear(n, d, d_ff, x_grad, "wi_0"), "act")
            h = linear(n, d, d_ff, x_grad, "wi_1") or h0  # the product act(wi_0 x) * wi_1 x
        else:
            h = rescale(n, d_ff, 1, linear(n, d, d_ff, x_grad, "wi"), "act")
        out = linear(n, d_ff, d, h, "wo")
        return x_grad or out

    b, L, T = batch_size, input_length, target_length
    x = full  # the embedding trains only in full fine-tuning
    for _ in range(cfg.num_layers):
        x = ffn(b * L, attention(b, L, L, x, x))
    encoded, y = x, full
    for _ in range(cfg.num_decoder_layers):
        y = ffn(b * T, attention(b, T, L, attention(b, T, T, y, y), encoded))
    c.mm(b * T, d, cfg.vocab_size, y, full)  # lm_head (or the tied embedding)
    return {"forward": c.forward, "backward": c.backward, "total": c.forward + c.backward}


def synchronize(device):
    """Wait for all queued work: CUDA kernels, or XLA's pending graph (cut, executed, waited for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla
        torch_xla.sync(wait=True)


def _run(a, b, device):
    """One a @ b, waited for. On XLA the product is kept alive and materialised: a lazy graph whose result nobody
    holds would execute nothing."""
    c = a @ b
    if device.type == "xla":
        c.sum().item()
    synchronize(device)
    return c


def matmul_peak(dtype, device, n=2048, repeats=3, budget_s=20.0):
    """Best FLOP/s of n x n @ n x n matmuls in `dtype` on `device` (one untimed first, then up to `repeats` timed,
    stopping early once `budget_s` has passed: an emulated bf16 matmul on a CPU takes tens of seconds).
    Returns (best FLOP/s, [times])."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    start, times = time.perf_counter(), []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        _run(a, b, device)
        if i > 0:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and times:
            break
    if not times:  # the untimed one alone exhausted the budget: time one more anyway
        t0 = time.perf_counter()
        _run(a, b, device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times), times
