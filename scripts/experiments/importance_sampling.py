"""Experiment (issue 18): defensive importance sampling of the residual by key or value norms.

Of each segment's m samples, half are the stratified uniform draws and half are drawn stratified on
the CDF of ||x_j||**power (x = k or v) over the segment's keys
each draw j gets the weight
1 / (m_u / n + m_n * p_j), p_j = ||x_j||**power / sum, which keeps the estimator (numerator and
normaliser) unbiased (the balance heuristic of multiple importance sampling
the uniform half
bounds every weight by 2n/m).  Patched into the reference backend (per-sample log weights in its
sparse tile), on benchmarks/estimators.py's families and settings (N = 4096, 2 heads, D = 64,
block 256 + 256 samples, min_seq_len 512, float64).

    python scripts/experiments/importance_sampling.py [seeds]
"""
import dataclasses
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
from quality import FAMILIES

import hyperattn
from hyperattn import sampling, testing
from hyperattn.algorithm import plan as plan_mod
from hyperattn_reference import numpy_kernels as nk

# per-sample log weights in the reference kernel
orig_tile = nk._sparse_tile
class PerSample:
    def __init__(self, arr, b, hk): self.arr, self.b, self.hk = arr, b, hk
    def __getitem__(self, s): return self.arr[self.b, self.hk, s]
def tile(q, k, v, st, b, hk, group, s, layout, c0, c1, scale, ones=False):
    if np.ndim(st.log_sample_weight) == 4:
        st = dataclasses.replace(st, log_sample_weight=PerSample(st.log_sample_weight, b, hk))
    return orig_tile(q, k, v, st, b, hk, group, s, layout, c0, c1, scale, ones)
nk._sparse_tile = tile

MODE = {"mode": None, "power": 2.0, "frac": 0.5, "v": None}
orig_ss = plan_mod.sparse_structure
def ss(backend, q, k, q_codes, k_codes, segments, config, seed, stream=0, global_heads=None):
    st = orig_ss(backend, q, k, q_codes, k_codes, segments, config, seed, stream, global_heads)
    if MODE["mode"] is None or st.samples is None:
        return st
    x = k if MODE["mode"] == "key" else MODE["v"]
    m = st.sample_size
    m_n = int(round(m * MODE["frac"]))
    m_u = m - m_n
    B, Hk, N, _ = x.shape
    norms = np.linalg.norm(x, axis=-1).astype(np.float64)  # [B,Hk,N]
    if MODE["power"] == "exp":  # E over Gaussian queries of exp(scale q.k): exp(scale^2 |q|^2/D |k|^2 / 2)
        c = (np.linalg.norm(q, axis=-1) ** 2).mean() / q.shape[-1] / q.shape[-1] / 2
        e = c * norms**2
        a = np.exp(e - e.max(-1, keepdims=True))
    else:
        a = norms ** MODE["power"]
    S = len(segments)
    samples = np.array(st.samples, copy=True).astype(np.int64)
    logw = np.zeros(samples.shape)
    idx = np.arange(B * Hk * S * m, dtype=np.uint64).reshape(B, Hk, S, m)
    u = sampling.mix(seed, stream + 1000, idx).astype(np.float64) / 2**32
    # uniform slots: re-draw stratified over m_u strata
    for s in range(S):
        ks, ke = int(segments.k_start[s]), int(segments.k_end[s])
        n = ke - ks
        j = np.arange(m)
        uni = ks + np.floor((j[:m_u] + u[:, :, s, :m_u]) * n / m_u).astype(np.int64)
        aseg = a[:, :, ks:ke]
        A = aseg.sum(-1, keepdims=True)
        cdf = np.cumsum(aseg, -1) / A
        t = (np.arange(m_n) + u[:, :, s, m_u:]) / m_n
        nor = np.stack([[np.minimum(np.searchsorted(cdf[b, h], t[b, h], side="right"), n - 1) for h in range(Hk)] for b in range(B)]) + ks
        drawn = np.concatenate([uni, nor], -1)
        samples[:, :, s] = drawn
        p = aseg / A  # [B,Hk,n]
        pj = np.take_along_axis(p, drawn - ks, -1)
        logw[:, :, s] = -np.log(m_u / n + m_n * pj)
    return dataclasses.replace(st, samples=samples.astype(np.int32), log_sample_weight=logw)
plan_mod.sparse_structure = ss

n, heads, dim, seeds = 4096, 2, 64, int(sys.argv[1]) if len(sys.argv) > 1 else 3
variants = [("stratified", None, 2, 0.5), ("key^2 50%", "key", 2, 0.5), ("key^1 50%", "key", 1, 0.5),
            ("value^2 50%", "value", 2, 0.5), ("value^1 50%", "value", 1, 0.5), ("key^4 50%", "key", 4, 0.5)]
if len(sys.argv) > 2:
    variants = [("stratified", None, 2, 0.5), ("key^4 50%", "key", 4, 0.5), ("key^8 50%", "key", 8, 0.5),
                ("key exp 50%", "key", "exp", 0.5), ("key^4 25%", "key", 4, 0.25)]
for family, make in FAMILIES.items():
    for causal in (False, True):
        res = {}
        for seed in range(seeds):
            q, k, v = make(np.random.default_rng(1000 * seed + n), heads, n, dim)
            want, want_lse = testing.exact_attention_f64(q, k, v, causal=causal)
            for name, mode, power, frac in variants:
                MODE.update(mode=mode, power=power, frac=frac, v=v)
                out, lse = hyperattn.attention(q, k, v, causal=causal, seed=seed, return_lse=True, backend="reference",
                                               lsh_num_projs=7, min_seq_len=512, exact_crossover=False,
                                               block_size=256, sample_size=256)
                res.setdefault(name, []).append((np.linalg.norm(out - want) / np.linalg.norm(v),
                                                 np.abs(lse - want_lse).mean(), np.exp(lse - want_lse).mean()))
        for name, r in res.items():
            r = np.array(r)
            print(f"{family:9s} causal={causal!s:5} {name:12s} rel {r[:,0].mean():.4f} lse {r[:,1].mean():.4f} ratio {r[:,2].mean():.3f}", flush=True)
