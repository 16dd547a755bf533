"""Limits that must hold to float64 precision, against the dense float64 exact attention."""

from __future__ import annotations

import numpy as np
import pytest

import hyperattn
from helpers import make_inputs
from hyperattn import testing


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape, kv_heads, n_k, v_dim",
    [((1, 1, 1, 40), 1, 1, 40), ((2, 4, 63, 64), 2, 63, 32), ((1, 2, 300, 128), 1, 1000, 128), ((1, 3, 1000, 40), 1, 1000, 72)],
)
def test_no_samples_and_one_block_is_exact_attention(shape, kv_heads, n_k, v_dim, causal):
    q, k, v = make_inputs(shape, kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=11)
    out, lse = hyperattn.attention(
        q, k, v, causal=causal, block_size=n_k, sample_size=0, min_seq_len=1, seed=0, return_lse=True
    )
    expected_out, expected_lse = testing.exact_attention_f64(q, k, v, causal=causal)
    assert testing.relative_error(out, expected_out) < 1e-13
    assert testing.relative_error(lse, expected_lse) < 1e-13


@pytest.mark.parametrize(
    "n_q, n_k, causal",
    [(n_q, n_k, causal) for n_q, n_k in [(1, 1), (2, 2), (63, 63), (1000, 1000), (600, 1000), (1000, 63)]
     for causal in (False, True) if n_q <= n_k or not causal],
)
def test_inputs_shorter_than_min_seq_len_are_exact(n_q, n_k, causal):
    q, k, v = make_inputs((2, 2, n_q, 64), kv_heads=1, n_k=n_k, v_dim=40, seed=n_q)
    out, lse = hyperattn.attention(q, k, v, causal=causal, min_seq_len=max(n_q, n_k) + 1, return_lse=True)
    expected_out, expected_lse = testing.exact_attention_f64(q, k, v, causal=causal)
    assert testing.relative_error(out, expected_out) < 1e-13
    assert testing.relative_error(lse, expected_lse) < 1e-13


@pytest.mark.parametrize("causal", [False, True])
def test_exact_attention_matches_float64_oracle(causal):
    q, k, v = make_inputs((2, 6, 700, 40), kv_heads=3, n_k=1000, v_dim=24, seed=4)
    out, lse = hyperattn.exact_attention(q, k, v, causal=causal, scale=0.2, return_lse=True)
    expected_out, expected_lse = testing.exact_attention_f64(q, k, v, causal=causal, scale=0.2)
    assert testing.relative_error(out, expected_out) < 1e-13
    assert testing.relative_error(lse, expected_lse) < 1e-13


def test_merge_stays_right_when_parts_differ_by_many_nats():
    """Causal pieces (leaf and rectangle, both exact here) whose log-sum-exps differ by ~50 nats."""
    q, k, v = make_inputs((1, 1, 64, 16), seed=2)
    direction = q[0, 0, 0] / np.linalg.norm(q[0, 0, 0])
    q[0, 0, :] = direction * 8.0
    k[0, 0, :32] = direction * 25.0  # keys of the rectangle: scores of 8 * 25 / 4 = 50 nats
    k[0, 0, 32:] *= 0.01  # the lower diagonal leaf: scores near 0
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out, lse = hyperattn.attention(
        q32, k32, v32, causal=True, block_size=64, sample_size=0, min_seq_len=32, seed=0, return_lse=True
    )
    expected_out, expected_lse = testing.exact_attention_f64(q, k, v, causal=True)
    assert np.abs(expected_lse[0, 0, 32:] - np.log(32) - 50).max() < 1e-6  # the setup is what it says
    assert testing.relative_error(out, expected_out) < 1e-5
    assert testing.relative_error(lse, expected_lse) < 1e-6
