"""Small row-wise kernels: the backward's delta (``row_dot_kernel``), the widening copy of the exact
path's results (``cast_rows_kernel``), the residual's samples (``draw_samples_kernel``) and each
sample's key block (``sample_blocks_kernel``)."""

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
    if SEED_IN_MEMORY:
        key = tl.load(Seed).to(tl.uint64, bitcast=True)
    else:
        key = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    key = key + stream.to(tl.uint64) * STREAM
    index = (bh * per_head + offs).to(tl.uint64, bitcast=True)
    z = key + (index + 1) * GOLDEN
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    z = z ^ (z >> 31)
    bits = z >> 32
    segment = offs // m
    start = tl.load(KStart + segment, mask=mask, other=0).to(tl.int64)
    span = tl.load(KLen + segment, mask=mask, other=0).to(tl.uint64)
    offset = ((bits * span) >> 32).to(tl.int64, bitcast=True)
    if STRATIFIED:  # j * span < 2**63 (m <= 2**31, span <= 2**32): int64 is exact
        offset = ((offs % m) * span.to(tl.int64, bitcast=True) + offset) // m
    drawn = offset + start
    tl.store(Out + bh * per_head + offs, drawn.to(Out.dtype.element_ty), mask=mask)
