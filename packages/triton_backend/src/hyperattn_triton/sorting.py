"""Stable segmented sort of LSH codes (the sortLSH step): a counting sort in three Triton launches
for codes of at most ``MAX_BITS`` bits, else one stable torch sort.

The codes have few bits (``lsh_num_projs``, 7 by default: 128 buckets), so a counting sort beats
a general radix sort over 32- or 64-bit keys.  Every position ``[0, N)`` of each (batch, head)
row is covered by *pieces*: the segments to sort, and the gaps between them, which keep their
order (their codes count as 0).  Pieces are cut into chunks of ``sort_chunk`` positions (see
``TritonOptions``; the kernels are in ``kernels/sort.py``):

1. ``chunk_histogram_kernel`` counts each chunk's codes, [BH, T, NB];
2. ``bucket_starts_kernel`` turns the counts into each (chunk, bucket)'s first destination: an
   exclusive prefix sum in (piece, bucket, chunk) order, which is stable and, since pieces cover
   every position in order, lands on absolute positions (one program per segment part and row);
3. ``chunk_scatter_kernel`` sorts each chunk in registers by ``(code, position)`` and writes
   ``order[destination] = position`` and ``rank[position] = destination - piece start``.

Three launches and three allocations: the host cost of a sort matters as much as its GPU time.

The causal recursion sorts the same codes once per level, over segments whose bounds are
multiples of the chunk.  Then every level's chunks are the same aligned chunks, whose counts and
in-chunk order do not depend on the level: ``chunk_presort_kernel`` computes them once per codes
tensor (kept in a ``DerivedTensors`` while it lives), and each level runs only the prefix sums and
``presorted_scatter_kernel`` (no in-register sort).

A sparse piece sorts its queries' codes within its query ranges and its keys' within its key
ranges.  When the two codes tensors are the halves of one buffer (``lsh.lsh_codes_pair``) and the
ranges are the same or disjoint (a non-causal call; a causal level, whose key and query ranges
tile the rows), :func:`sort_pair` sorts both halves at once, as 2·B·H rows over the ranges of both:
the same GPU work as two sorts (every position of a row is written either way), half the launches.

Orders and ranks are int32 (what the attention kernels read).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from hyperattn.protocol import Segments
from hyperattn.tiles import sort_chunk_tables

from .kernels.sort import (
    bucket_starts_kernel,
    chunk_histogram_kernel,
    chunk_presort_kernel,
    chunk_scatter_kernel,
    presorted_scatter_kernel,
)
from .launcher import direct
from .launches import MAX_GRID_Y, cdiv, next_power_of_2
from .options import TritonOptions, interpreting
from .staging import DerivedTensors, DeviceTables

#: Codes of at most this many bits are counting-sorted (2**bits buckets per chunk).
MAX_BITS = 8


def chunk_size(options: TritonOptions) -> int:
    """Positions per chunk: short ones under the interpreter (it sorts long chunks very slowly)."""
    return options.sort_interpreter_chunk if interpreting() else options.sort_chunk


def _starts_step(starts: np.ndarray, ends: np.ndarray, chunk: int, most: int) -> int:
    """Chunks per step of the prefix sums: ``most``, fewer (a power of two, at least 16) when
    every segment has fewer chunks (a causal level's segments: shorter steps are faster)."""
    return _starts_step_of(*_as_bytes(starts, ends), chunk, most)


def aligned(starts: np.ndarray, ends: np.ndarray, n: int, chunk: int) -> bool:
    """Whether segments cut [0, n) only at multiples of ``chunk`` and are not the one whole range
    (a sort of the whole range is the codes' only one: presorting would add a pass)."""
    return _aligned_of(*_as_bytes(starts, ends), n, chunk)


def _as_bytes(starts, ends) -> tuple[bytes, bytes]:
    """Segment bounds as int64 bytes: the keys of the per-segmentation answers below (a call's
    levels repeat call after call; NumPy on a few elements costs microseconds per operation)."""
    return np.asarray(starts, dtype=np.int64).tobytes(), np.asarray(ends, dtype=np.int64).tobytes()


@functools.lru_cache(maxsize=1024)
def _starts_step_of(starts: bytes, ends: bytes, chunk: int, most: int) -> int:
    starts_a, ends_a = np.frombuffer(starts, dtype=np.int64), np.frombuffer(ends, dtype=np.int64)
    longest = int(np.max(ends_a - starts_a, initial=0))
    chunks = -(-longest // chunk) + int(np.any(starts_a % chunk))  # a segment off the chunk grid: one more
    return max(min(most, next_power_of_2(chunks)), min(16, most))


@functools.lru_cache(maxsize=1024)
def _aligned_of(starts: bytes, ends: bytes, n: int, chunk: int) -> bool:
    starts_a, ends_a = np.frombuffer(starts, dtype=np.int64), np.frombuffer(ends, dtype=np.int64)
    if len(starts_a) == 1 and starts_a[0] == 0 and ends_a[0] == n:
        return False
    return bool(np.all((starts_a % chunk == 0) | (starts_a == n)) and np.all((ends_a % chunk == 0) | (ends_a == n)))


def _presort(codes, flat, row_stride: int, num_buckets: int, chunk: int, warps: int, presorted: DerivedTensors):
    """(hist int32 [BH, T, NB], sorted int32 [BH, N]) of the aligned chunks of ``codes`` (``flat``:
    them with (batch, head) rows ``row_stride`` apart), made once per version of ``codes`` (kept in
    ``presorted``)."""

    def presort():
        n = flat.shape[-1]
        bh = flat.numel() // max(n, 1)
        num_tiles = cdiv(n, chunk)
        hist = torch.empty(bh, num_tiles, num_buckets, dtype=torch.int32, device=flat.device)
        in_order = torch.empty(bh, n, dtype=torch.int32, device=flat.device)
        direct(chunk_presort_kernel)[(num_tiles, bh)](flat, hist, in_order, n, row_stride, in_order.stride(0), num_tiles,
                                              CHUNK=chunk, NB=num_buckets, num_warps=warps)
        return hist, in_order

    return presorted.get(codes, (chunk, num_buckets), presort)


def stacked_codes(q_codes, k_codes):
    """The [2, B, H, N] buffer whose halves are ``q_codes`` and ``k_codes`` (``lsh.lsh_codes_pair``),
    or None."""
    base = q_codes._base
    if base is None or k_codes._base is not base or base.dim() != 4 or base.shape[0] != 2 or not base.is_contiguous():
        return None
    half = q_codes.numel() * q_codes.element_size()
    same = q_codes.data_ptr() == base.data_ptr() and k_codes.data_ptr() == base.data_ptr() + half
    return base if same else None


def joint_ranges(segments: Segments):
    """(starts, ends) that cover a piece's query and key ranges at once, for both halves of stacked
    codes: the ranges themselves when the query and key ranges are the same, both sets when they
    differ (overlaps among them make the counting sort decline)."""
    if np.array_equal(segments.q_start, segments.k_start) and np.array_equal(segments.q_end, segments.k_end):
        return segments.q_start, segments.q_end
    return np.concatenate([segments.q_start, segments.k_start]), np.concatenate([segments.q_end, segments.k_end])


def sort_pair(q_codes, k_codes, segments: Segments, code_bits: int, **sort_state):
    """(q_order, k_order, k_rank) as ``Backend.sort_pair`` in one counting sort of stacked codes, or
    None where it does not apply (see the module docstring); ``sort_state``: the keyword arguments
    of ``counting_segment_sort``."""
    base = stacked_codes(q_codes, k_codes)
    if base is None or 2 * q_codes.shape[0] * q_codes.shape[1] > MAX_GRID_Y:  # rows along the grid's second axis
        return None
    starts, ends = joint_ranges(segments)
    counted = counting_segment_sort(base, starts, ends, code_bits, **sort_state)
    if counted is None:
        return None
    order, rank = counted
    q_order, k_order = order.unbind(0)
    return q_order, k_order, rank[1]


def counting_segment_sort(codes, starts: np.ndarray, ends: np.ndarray, code_bits: int, *, options: TritonOptions,
                          tables: DeviceTables, presorted: DerivedTensors):
    """(order, rank) int32 of codes' shape as ``Backend.segment_sort``, or None when it does not
    apply (codes wider than MAX_BITS, overlapping segments, or N beyond int32).  ``codes``: [B, H, N],
    or contiguous [..., N] (each row sorted alike).  ``tables`` keeps the device copies of the chunk
    tables, ``presorted`` the presort of each codes tensor."""
    n = codes.shape[-1]
    chunk = chunk_size(options)
    if code_bits > MAX_BITS or n >= 2**31 - chunk:
        return None
    num_buckets = max(2, 1 << code_bits)
    device_tables = tables.get(sort_chunk_tables, codes, np.asarray(starts), np.asarray(ends), n, chunk,
                               options.sort_starts_part)
    if device_tables is None:
        return None
    tiles, pieces = device_tables
    # the kernels address row (b, h) at b * H + h times one stride: the codes as they are when
    # their (batch, head) rows are evenly spaced (each torch operation costs host time), else a copy
    flat = codes
    evenly_spaced = codes.dim() == 3 and codes.stride(2) == 1 and codes.stride(0) == codes.shape[1] * codes.stride(1)
    if not evenly_spaced and not codes.is_contiguous():
        flat = codes.contiguous()
    row_stride = flat.stride(-2)
    bh, num_tiles = codes.numel() // max(n, 1), tiles.shape[0]
    grid = (num_tiles, bh)
    warps = options.sort_scatter_warps
    is_aligned = aligned(starts, ends, n, chunk)
    if is_aligned:  # the tiles are the aligned chunks, in order
        hist, in_order = _presort(codes, flat, row_stride, num_buckets, chunk, warps, presorted)
    else:
        hist = torch.empty(bh, num_tiles, num_buckets, dtype=torch.int32, device=codes.device)
        direct(chunk_histogram_kernel)[grid](tiles, flat, hist, row_stride, num_tiles, CHUNK=chunk, NB=num_buckets,
                                     num_warps=4)
    first = torch.empty_like(hist)  # gap chunks' entries stay unset: the scatter never reads them
    if pieces.shape[0]:
        step = _starts_step(starts, ends, chunk, options.sort_starts_chunks)
        direct(bucket_starts_kernel)[(pieces.shape[0], bh)](pieces, hist, first, num_tiles, CB=step, NB=num_buckets, num_warps=4)
    # in the codes' shape, contiguous: (batch, head) rows n apart, no views to make afterwards
    order = torch.empty(codes.shape, dtype=torch.int32, device=codes.device)
    rank = torch.empty(codes.shape, dtype=torch.int32, device=codes.device)
    if is_aligned:
        direct(presorted_scatter_kernel)[grid](tiles, flat, in_order, first, order, rank, row_stride, n,
                                       num_tiles, CHUNK=chunk, NB=num_buckets, num_warps=4)
    else:
        direct(chunk_scatter_kernel)[grid](tiles, flat, first, order, rank, row_stride, n, num_tiles,
                                   CHUNK=chunk, NB=num_buckets, num_warps=warps)
    return order, rank


def torch_segment_sort(codes, starts: np.ndarray, ends: np.ndarray, code_bits: int, bounds):
    """int32 (order, rank) through one stable torch sort of ``(segment label, code)`` keys;
    ``bounds`` is int64 [2, S] (starts, ends) on the codes' device, None when there are no segments."""
    n = codes.shape[-1]
    positions = torch.arange(n, device=codes.device)
    labels = _segment_labels(positions, bounds)
    if code_bits < 31 and (n << code_bits) < 2**31:
        keys = (labels.to(torch.int32) << code_bits) + codes.to(torch.int32)
    else:  # labels < 2**31 above any 32-bit code
        keys = (labels << 32) + codes
    _, order = torch.sort(keys, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, (positions - labels).expand_as(order))
    return order.to(torch.int32), rank.to(torch.int32)


def _segment_labels(positions, bounds):
    """``kernel_utils.segment_labels`` computed on the device (no large host-to-device copy)."""
    if bounds is None:
        return positions
    owner = (torch.searchsorted(bounds[0], positions, right=True) - 1).clamp_(min=0)
    inside = (positions >= bounds[0][owner]) & (positions < bounds[1][owner])
    return torch.where(inside, bounds[0][owner], positions)
