"""``sink_keys``: the first keys attended exactly by every row, the approximation covering the rest.

Checked against the plan's dense weights (each attended (row, key) pair counted once, the sinks
with weight 1), against the dense oracle of the same plan, by finite differences, through
``torch.compile``, and for what it is for: a smaller error on inputs with attention sinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperattn
from helpers import (
    assert_matches_plan_oracle,
    assert_pieces_are_disjoint_within,
    first_piece_row_counts,
    make_inputs,
    without_samples,
)
from hyperattn import testing
from hyperattn.config import HyperAttentionConfig
from hyperattn.registry import backend_status

REFERENCE = backend_status("reference").backend


@settings(max_examples=300, deadline=None)
@given(n_q=st.integers(1, 160), extra_keys=st.integers(0, 40), causal=st.booleans(), min_seq_len=st.integers(1, 40),
       sinks=st.integers(0, 60), block_size=st.integers(1, 20), sample_size=st.integers(0, 12))
def test_sinks_are_attended_once_with_weight_one_and_nothing_else_changes_support(
        n_q, extra_keys, causal, min_seq_len, sinks, block_size, sample_size):
    """The plan's pieces still tile what the call attends to: the allowed pairs of the sink keys
    have weight exactly 1 (exact, not also in a block or sampled), every allowed pair is attended
    by some piece, no disallowed pair is, and the first piece covers every row once."""
    n_k = n_q + extra_keys if causal else max(1, n_q + extra_keys - 20)
    sinks = min(sinks, min_seq_len)
    q, k, _ = make_inputs((1, 2, n_q, 4), kv_heads=1, n_k=n_k, v_dim=4, seed=n_q)
    config = HyperAttentionConfig(block_size=block_size, sample_size=sample_size, lsh_num_projs=3,
                                  min_seq_len=min_seq_len, sink_keys=sinks, exact_crossover=False)
    plan = testing.seeded_plan(REFERENCE, q, k, causal=causal, scale=0.5, config=config, seed=sinks)
    weights = testing.plan_weights(plan, 1, 2, n_q, n_k)
    allowed = testing.causal_mask(n_q, n_k) if causal else np.ones((n_q, n_k), bool)
    assert (weights[..., ~allowed] == 0).all()
    blocks_and_exact = testing.plan_weights(without_samples(plan), 1, 2, n_q, n_k)
    assert (blocks_and_exact[..., allowed] <= 1).all()  # no pair in two pieces' exact parts or blocks
    exact_sinks = sinks
    if causal and n_q > 1:  # the sinks of the causal square: at most the first leaf's keys
        from hyperattn.algorithm import causal_split

        leaves, levels = causal_split(n_q, min_seq_len)
        if levels:
            first_leaf = min(end for start, end in leaves if start == 0)
            exact_sinks = min(sinks, n_k - n_q + first_leaf)
    sink_pairs = allowed[:, :exact_sinks]
    assert (weights[..., :exact_sinks][..., sink_pairs] == 1).all()
    assert (first_piece_row_counts(plan, n_q) == 1).all()
    assert_pieces_are_disjoint_within(plan)


def _without_samples(plan):
    """The plan with every sparse piece's samples dropped: its block diagonals and exact pieces."""
    import dataclasses

    from hyperattn.algorithm import Plan, SparsePiece

    pieces = tuple(SparsePiece(dataclasses.replace(p.structure, samples=None)) if isinstance(p, SparsePiece) else p
                   for p in plan.pieces)
    return Plan(pieces, plan.scale)


@settings(max_examples=30, deadline=None)
@given(n_q=st.integers(2, 120), extra_keys=st.integers(0, 30), causal=st.booleans(), min_seq_len=st.integers(1, 30),
       sinks=st.integers(1, 30), kv_heads=st.integers(1, 2), group=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_any_call_with_sinks_matches_the_dense_oracle_of_its_plan(n_q, extra_keys, causal, min_seq_len, sinks,
                                                                  kv_heads, group, seed):
    n_k = n_q + extra_keys
    q, k, v = make_inputs((1, kv_heads * group, n_q, 6), kv_heads=kv_heads, n_k=n_k, v_dim=5, seed=seed % 997)
    params = dict(block_size=8, sample_size=6, lsh_num_projs=3, min_seq_len=min_seq_len,
                  sink_keys=min(sinks, min_seq_len), exact_crossover=False)
    assert_matches_plan_oracle(q, k, v, causal=causal, seed=seed, params=params)


@pytest.mark.parametrize("case", [(13, 13, False), (17, 17, True), (9, 14, True)])
def test_finite_differences_with_sinks(case):
    n_q, n_k, causal = case
    arrays = make_inputs((1, 2, n_q, 4), kv_heads=1, n_k=n_k, v_dim=3, seed=2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays)

    def function(q, k, v):
        return hyperattn.attention(q, k, v, causal=causal, seed=3, return_lse=True, block_size=4, sample_size=5,
                                   lsh_num_projs=3, min_seq_len=6, sink_keys=3, exact_crossover=False)

    assert torch.autograd.gradcheck(function, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_calls_with_sinks_equal_eager(causal):
    q, k, v = (torch.randn(1, 2, 200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    params = dict(block_size=16, sample_size=12, lsh_num_projs=3, min_seq_len=40, sink_keys=8, exact_crossover=False)
    eager = hyperattn.attention(q, k, v, causal=causal, seed=5, backend="reference", **params)
    compiled = torch.compile(lambda q, k, v: hyperattn.attention(q, k, v, causal=causal, seed=5, backend="reference",
                                                                  **params), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    paper = hyperattn.attention(q, k, v, causal=causal, seed=5, backend="reference", **{**params, "sink_keys": 0})
    assert not torch.equal(paper, eager)  # the option reaches the plan


def test_sinks_are_validated_naming_the_parameter():
    with pytest.raises(ValueError, match=r"sink_keys must be an int in \[0, 64\], got 65"):
        HyperAttentionConfig(min_seq_len=64, sink_keys=65)
    with pytest.raises(TypeError, match="sink_keys must be an int"):
        HyperAttentionConfig(sink_keys=1.5)
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(ValueError, match="sink_keys"):
        hyperattn.attention(q, q, q, sink_keys=-1)


def _sink_inputs(seed: int, n: int, dim: int = 16, heads: int = 4, sinks: int = 4, strength: float = 3.0):
    """Gaussian rows whose first ``sinks`` keys align with every query (benchmarks/quality.py's family)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, heads, n, dim)) for _ in range(3))
    direction = rng.standard_normal(dim) / np.sqrt(dim)
    q += direction
    k[:, :, :sinks] = strength * np.sqrt(dim) * direction
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_lower_the_error_where_heads_put_mass_on_the_first_keys(causal):
    """On the attention-sinks family, the same samples and blocks with the first keys exact give a
    smaller output error and log-sum-exp error than the paper's estimator (three seeds)."""
    params = dict(block_size=32, sample_size=32, lsh_num_projs=4, min_seq_len=128, exact_crossover=False)
    errors = {0: [], 16: []}
    for seed in range(3):
        q, k, v = _sink_inputs(seed, 1024)
        want_out, want_lse = testing.exact_attention_f64(q, k, v, causal=causal)
        for sinks in errors:
            out, lse = hyperattn.attention(q, k, v, causal=causal, seed=seed, return_lse=True, backend="reference",
                                           sink_keys=sinks, **params)
            errors[sinks].append((np.linalg.norm(out - want_out) / np.linalg.norm(v), np.abs(lse - want_lse).mean()))
    paper, with_sinks = np.mean(errors[0], axis=0), np.mean(errors[16], axis=0)
    assert (with_sinks < paper).all(), (paper, with_sinks)
