"""``band_keys``: every row of a causal call also attends exactly to its previous keys.

Checked against the plan's dense weights (each row's band and itself with weight exactly 1, the
pieces still tiling the causal support once), against the dense oracle of the same plan, by finite
differences, through ``torch.compile``, for the refusal of non-causal calls, and for what it is
for: a smaller error where rows attend to their neighbours."""

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
@given(n_q=st.integers(1, 160), extra_keys=st.integers(0, 40), min_seq_len=st.integers(1, 40),
       band=st.integers(0, 50), sinks=st.integers(0, 10), block_size=st.integers(1, 20),
       sample_size=st.integers(0, 12))
def test_each_row_sees_its_previous_band_keys_exactly_once(n_q, extra_keys, min_seq_len, band, sinks, block_size,
                                                           sample_size):
    """Row i (key position p = i + Nk - Nq) has weight exactly 1 on keys [p - band, p]; the pieces
    still attend every causal pair, no other, and each at most once outside the samples."""
    n_k = n_q + extra_keys
    q, k, _ = make_inputs((1, 2, n_q, 4), kv_heads=1, n_k=n_k, v_dim=4, seed=n_q)
    config = HyperAttentionConfig(block_size=block_size, sample_size=sample_size, lsh_num_projs=3,
                                  min_seq_len=min_seq_len, sink_keys=min(sinks, min_seq_len), band_keys=band,
                                  exact_crossover=False)
    plan = testing.seeded_plan(REFERENCE, q, k, causal=True, scale=0.5, config=config, seed=band)
    weights = testing.plan_weights(plan, 1, 2, n_q, n_k)
    allowed = testing.causal_mask(n_q, n_k)
    assert (weights[..., ~allowed] == 0).all()
    assert (testing.plan_weights(without_samples(plan), 1, 2, n_q, n_k)[..., allowed] <= 1).all()
    position = np.arange(n_q)[:, None] + (n_k - n_q)
    keys = np.arange(n_k)[None, :]
    in_band = (keys <= position) & (keys >= position - band)
    assert (weights[..., in_band] == 1).all()
    assert (first_piece_row_counts(plan, n_q) == 1).all()
    assert_pieces_are_disjoint_within(plan)


def test_the_band_is_each_rectangles_first_rows_exact_one_piece_a_level():
    """32k rows, leaves of 4096: three levels, so the first 256 rows of every rectangle against
    all its keys (256 x 16384 pairs a level), packed into three exact pieces (rows and keys
    disjoint in each), and the same three sparse calls, each rectangle 256 rows shorter."""
    from hyperattn.algorithm.plan import _pieces_of_shape

    paper = _pieces_of_shape(32768, 32768, True, HyperAttentionConfig(), False)
    banded = _pieces_of_shape(32768, 32768, True, HyperAttentionConfig(band_keys=256), False)
    assert len(banded[0]) == len(paper[0]) + 3 and len(banded[1]) == len(paper[1]) == 3
    band_pieces = banded[0][len(paper[0]):]
    assert all(not piece.causal and (piece.segments.q_len == 256).all() for piece in band_pieces)
    assert sum(int((p.segments.q_len * p.segments.k_len).sum()) for p in band_pieces) == 3 * 256 * 16384
    for before, after in zip(paper[1], banded[1]):
        np.testing.assert_array_equal(after.q_start, before.q_start + 256)
        np.testing.assert_array_equal(after.k_len, before.k_len)


def test_a_band_wider_than_a_rectangle_makes_its_rows_exact():
    """A band of at least a rectangle's rows leaves no sparse part of it."""
    from hyperattn.algorithm.plan import _pieces_of_shape

    config = HyperAttentionConfig(min_seq_len=64, band_keys=4096)
    exact, sparse = _pieces_of_shape(1024, 1024, True, config, False)
    assert sparse == ()
    band_pairs = sum(int((p.segments.q_len * p.segments.k_len).sum()) for p in exact[1:])
    leaves = exact[0].segments
    leaf_pairs = int((leaves.q_len * (leaves.q_len + 1) // 2).sum())
    assert band_pairs + leaf_pairs == 1024 * 1025 // 2  # every causal pair, once


def test_each_levels_band_is_one_strided_tiling_the_fused_kernels_batch():
    """Each level's band rows are equal rectangles at constant strides (what
    ``hyperattn.torch.fused`` runs as one batched call): 1, 2, 4 rectangles of 256 x 16384,
    8192, 4096 at 32k; a ragged split (halves that differ by one) is a piece the kernels run as
    it is."""
    from hyperattn.algorithm.plan import _pieces_of_shape

    paper = _pieces_of_shape(32768, 32768, True, HyperAttentionConfig(), False)
    banded = _pieces_of_shape(32768, 32768, True, HyperAttentionConfig(band_keys=256), False)
    tilings = [piece.segments.strided_tiling for piece in banded[0][len(paper[0]):]]
    assert [(t.count, t.rows, t.keys, t.q_step, t.k_step) for t in tilings] == [
        (1, 256, 16384, 256, 16384), (2, 256, 8192, 16384, 16384), (4, 256, 4096, 8192, 8192)]
    assert [(t.q_start, t.k_start) for t in tilings] == [(16384, 0), (8192, 0), (4096, 0)]
    ragged = _pieces_of_shape(20002, 20002, True, HyperAttentionConfig(band_keys=256, min_seq_len=1024), False)
    assert any(piece.segments.strided_tiling is None for piece in ragged[0][1:])
    # with sinks a level's first rectangle starts its keys after them: a piece of its own, the rest strided
    sunk = _pieces_of_shape(32768, 32768, True, HyperAttentionConfig(band_keys=256, sink_keys=64), False)
    band_pieces = [piece for piece in sunk[0] if not piece.causal and (piece.segments.q_len == 256).all()]
    assert [len(piece.segments) for piece in band_pieces] == [1, 1, 1, 1, 3]
    assert all(piece.segments.strided_tiling is not None for piece in band_pieces)


@settings(max_examples=30, deadline=None)
@given(n_q=st.integers(2, 120), extra_keys=st.integers(0, 30), min_seq_len=st.integers(1, 30),
       band=st.integers(1, 40), sinks=st.integers(0, 8), kv_heads=st.integers(1, 2), group=st.integers(1, 2),
       seed=st.integers(0, 2**31))
def test_any_call_with_a_band_matches_the_dense_oracle_of_its_plan(n_q, extra_keys, min_seq_len, band, sinks,
                                                                   kv_heads, group, seed):
    n_k = n_q + extra_keys
    q, k, v = make_inputs((1, kv_heads * group, n_q, 6), kv_heads=kv_heads, n_k=n_k, v_dim=5, seed=seed % 997)
    params = dict(block_size=8, sample_size=6, lsh_num_projs=3, min_seq_len=min_seq_len, band_keys=band,
                  sink_keys=min(sinks, min_seq_len), exact_crossover=False)
    assert_matches_plan_oracle(q, k, v, causal=True, seed=seed, params=params)


@pytest.mark.parametrize("n_q, n_k", [(17, 17), (9, 14), (30, 30)])
def test_finite_differences_with_a_band(n_q, n_k):
    arrays = make_inputs((1, 2, n_q, 4), kv_heads=1, n_k=n_k, v_dim=3, seed=4)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays)

    def function(q, k, v):
        return hyperattn.attention(q, k, v, causal=True, seed=3, return_lse=True, block_size=4, sample_size=5,
                                   lsh_num_projs=3, min_seq_len=4, band_keys=3, sink_keys=1, exact_crossover=False)

    assert torch.autograd.gradcheck(function, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compiled_calls_with_a_band_equal_eager():
    q, k, v = (torch.randn(1, 2, 200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    params = dict(block_size=16, sample_size=12, lsh_num_projs=3, min_seq_len=40, band_keys=8, exact_crossover=False)
    eager = hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference", **params)
    compiled = torch.compile(lambda q, k, v: hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference",
                                                                  **params), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    paper = hyperattn.attention(q, k, v, causal=True, seed=5, backend="reference", **{**params, "band_keys": 0})
    assert not torch.equal(paper, eager)  # the option reaches the plan


def test_a_band_is_validated_and_refused_on_non_causal_calls():
    with pytest.raises(ValueError, match="band_keys must be an int >= 0, got -1"):
        HyperAttentionConfig(band_keys=-1)
    q = np.zeros((1, 1, 8, 4))
    for n in (8, 9000):  # an exact call too: the option is never silently ignored
        q = np.zeros((1, 1, n, 4))
        with pytest.raises(ValueError, match="band_keys=16 needs causal=True"):
            hyperattn.attention(q, q, q, band_keys=16, backend="reference")
    with pytest.raises(ValueError, match="band_keys=16 needs causal=True"):
        hyperattn.HyperAttention(input_dim=4, band_keys=16)(*(torch.zeros(1, 1, 8, 4),) * 3, causal=False)


def test_a_band_lowers_the_error_where_rows_attend_to_their_neighbours():
    """On inputs whose heavy keys are each row's neighbours, the same blocks and samples with a
    band of 32 previous keys give a smaller output and log-sum-exp error (three seeds)."""
    params = dict(block_size=32, sample_size=32, lsh_num_projs=4, min_seq_len=128, exact_crossover=False)
    errors = {0: [], 32: []}
    for seed in range(3):
        q, k, v = testing.local_drift_inputs(np.random.default_rng(seed), 4, 1024, 16)
        want_out, want_lse = testing.exact_attention_f64(q, k, v, causal=True)
        for band in errors:
            out, lse = hyperattn.attention(q, k, v, causal=True, seed=seed, return_lse=True, backend="reference",
                                           band_keys=band, **params)
            errors[band].append((np.linalg.norm(out - want_out) / np.linalg.norm(v), np.abs(lse - want_lse).mean()))
    paper, with_band = np.mean(errors[0], axis=0), np.mean(errors[32], axis=0)
    assert (with_band < paper).all(), (paper, with_band)
