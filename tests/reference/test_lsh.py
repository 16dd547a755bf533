"""sortLSH: sign codes, Gray-code rank order, and stable sorting inside segments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperattn.protocol import query_block_bounds
from hyperattn_reference.backend import gray_rank


def test_gray_rank_inverts_the_reflected_gray_code():
    i = np.arange(1 << 12, dtype=np.int64)
    gray = i ^ (i >> 1)  # the i-th code of the reflected Gray sequence
    np.testing.assert_array_equal(gray_rank(gray), i)
    # neighbouring ranks differ in exactly one bit of the code: that is why we sort by rank
    codes_in_rank_order = np.argsort(gray_rank(i))
    flips = codes_in_rank_order[1:] ^ codes_in_rank_order[:-1]
    assert ((flips & (flips - 1)) == 0).all() and (flips > 0).all()


def test_lsh_codes_are_gray_ranks_of_sign_bits(reference):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 50, 8))
    projections = rng.standard_normal((8, 5))
    bits = (x @ projections > 0).astype(np.int64)
    codes = (bits * (1 << np.arange(5))).sum(-1)
    np.testing.assert_array_equal(reference.lsh_codes(x, projections), gray_rank(codes))


def test_segment_sort_is_stable_and_stays_inside_segments(reference):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, size=(2, 1, 40))
    starts, ends = np.array([3, 20]), np.array([15, 40])
    order, rank = reference.segment_sort(codes, starts, ends)
    for b in range(2):
        np.testing.assert_array_equal(order[b, 0, :3], np.arange(3))  # outside: untouched
        np.testing.assert_array_equal(order[b, 0, 15:20], np.arange(15, 20))
        for s, e in zip(starts, ends):
            expected = s + np.argsort(codes[b, 0, s:e], kind="stable")
            np.testing.assert_array_equal(order[b, 0, s:e], expected)
            np.testing.assert_array_equal(order[b, 0, s + rank[b, 0, s:e]], np.arange(s, e))


@settings(max_examples=200, deadline=None)
@given(
    n_q=st.integers(1, 3000), n_k=st.integers(1, 3000), block_size=st.integers(1, 700)
)
def test_query_blocks_partition_the_sorted_queries(n_q, n_k, block_size):
    n_blocks = -(-n_k // block_size)
    bounds = query_block_bounds(np.arange(n_blocks + 1), block_size, n_q, n_k)
    assert bounds[0] == 0 and bounds[-1] == n_q and (np.diff(bounds) >= 0).all()
    t = np.arange(n_q)
    block_of_rank = (t * n_k // n_q) // block_size  # the documented rule
    np.testing.assert_array_equal(np.searchsorted(bounds, t, side="right") - 1, block_of_rank)
    if n_q == n_k:
        assert (np.diff(bounds)[:-1] == block_size).all()  # query and key blocks coincide


@pytest.mark.parametrize("n_k", [1000, 2**31])
def test_drawn_samples_are_uniform_inside_their_segment(n_k):
    """Samples stay in their segment's key range, every key is drawn about equally often, and the
    index dtype is int32 until the keys need int64."""
    from hyperattn.sampling import sample_keys

    drawn = sample_keys(0, 3, (1, 2), np.array([0, 7]), np.array([7, 993]), 60000, n_k)
    assert drawn.shape == (1, 2, 2, 60000) and drawn.dtype == (np.int32 if n_k < 2**31 else np.int64)
    for s, (start, end) in enumerate([(0, 7), (7, 1000)]):
        counts = np.bincount(drawn[:, :, s].ravel() - start, minlength=end - start)
        assert len(counts) == end - start and counts.min() > 0  # in range, every key reachable
        expected = drawn[:, :, s].size / (end - start)
        assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)  # binomial spread


def test_stratified_samples_keep_to_their_strata_and_every_key_is_equally_likely():
    """Draw j lies in the j-th of m equal strata of its segment (fractional bounds), and over seeds
    every key is drawn m / span times in expectation, as with uniform draws (so the weights
    span / m stay unbiased); the strata hold the draws' spread to about one key per stratum."""
    from hyperattn.sampling import sample_keys

    k_start, k_len, m = np.array([0, 7, 1000]), np.array([7, 993, 10]), 3
    counts = [np.zeros(n) for n in k_len]
    for seed in range(4000):
        drawn = sample_keys(seed, 1, (1, 1), k_start, k_len, m, 1010, stratified=True)[0, 0]
        for s, (start, span) in enumerate(zip(k_start, k_len)):
            offsets = drawn[s] - start
            j = np.arange(m)
            assert ((offsets >= j * span // m) & (offsets <= ((j + 1) * span - 1) // m)).all()
            counts[s] += np.bincount(offsets, minlength=span)
    for s, span in enumerate(k_len):
        expected = 4000 * m / span
        assert np.abs(counts[s] - expected).max() < 6 * np.sqrt(expected) + 1, s
