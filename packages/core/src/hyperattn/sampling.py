"""The residual's key samples as a counter-based random function of the seed.

Every sample is a pure function of ``(seed, stream, index)``: no generator state, so a backend can
draw them on its device (inside a CUDA graph, from a seed held in device memory) and every backend
draws the same ones.  This module is the specification and the NumPy implementation; the backends'
kernels compute it bit for bit (integer arithmetic only).

For sparse piece ``stream`` (0, 1, ... in plan order) with segments ``s`` of ``span[s]`` keys from
``k_start[s]``, sample ``j`` of batch ``b`` and KV head ``h`` is::

    index = ((b * Hk + h) * S + s) * m + j
    bits  = mix(seed, stream, index)                # uniform 32-bit integer
    key   = k_start[s] + (bits * span[s]) >> 32     # uniform in [k_start, k_start + span)

or, stratified (``HyperAttentionConfig.sampling == "stratified"``), draw j uniform in the j-th of
m equal strata of the span, [j * span / m, (j + 1) * span / m) (fractional bounds)::

    key   = k_start[s] + (j * span[s] + ((bits * span[s]) >> 32)) // m

i.e. floor((j + u) * span / m) with u = bits / 2**32.  Every key is then drawn m / span times in
expectation, as with independent uniform draws, so the same weight ``span / m`` keeps the
estimator unbiased, while the draws cover the key range evenly (lower variance where the scores
vary smoothly along the sequence).  j * span < 2**63 for m <= 2**31: int64 arithmetic.

Importance sampling by key norm (``sampling == "key_norm"``, :func:`sample_keys_by_key_norm`): a
defensive mixture.  The first ``m_u = m - m // 2`` draws are stratified uniform over ``m_u`` strata
(the formula above with ``m_u`` for m); the other ``m_n = m // 2`` are stratified on the CDF of the
key weights ``w_x = ||k_x||**4`` (:func:`key_norm_weights`) over the segment: draw ``i`` is the
first key x whose inclusive prefix sum of w passes ``(i + u) / m_n`` of the segment's total (float64
prefix sums of the float32 weights; uniform, as the first part, if the segment's total is not
above ``PREFIX_FLOOR`` of the prefix sum at its end: the prefix sums run over the whole key axis,
so a segment far lighter than the keys before it has a total that rounding would swamp).  Key x is then
drawn ``m_u / n + m_n p_x`` times in expectation (``p_x = w_x / total``), and every draw of x gets
the weight ``1 / (m_u / n + m_n p_x)`` (``p_x = 1 / n`` where the segment falls back to uniform) (the balance heuristic: unbiased, and at most ``n / m_u``, so
no draw can blow up the estimate), as a per-draw log weight.  Heavy-norm keys (attention sinks)
are drawn more often, and the uniform half keeps every key reachable.  Backends compute this up to
the rounding of the float64 prefix sums (a draw whose target falls within rounding of a boundary
may pick the neighbouring key).

``mix`` is SplitMix64's finaliser over ``seed + stream * STREAM + (index + 1) * GOLDEN`` (mod 2**64),
keeping the high 32 bits.  The multiply-shift maps 32 bits to a span with a bias of at most
``span / 2**32`` (none for a power-of-two span), far below sampling noise.
"""

from __future__ import annotations

import numpy as np

#: SplitMix64's increment (2**64 / golden ratio) and multipliers; STREAM separates the pieces.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
STREAM = 0xD1B54A32D192ED03
#: Seeds are ints in [0, 2**63) (int64 tensors on a device hold them as they are).
SEED_LIMIT = 2**63
#: A segment may span at most this many keys (the multiply-shift's range).
MAX_SPAN = 2**32
#: Key-norm draws: a segment whose weights sum to at most this fraction of the prefix sum at its
#: end draws uniformly (the float64 prefix sums resolve its mass to ~1e-16 of that sum).
PREFIX_FLOOR = 2.0**-24


def mix(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """uint32 bits of ``index`` (uint64 array) in ``stream`` of ``seed`` (see the module docstring)."""
    u64 = np.uint64
    key = u64((seed + stream * STREAM) % 2**64)
    with np.errstate(over="ignore"):  # every operation is modulo 2**64 by design
        z = key + (index + u64(1)) * u64(GOLDEN)
        z = (z ^ (z >> u64(30))) * u64(MIX1)
        z = (z ^ (z >> u64(27))) * u64(MIX2)
        z = z ^ (z >> u64(31))
    return (z >> u64(32)).astype(np.uint32)


def sample_keys(seed: int, stream: int, heads: tuple[int, int], k_start: np.ndarray, k_len: np.ndarray,
                m: int, n_k: int, stratified: bool = False) -> np.ndarray:
    """[B, Hk, S, m] key indices, uniform with replacement in each segment's key range, or one
    per stratum (``stratified``): int32 (int64 once ``n_k`` reaches 2**31).  ``k_start``,
    ``k_len``: [S] int arrays."""
    batch, kv_heads = heads
    segments = len(k_start)
    index = np.arange(batch * kv_heads * segments * m, dtype=np.uint64).reshape(batch, kv_heads, segments, m)
    bits = mix(seed, stream, index).astype(np.uint64)
    spans = np.asarray(k_len, dtype=np.uint64)[None, None, :, None]
    drawn = (bits * spans) >> np.uint64(32)
    if stratified:
        slot = np.arange(m, dtype=np.uint64)
        drawn = (slot * spans + drawn) // np.uint64(m)
    drawn = drawn.astype(np.int64) + np.asarray(k_start, dtype=np.int64)[None, None, :, None]
    return drawn.astype(np.int32 if n_k < 2**31 else np.int64)


def key_norm_weights(k: np.ndarray) -> np.ndarray:
    """float32 [B, Hk, Nk]: ``||k_x||**4`` of every key (the squared norms summed in float32)."""
    squared = np.sum(np.square(np.asarray(k, dtype=np.float32)), axis=-1, dtype=np.float32)
    return np.square(squared)


def split_key_norm_draws(m: int) -> tuple[int, int]:
    """``(m_u, m_n)``: the uniform and the norm-proportional draws of ``m`` (see the module)."""
    return m - m // 2, m // 2


def sample_keys_by_key_norm(seed: int, stream: int, weights: np.ndarray, k_start: np.ndarray, k_len: np.ndarray,
                            m: int, head_ids: np.ndarray | None = None,
                            kv_total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, log_weights)``, both [B, Hk, S, m] (int32 / int64 keys as :func:`sample_keys`, float32
    log weights) of ``sampling="key_norm"`` (see the module docstring).  ``weights``: float32
    [B, Hk, Nk] (:func:`key_norm_weights`).  ``head_ids`` [Hk]: the KV head of a larger call with
    ``kv_total`` KV heads that each of these is (its counter; default: themselves)."""
    batch, kv_heads, n_k = weights.shape
    head_ids = np.arange(kv_heads) if head_ids is None else np.asarray(head_ids, dtype=np.int64)
    kv_total = kv_heads if kv_total is None else kv_total
    segments = len(k_start)
    m_u, m_n = split_key_norm_draws(m)
    slot = np.arange(m, dtype=np.uint64)
    index = (((np.arange(batch, dtype=np.uint64)[:, None, None, None] * np.uint64(kv_total)
               + head_ids.astype(np.uint64)[None, :, None, None]) * np.uint64(segments)
              + np.arange(segments, dtype=np.uint64)[None, None, :, None]) * np.uint64(m) + slot)
    bits = mix(seed, stream, index).astype(np.uint64)
    starts = np.asarray(k_start, dtype=np.int64)
    spans = np.asarray(k_len, dtype=np.int64)
    span_u = spans.astype(np.uint64)[None, None, :, None]
    # uniform part (and the norm part of a segment whose weights are all 0): strata of m_u or m_n
    strata = np.where(slot < m_u, np.uint64(m_u), np.uint64(max(m_n, 1)))
    stratum = np.where(slot < m_u, slot, slot - np.uint64(m_u))
    uniform = ((stratum * span_u + ((bits * span_u) >> np.uint64(32))) // strata).astype(np.int64)
    prefix = np.cumsum(weights.astype(np.float64), axis=-1)  # inclusive [B, Hk, Nk]
    keys = np.empty((batch, kv_heads, segments, m), dtype=np.int64)
    log_w = np.empty((batch, kv_heads, segments, m), dtype=np.float64)
    u = bits.astype(np.float64) * 2.0**-32
    for s, (a, n) in enumerate(zip(starts.tolist(), spans.tolist())):
        base = prefix[:, :, a - 1] if a > 0 else np.zeros((batch, kv_heads))
        total = prefix[:, :, a + n - 1] - base  # [B, Hk]
        by_norm = total > PREFIX_FLOOR * prefix[:, :, a + n - 1]  # else uniform (all zero, or swamped)
        drawn = a + uniform[:, :, s]
        for b in range(batch):
            for h in range(kv_heads):
                if m_n and by_norm[b, h]:
                    targets = base[b, h] + (np.arange(m_n) + u[b, h, s, m_u:]) / m_n * total[b, h]
                    found = np.searchsorted(prefix[b, h, a:a + n], targets, side="right")
                    drawn[b, h, m_u:] = a + np.minimum(found, n - 1)
        keys[:, :, s] = drawn
        w = np.take_along_axis(weights, drawn, axis=-1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(by_norm[..., None], w / total[..., None], 1.0 / n)
        log_w[:, :, s] = -np.log(m_u / n + m_n * p)
    return keys.astype(np.int32 if n_k < 2**31 else np.int64), log_w.astype(np.float32)
