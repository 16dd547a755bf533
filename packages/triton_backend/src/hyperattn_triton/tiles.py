"""Tile tables: which rows meet which keys in each program of a launch (host NumPy, vectorised).

Query-side tables (forward, dQ) have rows ``(segment, key block, q0, q1, k0, k1, diag)``; key-side
tables (dK/dV) ``(segment, key block, k0, k1, q0, q1, diag)``; see ``kernels.py`` for how the
kernels read them.
"""

from __future__ import annotations

import collections

import numpy as np
import torch.utils.weak

from hyperattn._arrays import host_to_device
from hyperattn.protocol import Segments, SparseStructure, query_block_bounds

#: Rows of one partial sum of the sample keys' dK/dV (one atomic add per chunk and sample slot).
SAMPLE_ROW_CHUNK = 4096


#: Device copies of tables kept (least recently used first out): the same shapes come back on
#: every call of a layer, so each table is built and copied once (a copy costs ~90 us of host time).
DEVICE_TABLES_CAPACITY = 512
_device_tables: collections.OrderedDict = collections.OrderedDict()


def _key(arg):
    """What a table depends on, hashable: segment bounds by value, structures by their segments and sizes."""
    if isinstance(arg, Segments):
        return tuple(a.tobytes() for a in (arg.q_start, arg.q_end, arg.k_start, arg.k_end))
    if isinstance(arg, SparseStructure):
        return _key(arg.segments), arg.block_size, arg.sample_size
    if isinstance(arg, np.ndarray):
        return arg.dtype.str, arg.shape, arg.tobytes()
    return arg


def on_device(build, like, *args):
    """``build(*args)`` (a host table, a tuple of them, or None) on ``like``'s device, built and
    copied once per distinct arguments (compared by value, see ``_key``)."""
    key = (build.__qualname__, str(like.device), *(_key(a) for a in args))
    if key in _device_tables:
        _device_tables.move_to_end(key)
        return _device_tables[key]
    host = build(*args)
    if isinstance(host, tuple):
        tables = tuple(host_to_device(t, like) for t in host)
    else:
        tables = None if host is None else host_to_device(host, like)
    _device_tables[key] = tables
    if len(_device_tables) > DEVICE_TABLES_CAPACITY:
        _device_tables.popitem(last=False)
    return tables


class DerivedTensors:
    """Tensors derived from a tensor (by ``key``), kept while it lives and made again after an
    in-place change of it (``Tensor._version``): a call's q and k share their prepared projections,
    a causal call's levels one presort of the codes."""

    def __init__(self):
        self._entries = torch.utils.weak.WeakIdKeyDictionary()  # tensor -> (its version, {key: derived})

    def __contains__(self, tensor) -> bool:
        return tensor in self._entries

    def get(self, tensor, key, make):
        """``make()`` for (``tensor``, ``key``), made once per version of ``tensor``."""
        version, derived = self._entries.get(tensor, (None, None))
        if version != tensor._version:
            derived = {}
            self._entries[tensor] = (tensor._version, derived)
        if key not in derived:
            derived[key] = make()
        return derived[key]


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
    (and, with ``keep_empty``, the tiles no row sees: a fresh backward writes their zeros)."""
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


def sample_key_tiles(structure: SparseStructure, block_n: int, row_chunk: int = SAMPLE_ROW_CHUNK) -> np.ndarray:
    """Key side for samples, [T, 7] (segment, -1, slot j0, j1, sorted q0, q1, 0): slot tiles x row chunks."""
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
