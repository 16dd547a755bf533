"""Oracles and helpers that the tests of every backend use (float64, dense, NumPy).

* :func:`exact_attention_f64` — plain softmax attention, the oracle for the limits.
* :func:`plan_weights` / :func:`dense_attention_from_plan` — the dense float64 equivalent of a
  HyperAttention plan: the weight each query gives each key (1 in its block or exact piece,
  ``n_k / m``, or the draw's own weight under importance sampling, per draw of a sample outside
  its block), then a weighted softmax.  It shares
  nothing with the kernels but the plan.
* :func:`local_drift_inputs` — inputs whose heavy keys are each row's neighbours (the band's tests
  and ``benchmarks/estimators.py``).
"""

from __future__ import annotations

import numpy as np

from .algorithm import CallSpec, ExactPiece, Plan
from .config import HyperAttentionConfig
from .protocol import Segments, SparseStructure, query_block_bounds


def to_numpy64(x) -> np.ndarray:
    """Any array (numpy, torch on any device) as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if str(x.dtype) == "torch.bfloat16" else x.detach().cpu().numpy()
    elif hasattr(x, "get"):  # cupy
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def _expand_kv(x: np.ndarray, q_heads: int) -> np.ndarray:
    return np.repeat(x, q_heads // x.shape[1], axis=1)


def causal_mask(n_q: int, n_k: int) -> np.ndarray:
    """[Nq, Nk] bool, True where allowed; aligned bottom-right (row i sees keys <= i + Nk - Nq)."""
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + (n_k - n_q)


def weighted_softmax_attention(q, k, v, weights: np.ndarray, scale: float):
    """out_i = sum_j w_ij e^(s q_i.k_j) v_j / sum_j w_ij e^(s q_i.k_j); lse_i = log of the normaliser.

    q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv], weights [B, Hq, Nq, Nk] (>= 0).
    """
    q, k, v = (to_numpy64(x) for x in (q, k, v))
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(weights > 0, scores + np.log(weights), -np.inf)
        row_max = np.max(scores, axis=-1, keepdims=True)
        p = np.exp(scores - row_max)
        total = p.sum(axis=-1, keepdims=True)
        out = np.einsum("bhij,bhjd->bhid", p / total, v)
        lse = (row_max + np.log(total))[..., 0]
    return out, lse


def exact_attention_f64(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Exact attention in float64: (out [B, Hq, Nq, Dv], lse [B, Hq, Nq])."""
    q = to_numpy64(q)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = causal_mask(n_q, n_k) if causal else np.ones((n_q, n_k), dtype=bool)
    weights = np.broadcast_to(allowed, (q.shape[0], q.shape[1], n_q, n_k)).astype(np.float64)
    return weighted_softmax_attention(q, k, v, weights, scale)


def plan_weights(plan: Plan, batch: int, q_heads: int, n_q: int, n_k: int) -> np.ndarray:
    """The dense [B, Hq, Nq, Nk] float64 weight matrix that a plan's pieces give together."""
    weights = np.zeros((batch, q_heads, n_q, n_k))
    for piece in plan.pieces:
        if isinstance(piece, ExactPiece):
            for qs, qe, ks, ke in piece.segments.table.tolist():
                allowed = causal_mask(qe - qs, ke - ks) if piece.causal else True
                weights[:, :, qs:qe, ks:ke] += allowed
        else:
            _add_sparse_weights(weights, piece.structure)
    return weights


def _add_sparse_weights(weights: np.ndarray, st: SparseStructure) -> None:
    batch, q_heads = weights.shape[:2]
    q_order, k_order, k_rank = (to_numpy64(x).astype(np.int64) for x in (st.q_order, st.k_order, st.k_rank))
    samples = None if st.samples is None else to_numpy64(st.samples).astype(np.int64)
    draw_log_w = None if st.sample_log_weights is None else to_numpy64(st.sample_log_weights)
    group = q_heads // k_order.shape[1]
    bs = st.block_size
    for s, (qs, qe, ks, ke) in enumerate(st.segments.table.tolist()):
        n_q, n_k = qe - qs, ke - ks
        n_blocks = -(-n_k // bs)
        bounds = query_block_bounds(np.arange(n_blocks + 1), bs, n_q, n_k)
        for b in range(batch):
            for h in range(q_heads):
                hk = h // group
                for blk in range(n_blocks):
                    rows = q_order[b, h, qs + bounds[blk] : qs + bounds[blk + 1]]
                    keys = k_order[b, hk, ks + blk * bs : ks + min((blk + 1) * bs, n_k)]
                    weights[b, h, rows[:, None], keys[None, :]] += 1.0
                    if samples is None:
                        continue
                    drawn = samples[b, hk, s]
                    outside = k_rank[b, hk, drawn] // bs != blk
                    draw_weights = (np.full(len(drawn), n_k / len(drawn)) if draw_log_w is None
                                    else np.exp(draw_log_w[b, hk, s]))
                    for key, weight in zip(drawn[outside], draw_weights[outside]):  # duplicates add up
                        weights[b, h, rows, key] += weight


def dense_attention_from_plan(plan: Plan, q, k, v):
    """What the kernels must compute for ``plan``, densely in float64: (out, lse)."""
    batch, q_heads, n_q = q.shape[:3]
    weights = plan_weights(plan, batch, q_heads, n_q, k.shape[2])
    return weighted_softmax_attention(q, k, v, weights, plan.scale)


def seeded_plan(backend, q, k, *, causal: bool, scale: float, config: HyperAttentionConfig, seed: int) -> Plan:
    """The plan that ``attention(..., seed=seed)`` builds for these inputs (same draws, same order).

    Its pieces are made as they are read: ``tuple(plan.pieces)`` makes them all."""
    qn, kn = backend.to_native(q), backend.to_native(k)
    return CallSpec(causal, scale, config, seed).plan(backend, qn, kn)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN if either has a NaN)."""
    a, e = to_numpy64(actual), to_numpy64(expected)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def local_drift_inputs(rng: np.random.Generator, heads: int, n: int, dim: int, strength: float = 2.0, lag: int = 3):
    """(q, k, v) float64 [1, heads, n, dim]: keys drifting along the sequence (a normalised random
    walk), each query near the key ``lag`` positions back, so every row's heaviest keys are its
    neighbours (near in position and in key space alike)."""
    k = np.cumsum(rng.standard_normal((1, heads, n, dim)), axis=2) / 4
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    k *= strength * np.sqrt(dim) ** 0.5
    q = np.roll(k, lag, axis=2) + 0.3 * rng.standard_normal(k.shape)
    return q, k, rng.standard_normal((1, heads, n, dim))


#: Rounding unit of each dtype; tolerances are multiples of it.
EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


__all__ = [
    "EPS",
    "Segments",
    "causal_mask",
    "dense_attention_from_plan",
    "exact_attention_f64",
    "local_drift_inputs",
    "plan_weights",
    "relative_error",
    "seeded_plan",
    "to_numpy64",
    "weighted_softmax_attention",
]
