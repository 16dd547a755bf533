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
