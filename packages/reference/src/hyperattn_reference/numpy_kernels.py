"""Reference kernels: NumPy/BLAS for the dense tiles, numba for the row-indexed merges.

Work is split into one task per (batch, KV head): a task owns the query heads of its GQA group
and its KV head, so tasks never write the same output row and run on a thread pool (NumPy and
BLAS release the GIL; BLAS is held to one thread meanwhile).  Inside a task, tiles are batched:
all blocks of a segment at once (padded to the largest query block, padding masked), or a chunk of
query rows against all its visible keys for exact attention.  Scores per tile are bounded by
``TILE_SCORES`` so memory stays small at any length.

Why not numba throughout: numba's scalar ``exp`` and small BLAS calls per block are several times
slower than NumPy's vectorised ``exp`` on whole tiles (docs/performance.md).  numba keeps the
loops that index rows one by one (the log-sum-exp merge into scattered rows).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from hyperattn.protocol import Segments, SparseStructure, query_block_bounds

TILE_SCORES = 1 << 19  # 2 MB of float32 scores: large enough for BLAS, small enough for cache
WORKERS = max(1, min(8, os.cpu_count() or 1))


def for_each_kv_head(batch: int, kv_heads: int, work) -> None:
    """Run ``work(b, hk)`` for every batch and KV head, in parallel when there are several."""
    tasks = [(b, hk) for b in range(batch) for hk in range(kv_heads)]
    if len(tasks) == 1 or WORKERS == 1:
        for task in tasks:
            work(*task)
        return
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(work, *task) for task in tasks]:
            future.result()


@numba.njit(cache=True, nogil=True)
def merge_rows(out, lse, rows, o, row_lse):
    """Merge partial softmaxes ``(o[i], row_lse[i])`` into ``out[rows[i]], lse[rows[i]]``.

    out [N, Dv], lse [N] (one head); rows [n]; o [n, Dv]; row_lse [n].  NaN propagates.
    """
    for i in range(rows.shape[0]):
        row, l_new = rows[i], row_lse[i]
        l_old = lse[row]
        if l_old == -np.inf:
            out[row, :] = o[i, :]
            lse[row] = l_new
        elif l_new != -np.inf:
            total = max(l_old, l_new) + math.log1p(math.exp(-abs(l_old - l_new)))
            a = math.exp(l_old - total)
            c = math.exp(l_new - total)
            for d in range(out.shape[1]):
                out[row, d] = a * out[row, d] + c * o[i, d]
            lse[row] = total


def with_ones_column(values: np.ndarray) -> np.ndarray:
    """values [..., c, Dv] -> [..., c, Dv + 1]: P @ this gives P @ values and the row sums of P at once."""
    ones = np.ones(values.shape[:-1] + (1,), dtype=values.dtype)
    return np.concatenate([values, ones], axis=-1)


def softmax_tile(scores: np.ndarray, values_and_ones: np.ndarray):
    """Row softmax of the biased, scaled ``scores`` [..., n, c] times values [..., c, Dv].

    ``values_and_ones`` is :func:`with_ones_column` of the values, so one BLAS call yields the
    weighted values and the normaliser.  Returns (o [..., n, Dv], lse [..., n]); overwrites ``scores``.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = scores.max(axis=-1, keepdims=True)
        np.subtract(scores, row_max, out=scores)
        np.exp(scores, out=scores)
        weighted = np.matmul(scores, values_and_ones)
        total = weighted[..., -1:]
        return weighted[..., :-1] / total, (row_max + np.log(total))[..., 0]


def score_gradient(p: np.ndarray, dp: np.ndarray, delta: np.ndarray, scale: float) -> np.ndarray:
    """In place on dp: dS = p * (dP - delta) * scale, the gradient of the scaled scores' input."""
    np.subtract(dp, delta[..., None], out=dp)
    np.multiply(dp, p, out=dp)
    dp *= scale
    return dp


# ---------------------------------------------------------------------------- sparse pieces
class _BlockLayout:
    """Static layout of one segment's blocks: padded sorted positions and their validity."""

    def __init__(self, n_q: int, n_k: int, block_size: int):
        self.n_blocks = -(-n_k // block_size)
        bounds = query_block_bounds(np.arange(self.n_blocks + 1), block_size, n_q, n_k)
        width = max(1, int(np.diff(bounds).max()))
        q_pos = bounds[:-1, None] + np.arange(width)
        self.q_valid = q_pos < bounds[1:, None]
        self.q_pos = np.minimum(q_pos, n_q - 1)
        k_pos = np.arange(self.n_blocks)[:, None] * block_size + np.arange(block_size)
        self.k_valid = k_pos < n_k
        self.k_pos = np.minimum(k_pos, n_k - 1)
        self.block_size = block_size

    def chunks(self, group: int, columns: int):
        """Ranges of blocks whose tile has at most TILE_SCORES scores."""
        per_block = group * self.q_pos.shape[1] * columns
        step = max(1, TILE_SCORES // per_block)
        return [(c, min(c + step, self.n_blocks)) for c in range(0, self.n_blocks, step)]


def _sparse_tile(q, k, v, st: SparseStructure, b, hk, group, s, layout: _BlockLayout, c0, c1, scale, ones=False):
    """Gathered tile of blocks [c0, c1) of segment s: rows, validity, queries, keys, values, scores.

    The score bias (padding, own-block samples, log sample weight) rides in the matmul as one
    extra column: [q * scale, 1] @ [k, bias]^T.  With ``ones`` the values carry a ones column.
    """
    qs, _, ks, _ = st.segments.table[s]
    heads = slice(hk * group, (hk + 1) * group)
    rows = st.q_order[b, heads][:, qs + layout.q_pos[c0:c1]]  # [G, nbc, bq]
    queries = q[b, heads][np.arange(group)[:, None, None], rows]  # [G, nbc, bq, D]
    key_rows = st.k_order[b, hk, ks + layout.k_pos[c0:c1]]  # [nbc, bs]
    bs, m, dim, v_dim = key_rows.shape[1], st.sample_size, k.shape[3], v.shape[3]
    # keys (block, then samples) with the score bias as an extra column, filled in place
    keys_and_bias = np.empty((c1 - c0, bs + m, dim + 1), k.dtype)
    values = np.empty((c1 - c0, bs + m, v_dim + ones), v.dtype)
    keys_and_bias[:, :bs, :dim] = k[b, hk][key_rows]
    values[:, :bs, :v_dim] = v[b, hk][key_rows]
    keys_and_bias[:, :bs, dim] = np.where(layout.k_valid[c0:c1], 0.0, -np.inf)
    if m:
        drawn = st.samples[b, hk, s]  # [m]
        own_block = (st.k_rank[b, hk, drawn] // layout.block_size)[None, :] == np.arange(c0, c1)[:, None]
        keys_and_bias[:, bs:, :dim] = k[b, hk][drawn]
        values[:, bs:, :v_dim] = v[b, hk][drawn]
        log_w = st.log_sample_weight[s] if st.sample_log_weights is None else st.sample_log_weights[b, hk, s]
        keys_and_bias[:, bs:, dim] = np.where(own_block, -np.inf, log_w)
    if ones:
        values[..., v_dim] = 1.0
    queries_and_one = np.empty(queries.shape[:-1] + (dim + 1,), q.dtype)
    np.multiply(queries, q.dtype.type(scale), out=queries_and_one[..., :dim])
    queries_and_one[..., dim] = 1.0
    scores = np.matmul(queries_and_one, np.swapaxes(keys_and_bias, 1, 2)[None])
    return rows, layout.q_valid[c0:c1], queries, keys_and_bias[..., :dim], values, scores


def sparse_forward(q, k, v, st: SparseStructure, scale: float, out, lse) -> None:
    group = q.shape[1] // k.shape[1]
    layouts = [_BlockLayout(nq, nk, st.block_size) for nq, nk in zip(st.segments.q_len, st.segments.k_len)]
    columns = st.block_size + st.sample_size

    def work(b, hk):
        for s, layout in enumerate(layouts):
            for c0, c1 in layout.chunks(group, columns):
                rows, valid, _, _, values, scores = _sparse_tile(
                    q, k, v, st, b, hk, group, s, layout, c0, c1, scale, ones=True
                )
                o, row_lse = softmax_tile(scores, values[None])
                for g in range(group):
                    h = hk * group + g
                    merge_rows(out[b, h], lse[b, h], rows[g][valid], o[g][valid], row_lse[g][valid])

    for_each_kv_head(q.shape[0], k.shape[1], work)


def sparse_backward(q, k, v, lse, dout, delta, st: SparseStructure, scale: float, dq, dk, dv) -> None:
    group = q.shape[1] // k.shape[1]
    layouts = [_BlockLayout(nq, nk, st.block_size) for nq, nk in zip(st.segments.q_len, st.segments.k_len)]
    columns = st.block_size + st.sample_size
    bs = st.block_size

    def work(b, hk):
        heads = slice(hk * group, (hk + 1) * group)
        g_index = np.arange(group)[:, None, None]
        for s, layout in enumerate(layouts):
            ks = st.segments.k_start[s]
            d_samples_k = d_samples_v = 0.0
            for c0, c1 in layout.chunks(group, columns):
                rows, valid, queries, keys, values, p = _sparse_tile(
                    q, k, v, st, b, hk, group, s, layout, c0, c1, scale
                )
                with np.errstate(invalid="ignore", over="ignore"):
                    np.subtract(p, lse[b, heads][g_index, rows][..., None], out=p)
                    np.exp(p, out=p)
                p *= valid[None, :, :, None]  # padded query rows repeat real ones: count them once
                d_out = dout[b, heads][g_index, rows].astype(q.dtype)
                ds = score_gradient(p, np.matmul(d_out, np.swapaxes(values, 1, 2)[None]), delta[b, heads][g_index, rows], scale)
                d_queries = np.matmul(ds, keys[None])
                for g in range(group):
                    dq[b, hk * group + g][rows[g][valid]] += d_queries[g][valid]
                d_keys = np.matmul(np.swapaxes(ds, 2, 3), queries).sum(axis=0)  # [nbc, bs + m, D]
                d_values = np.matmul(np.swapaxes(p, 2, 3), d_out).sum(axis=0)
                k_valid = layout.k_valid[c0:c1]
                key_rows = st.k_order[b, hk, ks + layout.k_pos[c0:c1]][k_valid]  # unique keys
                dk[b, hk][key_rows] += d_keys[:, :bs][k_valid]
                dv[b, hk][key_rows] += d_values[:, :bs][k_valid]
                d_samples_k = d_samples_k + d_keys[:, bs:].sum(axis=0)
                d_samples_v = d_samples_v + d_values[:, bs:].sum(axis=0)
            if st.samples is not None:
                np.add.at(dk[b, hk], st.samples[b, hk, s], d_samples_k)  # duplicate draws add up
                np.add.at(dv[b, hk], st.samples[b, hk, s], d_samples_v)

    for_each_kv_head(q.shape[0], k.shape[1], work)


# ----------------------------------------------------------------------------- exact pieces
def _exact_chunks(segments: Segments, group: int, causal: bool):
    """(segment, r0, r1, key_end) tiles: local query rows [r0, r1) see local keys [0, key_end)."""
    for s, (qs, qe, ks, ke) in enumerate(segments.table.tolist()):
        n_q, n_k = qe - qs, ke - ks
        step = max(1, min(n_q, TILE_SCORES // (group * n_k)))
        for r0 in range(0, n_q, step):
            r1 = min(r0 + step, n_q)
            yield s, r0, r1, (min(n_k, r1 + n_k - n_q) if causal else n_k)


@lru_cache(maxsize=64)
def _upper_triangle_bias(rows: int, cols: int, dtype) -> np.ndarray:
    """[rows, cols]: 0 where col <= row, -inf above the diagonal."""
    return np.where(np.arange(cols)[None, :] <= np.arange(rows)[:, None], 0.0, -np.inf).astype(dtype)


def _exact_tile(q, k, v, segments, b, hk, group, s, r0, r1, key_end, causal, scale):
    qs, qe, ks, ke = segments.table[s]
    heads = slice(hk * group, (hk + 1) * group)
    queries = q[b, heads, qs + r0 : qs + r1]  # [G, n, D]
    keys, values = k[b, hk, ks : ks + key_end], v[b, hk, ks : ks + key_end]
    scores = np.matmul(queries * queries.dtype.type(scale), keys.T)  # scaling q is cheaper than scores
    if causal:  # bottom-right aligned: local row r sees local keys <= r + (n_k - n_q)
        first = r0 + (ke - ks) - (qe - qs)  # keys before this one are visible to every row
        scores[..., first:key_end] += _upper_triangle_bias(r1 - r0, key_end - first, scores.dtype)
    return queries, keys, values, scores


def exact_forward(q, k, v, segments: Segments, causal: bool, scale: float, out, lse) -> None:
    group = q.shape[1] // k.shape[1]

    def work(b, hk):
        for s, r0, r1, key_end in _exact_chunks(segments, group, causal):
            _, _, values, scores = _exact_tile(q, k, v, segments, b, hk, group, s, r0, r1, key_end, causal, scale)
            o, row_lse = softmax_tile(scores, with_ones_column(values))
            rows = np.arange(r0, r1) + segments.q_start[s]
            for g in range(group):
                h = hk * group + g
                merge_rows(out[b, h], lse[b, h], rows, o[g], row_lse[g])

    for_each_kv_head(q.shape[0], k.shape[1], work)


def exact_backward(q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv) -> None:
    group = q.shape[1] // k.shape[1]

    def work(b, hk):
        heads = slice(hk * group, (hk + 1) * group)
        for s, r0, r1, key_end in _exact_chunks(segments, group, causal):
            queries, keys, values, p = _exact_tile(q, k, v, segments, b, hk, group, s, r0, r1, key_end, causal, scale)
            rows = slice(segments.q_start[s] + r0, segments.q_start[s] + r1)
            key_rows = slice(segments.k_start[s], segments.k_start[s] + key_end)
            with np.errstate(invalid="ignore", over="ignore"):
                np.subtract(p, lse[b, heads, rows][..., None], out=p)
                np.exp(p, out=p)
            d_out = dout[b, heads, rows].astype(q.dtype)
            ds = score_gradient(p, np.matmul(d_out, values.T), delta[b, heads, rows], scale)
            dq[b, heads, rows] += np.matmul(ds, keys)
            dk[b, hk, key_rows] += np.matmul(np.swapaxes(ds, 1, 2), queries).sum(axis=0)
            dv[b, hk, key_rows] += np.matmul(np.swapaxes(p, 1, 2), d_out).sum(axis=0)

    for_each_kv_head(q.shape[0], k.shape[1], work)
