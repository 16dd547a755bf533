"""The Triton backend inside CUDA graphs (``pytest -m gpu``): samples drawn on the device from a
seed exactly as ``hyperattn.sampling`` specifies, whole forward+backward steps captured with
``torch.cuda.CUDAGraph`` and under ``torch.compile(mode="reduce-overhead")``, and the seed
semantics of a replay (the same seed repeats its draws, an advanced one draws new ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from hyperattn.protocol import Segments
from hyperattn.registry import backend_status
from hyperattn.sampling import sample_keys

TRITON = backend_status("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON.available or not torch.cuda.is_available(),
                                                  reason=f"triton backend on a GPU: {TRITON.reason or 'no GPU'}")]

#: small enough to run in seconds, long enough for causal levels, sparse pieces and exact leaves
N, HEADS, DIM = 8192, 4, 64
PARAMS = dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=1024)


@pytest.mark.parametrize("n_k", [5000, 2**31 + 7])
def test_gpu_drawn_samples_equal_the_specification(n_k):
    """The compiled draw kernel against the NumPy specification, bit for bit: int seeds (the
    largest too), a device seed, several streams, uneven segments, int64 indices from 2**31 keys."""
    backend = TRITON.backend
    segments = Segments.from_ranges([(0, 10, 0, 7), (10, 20, 7, 1000), (20, 30, 1000, n_k)])
    like = torch.empty(1, 1, 1, DIM, device="cuda")
    for seed, stream in [(0, 0), (12345, 3), (2**63 - 1, 1)]:
        for given in (seed, torch.tensor(seed, device="cuda")):
            got = backend.draw_samples(given, stream, (2, 3), segments, 300, n_k, like).cpu().numpy()
            want = sample_keys(seed, stream, (2, 3), segments.k_start, segments.k_len, 300, n_k)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def _inputs(requires_grad=True):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, HEADS, N, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
            .requires_grad_(requires_grad) for _ in range(3)]


def _step(layer, q, k, v, grad_out, causal):
    out = layer(q, k, v, causal=causal)
    out.backward(grad_out)
    return out


@pytest.mark.parametrize("causal, options", [(False, {}), (True, {}), (True, {"sampling": "key_norm"}),
                                             (True, {"band_keys": 64, "sample_size": 64})])
def test_gpu_forward_backward_step_captures_in_a_cuda_graph(causal, options, backend_options):
    """A HyperAttention step (forward and backward) captured in a CUDA graph: a replay computes
    what the eager call with the same seed computes, and as the module's call count advances
    inside the graph, the next replay draws new samples (the eager call of that count again).
    ``key_norm``: the norm-weighted draws and their weights are made on the device too; a band:
    its exact pieces are part of the graph."""
    backend_options("triton", exact_below=(0, 0))
    layer = hyperattn.HyperAttention(DIM, seed=7, backend="triton", **{**PARAMS, **options}).cuda()
    q, k, v = _inputs()
    grad_out = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            _step(layer, q, k, v, grad_out, causal)
    torch.cuda.current_stream().wait_stream(side)
    for x in (q, k, v):
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    start = int(layer.calls)
    with torch.cuda.graph(graph):
        static_out = _step(layer, q, k, v, grad_out, causal)
    assert int(layer.calls) == start  # capturing records the kernels (the count's increment too), runs none

    replays = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        replays.append([static_out.clone()] + [x.grad.clone() for x in (q, k, v)])
    assert int(layer.calls) == start + 2  # each replay advanced it

    eager = []
    for count in (start, start + 1):
        layer.calls.fill_(count)
        qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = _step(layer, qe, ke, ve, grad_out, causal)
        eager.append([out.detach()] + [x.grad for x in (qe, ke, ve)])
    for got, want in zip(replays, eager):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same kernels on the same plan
        for g, w in zip(got[1:], want[1:]):  # sample slots add with atomics: rounding order differs
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    assert (replays[0][0].float() - replays[1][0].float()).abs().max() > 1e-3  # new draws on the next replay


def test_gpu_reduce_overhead_compiles_a_layer_into_cuda_graphs(backend_options):
    """torch.compile(mode="reduce-overhead") over a step of a HyperAttention layer: no cudagraph
    skips (no CPU tensors, no host reads in the graph), and each step matches the eager step of
    the same call count."""
    backend_options("triton", exact_below=(0, 0))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = hyperattn.HyperAttention(DIM, seed=11, backend="triton", **PARAMS).cuda()
    base = _inputs(requires_grad=False)
    grad_out = torch.randn_like(base[0])

    def step(q, k, v):
        out = layer(q, k, v, causal=True)
        return out

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    results = []
    for _ in range(4):
        q, k, v = (x.clone().requires_grad_() for x in base)
        count = int(layer.calls)
        out = compiled(q, k, v)
        out.backward(grad_out)
        results.append((count, out.detach().clone(), [x.grad.clone() for x in (q, k, v)]))
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    assert skips == 0, dict(torch._dynamo.utils.counters["inductor"])
    for count, out, grads in results[2:]:  # after cudagraph trees' warm-up runs
        layer.calls.fill_(count)
        q, k, v = (x.clone().requires_grad_() for x in base)
        want = layer(q, k, v, causal=True)
        want.backward(grad_out)
        torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)
        for g, w in zip(grads, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()
