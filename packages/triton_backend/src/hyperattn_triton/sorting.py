"""Stable segmented counting sort of small LSH codes (the sortLSH step) in three Triton launches.

The codes have few bits (``lsh_num_projs``, 7 by default: 128 buckets), so a counting sort beats
a general radix sort over 32- or 64-bit keys.  Every position ``[0, N)`` of each (batch, head)
row is covered by *pieces*: the segments to sort, and the gaps between them, which keep their
order (their codes count as 0).  Pieces are cut into chunks of ``CHUNK`` positions:

1. ``chunk_histogram_kernel`` counts each chunk's codes, [BH, T, NB];
2. ``bucket_starts_kernel`` turns the counts into each (chunk, bucket)'s first destination: an
   exclusive prefix sum in (piece, bucket, chunk) order, which is stable and, since pieces cover
   every position in order, lands on absolute positions (one program per segment and row);
3. ``chunk_scatter_kernel`` sorts each chunk in registers by ``(code, position)`` and writes
   ``order[destination] = position`` and ``rank[position] = destination - piece start``.

Three launches and three allocations: the host cost of a sort matters as much as its GPU time.

The causal recursion sorts the same codes once per level, over segments whose bounds are
multiples of ``CHUNK``.  Then every level's chunks are the same aligned chunks, whose counts and
in-chunk order do not depend on the level: ``chunk_presort_kernel`` computes them once per codes
tensor (cached while it lives), and each level runs only the prefix sums and
``presorted_scatter_kernel`` (no in-register sort: 28 of a level sort's 75 us on an H200).

Orders and ranks are int32 (what the attention kernels read).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .tiles import DerivedTensors, on_device, split_ranges

#: Positions per chunk (one program of each launch) and warps of the scatter: 256 and 2 sort
#: fastest on an H200 (kernel time of a 131072-position sort 113 us against 138 us at 512 and 4,
#: and 63 against 86 us for a causal level's 16 segments: experiments_2026-11-28c/sort_launches);
#: Triton's interpreter sorts a 1024-chunk in about 10 s, so it uses short ones.
CHUNK = 256
SCATTER_WARPS = 2
#: Chunks per step of the prefix-sum kernel (at most), and per part of a segment (one program per
#: part and row): 19 us for a 512-chunk segment against 40 in one part (sort_launches_h200_d01d995).
STARTS_CHUNKS = 64
STARTS_PART = 128
INTERPRETER_CHUNK = 32
#: Codes of at most this many bits are counting-sorted (2**bits buckets per chunk).
MAX_BITS = 8


@triton.jit
def _chunk_row(Tiles, CHUNK: tl.constexpr):
    """This program's chunk: (tile index, bh, its positions, mask, piece start, is it a gap)."""
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = Tiles + t * 4
    p0, p1, piece_start, is_gap = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    offs = p0 + tl.arange(0, CHUNK)
    return t, bh, offs, offs < p1, piece_start, is_gap


@triton.jit
def _chunk(Tiles, Codes, sc_bh, CHUNK: tl.constexpr, NB: tl.constexpr):
    """_chunk_row plus the chunk's codes (0 in gaps): (t, bh, offs, mask, codes, piece start, is gap)."""
    t, bh, offs, mask, piece_start, is_gap = _chunk_row(Tiles, CHUNK)
    codes = tl.load(Codes + bh * sc_bh + offs, mask=mask & (is_gap == 0), other=0).to(tl.int32)
    return t, bh, offs, mask, codes, piece_start, is_gap


@triton.jit
def _sorted_keys(codes, mask, CHUNK: tl.constexpr, NB: tl.constexpr):
    """A chunk's ``code * CHUNK + local index`` in ascending order (masked positions last, as code NB)."""
    return tl.sort(tl.where(mask, codes, NB) * CHUNK + tl.arange(0, CHUNK))


@triton.jit
def _store_in_place(Order, Rank, offs, mask, CHUNK: tl.constexpr):
    """A gap chunk: its positions stay where they are, rank 0."""
    tl.store(Order + offs, offs.to(tl.int32), mask=mask)
    tl.store(Rank + offs, tl.zeros([CHUNK], tl.int32), mask=mask)


@triton.jit
def chunk_histogram_kernel(Tiles, Codes, Hist, sc_bh, num_tiles, CHUNK: tl.constexpr, NB: tl.constexpr):
    """Hist[bh, t, c]: how many positions of chunk t have code c."""
    t, bh, offs, mask, codes, _, _ = _chunk(Tiles, Codes, sc_bh, CHUNK, NB)
    counts = tl.histogram(codes, NB, mask=mask)
    tl.store(Hist + (bh * num_tiles + t) * NB + tl.arange(0, NB), counts)


@triton.jit
def bucket_starts_kernel(Pieces, Hist, First, num_tiles, CB: tl.constexpr, NB: tl.constexpr):
    """First[bh, t, c] for the chunks t in [u0, u1) of one segment (piece) of chunks [t0, t1):
    the segment's start, plus its positions of smaller codes, plus code-c positions in its earlier
    chunks, minus chunk t's own positions of smaller codes (the scatter adds each position's
    index in the sorted chunk).  A long segment is cut into parts [u0, u1), one program each,
    which all read the segment's counts: 8 parts of a 512-chunk segment instead of one program."""
    row = Pieces + tl.program_id(0) * 5
    t0, t1, piece_start = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    u0, u1 = tl.load(row + 3), tl.load(row + 4)
    base = (tl.program_id(1).to(tl.int64) * num_tiles) * NB
    offs_c = tl.arange(0, NB)
    totals = tl.zeros([NB], tl.int32)
    before = tl.zeros([NB], tl.int32)  # code-c positions in the segment's chunks before this part
    for start in range(t0, t1, CB):
        rows = start + tl.arange(0, CB)
        counts = tl.load(Hist + base + rows[:, None] * NB + offs_c[None, :], mask=(rows < t1)[:, None], other=0)
        totals += tl.sum(counts, 0)
        before += tl.sum(tl.where((rows < u0)[:, None], counts, 0), 0)
    carry = (piece_start + tl.cumsum(totals, 0) - totals + before).to(tl.int32)  # first position of each code
    for start in range(u0, u1, CB):
        rows = start + tl.arange(0, CB)
        mask = (rows < u1)[:, None]
        counts = tl.load(Hist + base + rows[:, None] * NB + offs_c[None, :], mask=mask, other=0)
        earlier_chunks = tl.cumsum(counts, 0) - counts + carry[None, :]
        smaller_codes = tl.cumsum(counts, 1) - counts
        tl.store(First + base + rows[:, None] * NB + offs_c[None, :], earlier_chunks - smaller_codes, mask=mask)
        carry += tl.sum(counts, 0)


@triton.jit
def chunk_scatter_kernel(Tiles, Codes, First, Order, Rank, sc_bh, so_bh, num_tiles,
                         CHUNK: tl.constexpr, NB: tl.constexpr):
    """Scatter chunk t: its k-th position in (code, position) order goes to ``First[bh, t, code] + k``,
    where First already subtracts the chunk's own positions of smaller codes."""
    t, bh, offs, mask, codes, piece_start, is_gap = _chunk(Tiles, Codes, sc_bh, CHUNK, NB)
    if is_gap != 0:  # positions outside every segment
        _store_in_place(Order + bh * so_bh, Rank + bh * so_bh, offs, mask, CHUNK)
    else:
        local = tl.arange(0, CHUNK)
        keys = _sorted_keys(codes, mask, CHUNK, NB)
        code = keys // CHUNK
        valid = code < NB
        position = offs - local + keys % CHUNK  # p0 + local index
        dest = tl.load(First + (bh * num_tiles + t) * NB + code, mask=valid, other=0) + local
        tl.store(Order + bh * so_bh + dest, position.to(tl.int32), mask=valid)
        tl.store(Rank + bh * so_bh + position, (dest - piece_start).to(tl.int32), mask=valid)


@triton.jit
def chunk_presort_kernel(Codes, Hist, Sorted, n, sc_bh, so_bh, num_tiles, CHUNK: tl.constexpr, NB: tl.constexpr):
    """Aligned chunk t = [t * CHUNK, (t + 1) * CHUNK) clipped to n: Hist[bh, t, c] counts its code-c
    positions, Sorted[bh, t * CHUNK + k] is its k-th position in (code, position) order."""
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    local = tl.arange(0, CHUNK)
    offs = t * CHUNK + local
    mask = offs < n
    codes = tl.load(Codes + bh * sc_bh + offs, mask=mask, other=0).to(tl.int32)
    tl.store(Hist + (bh * num_tiles + t) * NB + tl.arange(0, NB), tl.histogram(codes, NB, mask=mask))
    keys = _sorted_keys(codes, mask, CHUNK, NB)
    tl.store(Sorted + bh * so_bh + offs, (t * CHUNK + keys % CHUNK).to(tl.int32), mask=mask)


@triton.jit
def presorted_scatter_kernel(Tiles, Codes, Sorted, First, Order, Rank, sc_bh, so_bh, num_tiles,
                             CHUNK: tl.constexpr, NB: tl.constexpr):
    """chunk_scatter_kernel for aligned chunks already sorted by chunk_presort_kernel."""
    t, bh, offs, mask, piece_start, is_gap = _chunk_row(Tiles, CHUNK)
    if is_gap != 0:  # positions outside every segment
        _store_in_place(Order + bh * so_bh, Rank + bh * so_bh, offs, mask, CHUNK)
    else:
        local = tl.arange(0, CHUNK)
        position = tl.load(Sorted + bh * so_bh + offs, mask=mask, other=0)
        code = tl.load(Codes + bh * sc_bh + position, mask=mask, other=0).to(tl.int32)
        dest = tl.load(First + (bh * num_tiles + t) * NB + code, mask=mask, other=0) + local
        tl.store(Order + bh * so_bh + dest, position, mask=mask)
        tl.store(Rank + bh * so_bh + position, (dest - piece_start).to(tl.int32), mask=mask)


def chunk_size() -> int:
    return INTERPRETER_CHUNK if os.environ.get("TRITON_INTERPRET") == "1" else CHUNK


def _cover(starts: np.ndarray, ends: np.ndarray, n: int):
    """Pieces covering [0, n) in order: (start, end, is_gap) arrays, or None if segments overlap."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    by_start = np.argsort(starts, kind="stable")
    starts, ends = starts[by_start], ends[by_start]
    if len(starts) and ((starts[1:] < ends[:-1]).any() or starts[0] < 0 or ends[-1] > n):
        return None
    gap_starts = np.concatenate([[0], ends])
    gap_ends = np.concatenate([starts, [n]])
    piece_start = np.stack([gap_starts, np.concatenate([starts, [n]])], axis=1).reshape(-1)[:-1]
    piece_end = np.stack([gap_ends, np.concatenate([ends, [n]])], axis=1).reshape(-1)[:-1]
    is_gap = np.tile([1, 0], len(starts) + 1)[:-1]
    nonempty = piece_end > piece_start
    return piece_start[nonempty], piece_end[nonempty], is_gap[nonempty]


def chunk_tables(starts: np.ndarray, ends: np.ndarray, n: int, chunk: int, part: int):
    """Host tables of one sort: chunks int64 [T, 4] (p0, p1, piece start, is gap) and segment
    parts int64 [P, 5] (first chunk, end chunk, start position of the segment; the first and end
    chunk of a part of at most ``part`` chunks); or None when the segments overlap."""
    cover = _cover(starts, ends, n)
    if cover is None:
        return None
    piece_start, piece_end, is_gap = cover
    owner, p0, p1 = split_ranges(piece_start, piece_end, chunk)
    counts = np.bincount(owner, minlength=len(piece_start))  # chunks per piece
    first = np.cumsum(counts) - counts  # first chunk of each piece
    tiles = np.stack([p0, p1, piece_start[owner], is_gap[owner]], axis=1)
    sorted_pieces = (is_gap == 0) & (counts > 0)
    segments = np.stack([first, first + counts, piece_start], axis=1)[sorted_pieces]
    part_of, u0, u1 = split_ranges(segments[:, 0], segments[:, 1], part)
    parts = np.concatenate([segments[part_of], u0[:, None], u1[:, None]], axis=1)
    return tiles, np.ascontiguousarray(parts.reshape(-1, 5))


def _starts_step(starts: np.ndarray, ends: np.ndarray, chunk: int) -> int:
    """Chunks per step of the prefix sums: STARTS_CHUNKS, fewer (a power of two, at least 16) when
    every segment has fewer chunks (a causal level's 16 chunks: 8 us against 16 at 64 per step)."""
    starts = np.asarray(starts)
    longest = int(np.max(np.asarray(ends) - starts, initial=0))
    chunks = -(-longest // chunk) + int(np.any(starts % chunk))  # a segment off the chunk grid: one more
    return max(min(STARTS_CHUNKS, triton.next_power_of_2(chunks)), min(16, STARTS_CHUNKS))


def aligned(starts: np.ndarray, ends: np.ndarray, n: int, chunk: int) -> bool:
    """Whether segments cut [0, n) only at multiples of ``chunk`` and are not the one whole range
    (a sort of the whole range is the codes' only one: presorting would add a pass)."""
    starts, ends = np.asarray(starts), np.asarray(ends)
    if len(starts) == 1 and starts[0] == 0 and ends[0] == n:
        return False
    return bool(np.all((starts % chunk == 0) | (starts == n)) and np.all((ends % chunk == 0) | (ends == n)))


#: codes tensor -> (hist, sorted) of chunk_presort_kernel, while the codes live (one call's levels)
_presorted = DerivedTensors()


def _presort(codes, flat, num_buckets: int, chunk: int):
    """(hist int32 [BH, T, NB], sorted int32 [BH, N]) of the aligned chunks of ``codes``, made once."""

    def presort():
        bh, n = flat.shape
        num_tiles = triton.cdiv(n, chunk)
        hist = torch.empty(bh, num_tiles, num_buckets, dtype=torch.int32, device=flat.device)
        in_order = torch.empty(bh, n, dtype=torch.int32, device=flat.device)
        chunk_presort_kernel[(num_tiles, bh)](flat, hist, in_order, n, flat.stride(0), in_order.stride(0), num_tiles,
                                              CHUNK=chunk, NB=num_buckets, num_warps=SCATTER_WARPS)
        return hist, in_order

    return _presorted.get(codes, (chunk, num_buckets), presort)


def counting_segment_sort(codes, starts: np.ndarray, ends: np.ndarray, code_bits: int):
    """(order, rank) int32 [B, H, N] as ``Backend.segment_sort``, or None when it does not apply
    (codes wider than MAX_BITS, overlapping segments, or N beyond int32)."""
    batch, heads, n = codes.shape
    chunk = chunk_size()
    if code_bits > MAX_BITS or n >= 2**31 - chunk:
        return None
    num_buckets = max(2, 1 << code_bits)
    tables = on_device(chunk_tables, codes, np.asarray(starts), np.asarray(ends), n, chunk, STARTS_PART)
    if tables is None:
        return None
    tiles, pieces = tables
    flat = codes.reshape(batch * heads, n)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    bh, num_tiles = batch * heads, len(tiles)
    grid = (num_tiles, bh)
    presorted = aligned(starts, ends, n, chunk)
    if presorted:  # the tiles are the aligned chunks, in order
        hist, in_order = _presort(codes, flat, num_buckets, chunk)
    else:
        hist = torch.empty(bh, num_tiles, num_buckets, dtype=torch.int32, device=codes.device)
        chunk_histogram_kernel[grid](tiles, flat, hist, flat.stride(0), num_tiles, CHUNK=chunk, NB=num_buckets,
                                     num_warps=4)
    first = torch.empty_like(hist)  # gap chunks' entries stay unset: the scatter never reads them
    if len(pieces):
        bucket_starts_kernel[(len(pieces), bh)](pieces, hist, first, num_tiles, CB=_starts_step(starts, ends, chunk),
                                                NB=num_buckets, num_warps=4)
    order = torch.empty(bh, n, dtype=torch.int32, device=codes.device)
    rank = torch.empty(bh, n, dtype=torch.int32, device=codes.device)
    if presorted:
        presorted_scatter_kernel[grid](tiles, flat, in_order, first, order, rank, flat.stride(0), order.stride(0),
                                       num_tiles, CHUNK=chunk, NB=num_buckets, num_warps=4)
    else:
        chunk_scatter_kernel[grid](tiles, flat, first, order, rank, flat.stride(0), order.stride(0), num_tiles,
                                   CHUNK=chunk, NB=num_buckets, num_warps=SCATTER_WARPS)
    return order.view(batch, heads, n), rank.view(batch, heads, n)
