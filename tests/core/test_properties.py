"""Property tests: random shapes and parameters against the dense oracle of the same plan."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperattn
from helpers import first_piece_row_counts, make_inputs
from hyperattn import testing
from hyperattn.config import HyperAttentionConfig


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    n_q=st.integers(1, 90),
    extra_keys=st.integers(0, 60),
    dim=st.integers(1, 12),
    v_dim=st.integers(1, 9),
    causal=st.booleans(),
    block_size=st.integers(1, 40),
    sample_size=st.integers(0, 30),
    projs=st.integers(1, 6),
    min_seq_len=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_valid_input_matches_the_dense_oracle(
    batch, kv_heads, group, n_q, extra_keys, dim, v_dim, causal, block_size, sample_size, projs, min_seq_len, seed
):
    from hyperattn.registry import backend_status

    reference = backend_status("reference").backend
    n_k = n_q + extra_keys
    q, k, v = make_inputs((batch, kv_heads * group, n_q, dim), kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=seed % 1000)
    params = dict(block_size=block_size, sample_size=sample_size, lsh_num_projs=projs, min_seq_len=min_seq_len)
    out, lse = hyperattn.attention(q, k, v, causal=causal, seed=seed, return_lse=True, **params)
    plan = testing.seeded_plan(
        reference, q, k, causal=causal, scale=dim**-0.5, config=HyperAttentionConfig(**params), seed=seed
    )
    expected_out, expected_lse = testing.dense_attention_from_plan(plan, q, k, v)
    np.testing.assert_allclose(out, expected_out, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12, atol=1e-12)
    if causal:
        weights = testing.plan_weights(plan, batch, kv_heads * group, n_q, n_k)
        assert weights[..., ~testing.causal_mask(n_q, n_k)].max(initial=0) == 0


@settings(max_examples=60, deadline=None)
@given(n_q=st.integers(1, 300), extra_keys=st.integers(0, 100), causal=st.booleans(), min_seq_len=st.integers(1, 80))
def test_the_first_piece_of_every_plan_covers_every_row(n_q, extra_keys, causal, min_seq_len):
    """run_forward leaves out unfilled: the first piece must write every row (it never reads)."""
    from hyperattn.registry import backend_status

    reference = backend_status("reference").backend
    q, k, _ = make_inputs((1, 1, n_q, 4), kv_heads=1, n_k=n_q + extra_keys, v_dim=4, seed=0)
    config = HyperAttentionConfig(block_size=16, sample_size=8, lsh_num_projs=3, min_seq_len=min_seq_len)
    plan = testing.seeded_plan(reference, q, k, causal=causal, scale=0.5, config=config, seed=0)
    assert (first_piece_row_counts(plan, n_q) == 1).all()
