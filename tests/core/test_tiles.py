"""Tile tables (``hyperattn.tiles``): host tables the GPU backends' kernels read."""

from __future__ import annotations

import numpy as np
import pytest

from hyperattn.protocol import Segments
from hyperattn.tiles import exact_key_tiles


@pytest.mark.parametrize("causal", [False, True])
def test_exact_key_tiles_in_row_chunks_cover_the_same_pairs(causal):
    """Cutting each key tile's rows into chunks keeps exactly the (row, key tile) pairs of the
    unchunked table, once each, every chunk at most ``row_chunk`` rows (empty tiles dropped)."""
    segments = Segments.from_ranges([(0, 50, 0, 50), (50, 117, 60, 127)] if causal else [(3, 90, 0, 7), (90, 100, 7, 40)])
    whole = exact_key_tiles(segments, causal, block_n=16)
    chunked = exact_key_tiles(segments, causal, block_n=16, row_chunk=8)

    def pairs(tiles):
        return sorted((int(t[0]), int(t[2]), int(t[3]), row) for t in tiles for row in range(t[4], t[5]))

    assert pairs(chunked) == pairs(whole)
    assert (chunked[:, 5] - chunked[:, 4] <= 8).all() and (chunked[:, 5] > chunked[:, 4]).all()
    np.testing.assert_array_equal(np.unique(chunked[:, 6]), np.unique(whole[:, 6]))
