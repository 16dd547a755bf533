"""The segment sort (``Backend.segment_sort``), host side of ``kernels/sort.cu``: a stable counting
sort of codes of at most :data:`MAX_BITS` bits in three launches, and :func:`fallback_sort`, one or
two stable ``cupy.argsort`` calls, for wider codes and overlapping segments.

Every position ``[0, N)`` of a (batch, head) row is covered by *pieces*: the segments to sort and
the gaps between them, which keep their order.  Pieces are cut into chunks of ``launch.block``
positions (the ``"sort"`` launch; ``launch.threads`` threads per chunk):

1. ``chunk_histogram`` counts each segment chunk's codes: hist int32 [rows, T, NB];
2. ``bucket_starts`` turns them into first[rows, T, NB], where each (chunk, code) starts: an
   exclusive prefix sum in (code, chunk) order inside each segment, from the segment's start (one
   block per part of at most :data:`PART_CHUNKS` chunks of a segment, per row);
3. ``chunk_scatter`` writes ``order[dest] = p`` and ``rank[p] = dest - segment start``, stably
   (a chunk's positions of one code keep their order), and ``order[p] = p``, ``rank[p] = 0`` in
   the gaps.

The host tables (:func:`chunk_tables`) are pure functions of ``(starts, ends, n, chunk, part)``,
kept per distinct arguments; ``stage`` copies them to the device (the backend's device tables,
one copy per distinct table).  Orders and ranks are int32 [B, H, N] (what the attention kernels read).
"""

from __future__ import annotations

import functools

import numpy as np

from hyperattn.tiles import sort_chunk_tables, sort_cover

from . import compiler
from .arrays import element_strides
from .launches import RowLaunch
from .utility import i32, i64, int_type, row_launch

SOURCE = "sort.cu"
#: Codes of at most this many bits are counting-sorted (2**bits buckets, at most 256).
MAX_BITS = 8
#: Chunks per part of a segment in the prefix sums: long segments are split over several blocks.
PART_CHUNKS = 32


# -- host tables -----------------------------------------------------------------------------------
def chunk_tables(starts: np.ndarray, ends: np.ndarray, n: int, chunk: int, part: int = PART_CHUNKS):
    """The sort's host tables: chunks int64 [T, 4] (p0, p1, piece start, is gap) in position order,
    and segment parts int64 [P, 5] (first chunk, end chunk, start of the segment, first and end
    chunk of the part: at most ``part`` chunks); None when the segments overlap.  Read-only arrays,
    kept per distinct arguments."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    return _chunk_tables(starts.tobytes(), ends.tobytes(), int(n), int(chunk), int(part))


@functools.lru_cache(maxsize=256)
def _chunk_tables(starts: bytes, ends: bytes, n: int, chunk: int, part: int):
    tables = sort_chunk_tables(np.frombuffer(starts, dtype=np.int64), np.frombuffer(ends, dtype=np.int64), n,
                               chunk, part)
    if tables is None:
        return None
    for table in tables:  # shared by every caller of the cache
        table.setflags(write=False)
    return tables


def num_buckets(code_bits: int) -> int:
    """Buckets of the counting sort: 2**code_bits, at least 2."""
    return max(2, 1 << max(int(code_bits), 0))


# -- the counting sort -----------------------------------------------------------------------------
def segment_sort(codes, starts: np.ndarray, ends: np.ndarray, code_bits: int, *, launches, stage):
    """int32 (order, rank) of codes' shape as ``Backend.segment_sort``, or None where the counting
    sort does not apply (codes wider than MAX_BITS, overlapping segments, N near 2**31).
    ``codes``: integer [..., N], any strides (each row sorted alike); ``stage(host_table)``: its
    device copy."""
    import cupy

    n = codes.shape[-1]
    launch = row_launch(launches, "sort")
    if code_bits > MAX_BITS or n >= 2**31 - launch.block:
        return None
    tables = chunk_tables(starts, ends, n, launch.block)
    if tables is None:
        return None
    order = cupy.empty(codes.shape, dtype=cupy.int32)
    rank = cupy.empty(codes.shape, dtype=cupy.int32)
    if order.size == 0:
        return order, rank
    if codes.dtype not in (cupy.int32, cupy.int64):
        codes = codes.astype(cupy.int32)
    flat = codes.reshape(-1, n)  # a view where the rows are evenly spaced, else a copy
    chunks, parts = tables
    nb = num_buckets(code_bits)
    hist = first = None
    if len(parts):
        work = cupy.empty((2, flat.shape[0], len(chunks), nb), dtype=cupy.int32)
        hist, first = work[0], work[1]  # gap chunks' entries stay unset: nothing reads them
    launch_counting_sort(flat, stage(chunks), len(chunks), None if hist is None else stage(parts), len(parts),
                         hist, first, order, rank, nb, launch)
    return order, rank


def launch_counting_sort(flat, chunks, num_chunks: int, parts, num_parts: int, hist, first, order, rank, nb: int,
                         launch: RowLaunch) -> None:
    """The three launches over the rows of ``flat`` [rows, N] (device tables ``chunks``, ``parts``;
    with no parts, only the scatter of the gaps runs and hist/first are None):

    * ``chunk_histogram<CodeT>(chunks, T, codes, sc_row, sc_n, hist, nb)``: grid rows * T,
      ``launch.threads`` threads, nb ints of shared memory;
    * ``bucket_starts(parts, P, hist, first, T, nb)``: grid rows * P, max(32, nb) threads (one per
      code), as many ints of shared memory;
    * ``chunk_scatter<CodeT>(chunks, T, codes, sc_row, sc_n, first, order, rank, n, nb)``: grid
      rows * T, ``launch.threads`` threads, (threads / 32 + 1) * nb ints of shared memory.
    """
    rows, n = flat.shape
    sc_row, sc_n = element_strides(flat)
    code = int_type(flat.dtype)
    if num_parts:
        compiler.kernel(SOURCE, f"hyperattn::chunk_histogram<{code}>").launch(
            (rows * num_chunks,), (launch.threads,), (chunks, i64(num_chunks), flat, sc_row, sc_n, hist, i32(nb)),
            nb * 4)
        scan_threads = max(32, nb)
        compiler.kernel(SOURCE, "hyperattn::bucket_starts").launch(
            (rows * num_parts,), (scan_threads,), (parts, i64(num_parts), hist, first, i64(num_chunks), i32(nb)),
            scan_threads * 4)
    else:
        first = order  # only gap chunks: the scatter reads no first destination
    compiler.kernel(SOURCE, f"hyperattn::chunk_scatter<{code}>").launch(
        (rows * num_chunks,), (launch.threads,),
        (chunks, i64(num_chunks), flat, sc_row, sc_n, first, order, rank, i64(n), i32(nb)),
        (launch.threads // 32 + 1) * nb * 4)


# -- the fallback ----------------------------------------------------------------------------------
def fallback_sort(codes, starts: np.ndarray, ends: np.ndarray, code_bits: int):
    """int32 (order, rank) as ``Backend.segment_sort`` through stable ``cupy.argsort``: one sort of
    ``(segment label << code_bits) + code`` keys where they fit 64 bits (code_bits <= 32; int32
    keys where ``N << code_bits`` fits), else a stable sort by code and then one by label.  Labels
    as ``hyperattn.kernel_utils.segment_labels`` (a later segment wins where segments overlap)."""
    import cupy

    shape, n = codes.shape, codes.shape[-1]
    if codes.size == 0:
        return cupy.empty(shape, dtype=cupy.int32), cupy.empty(shape, dtype=cupy.int32)
    flat = codes.reshape(-1, n)
    labels = segment_labels(n, starts, ends)  # int64 [n], non-decreasing where segments do not overlap
    bits = max(int(code_bits), 0)
    if bits < 31 and (n << bits) < 2**31:
        order = cupy.argsort((labels.astype(cupy.int32) << bits)[None, :] + flat.astype(cupy.int32), axis=-1)
    elif bits <= 32:  # labels < 2**31: (label + 1) << 32 <= 2**63
        order = cupy.argsort((labels << bits)[None, :] + flat.astype(cupy.int64), axis=-1)
    else:  # both sorts stable: by label, then by code, then by position
        by_code = cupy.argsort(flat, axis=-1)
        order = cupy.take_along_axis(by_code, cupy.argsort(labels[by_code], axis=-1), axis=-1)
    # rank[order[i]] = i - labels[i]: the position in the segment (0 outside every segment)
    within = (cupy.arange(n, dtype=cupy.int64) - labels).astype(cupy.int32)
    rank = cupy.empty(flat.shape, dtype=cupy.int32)
    cupy.put_along_axis(rank, order, cupy.broadcast_to(within, flat.shape), axis=-1)
    return order.astype(cupy.int32).reshape(shape), rank.reshape(shape)


def segment_labels(n: int, starts: np.ndarray, ends: np.ndarray):
    """``hyperattn.kernel_utils.segment_labels`` on the device, int64 [n]: each position's segment
    start, or the position itself outside every segment."""
    import cupy

    positions = cupy.arange(n, dtype=cupy.int64)
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if len(starts) == 0:
        return positions
    if sort_cover(starts, ends, n) is None:  # overlapping: one slice per segment, in order, as the reference
        for start, end in zip(starts.tolist(), ends.tolist()):
            positions[max(start, 0):min(end, n)] = start
        return positions
    by_start = np.argsort(starts, kind="stable")
    bounds = cupy.asarray(np.stack([starts[by_start], ends[by_start]]))
    owner = cupy.maximum(cupy.searchsorted(bounds[0], positions, side="right") - 1, 0)
    inside = (positions >= bounds[0][owner]) & (positions < bounds[1][owner])
    return cupy.where(inside, bounds[0][owner], positions)
