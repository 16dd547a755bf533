"""Fewer operations per score in the sparse forward: one column bias instead of bias plus select.

The production ``_online_step`` computes ``where(valid, s * scale2 + bias2, -inf)`` per score;
without a causal mask validity is per key, so ``s * scale2 + column_bias`` with
``column_bias = where(valid_key, bias2, -inf)`` ([BLOCK_N], once per step) does the same with one
fused multiply-add per score.  ``python scripts/experiments/fwd_column_bias.py`` on the GPU
machine times both on one N=131072 non-causal plan (B=1, H=32, D=64, bf16) and checks they agree.
"""

import torch
import triton
import triton.language as tl

from hyperattn_triton.kernels import (
    _block_keys,
    _positions,
    _program_heads,
    _rows_of,
    _sample_keys,
    _store_partial,
    _tile,
)


@triton.jit
def _online_step_columns(q, kt, vv, column_bias, m_i, l_i, acc, scale2):
    s = tl.dot(q, kt) * scale2 + column_bias[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def fwd_column_bias(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale2, num_samples,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, hk = _program_heads(num_heads, group)
    seg, blk, q0, q1, k0, k1, diag = _tile(Tiles)
    rows, mask_m = _positions(q0, q1, QOrder + b * sqo_b + h * sqo_h, BLOCK_M, True, False)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows_of(Q + b * sq_b + h * sq_h, rows, sq_n, offs_d, sq_d, mask_m, HEAD_DIM)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(k0, k1, BLOCK_N):
        kt, vv, valid = _block_keys(start, k1, KOrder + b * sko_b + hk * sko_h, k_base, v_base, sk_n, sk_d, sv_n,
                                    sv_d, offs_d, offs_d, rows, diag, HEAD_DIM, HEAD_DIM, BLOCK_N, True, False, False)
        column_bias = tl.where(tl.reshape(valid, [BLOCK_N]), 0.0, -float("inf"))
        m_i, l_i, acc = _online_step_columns(q, kt, vv, column_bias, m_i, l_i, acc, scale2)
    log_w2 = tl.load(LogW + seg) * 1.4426950408889634
    sample_row = b * ss_b + hk * ss_h + seg * ss_s
    for start in range(0, num_samples, BLOCK_N):
        kt, vv, keep = _sample_keys(start, num_samples, Samples + sample_row, SampleBlock + sample_row, blk,
                                    k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_d, HEAD_DIM, HEAD_DIM,
                                    BLOCK_N, False)
        column_bias = tl.where(tl.reshape(keep, [BLOCK_N]), log_w2, -float("inf"))
        m_i, l_i, acc = _online_step_columns(q, kt, vv, column_bias, m_i, l_i, acc, scale2)
    _store_partial(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, rows, mask_m, offs_d, so_n, so_d, sl_n,
                   m_i, l_i, acc, HEAD_DIM, True)


def launch(q, k, v, out, lse, tiles, ix, block_m=128, block_n=64, warps=4, stages=3):
    fwd_column_bias[(len(tiles), q.shape[0] * q.shape[1])](
        q, k, v, out, lse, tiles, ix["q_order"], ix["k_order"], ix["samples"], ix["sample_blocks"], ix["log_w"],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *ix["order_strides"], *ix["sample_strides"], q.shape[1], q.shape[1] // k.shape[1],
        q.shape[3] ** -0.5 * 1.4426950408889634, ix["m"],
        HEAD_DIM=q.shape[3], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


if __name__ == "__main__":
    from hyperattn.algorithm import draw_projections, plan_attention
    from hyperattn.api import make_rng
    from hyperattn.config import HyperAttentionConfig
    from hyperattn_triton import backend
    from hyperattn_triton.tiles import on_device, sparse_tiles

    n = 131072
    q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    impl = backend.TritonBackend()
    rng = make_rng(0)
    plan = plan_attention(impl, q, k, causal=False, scale=0.125, config=HyperAttentionConfig(),
                          projections=draw_projections(rng, 64, 7), rng=rng)
    (piece,) = list(plan.pieces)
    st = piece.structure
    out_ref = torch.empty_like(q)
    lse_ref = torch.empty(q.shape[:3], device="cuda")
    impl.sparse_forward(q, k, v, st, 0.125, out_ref, lse_ref, fresh=True)
    ms = triton.testing.do_bench(lambda: impl.sparse_forward(q, k, v, st, 0.125, out_ref, lse_ref, fresh=True),
                                 return_mode="median", warmup=5, rep=50)
    print(f"attention_fwd_kernel (production): {ms * 1e3:8.1f} us", flush=True)
    ix = impl._indices(q, st)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    for block_m, block_n, warps, stages in ((128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2), (64, 64, 4, 3)):
        tiles = on_device(sparse_tiles, q, st, block_m)
        args = dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages)
        launch(q, k, v, out, lse, tiles, ix, **args)
        err = (out.float() - out_ref.float()).abs().max().item()
        lerr = (lse - lse_ref).abs().max().item()
        ms = triton.testing.do_bench(lambda tiles=tiles, args=args: launch(q, k, v, out, lse, tiles, ix, **args),
                                     return_mode="median", warmup=5, rep=50)
        print(f"column bias {args}: {ms * 1e3:8.1f} us  err {err:.2e} lse {lerr:.2e}", flush=True)
