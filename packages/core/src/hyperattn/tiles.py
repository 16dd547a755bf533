"""Tile tables: which rows meet which keys in each program of a launch (host NumPy, vectorised).

Query-side tables (forward, dQ) have rows ``(segment, key block, q0, q1, k0, k1, diag)``; key-side
tables (dK/dV) ``(segment, key block, k0, k1, q0, q1, diag)``; the GPU backends' attention kernels
read them (``hyperattn_triton/kernels/attention.py`` says how).  Pure functions of their arguments,
shared by the backends through the core's public surface; each backend keeps their device copies.
"""

from __future__ import annotations

import numpy as np

from hyperattn.protocol import Segments, SparseStructure, query_block_bounds


def split_ranges(starts, ends, step: int):
    """Cut every range [starts[i], ends[i]) into pieces of ``step``: (owner i, piece start, piece end)."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    counts = np.maximum(-(-(ends - starts) // step), 0)
    owner = np.repeat(np.arange(len(starts)), counts)
    first = np.cumsum(counts) - counts
    piece_start = starts[owner] + (np.arange(counts.sum()) - first[owner]) * step
    return owner, piece_start, np.minimum(piece_start + step, ends[owner])


def _table(*columns) -> np.ndarray:
    return np.stack([np.broadcast_to(np.asarray(c, dtype=np.int64), np.shape(columns[2])) for c in columns],
                    axis=1).reshape(-1, 7)


def exact_tiles(segments: Segments, causal: bool, block_m: int) -> np.ndarray:
    """Query side, [T, 7] (segment, 0, q0, q1, k0, k1, diag) covering every segment's rows."""
    seg, q0, q1 = split_ranges(segments.q_start, segments.q_end, block_m)
    diag = (segments.k_end - segments.q_end)[seg]  # causal, bottom-right: key j visible to row i when j <= i + diag
    k1 = np.minimum(segments.k_end[seg], q1 + diag) if causal else segments.k_end[seg]
    return _table(seg, 0, q0, q1, segments.k_start[seg], k1, diag)


def exact_key_tiles(segments: Segments, causal: bool, block_n: int, keep_empty: bool = False) -> np.ndarray:
    """Key side, [T, 7] (segment, 0, k0, k1, q0, q1, diag): every key tile with the rows that see it
    (and, with ``keep_empty``, the tiles no row sees: an overwriting backward writes their zeros)."""
    seg, k0, k1 = split_ranges(segments.k_start, segments.k_end, block_n)
    diag = (segments.k_end - segments.q_end)[seg]
    q0 = np.maximum(segments.q_start[seg], k0 - diag) if causal else segments.q_start[seg]
    tiles = _table(seg, 0, k0, k1, q0, segments.q_end[seg], diag)
    return tiles if keep_empty else tiles[tiles[:, 4] < tiles[:, 5]]


def _blocks(structure: SparseStructure):
    """Every (segment, key block): (segment, block, sorted k0, k1, sorted q0, q1)."""
    bs, seg_table = structure.block_size, structure.segments
    n_q, n_k = seg_table.q_len, seg_table.k_len
    seg, k0, k1 = split_ranges(seg_table.k_start, seg_table.k_end, bs)
    blk = (k0 - seg_table.k_start[seg]) // bs
    q0 = seg_table.q_start[seg] + query_block_bounds(blk, bs, n_q[seg], n_k[seg])
    q1 = seg_table.q_start[seg] + query_block_bounds(blk + 1, bs, n_q[seg], n_k[seg])
    return seg, blk, k0, k1, q0, q1


def sparse_tiles(structure: SparseStructure, block_m: int) -> np.ndarray:
    """Query side, [T, 7] (segment, block, sorted q0, q1, sorted k0, k1, 0): each block's queries in tiles."""
    seg, blk, k0, k1, q0, q1 = _blocks(structure)
    owner, t0, t1 = split_ranges(q0, q1, block_m)
    return _table(seg[owner], blk[owner], t0, t1, k0[owner], k1[owner], 0)


def sparse_key_tiles(structure: SparseStructure, block_n: int, keep_empty: bool = False) -> np.ndarray:
    """Key side, [T, 7] (segment, block, sorted k0, k1, sorted q0, q1, 0): each block's keys in tiles
    (with ``keep_empty`` also those of blocks without queries, see ``exact_key_tiles``)."""
    seg, blk, k0, k1, q0, q1 = _blocks(structure)
    owner, t0, t1 = split_ranges(k0, k1, block_n)
    tiles = _table(seg[owner], blk[owner], t0, t1, q0[owner], q1[owner], 0)
    return tiles if keep_empty else tiles[tiles[:, 4] < tiles[:, 5]]


def sample_key_tiles(structure: SparseStructure, block_n: int, row_chunk: int) -> np.ndarray:
    """Key side for samples, [T, 7] (segment, -1, slot j0, j1, sorted q0, q1, 0): slot tiles x chunks
    of ``row_chunk`` rows (one partial sum, added atomically, per chunk and slot)."""
    seg_table, m = structure.segments, structure.sample_size
    seg, q0, q1 = split_ranges(seg_table.q_start, seg_table.q_end, row_chunk)
    slot_tiles = -(-m // block_n)
    j0 = np.tile(np.arange(slot_tiles) * block_n, len(seg))
    rep = np.repeat(np.arange(len(seg)), slot_tiles)
    return _table(seg[rep], -1, j0, np.minimum(j0 + block_n, m), q0[rep], q1[rep], 0)


def log_sample_weights(structure: SparseStructure) -> np.ndarray:
    """float32 [S]: each segment's ``log(n_k / m)``."""
    return np.asarray(structure.log_sample_weight, dtype=np.float32)


def query_blocks(structure: SparseStructure, n_q: int) -> np.ndarray:
    """int32 [Nq]: the key block of each sorted query position (-2 outside every segment)."""
    ids = np.full(n_q, -2, dtype=np.int32)
    _, blk, _, _, q0, q1 = _blocks(structure)
    owner, start, end = split_ranges(q0, q1, 1)  # one piece per sorted position
    ids[start] = blk[owner]
    return ids
