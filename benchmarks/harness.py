"""What the asv suite and the single-layer script share: inputs, steps, timing, FLOP counts.

A *method* is ``hyper`` (hyperattn.attention on a backend) or ``sdpa`` (PyTorch's
scaled_dot_product_attention, the exact baseline; cuDNN on the GPU when it is available).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import hyperattn
from hyperattn.algorithm import ExactPiece, Plan
from hyperattn.config import HyperAttentionConfig
from hyperattn.testing import seeded_plan

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def make_inputs(batch, heads, kv_heads, n, dim, dtype, device, requires_grad=False, seed=0):
    """Gaussian q [B, H, N, D], k and v [B, Hkv, N, D] (never zeros: they time differently)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [
        torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[dtype]).requires_grad_(requires_grad)
        for shape in shapes
    ]


def sdpa(q, k, v, causal):
    """Exact attention through PyTorch: cuDNN on CUDA when it can, GQA without copying K/V."""
    enable_gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # set_priority: without it PyTorch's default order (FlashAttention first) picks the kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


def make_step(method, q, k, v, *, causal, mode, backend="auto", params=None):
    """A zero-argument callable doing one step: 'fwd', 'bwd' (backward only, of one forward made
    here) or 'fwd+bwd' (both, timed as one step)."""
    params = params or {}

    def forward():
        if method == "sdpa":
            return sdpa(q, k, v, causal)
        return hyperattn.attention(q, k, v, causal=causal, backend=backend, seed=0, **params)

    if mode == "fwd":
        return forward
    if mode == "bwd":
        out = forward()
        grad = torch.randn_like(out)

        def backward_only():
            q.grad = k.grad = v.grad = None
            out.backward(grad, retain_graph=True)
            return out

        return backward_only
    grad = None

    def forward_backward():
        nonlocal grad
        # as a training step after zero_grad(set_to_none=True): the gradients are the backward's
        # own tensors, not added into the last step's (three elementwise adds of the inputs'
        # size are no part of attention)
        q.grad = k.grad = v.grad = None
        out = forward()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        return out

    return forward_backward


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: Fast steps are repeated until the timed steps add up to this many seconds (at most MAX_REPEATS):
#: five single sub-millisecond steps, each after a sync, vary by +-30% from run to run.
MIN_TOTAL_SECONDS = 0.2
MAX_REPEATS = 200
#: On the GPU each sample times this many seconds of back-to-back steps (at least one step), as a
#: training or serving loop runs them: the host's Python overhead of one call then overlaps the
#: GPU work of the previous one instead of being timed as idle GPU.
GPU_SAMPLE_SECONDS = 0.02
#: Before each timed GPU sample, back-to-back untimed steps of the same method lasting about this
#: long are queued (no sync in between): the timed steps then start with the host already ahead and
#: the GPU in this method's own steady state (clocks included), as in a loop of training steps.
#: Without it a sample of a few ms steps also timed the host's ramp-up to its first kernel, and
#: after a long SDPA sample the GPU's lowered clock.
GPU_WARM_SECONDS = 0.02


def _steps_per_sample(step, device: str, warmup: int) -> tuple[int, float]:
    """Warm ``step`` up, then (steps per GPU sample, seconds of one step after a sync)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    begin = time.perf_counter()
    step()
    synchronize(device)
    once = time.perf_counter() - begin
    return max(1, int(GPU_SAMPLE_SECONDS / max(once, 1e-6))), once


def _sample_count(repeats: int, seconds_per_sample: float) -> int:
    """At least ``repeats`` samples, more for fast ones (up to MIN_TOTAL_SECONDS, MAX_REPEATS)."""
    return max(repeats, min(MAX_REPEATS, int(MIN_TOTAL_SECONDS / max(seconds_per_sample, 1e-6))))


def _warm_steps(once: float) -> int:
    """Untimed steps queued before each GPU sample (see GPU_WARM_SECONDS): none for long steps."""
    return int(GPU_WARM_SECONDS / max(once, 1e-6)) if once < GPU_WARM_SECONDS else 0


def _gpu_sample(step, run: int, warm: int = 0) -> float:
    """Seconds per step of ``run`` back-to-back steps between two CUDA events, after ``warm``
    untimed steps queued just before them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warm):
        step()
    start.record()
    for _ in range(run):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / run


#: Methods are interleaved only while every one's step is shorter than this.  A long step at full
#: power (SDPA at N=131072: 0.15-1 s) lowers the clock for the next method's samples: an H200 ran
#: HyperAttention at a lower clock interleaved with SDPA than alone (docs/performance.md, "Timing method"),
#: which no loop of one method sees.  Such methods are timed one after the other: all but a method's first sample
#: then follow its own steps.
INTERLEAVE_BELOW_SECONDS = 0.05


def measure_steps_interleaved(steps: dict, *, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per step of each of ``steps`` (name -> step) on the GPU, their samples taken
    in turn (A, B, A, B, ...): host-bound short steps drift by tens of percent within a run, and a
    ratio of two methods should see the same drift.  Each sample is measure_step's (a run of
    back-to-back steps lasting about GPU_SAMPLE_SECONDS, after GPU_WARM_SECONDS of untimed ones).
    When a step is longer than INTERLEAVE_BELOW_SECONDS, each method's samples run in a row."""
    runs, warms, longest = {}, {}, 0.0
    for name, step in steps.items():
        runs[name], once = _steps_per_sample(step, "cuda", warmup)
        warms[name], longest = _warm_steps(once), max(longest, once)
        repeats = _sample_count(repeats, once * runs[name])
    if longest >= INTERLEAVE_BELOW_SECONDS:
        order = [name for name in steps for _ in range(repeats)]
    else:
        order = [name for _ in range(repeats) for name in steps]
    samples = {name: [] for name in steps}
    for name in order:
        samples[name].append(_gpu_sample(steps[name], runs[name], warms[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


def measure_step(step, device: str, *, repeats: int, warmup: int = 1) -> float:
    """Median seconds per ``step``.

    GPU: CUDA events around a run of back-to-back steps lasting about GPU_SAMPLE_SECONDS (a single
    step for steps longer than that), each run after GPU_WARM_SECONDS of untimed ones.  Elsewhere: the host clock around single steps after a sync.
    At least ``repeats`` samples, more for fast steps (see MIN_TOTAL_SECONDS).
    """
    run, once = _steps_per_sample(step, device, warmup)
    if device.startswith("cuda"):
        warm = _warm_steps(once)
        return statistics.median(_gpu_sample(step, run, warm) for _ in range(_sample_count(repeats, once * run)))
    samples = []
    for _ in range(_sample_count(repeats, once)):
        begin = time.perf_counter()
        step()
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def measure_single_call(step, device: str, *, repeats: int) -> float:
    """Median seconds of one ``step`` from an idle device to its result (a sync before and after):
    the latency of a lone call, host time included."""
    samples = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        step()
        synchronize(device)
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def measure_graph_replay(step, *, repeats: int) -> tuple[float | None, str | None]:
    """(median seconds per replay of ``step`` captured in a CUDA graph, None) — back-to-back
    replays between CUDA events, as measure_step times steps — or (None, why the capture failed).
    The step is warmed up on a side stream first, as ``torch.cuda.graphs`` asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as error:  # a step that cannot be captured is reported, not timed
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    run, once = _steps_per_sample(graph.replay, "cuda", warmup=1)
    seconds = statistics.median(_gpu_sample(graph.replay, run, _warm_steps(once))
                                for _ in range(_sample_count(repeats, once * run)))
    del graph
    return seconds, None


def attended_pairs(plan: Plan, n_q: int, n_k: int) -> float:
    """(query, key) score evaluations per query head that a plan needs (exact + sparse)."""
    total = 0.0
    for piece in plan.pieces:
        if isinstance(piece, ExactPiece):
            for qs, qe, ks, ke in piece.segments.table.tolist():
                nq, nk = qe - qs, ke - ks
                total += nq * nk - (nq * (nq - 1) / 2 if piece.causal else 0)
        else:
            st = piece.structure
            total += float(np.sum(st.segments.q_len)) * (st.block_size + st.sample_size)
    return total


def attention_flops(pairs: float, batch: int, heads: int, dim: int, mode: str) -> float:
    """Per pair: forward 2 matmuls of 2·D FLOPs; backward 5 (recomputed scores included)."""
    per_pair = {"fwd": 4 * dim, "bwd": 10 * dim, "fwd+bwd": 14 * dim}[mode]
    return pairs * batch * heads * per_pair


def pairs_of_method(method, q, k, *, causal, params, backend) -> float:
    n_q, n_k = q.shape[2], k.shape[2]
    if method == "sdpa":
        return n_q * n_k - (n_q * (n_q - 1) / 2 if causal else 0)
    from hyperattn.dispatch import resolve_backend
    from hyperattn.validate import validate_inputs

    impl = resolve_backend(backend, validate_inputs(q, k, k, causal=causal))
    plan = seeded_plan(
        impl, q.detach(), k.detach(), causal=causal, scale=q.shape[-1] ** -0.5,
        config=HyperAttentionConfig(**params), seed=0,
    )
    return attended_pairs(plan, n_q, n_k)


def io_bytes(q, k, v, mode: str) -> float:
    """Fewest bytes: forward reads q, k, v and writes out; backward reads q, k, v, out, dO, writes dq, dk, dv."""
    forward = (q.numel() + k.numel() + v.numel() + q.numel()) * q.element_size()
    return {"fwd": forward, "bwd": forward * 2, "fwd+bwd": forward * 3}[mode]


def measure_ceilings(device: str, dtype: str) -> tuple[float, float]:
    """(matrix FLOP/s, memory bytes/s) measured here: a large matmul and a device-to-device copy."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    flops = 2 * n**3 / measure_step(lambda: a @ b, device, repeats=5)
    big = torch.empty(1 << (28 if device.startswith("cuda") else 25), dtype=torch.uint8, device=device)
    other = torch.empty_like(big)
    bandwidth = 2 * big.numel() / measure_step(lambda: other.copy_(big), device, repeats=5)
    return flops, bandwidth
