"""Does the sparse forward pay for gathering its sample keys through their indices?

``python scripts/experiments/sample_gather.py`` on the GPU machine times, at N=131072 (non-causal
plan, B=1, H=32, D=64, bf16): the production kernel; the same without samples (block keys only);
and a variant whose sample loop reads the sample keys and values from a small contiguous copy
[B, Hk, S, m, D] (4 MiB here, made by one torch gather per call), so that its loads do not wait
on an index load.  Also the gather itself.
"""

import torch
import triton
import triton.language as tl

from hyperattn_triton.kernels import (
    _block_keys,
    _online_step,
    _positions,
    _program_heads,
    _rows_of,
    _store_partial,
    _tile,
)


@triton.jit
def fwd_gathered_samples(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, SK, SV, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale2, num_samples,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_SAMPLES: tl.constexpr,
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
        m_i, l_i, acc = _online_step(q, kt, vv, valid, 0.0, m_i, l_i, acc, scale2, "tf32")
    log_w2 = tl.load(LogW + seg) * 1.4426950408889634
    sample_row = b * ss_b + hk * ss_h + seg * ss_s
    copy_row = sample_row.to(tl.int64) * HEAD_DIM  # SK/SV [B, Hk, S, m, D] contiguous
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, M_SAMPLES, BLOCK_N):
        slots = start + offs_n
        blocks = tl.load(SampleBlock + sample_row + slots)
        kt = tl.load(SK + copy_row + slots[None, :] * HEAD_DIM + offs_d[:, None])
        vv = tl.load(SV + copy_row + slots[:, None] * HEAD_DIM + offs_d[None, :])
        m_i, l_i, acc = _online_step(q, kt, vv, (blocks != blk)[None, :], log_w2, m_i, l_i, acc, scale2, "tf32")
    _store_partial(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, rows, mask_m, offs_d, so_n, so_d, sl_n,
                   m_i, l_i, acc, HEAD_DIM, True)


if __name__ == "__main__":
    from hyperattn.algorithm import draw_projections, plan_attention
    from hyperattn.api import make_rng
    from hyperattn.config import HyperAttentionConfig
    from hyperattn_triton import backend
    from hyperattn_triton.tiles import on_device, sparse_tiles

    n = 131072
    q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    impl = backend.TritonBackend()
    results = {}
    for label, config in (("production", HyperAttentionConfig()), ("block keys only", HyperAttentionConfig(sample_size=0))):
        rng = make_rng(0)
        plan = plan_attention(impl, q, k, causal=False, scale=0.125, config=config,
                              projections=draw_projections(rng, 64, 7), rng=rng)
        (piece,) = list(plan.pieces)
        st = piece.structure
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device="cuda")
        impl.sparse_forward(q, k, v, st, 0.125, out, lse, fresh=True)
        ms = triton.testing.do_bench(lambda st=st, out=out, lse=lse: impl.sparse_forward(q, k, v, st, 0.125, out, lse, fresh=True),
                                     return_mode="median", warmup=5, rep=50)
        print(f"attention_fwd_kernel, {label}: {ms * 1e3:8.1f} us", flush=True)
        results[label] = (st, out.clone(), lse.clone())
    st, out_ref, lse_ref = results["production"]
    ix = impl._indices(q, st)
    samples = st.samples  # [B, Hk, S, m]
    B, Hk, S, m = samples.shape

    def gather():
        idx = samples.to(torch.int64).reshape(B, Hk, S * m, 1).expand(-1, -1, -1, 64)
        return torch.gather(k, 2, idx).reshape(B, Hk, S, m, 64), torch.gather(v, 2, idx).reshape(B, Hk, S, m, 64)

    sk, sv = gather()
    ms = triton.testing.do_bench(gather, return_mode="median", warmup=5, rep=50)
    print(f"torch gather of the sample keys and values: {ms * 1e3:8.1f} us", flush=True)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    for block_m, block_n, warps, stages in ((128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)):
        tiles = on_device(sparse_tiles, q, st, block_m)

        def launch(tiles=tiles, block_m=block_m, block_n=block_n, warps=warps, stages=stages):
            fwd_gathered_samples[(len(tiles), 32)](
                q, k, v, out, lse, tiles, ix["q_order"], ix["k_order"], sk, sv, ix["sample_blocks"], ix["log_w"],
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                *ix["order_strides"], *ix["sample_strides"], 32, 1, 0.125 * 1.4426950408889634, ix["m"],
                HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=block_n, M_SAMPLES=m, num_warps=warps, num_stages=stages)
        try:
            launch()
            err = (out.float() - out_ref.float()).abs().max().item()
            lerr = (lse - lse_ref).abs().max().item()
            ms = triton.testing.do_bench(launch, return_mode="median", warmup=5, rep=50)
            print(f"gathered samples M={block_m} N={block_n} warps={warps} stages={stages}: {ms * 1e3:8.1f} us "
                  f"err {err:.2e} lse {lerr:.2e}", flush=True)
        except Exception as error:
            print(f"gathered samples M={block_m}: {type(error).__name__}: {str(error)[:200]}", flush=True)
