"""Small row-wise kernels: the backward's delta (``row_dot_kernel``), the widening copy of the exact
path's results (``cast_rows_kernel``), the residual's samples (``draw_samples_kernel``; by key norm
``draw_key_norm_samples_kernel``) and each sample's key block (``sample_blocks_kernel``)."""

from __future__ import annotations

import triton
import triton.language as tl

from hyperattn import sampling

from .common import load_rows, program_heads

# the counter hash's constants (kernels read module globals only as constexprs)
GOLDEN = tl.constexpr(sampling.GOLDEN)
MIX1 = tl.constexpr(sampling.MIX1)
MIX2 = tl.constexpr(sampling.MIX2)
STREAM = tl.constexpr(sampling.STREAM)
PREFIX_FLOOR = tl.constexpr(sampling.PREFIX_FLOOR)


@triton.jit
def row_dot_kernel(A, B, Out, n_rows, num_heads, sa_b, sa_h, sa_n, sa_d, sb_b, sb_h, sb_n, sb_d, so_b, so_h, so_n,
                   DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Out[b, h, n] = sum_d A[b, h, n, d] * B[b, h, n, d] in fp32 (the backward's delta)."""
    b, h, _ = program_heads(num_heads, 1)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask_n = offs_n < n_rows
    a = load_rows(A + b * sa_b + h * sa_h, offs_n, sa_n, offs_d, sa_d, mask_n, DIM).to(tl.float32)
    c = load_rows(B + b * sb_b + h * sb_h, offs_n, sb_n, offs_d, sb_d, mask_n, DIM).to(tl.float32)
    tl.store(Out + b * so_b + h * so_h + offs_n * so_n, tl.sum(a * c, 1), mask=mask_n)


@triton.jit
def cast_rows_kernel(Src, Dst, n_rows, num_heads, ss_b, ss_h, ss_n, ss_d, sd_b, sd_h, sd_n, sd_d,
                     DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    """Dst[b, h, n] = Src[b, h, n] in Dst's dtype (``ADD``: Dst += it), rows of [B, H, N, DIM] views.

    The exact pieces' fp16/bf16 results go into fp32 accumulators this way: PyTorch copies a
    widening cast through its generic casting kernel, this one vectorises."""
    b, h, _ = program_heads(num_heads, 1)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask_n = offs_n < n_rows
    x = load_rows(Src + b * ss_b + h * ss_h, offs_n, ss_n, offs_d, ss_d, mask_n, DIM).to(Dst.dtype.element_ty)
    ptrs = Dst + b * sd_b + h * sd_h + offs_n[:, None] * sd_n + offs_d[None, :] * sd_d
    mask = mask_n[:, None] & (offs_d[None, :] < DIM)
    if ADD:
        x += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, x, mask=mask)


@triton.jit
def sample_blocks_kernel(Samples, KRank, Blocks, count, kv_heads, ss_b, ss_h, sr_b, sr_h, sr_n, block_size,
                         BLOCK: tl.constexpr):
    """Blocks[b, h, i] = KRank[b, h, Samples[b, h, i]] // block_size for the ``count`` samples of
    one (batch, KV head) (Samples [B, Hk, count] int32 in rows, Blocks contiguous): each sample's
    key block, in one launch instead of five elementwise ones."""
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    h = (bh % kv_heads).to(tl.int64)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < count
        keys = tl.load(Samples + b * ss_b + h * ss_h + offs, mask=mask, other=0).to(tl.int64)
        rank = tl.load(KRank + b * sr_b + h * sr_h + keys * sr_n, mask=mask, other=0)
        tl.store(Blocks + bh.to(tl.int64) * count + offs, (rank // block_size).to(tl.int32), mask=mask)


@triton.jit
def _counter_bits(seed, Seed, stream, index, SEED_IN_MEMORY: tl.constexpr):
    """uint64 [BLOCK] holding ``hyperattn.sampling.mix(seed, stream, index)`` (32 bits)."""
    if SEED_IN_MEMORY:
        key = tl.load(Seed).to(tl.uint64, bitcast=True)
    else:
        key = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    key = key + stream.to(tl.uint64) * STREAM
    z = key + (index.to(tl.uint64, bitcast=True) + 1) * GOLDEN
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    z = z ^ (z >> 31)
    return z >> 32


@triton.jit(do_not_specialize=["seed", "stream"])
def draw_key_norm_samples_kernel(Out, LogW, Weights, Prefix, KStart, KLen, HeadIds, seed, Seed, stream, per_head,
                                 m, m_u, m_n, kv_heads, kv_total, n_k, search_steps,
                                 SEED_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    """``hyperattn.sampling.sample_keys_by_key_norm``: Out[bh, s, j] (int keys) and LogW[bh, s, j]
    (float32), contiguous [B * Hk, S, m], from the key weights ``Weights`` (float32) and their
    inclusive float64 prefix sums ``Prefix`` (both contiguous [B * Hk, Nk]).  Draws j < m_u are
    stratified uniform; the others search the prefix sums (``search_steps`` >= bit length of the
    longest span halvings).  ``HeadIds`` [Hk]: each KV head's index in a call of ``kv_total``."""
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_head
    b = bh // kv_heads
    head = tl.load(HeadIds + bh % kv_heads).to(tl.int64)
    bits = _counter_bits(seed, Seed, stream, (b * kv_total + head) * per_head + offs, SEED_IN_MEMORY)
    segment = offs // m
    slot = offs % m
    start = tl.load(KStart + segment, mask=mask, other=0).to(tl.int64)
    span = tl.load(KLen + segment, mask=mask, other=1).to(tl.int64)
    prefix = Prefix + bh * n_k
    base = tl.load(prefix + start - 1, mask=mask & (start > 0), other=0.0)
    end = tl.load(prefix + start + span - 1, mask=mask, other=0.0)
    total = end - base
    weighed = total > end * PREFIX_FLOOR  # else uniform: all zero, or swamped by the keys before it
    norm_draw = slot >= m_u
    by_norm = norm_draw & weighed
    # stratified uniform: m_u strata for the first draws, m_n for the others (if the total is 0)
    stratum = tl.where(norm_draw, slot - m_u, slot)
    strata = tl.where(norm_draw, tl.maximum(m_n, 1), m_u)
    drawn = start + (stratum * span + ((bits * span.to(tl.uint64)) >> 32).to(tl.int64, bitcast=True)) // strata
    # the first key whose inclusive prefix sum passes the target: lo in [start, start + span]
    target = base + (stratum.to(tl.float64) + bits.to(tl.float64) * (2.0**-32)) / tl.maximum(m_n, 1) * total
    lo = start
    hi = start + span
    for _ in range(search_steps):
        active = by_norm & (lo < hi) & mask
        mid = (lo + hi) // 2
        above = tl.load(prefix + mid, mask=active, other=0.0) > target
        hi = tl.where(active & above, mid, hi)
        lo = tl.where(active & ~above, mid + 1, lo)
    drawn = tl.where(by_norm, tl.minimum(lo, start + span - 1), drawn)
    w = tl.load(Weights + bh * n_k + drawn, mask=mask, other=0.0).to(tl.float64)
    n = span.to(tl.float64)
    p = tl.where(weighed, w / tl.where(weighed, total, 1.0), 1.0 / n)
    log_w = -tl.log((m_u / n + m_n * p).to(tl.float32))
    tl.store(Out + bh * per_head + offs, drawn.to(Out.dtype.element_ty), mask=mask)
    tl.store(LogW + bh * per_head + offs, log_w, mask=mask)


@triton.jit(do_not_specialize=["seed", "stream"])
def draw_samples_kernel(Out, KStart, KLen, seed, Seed, stream, per_head, m,
                        SEED_IN_MEMORY: tl.constexpr, STRATIFIED: tl.constexpr, BLOCK: tl.constexpr):
    """Out[bh, s, j] (contiguous [B * Hk, S, m]) = ``hyperattn.sampling.sample_keys`` exactly:
    SplitMix64 of the counter in uint64 arithmetic, then a multiply-shift into segment s's keys
    (with ``STRATIFIED``, into its j-th of m strata).
    The seed is ``seed`` (an int baked into the launch) or, with ``SEED_IN_MEMORY``, read from
    ``Seed`` when the kernel runs (a device seed: a CUDA graph replay reads its current value)."""
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_head
    bits = _counter_bits(seed, Seed, stream, bh * per_head + offs, SEED_IN_MEMORY)
    segment = offs // m
    start = tl.load(KStart + segment, mask=mask, other=0).to(tl.int64)
    span = tl.load(KLen + segment, mask=mask, other=0).to(tl.uint64)
    offset = ((bits * span) >> 32).to(tl.int64, bitcast=True)
    if STRATIFIED:  # j * span < 2**63 (m <= 2**31, span <= 2**32): int64 is exact
        offset = ((offs % m) * span.to(tl.int64, bitcast=True) + offset) // m
    drawn = offset + start
    tl.store(Out + bh * per_head + offs, drawn.to(Out.dtype.element_ty), mask=mask)
