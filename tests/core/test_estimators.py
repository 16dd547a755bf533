"""Named estimators (``estimator=``, ``hyperattn.config.ESTIMATORS``): each sets its parameters on
every front door, a conflicting parameter is refused naming both, and the default is stratified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from hyperattn.config import ESTIMATORS, HyperAttentionConfig, make_config
from hyperattn.integrations.transformers import HyperParams, _hyper_call

PARAMS = dict(block_size=16, lsh_num_projs=3, min_seq_len=40, exact_crossover=False)


def _inputs(n=200, dim=16):
    return tuple(torch.randn(1, 2, n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                 for i in range(3))


def test_the_default_is_stratified_and_each_name_sets_its_fields():
    assert HyperAttentionConfig().sampling == "stratified" == make_config(256, 256, 7, 4096).sampling
    paper = make_config(256, 256, 7, 4096, estimator="paper")
    assert (paper.sampling, paper.sink_keys, paper.band_keys, paper.sample_size) == ("uniform", 0, 0, 256)
    band = make_config(256, 256, 7, 4096, estimator="band")
    assert (band.sampling, band.band_keys, band.sample_size) == ("stratified", 64, 64)
    assert make_config(256, 256, 7, 4096, estimator="stratified") == HyperAttentionConfig()
    assert set(ESTIMATORS) == {"paper", "stratified", "band"}


@pytest.mark.parametrize("estimator, extra, expected", [
    ("paper", {}, dict(sampling="uniform", sample_size=12)),
    ("band", {}, dict(band_keys=64, sample_size=64)),
    ("band", dict(sampling="stratified", band_keys=64), dict(band_keys=64, sample_size=64)),  # agreeing: fine
])
def test_a_named_call_equals_the_call_with_its_parameters(estimator, extra, expected):
    q, k, v = _inputs()
    sample_size = extra.pop("sample_size", 12 if estimator == "paper" else 256)
    named = hyperattn.attention(q, k, v, causal=True, seed=3, backend="reference", estimator=estimator,
                                sample_size=sample_size, **extra, **PARAMS)
    spelled = hyperattn.attention(q, k, v, causal=True, seed=3, backend="reference", **{**PARAMS, **expected})
    torch.testing.assert_close(named, spelled, rtol=0, atol=0)


@pytest.mark.parametrize("estimator, conflict, message", [
    ("paper", dict(band_keys=64), r"estimator='paper' sets band_keys=0, got band_keys=64 too"),
    ("paper", dict(sampling="norms"), r"estimator='paper' sets sampling='uniform', got sampling='norms' too"),
    ("band", dict(sample_size=128), r"estimator='band' sets sample_size=64, got sample_size=128 too"),
])
def test_a_parameter_that_contradicts_the_estimator_is_refused_naming_both(estimator, conflict, message):
    q = np.zeros((1, 1, 64, 8))
    with pytest.raises(ValueError, match=message):
        hyperattn.attention(q, q, q, causal=True, estimator=estimator, **conflict)


def test_an_unknown_estimator_is_refused_naming_the_choices():
    q = np.zeros((1, 1, 64, 8))
    with pytest.raises(ValueError, match=r"estimator must be one of \('paper', 'stratified', 'band'\) or None, "
                                         r"got 'Paper'"):
        hyperattn.attention(q, q, q, estimator="Paper")
    with pytest.raises(ValueError, match="estimator must be one of"):
        hyperattn.HyperAttention(input_dim=8, estimator=1)


def test_the_band_estimator_refuses_a_non_causal_call():
    q = np.zeros((1, 1, 64, 8))
    with pytest.raises(ValueError, match=r"band_keys=64 needs causal=True"):
        hyperattn.attention(q, q, q, causal=False, estimator="band")


def test_the_module_and_the_transformers_layer_take_the_name():
    module = hyperattn.HyperAttention(input_dim=16, estimator="paper")
    assert module.config.sampling == "uniform"
    q, k, v = _inputs()
    params = dict(block_size=16, lsh_num_projs=3, min_seq_len=40, exact_crossover=False, seed=3, backend="reference")
    named = _hyper_call(q, k, v, causal=True, scale=None, params=HyperParams(estimator="paper", sample_size=12, **params))
    spelled = _hyper_call(q, k, v, causal=True, scale=None,
                          params=HyperParams(sampling="uniform", sample_size=12, **params))
    torch.testing.assert_close(named, spelled, rtol=0, atol=0)
    stratified = _hyper_call(q, k, v, causal=True, scale=None, params=HyperParams(sample_size=12, **params))
    assert not torch.equal(named, stratified)  # the name reaches the draws
