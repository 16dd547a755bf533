"""The reference kernels against the dense float64 oracle of the same plan (same seed, same draws)."""

from __future__ import annotations

import numpy as np
import pytest

import hyperattn
from helpers import make_inputs
from hyperattn import testing
from hyperattn.algorithm import ExactPiece, SparsePiece
from hyperattn.config import HyperAttentionConfig

SMALL = dict(block_size=64, sample_size=32, lsh_num_projs=5, min_seq_len=128)
TINY = dict(block_size=4, sample_size=3, lsh_num_projs=3, min_seq_len=1)  # sparse even at N = 2
DEFAULT = dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=4096)

# (B, Hq, Hk, Nq, Nk, D, Dv, causal, params)
CASES = [
    (1, 1, 1, 1, 1, 40, 40, False, TINY),
    (1, 1, 1, 1, 1, 40, 40, True, TINY),
    (2, 2, 1, 2, 2, 40, 24, True, TINY),
    (1, 2, 1, 2, 63, 16, 16, False, TINY),
    (1, 4, 2, 63, 63, 64, 64, True, TINY),
    (2, 2, 2, 63, 1000, 64, 40, False, SMALL),
    (1, 4, 1, 1000, 1000, 40, 72, True, SMALL),
    (1, 2, 2, 1000, 1000, 128, 128, False, SMALL),
    (1, 2, 1, 700, 1000, 64, 64, True, SMALL),
    (1, 2, 1, 1000, 63, 40, 40, False, SMALL),
    (1, 2, 1, 4097, 4097, 64, 64, False, DEFAULT),
    (1, 2, 1, 1500, 4097, 32, 16, True, SMALL),
]


def _ids(case):
    b, hq, hk, nq, nk, d, dv, causal, params = case
    return f"B{b}-H{hq}/{hk}-N{nq}x{nk}-D{d}/{dv}-{'causal' if causal else 'full'}-bs{params['block_size']}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_dense_oracle_of_the_same_plan(case, reference):
    batch, q_heads, kv_heads, n_q, n_k, dim, v_dim, causal, params = case
    q, k, v = make_inputs((batch, q_heads, n_q, dim), kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=n_q + n_k)
    scale = 0.9 / np.sqrt(dim)
    out, lse = hyperattn.attention(
        q, k, v, causal=causal, scale=scale, backend="reference", seed=7, return_lse=True, **params
    )
    plan = testing.seeded_plan(
        reference, q, k, causal=causal, scale=scale, config=HyperAttentionConfig(**params), seed=7
    )
    expected_out, expected_lse = testing.dense_attention_from_plan(plan, q, k, v)
    assert out.shape == (batch, q_heads, n_q, v_dim) and out.dtype == np.float64
    assert lse.shape == (batch, q_heads, n_q) and lse.dtype == np.float64
    assert testing.relative_error(out, expected_out) < 1e-12
    assert testing.relative_error(lse, expected_lse) < 1e-12


@pytest.mark.parametrize("n", [300, 1000, 4097])
@pytest.mark.parametrize("n_q_less", [0, 137])
def test_causal_plan_covers_the_lower_triangle_once(n, n_q_less, reference):
    """With no samples, the exact pieces and block diagonals never attend to the future."""
    q, k, _ = make_inputs((1, 2, n - n_q_less, 16), kv_heads=1, n_k=n, seed=3)
    plan = testing.seeded_plan(
        reference, q, k, causal=True, scale=0.25, config=HyperAttentionConfig(32, 0, 4, 64), seed=1
    )
    weights = testing.plan_weights(plan, 1, 2, n - n_q_less, n)
    allowed = testing.causal_mask(n - n_q_less, n)
    assert weights[..., ~allowed].max() == 0.0
    assert weights.max() == 1.0  # no (query, key) pair is counted by two pieces
    assert any(isinstance(p, SparsePiece) for p in plan.pieces)
    assert any(isinstance(p, ExactPiece) and p.causal for p in plan.pieces)


def test_sampled_keys_inside_the_own_block_are_masked(reference):
    """Every (query, sampled key) weight is n_k / m times the draws outside the query's block."""
    q, k, _ = make_inputs((1, 1, 256, 8), seed=5)
    config = HyperAttentionConfig(block_size=32, sample_size=64, lsh_num_projs=3, min_seq_len=1)
    plan = testing.seeded_plan(reference, q, k, causal=False, scale=0.3, config=config, seed=2)
    weights = testing.plan_weights(plan, 1, 1, 256, 256)
    (piece,) = plan.pieces
    st = piece.structure
    q_rank = np.argsort(st.q_order[0, 0])
    for row in (0, 17, 255):
        block = (q_rank[row] * 256 // 256) // 32
        drawn = st.samples[0, 0, 0]
        same_block = st.k_rank[0, 0, drawn] // 32 == block
        own_keys = st.k_order[0, 0, block * 32 : (block + 1) * 32]
        expected = np.zeros(256)
        expected[own_keys] = 1.0
        np.add.at(expected, drawn[~same_block], 256 / 64)
        np.testing.assert_array_equal(weights[0, 0, row], expected)


@pytest.mark.parametrize("causal, ranges", [
    (True, [(0, 40, 0, 40), (40, 80, 40, 80), (80, 120, 80, 120)]),  # causal leaves
    (True, [(0, 40, 10, 50), (40, 80, 50, 90), (80, 120, 90, 130)]),  # leaves after a key prefix
    (False, [(0, 120, 5, 130)]),  # one rectangle over all rows
])
@pytest.mark.parametrize("overwrite", [True, False])
def test_torch_fused_exact_path_equals_the_numpy_tiles(causal, ranges, overwrite, reference, backend_options):
    """Exact pieces that fold run through PyTorch's CPU flash kernel: the same numbers (float64) as
    the NumPy tiles, forward (overwriting or merged into earlier rows) and backward with the final out."""
    from hyperattn.protocol import Segments
    from hyperattn_reference import torch_exact

    segments = Segments.from_ranges(ranges)
    q, k, v = make_inputs((2, 3, 120, 16), kv_heads=3, n_k=130, v_dim=16, seed=5)
    rng = np.random.default_rng(0)
    results = {}
    for use_torch in (True, False):
        backend_options("reference", use_torch_exact=use_torch)
        out = np.zeros((2, 3, 120, 16))
        lse = np.full((2, 3, 120), -np.inf)
        if not overwrite:  # rows already holding an earlier piece's part (some untouched)
            lse[:, :, ::2] = rng.standard_normal((2, 3, 60))
            out[:, :, ::2] = rng.standard_normal((2, 3, 60, 16))
            rng = np.random.default_rng(0)
        reference.exact_forward(q, k, v, segments, causal, 0.3, out, lse, overwrite=overwrite)
        dout = np.random.default_rng(1).standard_normal(out.shape)
        delta = (dout * out).sum(-1)
        grads = [np.zeros(x.shape) for x in (q, k, v)]
        reference.exact_backward(q, k, v, lse, dout, delta, segments, causal, 0.3, *grads, out=out)
        results[use_torch] = (out, lse, *grads)
        if use_torch:
            assert torch_exact._fold(segments, causal, q, k, v) is not None  # the fused path did run
    for got, want in zip(results[True], results[False]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_equal_tiling_recognises_the_batches_fused_kernels_can_run():
    from hyperattn.protocol import Segments

    leaves = Segments.from_ranges([(0, 4, 2, 6), (4, 8, 6, 10)])
    assert leaves.equal_tiling(8, causal=True) == (2, 4, 4, 2, 10)  # count, rows, keys, k_start, k_end
    assert Segments.from_ranges([(0, 8, 3, 20)]).equal_tiling(8, causal=False) == (1, 8, 17, 3, 20)  # any keys
    tiling = leaves.equal_tiling(8, causal=True)
    x = np.arange(2 * 3 * 10 * 5).reshape(2, 3, 10, 5)
    np.testing.assert_array_equal(tiling.fold_keys(x)[1, 3], x[1, 1, 6:10])  # head 1, leaf 1 -> folded head 3
    np.testing.assert_array_equal(tiling.fold_rows(x[:, :, :8])[0, 5], x[0, 2, 4:8])
    assert Segments.from_ranges([(0, 8, 3, 20)]).equal_tiling(8, causal=True) is None  # Nq != Nk causal
    assert Segments.from_ranges([(0, 4, 0, 4), (4, 7, 4, 7)]).equal_tiling(7, causal=True) is None  # unequal
    assert Segments.from_ranges([(0, 4, 0, 4), (4, 8, 5, 9)]).equal_tiling(8, causal=True) is None  # keys shift
    assert Segments.from_ranges([(0, 4, 0, 4)]).equal_tiling(8, causal=True) is None  # rows not covered
