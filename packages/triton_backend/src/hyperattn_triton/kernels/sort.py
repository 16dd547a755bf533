"""The counting sort's kernels (see ``hyperattn_triton/sorting.py`` for the algorithm and the host side).

Chunk tables are int64 [T, 4] ``(p0, p1, piece start, is gap)``; segment parts int64 [P, 5]
``(first chunk, end chunk, segment start, part's first chunk, part's end chunk)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
