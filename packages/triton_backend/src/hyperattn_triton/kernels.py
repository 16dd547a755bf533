"""Triton kernels: one forward and one backward for every attention piece.

A launch covers a table of *tiles* (int64 [T, 7]: segment, key block, first and last+1 query
position, first and last+1 key position, causal diagonal) times every (batch, query head).
With ``PERMUTED`` the positions index the LSH orders (rows and keys are gathered through
``QOrder``/``KOrder``, never copied sorted); without it they are rows and keys themselves.
``CAUSAL`` keeps key j for row i when ``j <= i + diag``.  ``HAS_SAMPLES`` adds the sampled keys
of the segment, masked when their key block (``KRank // block_size``) is the tile's own, and
weighted by ``exp(LogW[segment])``.

Forward: online softmax (base 2) over the tile's keys then its samples, merged by log-sum-exp
into the running fp32 ``Out``/``Lse`` (rows are disjoint inside one launch).
Backward: FlashAttention's formula with the final ``Lse`` and ``Delta``; dQ rows are owned by the
tile, dK/dV are added with fp32 atomics (block keys are shared by GQA heads, samples by all tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tile_rows(Tiles, QOrder, b, h, sqo_b, sqo_h, BLOCK_M: tl.constexpr, PERMUTED: tl.constexpr):
    tile = Tiles + tl.program_id(0).to(tl.int64) * 7
    seg = tl.load(tile)
    blk = tl.load(tile + 1)
    q0 = tl.load(tile + 2)
    q1 = tl.load(tile + 3)
    k0 = tl.load(tile + 4)
    k1 = tl.load(tile + 5)
    diag = tl.load(tile + 6)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q1
    if PERMUTED:
        rows = tl.load(QOrder + b * sqo_b + h * sqo_h + offs_m, mask=mask_m, other=0)
    else:
        rows = offs_m
    return seg, blk, k0, k1, diag, rows, mask_m


@triton.jit
def _keys_of(start, k1, KOrder, b, hk, sko_b, sko_h, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < k1
    if PERMUTED:
        keys = tl.load(KOrder + b * sko_b + hk * sko_h + offs_n, mask=mask_n, other=0)
    else:
        keys = offs_n
    return keys, mask_n


@triton.jit
def _samples_of(start, Samples, KRank, b, hk, seg, blk, ss_b, ss_h, ss_s, sko_b, sko_h, num_samples, block_size,
                BLOCK_N: tl.constexpr):
    offs_j = start + tl.arange(0, BLOCK_N)
    mask_j = offs_j < num_samples
    keys = tl.load(Samples + b * ss_b + hk * ss_h + seg * ss_s + offs_j, mask=mask_j, other=0)
    rank = tl.load(KRank + b * sko_b + hk * sko_h + keys, mask=mask_j, other=0)
    keep = mask_j & ((rank // block_size) != blk)
    return keys, keep


@triton.jit
def _online_step(q, kt, vv, valid, bias2, m_i, l_i, acc, scale2, PRECISION: tl.constexpr):
    s = tl.dot(q, kt, input_precision=PRECISION) * scale2 + bias2
    s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, KRank, Samples, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale2, block_size, num_samples,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    seg, blk, k0, k1, diag, rows, mask_m = _tile_rows(Tiles, QOrder, b, h, sqo_b, sqo_h, BLOCK_M, PERMUTED)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for start in range(k0, k1, BLOCK_N):
        keys, mask_n = _keys_of(start, k1, KOrder, b, hk, sko_b, sko_h, BLOCK_N, PERMUTED)
        kt = tl.load(k_base + keys[None, :] * sk_n + offs_d[:, None] * sk_d,
                     mask=mask_n[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vv = tl.load(v_base + keys[:, None] * sv_n + offs_v[None, :] * sv_d,
                     mask=mask_n[:, None] & (offs_v[None, :] < V_DIM), other=0.0)
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None] + diag)
        m_i, l_i, acc = _online_step(q, kt, vv, valid, 0.0, m_i, l_i, acc, scale2, PRECISION)
    if HAS_SAMPLES:
        log_w2 = tl.load(LogW + seg) * 1.4426950408889634
        for start in range(0, num_samples, BLOCK_N):
            keys, keep = _samples_of(start, Samples, KRank, b, hk, seg, blk, ss_b, ss_h, ss_s, sko_b, sko_h,
                                     num_samples, block_size, BLOCK_N)
            kt = tl.load(k_base + keys[None, :] * sk_n + offs_d[:, None] * sk_d,
                         mask=keep[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            vv = tl.load(v_base + keys[:, None] * sv_n + offs_v[None, :] * sv_d,
                         mask=keep[:, None] & (offs_v[None, :] < V_DIM), other=0.0)
            m_i, l_i, acc = _online_step(q, kt, vv, keep[None, :], log_w2, m_i, l_i, acc, scale2, PRECISION)
    # this piece's (o, lse), natural log
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse_new = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, -float("inf"))
    # merge into the running (Out, Lse); an untouched row (Lse = -inf) is overwritten, never read
    lse_ptrs = Lse + b * sl_b + h * sl_h + rows * sl_n
    out_ptrs = Out + b * so_b + h * so_h + rows[:, None] * so_n + offs_v[None, :] * so_d
    out_mask = mask_m[:, None] & (offs_v[None, :] < V_DIM)
    l_old = tl.load(lse_ptrs, mask=mask_m, other=-float("inf"))
    o_old = tl.load(out_ptrs, mask=out_mask & (l_old[:, None] > -float("inf")), other=0.0)
    top = tl.maximum(l_old, lse_new)
    top_safe = tl.where(top == -float("inf"), 0.0, top)
    a = tl.exp(l_old - top_safe)
    c = tl.exp(lse_new - top_safe)
    total = a + c
    total_safe = tl.where(total > 0, total, 1.0)
    merged = (a[:, None] * o_old + c[:, None] * o) / total_safe[:, None]
    tl.store(out_ptrs, merged, mask=out_mask)
    tl.store(lse_ptrs, top_safe + tl.log(total), mask=mask_m)


@triton.jit
def _grad_step(q, do, kt, vv, keys, write, valid, bias2, lse2, delta, dq, DK_base, DV_base,
               sdk_n, sdk_d, sdv_n, sdv_d, offs_d, offs_v, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
               scale, scale2, PRECISION: tl.constexpr):
    s = tl.dot(q, kt, input_precision=PRECISION) * scale2 + bias2
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dv_part = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    tl.atomic_add(DV_base + keys[:, None] * sdv_n + offs_v[None, :] * sdv_d, dv_part,
                  mask=write[:, None] & (offs_v[None, :] < V_DIM))
    dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
    ds = p * (dp - delta[:, None]) * scale
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dk_part = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.atomic_add(DK_base + keys[:, None] * sdk_n + offs_d[None, :] * sdk_d, dk_part,
                  mask=write[:, None] & (offs_d[None, :] < HEAD_DIM))
    return dq


@triton.jit
def attention_bwd_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, Tiles, QOrder, KOrder, KRank, Samples, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sl_b, sl_h, sl_n,
    sdq_b, sdq_h, sdq_n, sdq_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale, scale2, block_size, num_samples,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    seg, blk, k0, k1, diag, rows, mask_m = _tile_rows(Tiles, QOrder, b, h, sqo_b, sqo_h, BLOCK_M, PERMUTED)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_n + offs_v[None, :] * sdo_d,
                 mask=mask_m[:, None] & (offs_v[None, :] < V_DIM), other=0.0).to(q.dtype)
    lse2 = tl.load(Lse + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    DK_base = DK + b * sdk_b + hk * sdk_h
    DV_base = DV + b * sdv_b + hk * sdv_h
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(k0, k1, BLOCK_N):
        keys, mask_n = _keys_of(start, k1, KOrder, b, hk, sko_b, sko_h, BLOCK_N, PERMUTED)
        kt = tl.load(k_base + keys[None, :] * sk_n + offs_d[:, None] * sk_d,
                     mask=mask_n[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vv = tl.load(v_base + keys[:, None] * sv_n + offs_v[None, :] * sv_d,
                     mask=mask_n[:, None] & (offs_v[None, :] < V_DIM), other=0.0)
        valid = mask_n[None, :] & mask_m[:, None]
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None] + diag)
        dq = _grad_step(q, do, kt, vv, keys, mask_n, valid, 0.0, lse2, delta, dq, DK_base, DV_base,
                        sdk_n, sdk_d, sdv_n, sdv_d, offs_d, offs_v, HEAD_DIM, V_DIM, scale, scale2, PRECISION)
    if HAS_SAMPLES:
        log_w2 = tl.load(LogW + seg) * 1.4426950408889634
        for start in range(0, num_samples, BLOCK_N):
            keys, keep = _samples_of(start, Samples, KRank, b, hk, seg, blk, ss_b, ss_h, ss_s, sko_b, sko_h,
                                     num_samples, block_size, BLOCK_N)
            kt = tl.load(k_base + keys[None, :] * sk_n + offs_d[:, None] * sk_d,
                         mask=keep[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            vv = tl.load(v_base + keys[:, None] * sv_n + offs_v[None, :] * sv_d,
                         mask=keep[:, None] & (offs_v[None, :] < V_DIM), other=0.0)
            dq = _grad_step(q, do, kt, vv, keys, keep, keep[None, :] & mask_m[:, None], log_w2, lse2, delta, dq,
                            DK_base, DV_base, sdk_n, sdk_d, sdv_n, sdv_d, offs_d, offs_v, HEAD_DIM, V_DIM,
                            scale, scale2, PRECISION)
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :] * sdq_d
    dq_mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq, mask=dq_mask)


@triton.jit
def lsh_codes_kernel(X, P, Codes, n_rows, num_heads, sx_b, sx_h, sx_n, sx_d, sc_b, sc_h,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_PROJS: tl.constexpr, R_PAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Gray rank of the sign pattern of x @ P for BLOCK rows of one (batch, head), in fp32."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < n_rows
    x = tl.load(X + b * sx_b + h * sx_h + offs_n[:, None] * sx_n + offs_d[None, :] * sx_d,
                mask=mask_n[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    p = tl.load(P + offs_d[:, None] * R_PAD + offs_r[None, :], mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    projected = tl.dot(x, p, input_precision="ieee")
    bits = ((projected > 0) & (offs_r[None, :] < NUM_PROJS)).to(tl.int64) << offs_r[None, :].to(tl.int64)
    code = tl.sum(bits, 1)
    rank = code
    for shift in tl.static_range(6):  # c ^ (c >> 1) ^ (c >> 2) ^ ... by doubling shifts
        rank = rank ^ (rank >> (1 << shift))
    tl.store(Codes + b * sc_b + h * sc_h + offs_n, rank, mask=mask_n)
