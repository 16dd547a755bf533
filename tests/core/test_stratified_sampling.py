"""``sampling="stratified"``: draw j of a sparse rectangle uniform in the j-th of m equal strata
of its keys.  Checked against the dense oracle of the same plan, by finite differences, through
``torch.compile``, for the refusal of unknown modes, and for what it is for: the same unbiased
normaliser with a smaller spread over seeds where the scores vary smoothly along the keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperattn
from helpers import assert_matches_plan_oracle, make_inputs
from hyperattn import testing
from hyperattn.config import HyperAttentionConfig
from hyperattn.registry import backend_status

REFERENCE = backend_status("reference").backend
PARAMS = dict(block_size=32, sample_size=32, lsh_num_projs=4, min_seq_len=128, exact_crossover=False)


@settings(max_examples=20, deadline=None)
@given(n_q=st.integers(2, 120), extra_keys=st.integers(0, 30), causal=st.booleans(), min_seq_len=st.integers(1, 30),
       sample_size=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_any_stratified_call_matches_the_dense_oracle_of_its_plan(n_q, extra_keys, causal, min_seq_len, sample_size,
                                                                  seed):
    n_k = n_q + extra_keys
    q, k, v = make_inputs((1, 2, n_q, 6), kv_heads=1, n_k=n_k, v_dim=5, seed=seed % 997)
    params = dict(block_size=8, sample_size=sample_size, lsh_num_projs=3, min_seq_len=min_seq_len,
                  sampling="stratified", exact_crossover=False)
    assert_matches_plan_oracle(q, k, v, causal=causal, seed=seed, params=params)


def test_finite_differences_with_stratified_samples():
    arrays = make_inputs((1, 2, 17, 4), kv_heads=1, n_k=17, v_dim=3, seed=2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays)

    def function(q, k, v):
        return hyperattn.attention(q, k, v, causal=True, seed=3, return_lse=True, block_size=4, sample_size=5,
                                   lsh_num_projs=3, min_seq_len=6, sampling="stratified", exact_crossover=False)

    assert torch.autograd.gradcheck(function, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compiled_stratified_calls_equal_eager_and_differ_from_uniform():
    q, k, v = (torch.randn(1, 2, 200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    params = dict(block_size=16, sample_size=12, lsh_num_projs=3, min_seq_len=40, exact_crossover=False)
    eager = hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference", sampling="stratified", **params)
    compiled = torch.compile(lambda q, k, v: hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference",
                                                                  sampling="stratified", **params), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    uniform = hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference", sampling="uniform", **params)
    assert not torch.equal(uniform, eager)  # the option reaches the draws


def test_an_unknown_sampling_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"sampling must be one of \('uniform', 'stratified', 'key_norm'\), got 'norms'"):
        HyperAttentionConfig(sampling="norms")
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(ValueError, match="sampling must be one of"):
        hyperattn.attention(q, q, q, sampling="Stratified")


def _smooth_scores(n: int = 1024, dim: int = 16):
    """Queries along one direction, keys moving along it with position: each row's scores rise
    smoothly along the keys (with noise), the case stratification is for."""
    rng = np.random.default_rng(0)
    direction = np.eye(dim)[0]
    q = 2.0 * direction + 0.05 * rng.standard_normal((1, 1, n, dim))
    k = 4.0 * np.linspace(-1, 1, n)[None, None, :, None] * direction + 0.3 * rng.standard_normal((1, 1, n, dim))
    return q, k, rng.standard_normal((1, 1, n, dim))


def test_stratified_draws_keep_the_normaliser_unbiased_with_less_spread():
    """Over 40 seeds: the normaliser's mean ratio to the true one is 1 within 3% for both, and the
    stratified log-sum-exp errors spread less than half as much as the uniform ones."""
    q, k, v = _smooth_scores()
    _, want_lse = testing.exact_attention_f64(q, k, v, causal=False)
    errors = {}
    for mode in ("uniform", "stratified"):
        errors[mode] = np.array([
            hyperattn.attention(q, k, v, seed=seed, return_lse=True, backend="reference", sampling=mode,
                                **PARAMS)[1] - want_lse for seed in range(40)])
        assert abs(np.exp(errors[mode]).mean() - 1) < 0.03, mode
    spread = {mode: e.std(axis=0).mean() for mode, e in errors.items()}
    assert spread["stratified"] < 0.5 * spread["uniform"], spread
