"""Two ideas for the sparse forward's steps, measured against the production kernel (both lost).

``python scripts/experiments/fwd_step_variants.py`` on the GPU machine times, on one N=131072
non-causal plan (B=1, H=32, D=64, bf16):

* the production ``attention_fwd_kernel``, and the same without samples (block keys only): how the
  time splits between the two loops;
* ``COPIED_SAMPLES``: the sample loop reads keys and values from a small contiguous copy
  [B, Hk, S, m, D] (4 MiB here, one torch gather per call), so its loads wait on no index load;
* ``COLUMN_BIAS``: ``s * scale2 + column_bias`` with ``column_bias = where(valid_key, bias2, -inf)``
  ([BLOCK_N], once per step) instead of ``where(valid, s * scale2 + bias2, -inf)`` per score: one
  fused multiply-add per score instead of that plus a select (without a causal mask validity is
  per key).

Each variant is checked against the production output.  Results:
benchmarks/results/experiments_2026-11-28b/ (run then as two scripts, ``sample_gather.py`` and
``fwd_column_bias.py``, with the same kernels).
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
def _online_step(q, kt, vv, valid, bias2, m_i, l_i, acc, scale2, PRECISION: tl.constexpr):
    """The production step until 2026-11-28 (scaled scores, a select per score, then exp2 of a
    difference): the baseline of these variants and of register_caps.py's step A/B."""
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
def _step(q, kt, vv, keep, bias2, m_i, l_i, acc, scale2, BLOCK_N: tl.constexpr, COLUMN_BIAS: tl.constexpr):
    """One online-softmax step over keys ``kt``/``vv`` of which ``keep`` [1, BLOCK_N] count."""
    if not COLUMN_BIAS:
        return _online_step(q, kt, vv, keep, bias2, m_i, l_i, acc, scale2, "tf32")
    column_bias = tl.where(tl.reshape(keep, [BLOCK_N]), bias2, -float("inf"))
    s = tl.dot(q, kt) * scale2 + column_bias[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def fwd_step_variant(
    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW, SK, SV,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s,
    num_heads, group, scale2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_SAMPLES: tl.constexpr,
    COPIED_SAMPLES: tl.constexpr, COLUMN_BIAS: tl.constexpr,
):
    """The production forward (non-causal, permuted, fresh, D = Dv = HEAD_DIM) with the two switches."""
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
        m_i, l_i, acc = _step(q, kt, vv, valid, 0.0, m_i, l_i, acc, scale2, BLOCK_N, COLUMN_BIAS)
    log_w2 = tl.load(LogW + seg) * 1.4426950408889634
    sample_row = b * ss_b + hk * ss_h + seg * ss_s
    for start in range(0, M_SAMPLES, BLOCK_N):
        if COPIED_SAMPLES:  # SK/SV [B, Hk, S, m, D] contiguous: addresses need no index load
            slots = start + tl.arange(0, BLOCK_N)
            keep = (tl.load(SampleBlock + sample_row + slots) != blk)[None, :]
            copy_row = sample_row.to(tl.int64) * HEAD_DIM
            kt = tl.load(SK + copy_row + slots[None, :] * HEAD_DIM + offs_d[:, None])
            vv = tl.load(SV + copy_row + slots[:, None] * HEAD_DIM + offs_d[None, :])
        else:
            kt, vv, keep = _sample_keys(start, M_SAMPLES, Samples + sample_row, SampleBlock + sample_row, blk,
                                        k_base, v_base, sk_n, sk_d, sv_n, sv_d, offs_d, offs_d, HEAD_DIM, HEAD_DIM,
                                        BLOCK_N, False)
        m_i, l_i, acc = _step(q, kt, vv, keep, log_w2, m_i, l_i, acc, scale2, BLOCK_N, COLUMN_BIAS)
    _store_partial(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, rows, mask_m, offs_d, so_n, so_d, sl_n,
                   m_i, l_i, acc, HEAD_DIM, True)


def copied_samples(k, v, samples):
    """Contiguous [B, Hk, S, m, D] copies of the sample keys and values."""
    batch, kv_heads, segments, m = samples.shape
    idx = samples.to(torch.int64).reshape(batch, kv_heads, segments * m, 1).expand(-1, -1, -1, k.shape[3])
    shape = (batch, kv_heads, segments, m, k.shape[3])
    return torch.gather(k, 2, idx).reshape(shape), torch.gather(v, 2, idx).reshape(shape)


def launch(q, k, v, out, lse, tiles, ix, sk, sv, *, copied=False, column_bias=False, block_m=128, block_n=64,
           warps=4, stages=3):
    """``ix``: the backend's index tensors of the plan (``TritonBackend._indices``)."""
    fwd_step_variant[(len(tiles), q.shape[0] * q.shape[1])](
        q, k, v, out, lse, tiles, ix["q_order"], ix["k_order"], ix["samples"], ix["sample_blocks"], ix["log_w"],
        sk, sv, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *ix["order_strides"], *ix["sample_strides"], q.shape[1], q.shape[1] // k.shape[1],
        q.shape[3] ** -0.5 * 1.4426950408889634,
        HEAD_DIM=q.shape[3], BLOCK_M=block_m, BLOCK_N=block_n, M_SAMPLES=ix["m"], COPIED_SAMPLES=copied,
        COLUMN_BIAS=column_bias, num_warps=warps, num_stages=stages)


if __name__ == "__main__":
    from hyperattn.algorithm import draw_projections, plan_attention
    from hyperattn.api import make_rng
    from hyperattn.config import HyperAttentionConfig
    from hyperattn_triton import backend
    from hyperattn_triton.tiles import on_device, sparse_tiles

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median", warmup=5, rep=50) * 1e3

    n = 131072
    q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    impl = backend.TritonBackend()
    plans = {}
    for label, config in (("production", HyperAttentionConfig()), ("block keys only", HyperAttentionConfig(sample_size=0))):
        rng = make_rng(0)
        plan = plan_attention(impl, q, k, causal=False, scale=0.125, config=config,
                              projections=draw_projections(rng, 64, 7), rng=rng)
        (piece,) = list(plan.pieces)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device="cuda")
        run = lambda st=piece.structure, out=out, lse=lse: impl.sparse_forward(q, k, v, st, 0.125, out, lse,  # noqa: E731
                                                                                  fresh=True)
        run()
        print(f"attention_fwd_kernel, {label}: {bench(run):8.1f} us", flush=True)
        plans[label] = (piece.structure, out, lse)
    st, out_ref, lse_ref = plans["production"]
    ix = impl._indices(q, st)
    sk, sv = copied_samples(k, v, st.samples)
    print(f"torch gather of the sample keys and values: {bench(lambda: copied_samples(k, v, st.samples)):8.1f} us")
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    for switches in (dict(copied=True), dict(column_bias=True)):
        for shape in (dict(), dict(stages=4), dict(block_n=128, warps=8, stages=2), dict(block_m=64)):
            tiles = on_device(sparse_tiles, q, st, shape.get("block_m", 128))
            args = dict(switches, **shape)
            run = lambda tiles=tiles, args=args: launch(q, k, v, out, lse, tiles, ix, sk, sv, **args)  # noqa: E731
            run()
            err = (out.float() - out_ref.float()).abs().max().item()
            lerr = (lse - lse_ref).abs().max().item()
            print(f"{args}: {bench(run):8.1f} us  err {err:.2e} lse {lerr:.2e}", flush=True)
