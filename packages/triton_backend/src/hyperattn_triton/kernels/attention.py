"""The attention kernels: a forward and a two-kernel backward for every attention piece.

A launch covers a table of *tiles* (int64 [T, 7], see ``tiles.py``) times every (batch, head).
Query-side tiles (forward, dQ) are ``(segment, key block, q0, q1, k0, k1, diag)``: rows ``[q0, q1)``
against keys ``[k0, k1)``; key-side tiles (dK/dV) are ``(segment, key block, k0, k1, q0, q1, diag)``:
keys ``[k0, k1)`` (or sample slots ``[k0, k1)`` of the segment) against rows ``[q0, q1)``.
With ``PERMUTED`` the positions index the LSH orders (rows and keys are gathered through the int32
``QOrder``/``KOrder``, never copied sorted); without it they are rows and keys themselves.
``CAUSAL`` keeps key j for row i when ``j <= i + diag``.  Samples (int32 ``Samples`` with their
key block ``SampleBlock``, both [B, Hk, S, m]) are masked for rows of their own key block and
weighted by ``exp(LogW[segment])``, or with ``DRAW_WEIGHTS`` (importance sampling) by each draw's
``exp(LogW[b, hk, segment, slot])`` (float32, laid out as ``Samples``).  ``INT64_OFFSETS``: offsets inside one (batch, head) may pass
2**31, so indices are int64 (else int32).  ``OVERWRITE``: the call's first piece, whose outputs
hold nothing yet on its rows and keys: write without reading.

Forward: online softmax (base 2, ``scale_log2 = scale * LOG2E``) over the tile's keys then its
samples, merged by log-sum-exp into the running ``Out`` (fp32, or the input dtype: see
``Capabilities.running_out_dtype``) and fp32 ``Lse``, in fp32 arithmetic (rows are disjoint inside
one launch).
Backward: FlashAttention's formulas with the final ``Lse`` and ``Delta``, split so that nothing
contends: the dQ kernel walks a query tile's keys and samples (it owns its rows); the dK/dV kernel
walks a key tile's rows, for every query head of its KV group, and owns its keys.  Only sample
slots, which every row of a segment sees, add their partial dK/dV per chunk of rows with fp32
atomics (duplicate draws add up there too).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LN2, LOG2E, load_rows, load_rows_transposed, program_heads


@triton.jit
def _load_tile(Tiles, INT64_OFFSETS: tl.constexpr = True):
    """This program's row of the tile table, in int32 unless ``INT64_OFFSETS`` (positions are below N, and
    N < 2**31 when offsets fit in int32): 32-bit loop counters and masks halve the integer work."""
    tile = Tiles + tl.program_id(0).to(tl.int64) * 7
    dtype = tl.int64 if INT64_OFFSETS else tl.int32
    return (tl.load(tile).to(dtype), tl.load(tile + 1).to(dtype), tl.load(tile + 2).to(dtype),
            tl.load(tile + 3).to(dtype), tl.load(tile + 4).to(dtype), tl.load(tile + 5).to(dtype),
            tl.load(tile + 6).to(dtype))


@triton.jit
def _as_index(x, INT64_OFFSETS: tl.constexpr):
    """Row or key indices as the offset arithmetic wants them: int32 unless an offset inside one
    (batch, head) may pass 2**31 (``INT64_OFFSETS``); int32 gathers take fewer registers."""
    return x.to(tl.int64 if INT64_OFFSETS else tl.int32)


@triton.jit
def _positions(start, end, Order, BLOCK: tl.constexpr, PERMUTED: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Row or key indices of positions [start, start + BLOCK) clipped to end, and their mask."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    if PERMUTED:
        offs = tl.load(Order + offs, mask=mask, other=0)
    return _as_index(offs, INT64_OFFSETS), mask


@triton.jit
def _sample_slots(start, end, SampleRow, SampleBlockRow, BLOCK: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Key indices, key blocks and mask of sample slots [start, start + BLOCK) clipped to end."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    keys = _as_index(tl.load(SampleRow + offs, mask=mask, other=0), INT64_OFFSETS)
    blocks = tl.load(SampleBlockRow + offs, mask=mask, other=-1)
    return keys, blocks, mask


@triton.jit
def _slot_log_weights(LogWRow, start, end, BLOCK: tl.constexpr):
    """float32 [BLOCK]: the per-draw log weights of sample slots [start, start + BLOCK) clipped to
    end (``DRAW_WEIGHTS``; 0 past end)."""
    offs = start + tl.arange(0, BLOCK)
    return tl.load(LogWRow + offs, mask=offs < end, other=0.0)


@triton.jit
def _block_keys(start, k1, k_order, k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v, rows, diag,
                HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr,
                CAUSAL: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """K^T [D_PAD, BLOCK_N] and V [BLOCK_N, DV_PAD] of key positions [start, start + BLOCK_N) clipped
    to k1 (through ``k_order`` when PERMUTED), and which (row, key) pairs count: [1 or rows, BLOCK_N]."""
    keys, mask_n = _positions(start, k1, k_order, BLOCK_N, PERMUTED, INT64_OFFSETS)
    kt = load_rows_transposed(k_base, keys, sk_n, offs_d, sk_d, mask_n, HEAD_DIM)
    vv = load_rows(v_base, keys, sv_n, offs_v, sv_d, mask_n, V_DIM)
    valid = mask_n[None, :]
    if CAUSAL:
        valid = valid & (keys[None, :] <= rows[:, None] + diag)
    return kt, vv, valid


@triton.jit
def _sample_keys(start, num_samples, samples_row, blocks_row, blk, k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d,
                 offs_v, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """K^T and V of sample slots [start, start + BLOCK_N), and which count: [1, BLOCK_N], the slots
    drawn from key block ``blk`` (the rows' own block, computed exactly) left out."""
    keys, key_blocks, mask_n = _sample_slots(start, num_samples, samples_row, blocks_row, BLOCK_N, INT64_OFFSETS)
    keep = mask_n & (key_blocks != blk)
    kt = load_rows_transposed(k_base, keys, sk_n, offs_d, sk_d, keep, HEAD_DIM)
    vv = load_rows(v_base, keys, sv_n, offs_v, sv_d, keep, V_DIM)
    return kt, vv, keep[None, :]


@triton.jit
def _online_step(q, kt, vv, key_bias, valid, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr, BIAS: tl.constexpr,
                 MASK: tl.constexpr):
    """One online-softmax step (base 2) over keys ``kt`` [D, N] / ``vv`` [N, Dv].

    The row maxima are taken over the *raw* scores and scaled per row (scale_log2 > 0), so that each
    probability is one fused multiply-add and an exp2: the step is bound by instruction issue, so
    every instruction per score counts (masking adds some).
    ``key_bias`` [1, N] (if BIAS) is added to the raw scores: a log weight / scale_log2, or -inf for a
    key that does not count; ``valid`` [R or 1, N] (if MASK) says which scores count."""
    s = tl.dot(q, kt, input_precision=PRECISION)
    if BIAS:
        s = s + key_bias
    if MASK:
        s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * scale_log2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_partial(Out, Lse, rows, mask_m, offs_v, so_n, so_d, sl_n, m_i, l_i, acc, V_DIM: tl.constexpr,
                   OVERWRITE: tl.constexpr):
    """Write this piece's (o, lse) of ``rows`` (natural log) from the online softmax state, or merge
    it into the running (Out, Lse) by log-sum-exp unless OVERWRITE (no earlier piece wrote them)."""
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse_new = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, -float("inf"))
    lse_ptrs = Lse + rows * sl_n
    out_ptrs = Out + rows[:, None] * so_n + offs_v[None, :] * so_d
    out_mask = mask_m[:, None] & (offs_v[None, :] < V_DIM)
    if OVERWRITE:  # write without reading
        tl.store(out_ptrs, o, mask=out_mask)
        tl.store(lse_ptrs, lse_new, mask=mask_m)
    else:  # an untouched row (Lse = -inf) is overwritten, never read
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
def attention_fwd_kernel(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale_log2, num_samples,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, OVERWRITE: tl.constexpr, DRAW_WEIGHTS: tl.constexpr = False,
):
    b, h, hk = program_heads(num_heads, group)
    seg, blk, q0, q1, k0, k1, diag = _load_tile(Tiles, INT64_OFFSETS)
    rows, mask_m = _positions(q0, q1, QOrder + b * sqo_b + h * sqo_h, BLOCK_M, PERMUTED, INT64_OFFSETS)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    q = load_rows(Q + b * sq_b + h * sq_h, rows, sq_n, offs_d, sq_d, mask_m, HEAD_DIM)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    k_order = KOrder + b * sko_b + hk * sko_h
    # whole steps unmasked (unless causal), then the block's partial last step masked
    k_whole = k1 if CAUSAL else k0 + (k1 - k0) // BLOCK_N * BLOCK_N
    for start in range(k0, k_whole, BLOCK_N):
        kt, vv, valid = _block_keys(start, k1, k_order, k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v, rows,
                                    diag, HEAD_DIM, V_DIM, BLOCK_N, PERMUTED, CAUSAL, INT64_OFFSETS)
        m_i, l_i, acc = _online_step(q, kt, vv, 0.0, valid, m_i, l_i, acc, scale_log2, PRECISION, False, CAUSAL)
    if k_whole < k1:
        kt, vv, valid = _block_keys(k_whole, k1, k_order, k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v,
                                    rows, diag, HEAD_DIM, V_DIM, BLOCK_N, PERMUTED, False, INT64_OFFSETS)
        m_i, l_i, acc = _online_step(q, kt, vv, 0.0, valid, m_i, l_i, acc, scale_log2, PRECISION, False, True)
    if HAS_SAMPLES:
        log_w = tl.load(LogW + seg) * LOG2E / scale_log2  # in raw score units
        sample_row = b * ss_b + hk * ss_h + seg * ss_s
        for start in range(0, num_samples, BLOCK_N):
            kt, vv, keep = _sample_keys(start, num_samples, Samples + sample_row, SampleBlock + sample_row, blk,
                                        k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v, HEAD_DIM, V_DIM,
                                        BLOCK_N, INT64_OFFSETS)
            if DRAW_WEIGHTS:  # each draw's own log weight, in raw score units
                slot_w = _slot_log_weights(LogW + sample_row, start, num_samples, BLOCK_N)
                key_bias = tl.where(keep, slot_w[None, :] * (LOG2E / scale_log2), -float("inf"))
            else:
                key_bias = tl.where(keep, log_w, -float("inf"))
            m_i, l_i, acc = _online_step(q, kt, vv, key_bias, keep, m_i, l_i, acc, scale_log2, PRECISION, True, False)
    _store_partial(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, rows, mask_m, offs_v, so_n, so_d, sl_n,
                   m_i, l_i, acc, V_DIM, OVERWRITE)


@triton.jit
def _dq_step(q, do, kt, vv, valid, row_offset2, delta, dq, scale, scale_log2, PRECISION: tl.constexpr,
             col_bias2=0.0, COL_BIAS: tl.constexpr = False):
    """dq += dS K for keys ``kt``/``vv``: P = exp2(S * scale_log2 - row_offset2) with row_offset2 =
    lse2 - the keys' log weight (one fused multiply-add per score); with ``COL_BIAS`` also
    + ``col_bias2`` [1, N] (per-draw log2 weights).  Masked rows read q = do = 0
    and lse2 = delta = 0, so their P is 1 and their dS 0; keys need the mask (``valid``): a
    zero-filled key gives P = exp2(-lse2), which overflows for lse < -88, and inf * 0 is NaN."""
    x = tl.dot(q, kt, input_precision=PRECISION) * scale_log2 - row_offset2[:, None]
    if COL_BIAS:
        x = x + col_bias2
    p = tl.where(valid, tl.exp2(x), 0.0)
    dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
    ds = p * (dp - delta[:, None]) * scale
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sl_b, sl_h, sl_n, sdq_b, sdq_h, sdq_n, sdq_d,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale, scale_log2, num_samples,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, OVERWRITE: tl.constexpr, DRAW_WEIGHTS: tl.constexpr = False,
):
    """dQ of a query tile: its rows are owned, so dQ is read, added to and written once (written
    without reading when OVERWRITE: the call's first piece)."""
    b, h, hk = program_heads(num_heads, group)
    seg, blk, q0, q1, k0, k1, diag = _load_tile(Tiles, INT64_OFFSETS)
    rows, mask_m = _positions(q0, q1, QOrder + b * sqo_b + h * sqo_h, BLOCK_M, PERMUTED, INT64_OFFSETS)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    q = load_rows(Q + b * sq_b + h * sq_h, rows, sq_n, offs_d, sq_d, mask_m, HEAD_DIM)
    do = load_rows(DO + b * sdo_b + h * sdo_h, rows, sdo_n, offs_v, sdo_d, mask_m, V_DIM).to(q.dtype)
    lse2 = tl.load(Lse + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(Delta + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_order = KOrder + b * sko_b + hk * sko_h
    # every step masked: an unmasked loop and a masked last step (as in the forward) spill here
    for start in range(k0, k1, BLOCK_N):
        kt, vv, valid = _block_keys(start, k1, k_order, k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v, rows,
                                    diag, HEAD_DIM, V_DIM, BLOCK_N, PERMUTED, CAUSAL, INT64_OFFSETS)
        dq = _dq_step(q, do, kt, vv, valid, lse2, delta, dq, scale, scale_log2, PRECISION)
    if HAS_SAMPLES:
        sample_row = b * ss_b + hk * ss_h + seg * ss_s
        if DRAW_WEIGHTS:
            sample_offset2 = lse2
        else:
            sample_offset2 = lse2 - tl.load(LogW + seg) * LOG2E
        for start in range(0, num_samples, BLOCK_N):
            kt, vv, keep = _sample_keys(start, num_samples, Samples + sample_row, SampleBlock + sample_row, blk,
                                        k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_v, HEAD_DIM, V_DIM,
                                        BLOCK_N, INT64_OFFSETS)
            if DRAW_WEIGHTS:
                slot_w2 = _slot_log_weights(LogW + sample_row, start, num_samples, BLOCK_N) * LOG2E
                dq = _dq_step(q, do, kt, vv, keep, sample_offset2, delta, dq, scale, scale_log2, PRECISION,
                              slot_w2[None, :], True)
            else:
                dq = _dq_step(q, do, kt, vv, keep, sample_offset2, delta, dq, scale, scale_log2, PRECISION)
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :] * sdq_d
    dq_mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    if not OVERWRITE:
        dq += tl.load(dq_ptrs, mask=dq_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=dq_mask)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Tiles, QOrder, KOrder, QBlock, Samples, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sl_b, sl_h, sl_n,
    sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_kv_heads, group, scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, CAUSAL: tl.constexpr, SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, OVERWRITE: tl.constexpr, SLOT_OUTPUT: tl.constexpr = False,
    ATOMIC: tl.constexpr = False, DRAW_WEIGHTS: tl.constexpr = False,
):
    """dK, dV of a key tile (block keys, exact keys, or sample slots) over rows [q0, q1) of every
    query head of its KV head; program axis 1 runs over batch x KV heads.

    ``ATOMIC`` (exact keys whose rows come in chunks, several tiles per key tile): each program's
    partial dK, dV are added with fp32 atomics, as the sample slots' are.

    ``SLOT_OUTPUT`` (sample slots, deterministic mode): DK and DV are [B, Hk, S * m, D] buffers of
    one row per sample slot, stored without atomics (the caller gives each slot one program and
    adds the slots into the keys' gradients in a fixed order)."""
    b, hk, _ = program_heads(num_kv_heads, 1)
    seg, blk, k0, k1, q0, q1, diag = _load_tile(Tiles, INT64_OFFSETS)
    if SAMPLES:
        sample_row = b * ss_b + hk * ss_h + seg * ss_s
        keys, key_blocks, mask_n = _sample_slots(k0, k1, Samples + sample_row, SampleBlock + sample_row, BLOCK_N, INT64_OFFSETS)
        if DRAW_WEIGHTS:  # [BLOCK_N]: each slot's own log2 weight
            bias2 = _slot_log_weights(LogW + sample_row, k0, k1, BLOCK_N) * LOG2E
        else:
            bias2 = tl.load(LogW + seg) * LOG2E
    else:
        keys, mask_n = _positions(k0, k1, KOrder + b * sko_b + hk * sko_h, BLOCK_N, PERMUTED, INT64_OFFSETS)
        bias2 = 0.0
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    k = load_rows(K + b * sk_b + hk * sk_h, keys, sk_n, offs_d, sk_d, mask_n, HEAD_DIM)
    v = load_rows(V + b * sv_b + hk * sv_h, keys, sv_n, offs_v, sv_d, mask_n, V_DIM)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for g in range(group):
        h = hk * group + g
        q_order = QOrder + b * sqo_b + h * sqo_h
        for start in range(q0, q1, BLOCK_M):
            rows, mask_m = _positions(start, q1, q_order, BLOCK_M, PERMUTED, INT64_OFFSETS)
            qt = load_rows_transposed(Q + b * sq_b + h * sq_h, rows, sq_n, offs_d, sq_d, mask_m, HEAD_DIM)
            do = load_rows(DO + b * sdo_b + h * sdo_h, rows, sdo_n, offs_v, sdo_d, mask_m, V_DIM).to(qt.dtype)
            lse2 = tl.load(Lse + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0) * LOG2E
            delta = tl.load(Delta + b * sl_b + h * sl_h + rows * sl_n, mask=mask_m, other=0.0)
            # [BLOCK_N, BLOCK_M]; one fused multiply-add per score
            if DRAW_WEIGHTS:
                pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * scale_log2 + bias2[:, None] - lse2[None, :])
            else:
                pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * scale_log2 - (lse2 - bias2)[None, :])
            # Masked rows read q = do = 0, lse2 = delta = 0: P = 1, dS = 0, no contribution; a
            # masked key's row of dK/dV is never stored.  So only causality and the samples' own
            # block need masks.
            if CAUSAL:
                pt = tl.where(keys[:, None] <= rows[None, :] + diag, pt, 0.0)
            if SAMPLES:  # sorted position -> the row's key block: samples of that block are not its
                row_blocks = tl.load(QBlock + start + tl.arange(0, BLOCK_M), mask=mask_m, other=-2)
                pt = tl.where(key_blocks[:, None] != row_blocks[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :]) * scale
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    dk_ptrs = DK + b * sdk_b + hk * sdk_h + keys[:, None] * sdk_n + offs_d[None, :] * sdk_d
    dv_ptrs = DV + b * sdv_b + hk * sdv_h + keys[:, None] * sdv_n + offs_v[None, :] * sdv_d
    dk_mask = mask_n[:, None] & (offs_d[None, :] < HEAD_DIM)
    dv_mask = mask_n[:, None] & (offs_v[None, :] < V_DIM)
    if SAMPLES and SLOT_OUTPUT:  # row seg * m + slot of the slot buffers (m = ss_s: contiguous samples)
        slots = seg * ss_s + k0 + tl.arange(0, BLOCK_N)
        dk_ptrs = DK + b * sdk_b + hk * sdk_h + slots[:, None] * sdk_n + offs_d[None, :] * sdk_d
        dv_ptrs = DV + b * sdv_b + hk * sdv_h + slots[:, None] * sdv_n + offs_v[None, :] * sdv_d
        tl.store(dk_ptrs, dk, mask=dk_mask)
        tl.store(dv_ptrs, dv, mask=dv_mask)
    elif SAMPLES or ATOMIC:  # every chunk of rows adds into the same keys (and sample draws repeat)
        tl.atomic_add(dk_ptrs, dk, mask=dk_mask)
        tl.atomic_add(dv_ptrs, dv, mask=dv_mask)
    else:  # this tile owns its keys within the launch (OVERWRITE: and no earlier piece wrote them)
        if not OVERWRITE:
            dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0)
            dv += tl.load(dv_ptrs, mask=dv_mask, other=0.0)
        tl.store(dk_ptrs, dk, mask=dk_mask)
        tl.store(dv_ptrs, dv, mask=dv_mask)
