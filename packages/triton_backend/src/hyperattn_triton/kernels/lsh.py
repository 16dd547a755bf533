"""LSH hashing: the projections prepared for the hashing kernel (``split_projections_kernel``) and
the hashing itself (``lsh_codes_kernel``: projections, sign bits and Gray rank in one launch)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import load_rows, program_heads


@triton.jit
def split_projections_kernel(P, Out, sp_d, sp_r, HEAD_DIM: tl.constexpr, NUM_PROJS: tl.constexpr,
                             D_PAD: tl.constexpr, R_PAD: tl.constexpr, TERMS: tl.constexpr):
    """Out [TERMS, D_PAD, R_PAD] in its own dtype (fp16/bf16): terms whose fp32 sum is P [D, r]
    (any float dtype; zero-padded), each the rounding of what the earlier ones leave.  3 bf16 terms
    carry all 24 bits of an fp32.  TERMS == 0: Out is P padded, in fp32.  One program: a call
    prepares its projections in one launch, not a dozen elementwise ones."""
    offs_d = tl.arange(0, D_PAD)
    offs_r = tl.arange(0, R_PAD)
    mask = (offs_d[:, None] < HEAD_DIM) & (offs_r[None, :] < NUM_PROJS)
    rest = tl.load(P + offs_d[:, None] * sp_d + offs_r[None, :] * sp_r, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = Out + offs_d[:, None] * R_PAD + offs_r[None, :]
    if TERMS == 0:
        tl.store(out_ptrs, rest)
    for t in tl.static_range(TERMS):
        part = rest.to(Out.dtype.element_ty)
        tl.store(out_ptrs + t * D_PAD * R_PAD, part)
        rest = rest - part.to(tl.float32)


@triton.jit
def lsh_codes_kernel(X, P, Codes, n_rows, num_heads, sx_b, sx_h, sx_n, sx_d, sc_b, sc_h,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_PROJS: tl.constexpr, R_PAD: tl.constexpr,
                     BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Gray rank of the sign pattern of x @ P for BLOCK rows of one (batch, head).

    ``SPLIT > 0`` (fp16/bf16 x): P is [SPLIT, D_PAD, R_PAD] in x's dtype, terms whose sum is the
    fp32 projections (see ``split_projections_kernel``), and x @ P is SPLIT matrix-unit products
    accumulated in fp32: x is exact in its own dtype, so this is an fp32-accurate projection at
    the cost of a few tiny products (the multiply-and-reduce passes are ALU-bound: half the
    memory bandwidth).  ``SPLIT == 0``: P is fp32 [D_PAD, R_PAD] and the projections are NUM_PROJS
    multiply-and-reduce passes over the rows in fp32 registers."""
    b, h, _ = program_heads(num_heads, 1)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask_n = offs_n < n_rows
    x = load_rows(X + b * sx_b + h * sx_h, offs_n, sx_n, offs_d, sx_d, mask_n, HEAD_DIM)
    if SPLIT > 0:
        offs_r = tl.arange(0, R_PAD)
        projected = tl.zeros([BLOCK, R_PAD], tl.float32)
        for t in tl.static_range(SPLIT):
            p = tl.load(P + t * D_PAD * R_PAD + offs_d[:, None] * R_PAD + offs_r[None, :])
            projected = tl.dot(x, p, projected)
        bits = ((projected > 0) & (offs_r[None, :] < NUM_PROJS)).to(tl.int64) << offs_r[None, :].to(tl.int64)
        code = tl.sum(bits, 1)
    else:
        x = x.to(tl.float32)
        code = tl.zeros([BLOCK], tl.int64)
        for r in tl.static_range(NUM_PROJS):
            p_r = tl.load(P + offs_d * R_PAD + r, mask=offs_d < HEAD_DIM, other=0.0)
            code += (tl.sum(x * p_r[None, :], 1) > 0).to(tl.int64) << r
    rank = code
    for shift in tl.static_range(6):  # c ^ (c >> 1) ^ (c >> 2) ^ ... by doubling shifts
        rank = rank ^ (rank >> (1 << shift))
    tl.store(Codes + b * sc_b + h * sc_h + offs_n, rank, mask=mask_n)  # int32 when NUM_PROJS < 32
