"""``HyperAttention(cuda_graphs=True)`` on the Triton backend (``pytest -m gpu``): each call
signature captured once and replayed, computing what the eager module computes call by call
(the same draws from the same call count), forward and backward; outputs that later replays do
not overwrite; a backward after a later forward refused; signatures kept apart and bounded."""

from __future__ import annotations

import pytest
import torch

import hyperattn
from hyperattn.registry import backend_status

TRITON = backend_status("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON.available or not torch.cuda.is_available(),
                                                  reason=f"triton backend on a GPU: {TRITON.reason or 'no GPU'}")]

N, HEADS, DIM = 8192, 4, 64
PARAMS = dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=1024)


def _pair(seed=5, **options):
    """An eager module and a graphed one with the same seed (the same projections and draws)."""
    make = lambda graphs: hyperattn.HyperAttention(DIM, seed=seed, backend="triton", cuda_graphs=graphs,  # noqa: E731
                                                   exact_crossover=False,
                                                   **{**PARAMS, **options}).cuda()
    return make(False), make(True)


def _inputs(n=N, heads=HEADS, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, heads, n, DIM, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("causal, sampling", [(False, "stratified"), (True, "stratified"), (True, "key_norm")])
def test_gpu_graphed_forward_replays_equal_the_eager_calls(causal, sampling, backend_options):
    """Inference (no gradients): replay i equals eager call i bit for bit (same kernels, same plan,
    same draws), consecutive replays draw anew, earlier outputs are not overwritten, one graph."""
    backend_options("triton", exact_below=(0, 0))
    eager, graphed = _pair(sampling=sampling)
    q, k, v = _inputs()
    with torch.no_grad():
        got = [graphed(q, k, v, causal=causal) for _ in range(3)]
        kept = [x.clone() for x in got]
        want = [eager(q, k, v, causal=causal) for _ in range(3)]
    assert len(graphed.graphs) == 1
    assert int(graphed.calls) == int(eager.calls) == 3
    for g, keep, w in zip(got, kept, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        torch.testing.assert_close(g, keep, rtol=0, atol=0)  # a later replay left it alone
    assert (got[0].float() - got[1].float()).abs().max() > 1e-3  # new draws on the next call


@pytest.mark.parametrize("causal, return_lse", [(False, False), (True, False), (True, True)])
def test_gpu_graphed_forward_backward_matches_the_eager_module(causal, return_lse, backend_options):
    """Training steps: outputs (and lse) bit for bit, input gradients within the rounding of the
    sample slots' atomics; the lse's gradient goes through the graph's backward too."""
    backend_options("triton", exact_below=(0, 0))
    eager, graphed = _pair(seed=9)
    base = _inputs(seed=1)
    grad_out = torch.randn_like(base[0])
    grad_lse = torch.randn(1, HEADS, N, device="cuda") if return_lse else None
    results = {}
    for name, module in (("graphed", graphed), ("eager", eager)):
        steps = []
        for _ in range(3):
            q, k, v = (x.clone().requires_grad_() for x in base)
            result = module(q, k, v, causal=causal, return_lse=return_lse)
            out, lse = result if return_lse else (result, None)
            torch.autograd.backward([out] + ([lse] if return_lse else []), [grad_out] + ([grad_lse] if return_lse else []))
            steps.append([out.detach()] + ([lse.detach()] if return_lse else []) + [x.grad for x in (q, k, v)])
        results[name] = steps
    assert len(graphed.graphs) == 1
    for got, want in zip(results["graphed"], results["eager"]):
        n_out = 2 if return_lse else 1
        for g, w in zip(got[:n_out], want[:n_out]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for g, w in zip(got[n_out:], want[n_out:]):
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


def test_gpu_graphed_backward_after_a_later_forward_raises(backend_options):
    """The backward graph reads what its forward left in the graph's memory: after the next
    forward of the same signature it would compute another call's gradients, so it raises."""
    backend_options("triton", exact_below=(0, 0))
    _, graphed = _pair()
    q, k, v = (x.requires_grad_() for x in _inputs())
    first = graphed(q, k, v, causal=True)
    second = graphed(q, k, v, causal=True)
    with pytest.raises(RuntimeError, match="backward ran after a later forward"):
        first.sum().backward()
    second.sum().backward()  # the latest forward's backward is fine
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v))


def test_gpu_graphed_signatures_are_kept_apart_and_bounded(backend_options):
    """Shapes, causal and grad mode each get their own graph; at most max_graphs are kept;
    ``module.to`` drops them (new buffers); an unsupported input still raises its own error,
    leaving the call count and the cache as they were."""
    backend_options("triton", exact_below=(0, 0))
    eager, graphed = _pair()
    graphed.graphs.max_graphs = 2
    q, k, v = _inputs()
    q2, k2, v2 = _inputs(n=4096, seed=3)
    with torch.no_grad():
        a = graphed(q, k, v, causal=False)
        b = graphed(q2, k2, v2, causal=False)
        c = graphed(q, k, v, causal=True)
        want = [eager(q, k, v, causal=False), eager(q2, k2, v2, causal=False), eager(q, k, v, causal=True)]
    assert len(graphed.graphs) == 2
    for g, w in zip((a, b, c), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    graphed.to("cuda")
    assert len(graphed.graphs) == 0
    calls = int(graphed.calls)
    with pytest.raises(ValueError, match="head dim"):
        graphed(q[..., :32].contiguous(), k[..., :32].contiguous(), v, causal=False)
    assert int(graphed.calls) == calls and len(graphed.graphs) == 0  # a refused call counts as none
