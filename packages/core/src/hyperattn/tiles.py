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


def exact_key_tiles(segments: Segments, causal: bool, block_n: int, keep_empty: bool = False,
                    row_chunk: int | None = None) -> np.ndarray:
    """Key side, [T, 7] (segment, 0, k0, k1, q0, q1, diag): every key tile with the rows that see it
    (and, with ``keep_empty``, the tiles no row sees: an overwriting backward writes their zeros).
    ``row_chunk``: each tile's rows cut into chunks of that many, one tile each (their partial sums
    of one key tile are then added atomically): a piece with far more rows than keys (the sinks'
    rectangles) otherwise gives a few programs a loop over all its rows.  Empty tiles are then dropped
    whatever ``keep_empty`` says: added partial sums need their keys zeroed by the caller anyway."""
    seg, k0, k1 = split_ranges(segments.k_start, segments.k_end, block_n)
    diag = (segments.k_end - segments.q_end)[seg]
    q0 = np.maximum(segments.q_start[seg], k0 - diag) if causal else segments.q_start[seg]
    tiles = _table(seg, 0, k0, k1, q0, segments.q_end[seg], diag)
    if keep_empty and row_chunk is None:
        return tiles
    tiles = tiles[tiles[:, 4] < tiles[:, 5]]
    if row_chunk is not None:
        owner, c0, c1 = split_ranges(tiles[:, 4], tiles[:, 5], row_chunk)
        tiles = tiles[owner]
        tiles[:, 4], tiles[:, 5] = c0, c1
    return tiles


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


# -- the segmented counting sort's host tables (both GPU backends' sorts read them) ----------------
def sort_cover(starts, ends, n: int):
    """Pieces covering [0, n) in order: (start, end, is_gap) int64 arrays (gap 0, segment 0, gap 1,
    ..., empty pieces left out), or None when the non-empty segments overlap or leave [0, n)."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    by_start = np.argsort(starts, kind="stable")
    starts, ends = starts[by_start], ends[by_start]
    if len(starts) and ((starts[1:] < ends[:-1]).any() or starts[0] < 0 or ends[-1] > n):
        return None
    piece_start = np.stack([np.concatenate([[0], ends]), np.concatenate([starts, [n]])], axis=1).reshape(-1)[:-1]
    piece_end = np.stack([np.concatenate([starts, [n]]), np.concatenate([ends, [n]])], axis=1).reshape(-1)[:-1]
    is_gap = np.tile(np.array([1, 0], dtype=np.int64), len(starts) + 1)[:-1]
    nonempty = piece_end > piece_start
    return piece_start[nonempty], piece_end[nonempty], is_gap[nonempty]


def sort_chunk_tables(starts, ends, n: int, chunk: int, part: int):
    """Host tables of one counting sort: chunks int64 [T, 4] (p0, p1, piece start, is gap) in
    position order, and segment parts int64 [P, 5] (first chunk, end chunk, start position of the
    segment; the first and end chunk of a part of at most ``part`` chunks); None when the segments
    overlap."""
    cover = sort_cover(starts, ends, n)
    if cover is None:
        return None
    piece_start, piece_end, is_gap = cover
    owner, p0, p1 = split_ranges(piece_start, piece_end, chunk)
    counts = np.bincount(owner, minlength=len(piece_start))  # chunks per piece
    first = np.cumsum(counts) - counts  # first chunk of each piece
    chunks = np.stack([p0, p1, piece_start[owner], is_gap[owner]], axis=1).astype(np.int64).reshape(-1, 4)
    sorted_pieces = (is_gap == 0) & (counts > 0)
    segments = np.stack([first, first + counts, piece_start], axis=1)[sorted_pieces]
    part_of, u0, u1 = split_ranges(segments[:, 0], segments[:, 1], part)
    parts = np.concatenate([segments[part_of], u0[:, None], u1[:, None]], axis=1).astype(np.int64).reshape(-1, 5)
    return np.ascontiguousarray(chunks), np.ascontiguousarray(parts)


def table_key(arg):
    """What a host table built from ``arg`` depends on, hashable (the backends' device-table caches
    key on it): segment bounds by value, structures by their segments and sizes, arrays by value."""
    if isinstance(arg, Segments):
        return arg.key
    if isinstance(arg, SparseStructure):
        return table_key(arg.segments), arg.block_size, arg.sample_size
    if isinstance(arg, np.ndarray):
        return arg.dtype.str, arg.shape, arg.tobytes()
    return arg
