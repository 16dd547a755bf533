"""Experiments behind the Triton forward's current form (benchmarks/results/experiments_2026-11-28/).

``python scripts/experiments/fwd_variants.py [host]`` on the GPU machine prints (A) host vs GPU
time of the four N=131072 steps with cProfile tables, then (B) the sparse forward kernel at a few
launch configurations next to a variant that walks block keys and samples in one pipelined loop
(``sparse_fwd_merged``, 10-40% slower), and (C) the counting sort's chunk sizes.
"""

import triton
import triton.language as tl
from fwd_step_variants import _online_step  # the step these variants were measured with

from hyperattn_triton.kernels import _index, _positions, _program_heads, _rows_of, _store_partial, _tile


@triton.jit
def sparse_fwd_merged(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale2, num_samples,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, V_DIM: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FRESH: tl.constexpr, WIDE: tl.constexpr, KT: tl.constexpr,
):
    """Block keys then samples in ONE pipelined loop; FRESH writes without reading Out/Lse."""
    b, h, hk = _program_heads(num_heads, group)
    seg, blk, q0, q1, k0, k1, diag = _tile(Tiles)
    rows, mask_m = _positions(q0, q1, QOrder + b * sqo_b + h * sqo_h, BLOCK_M, True, WIDE)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    q = _rows_of(Q + b * sq_b + h * sq_h, rows, sq_n, offs_d, sq_d, mask_m, HEAD_DIM)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    k_order = KOrder + b * sko_b + hk * sko_h
    sample_row = b * ss_b + hk * ss_h + seg * ss_s
    log_w2 = tl.load(LogW + seg) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_block = tl.cdiv(k1 - k0, BLOCK_N)
    n_steps = n_block + tl.cdiv(num_samples, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    for step in range(0, n_steps):
        in_block = step < n_block
        pb = k0 + step * BLOCK_N + offs_n
        ps = (step - n_block) * BLOCK_N + offs_n
        mb = in_block & (pb < k1)
        ms = (not in_block) & (ps >= 0) & (ps < num_samples)
        kb = tl.load(k_order + pb, mask=mb, other=0)
        ks = tl.load(Samples + sample_row + ps, mask=ms, other=0)
        sb = tl.load(SampleBlock + sample_row + ps, mask=ms, other=-1)
        keys = _index(tl.where(in_block, kb, ks), WIDE)
        keep = mb | (ms & (sb != blk))
        bias2 = tl.where(in_block, 0.0, log_w2)
        if KT:
            kt = tl.load(k_base + keys[None, :] * sk_n + offs_d[:, None] * sk_d,
                         mask=keep[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            kt = tl.trans(tl.load(k_base + keys[:, None] * sk_n + offs_d[None, :] * sk_d,
                                  mask=keep[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0))
        vv = tl.load(v_base + keys[:, None] * sv_n + offs_v[None, :] * sv_d,
                     mask=keep[:, None] & (offs_v[None, :] < V_DIM), other=0.0)
        m_i, l_i, acc = _online_step(q, kt, vv, keep[None, :], bias2, m_i, l_i, acc, scale2, "tf32")
    _store_partial(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, rows, mask_m, offs_v, so_n, so_d, sl_n,
                   m_i, l_i, acc, V_DIM, FRESH)

# ---------------------------------------------------------------------------------------------
# Sweep (GPU): python scripts/experiments/fwd_variants.py
if __name__ == "__main__":
    import itertools
    import math
    import time

    import torch

    import hyperattn
    from hyperattn.algorithm import draw_projections, plan_attention
    from hyperattn.api import make_rng
    from hyperattn.config import HyperAttentionConfig
    from hyperattn_triton import backend, sorting
    from hyperattn_triton.tiles import on_device, sparse_tiles

    def kernel_times(fn, calls=5):
        """GPU time per call of each kernel name (torch profiler), microseconds."""
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        times = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "self_device_time_total", 0) > 0:
                t = getattr(e, "self_device_time_total", 0)
                if t > 0:
                    times[e.key[:60]] = t / calls
        return dict(sorted(times.items(), key=lambda kv: -kv[1]))

    n = 131072
    q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    # A) host vs GPU time of one call, four modes
    for causal, grad in itertools.product((False, True), (False, True)):
        qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
        dout = torch.randn_like(q)

        def step(qq=qq, kk=kk, vv=vv, causal=causal, grad=grad, dout=dout):
            o = hyperattn.attention(qq, kk, vv, causal=causal, backend="triton")
            if grad:
                o.backward(dout)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        calls = 10
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        kt = kernel_times(step, 3)
        gpu = sum(kt.values()) / 1e3
        print(f"causal={causal} grad={grad}: host {1e3 * (t1 - t0) / calls:6.2f} ms/call (until the queue fills), "
              f"wall {1e3 * (t2 - t0) / calls:6.2f} ms/call, GPU kernels {gpu:6.2f} ms/call", flush=True)
        if not grad:  # where the host time goes
            import cProfile
            import pstats
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(5):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            pstats.Stats(profiler).sort_stats("cumtime").print_stats(40)

    import sys
    if sys.argv[1:] == ["host"]:
        raise SystemExit
    # B) the sparse forward alone on one plan
    impl = backend.TritonBackend()
    rng = make_rng(0)
    plan = plan_attention(impl, q, k, causal=False, scale=0.125, config=HyperAttentionConfig(),
                          projections=draw_projections(rng, 64, 7), rng=rng)
    (piece,) = list(plan.pieces)
    st = piece.structure
    out_ref = torch.empty_like(q)
    lse_ref = torch.full(q.shape[:3], -math.inf, device="cuda")
    impl.sparse_forward(q, k, v, st, 0.125, out_ref, lse_ref, fresh=True)
    for launch_config in ({}, dict(block_n=128, stages=2), dict(block_m=64, block_n=128, stages=2)):
        # the production kernel (two loops, int32 gathers, FRESH) at launch configurations
        backend.TUNING.update(launch_config)
        ms = triton.testing.do_bench(lambda: impl.sparse_forward(q, k, v, st, 0.125, out_ref, lse_ref, fresh=True),
                                     return_mode="median", warmup=5, rep=40)
        print(f"attention_fwd_kernel {launch_config or 'default'}: {ms * 1e3:8.1f} us", flush=True)
        backend.TUNING.update(block_m=128, block_n=64, stages=3)
    impl.sparse_forward(q, k, v, st, 0.125, out_ref, lse_ref, fresh=True)
    ix = impl._indices(q, st)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    lse_fill = torch.full(q.shape[:3], -math.inf, device="cuda")
    # the merged-loop variant (block keys and samples in one pipelined loop): slower at every setting
    base = dict(block_m=128, block_n=128, warps=4, stages=2, fresh=True, wide=False, kt_=False, maxnreg=None)
    changes = [{}, dict(kt_=True), dict(stages=3), dict(stages=1), dict(block_m=64), dict(block_n=64, stages=3),
               dict(warps=8), dict(fresh=False), dict(wide=True), dict(maxnreg=128), dict(maxnreg=168)]
    for change in changes:
        cfg = dict(base, **change)
        tiles = on_device(sparse_tiles, q, st, cfg["block_m"])

        def launch(cfg=cfg, tiles=tiles):
            if not cfg["fresh"]:
                lse.copy_(lse_fill)
            extra = {} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}
            sparse_fwd_merged[(len(tiles), 32)](
                q, k, v, out, lse, tiles, ix["q_order"], ix["k_order"], ix["samples"], ix["sample_blocks"], ix["log_w"],
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                *ix["order_strides"], *ix["sample_strides"], 32, 1, 0.125 * 1.4426950408889634, ix["m"],
                HEAD_DIM=64, D_PAD=64, V_DIM=64, DV_PAD=64, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                FRESH=cfg["fresh"], WIDE=cfg["wide"], KT=cfg["kt_"], num_warps=cfg["warps"], num_stages=cfg["stages"],
                **extra)
        label = "sparse_fwd_merged " + " ".join(f"{key}={value}" for key, value in cfg.items())
        try:
            launch()
            err = (out.float() - out_ref.float()).abs().max().item()
            lerr = (lse - lse_ref).abs().max().item()
            ms = triton.testing.do_bench(launch, return_mode="median", warmup=5, rep=30)
            if not cfg["fresh"]:
                ms -= triton.testing.do_bench(lambda: lse.copy_(lse_fill), return_mode="median", warmup=5, rep=30)
            print(f"{label} | {ms * 1e3:8.1f} us  err {err:.2e} lse {lerr:.2e}", flush=True)
        except Exception as error:
            print(f"{label} | {type(error).__name__}: {str(error)[:100]}", flush=True)

    # C) counting sort chunk sizes and warps (kernel times)
    codes = torch.randint(0, 128, (1, 32, n), device="cuda", dtype=torch.int32)
    import numpy as np
    for chunk, warps in ((512, 2), (512, 4), (512, 8), (1024, 8), (256, 2), (256, 4)):
        sorting.CHUNK, sorting.SCATTER_WARPS = chunk, warps
        ref = impl.segment_sort(codes, np.array([0]), np.array([n]), code_bits=7)
        kt = kernel_times(lambda: impl.segment_sort(codes, np.array([0]), np.array([n]), code_bits=7))
        print(f"sort chunk={chunk} warps={warps}: total {sum(kt.values()):7.1f} us | " +
              ", ".join(f"{name[:28]} {t:.1f}" for name, t in kt.items()), flush=True)
