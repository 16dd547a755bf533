"""Gradients of the seeded function: finite differences, and autograd of the dense oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from helpers import make_inputs
from hyperattn import testing
from hyperattn.config import HyperAttentionConfig

TINY = dict(block_size=4, sample_size=5, lsh_num_projs=3, min_seq_len=6)

# (B, Hq, Hk, Nq, Nk, D, Dv, causal)
CASES = [
    (1, 2, 1, 13, 13, 5, 3, False),
    (1, 2, 2, 17, 17, 4, 6, True),
    (2, 2, 1, 9, 14, 3, 3, True),
    (1, 1, 1, 11, 7, 4, 2, False),
]


def _tensors(case, seed=0):
    batch, q_heads, kv_heads, n_q, n_k, dim, v_dim, _ = case
    arrays = make_inputs((batch, q_heads, n_q, dim), kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=seed)
    return [torch.from_numpy(x).requires_grad_() for x in arrays]


@pytest.mark.parametrize("case", CASES)
def test_finite_differences(case):
    causal = case[-1]
    q, k, v = _tensors(case)

    def function(q, k, v):
        out, lse = hyperattn.attention(q, k, v, causal=causal, seed=3, return_lse=True, **TINY)
        return out, lse

    assert torch.autograd.gradcheck(function, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def _weighted_attention_torch(q, k, v, weights, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.where(weights > 0, q @ k.transpose(-1, -2) * scale + weights.log(), -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


@pytest.mark.parametrize("causal", [False, True])
def test_matches_autograd_of_the_dense_oracle(causal, reference):
    """Larger shapes (duplicate samples, scattered rows, GQA, several recursion levels)."""
    params = dict(block_size=16, sample_size=40, lsh_num_projs=4, min_seq_len=32)
    q, k, v = _tensors((1, 4, 2, 200, 200, 8, 5, causal), seed=1)
    out, lse = hyperattn.attention(q, k, v, causal=causal, seed=9, return_lse=True, **params)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))

    plan = testing.seeded_plan(reference, q, k, causal=causal, scale=8**-0.5, config=HyperAttentionConfig(**params), seed=9)
    weights = torch.from_numpy(testing.plan_weights(plan, 1, 4, 200, 200))
    assert weights.max() > 1.0  # samples with their n/m weight are really part of it
    dense_out, dense_lse = _weighted_attention_torch(q, k, v, weights, 8**-0.5)
    expected = torch.autograd.grad((dense_out * d_out).sum() + (dense_lse * d_lse).sum(), (q, k, v))
    torch.testing.assert_close(out, dense_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("qkv", grads, expected):
        assert testing.relative_error(got, want) < 1e-11, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradients_follow_float64(dtype):
    params = dict(block_size=16, sample_size=16, lsh_num_projs=4, min_seq_len=32)
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in _tensors((1, 2, 1, 120, 120, 16, 16, True), seed=4))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))  # same rounded inputs, same hashes
    out = hyperattn.attention(q, k, v, causal=True, seed=2, **params)
    d_out = torch.randn_like(out, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    expected = torch.autograd.grad(hyperattn.attention(q64, k64, v64, causal=True, seed=2, **params), (q64, k64, v64), d_out)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        assert testing.relative_error(got, want) < tolerance


def test_exact_attention_gradients_and_output_only_or_lse_only_losses():
    q, k, v = _tensors((1, 2, 1, 10, 12, 4, 3, True), seed=6)
    assert torch.autograd.gradcheck(lambda q, k, v: hyperattn.exact_attention(q, k, v, causal=True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: hyperattn.exact_attention(q, k, v, return_lse=True)[1], (q, k, v)
    )


def test_no_grad_inputs_give_plain_outputs():
    q, k, v = (x.detach() for x in _tensors(CASES[0]))
    out = hyperattn.attention(q, k, v, seed=0, **TINY)
    assert not out.requires_grad
    with torch.no_grad():
        q.requires_grad_()
        assert not hyperattn.attention(q, k, v, seed=0, **TINY).requires_grad
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("case", [(1, 4, 2, 19, 19, 4, 3, True), (2, 3, 3, 13, 16, 5, 5, False)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_backward_in_chunks_of_heads_equals_one_pass(case, with_lse, backend_options):
    """Long calls run their backward a few KV heads (and their query heads) at a time, converting
    each chunk into the final gradients: the same gradients as one pass (GQA, causal, lse grad)."""

    def grads():
        q, k, v = _tensors(case, seed=2)
        result = hyperattn.attention(q, k, v, causal=case[-1], seed=4, backend="reference", return_lse=with_lse, **TINY)
        out, lse = result if with_lse else (result, None)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()
        if lse is not None:
            loss = loss + (lse * 0.3).sum()
        loss.backward()
        return [x.grad for x in (q, k, v)]

    whole = grads()
    backend_options("reference", backward_chunk_bytes=1)  # one KV head per chunk
    for got, want in zip(grads(), whole):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kv_heads", "per_head", "budget", "want"),
                         [(32, 96, 1024, 8), (32, 96, 512, 5), (32, 96, 4096, 32), (8, 100, 1, 1), (7, 10, 30, 3)])
def test_backward_chunks_are_equal_and_within_the_budget(kv_heads, per_head, budget, want):
    """As few chunks as the byte budget allows, of equal size (no small last chunk idling the GPU)."""
    from hyperattn import algorithm

    step = algorithm.backward_chunk_heads(kv_heads, per_head, budget)
    assert step == want
    assert step * per_head <= max(budget, per_head)
    chunks = -(-kv_heads // step)
    assert chunks == -(-kv_heads // max(1, budget // per_head))  # no more chunks than the budget needs


def test_backward_chunks_free_each_accumulator_before_the_next(monkeypatch, backend_options):
    """Each chunk's accumulators are gone (converted into the final gradients) before the next
    chunk allocates its own: at most one chunk of accumulators is ever alive (the memory peak)."""
    import weakref

    from hyperattn.algorithm import backward

    case = (1, 4, 2, 19, 19, 4, 3, True)
    alive = []
    real = backward._backward_heads

    def recording(*args, **kwargs):
        assert all(ref() is None for ref in alive), "an earlier chunk's accumulator is still alive"
        grads = real(*args, **kwargs)
        alive.extend(weakref.ref(g) for g in grads)
        return grads

    monkeypatch.setattr(backward, "_backward_heads", recording)
    backend_options("reference", backward_chunk_bytes=1)  # one KV head per chunk
    q, k, v = _tensors(case, seed=2)
    hyperattn.attention(q, k, v, causal=True, seed=4, backend="reference", **TINY).sum().backward()
    assert len(alive) == 3 * case[2]  # two chunks ran
