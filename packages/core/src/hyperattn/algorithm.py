"""HyperAttention as a plan of pieces, run forward and backward on any backend.

A *plan* splits one attention call into pieces whose (query, key) supports are disjoint:

* non-causal: one rectangle, exact if it has fewer than ``min_seq_len`` query rows, else
  sortLSH block diagonal plus sampled residual (a :class:`SparseStructure`);
* causal (square part aligned bottom-right, so ``Nq <= Nk``): the prefix keys every query sees
  form one rectangle; the square is split at its middle recursively, each level's lower-left
  rectangles forming one sparse call (batched over the level), while a diagonal block whose
  lower half would have fewer than ``min_seq_len`` rows is a leaf computed exactly (all leaves in
  one call).

Each piece's kernel merges its partial softmax into a running ``(out, lse)``; the gradient of
the whole is the sum of the pieces' gradients computed with the final ``out`` and ``lse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace, device

from ._arrays import host_to_device
from .config import HyperAttentionConfig
from .protocol import Backend, Segments, SparseStructure


@dataclass(frozen=True)
class ExactPiece:
    segments: Segments
    causal: bool


@dataclass(frozen=True)
class SparsePiece:
    structure: SparseStructure


class Pieces:
    """A plan's pieces, made on first use and kept: a forward runs each piece as soon as it is
    made, so the GPU computes the exact leaves while the host plans the sparse levels."""

    def __init__(self, count: int, source):
        self.count, self._source, self._made = count, iter(source), []

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        i = 0
        while True:
            if i == len(self._made):
                piece = next(self._source, None)
                if piece is None:
                    return
                self._made.append(piece)
            yield self._made[i]
            i += 1


@dataclass(frozen=True)
class Plan:
    """Everything random or data-dependent about one call; reused by its backward.

    ``pieces``: a sequence (a tuple, or :class:`Pieces` made lazily, in order)."""

    pieces: tuple | Pieces
    scale: float


def draw_projections(rng: np.random.Generator, head_dim: int, num_projs: int) -> np.ndarray:
    """Gaussian hyperplanes of the sortLSH, float64 [D, r]."""
    return rng.standard_normal((head_dim, num_projs))


def causal_split(n_q: int, min_seq_len: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int, int]]]]:
    """Split the causal square ``[0, n_q)`` into exact leaves and levels of rectangles.

    Returns ``(leaves, levels)``: leaves are ``(start, end)`` diagonal blocks; each level is a list
    of ``(start, mid, end)``: rows ``[mid, end)`` attend to keys ``[start, mid)``.  A block of at
    least two rows is split while its lower half ``end - mid`` has at least ``min_seq_len`` rows.
    """
    leaves, levels = [], []
    frontier = [(0, n_q)]
    while frontier:
        level, next_frontier = [], []
        for start, end in frontier:
            mid = start + (end - start) // 2
            if end - start < 2 or end - mid < min_seq_len:
                leaves.append((start, end))
            else:
                level.append((start, mid, end))
                next_frontier += [(start, mid), (mid, end)]
        if level:
            levels.append(level)
        frontier = next_frontier
    return leaves, levels


def is_exact_call(n_q: int, n_k: int, causal: bool, config: HyperAttentionConfig, backend: Backend) -> bool:
    """True when the plan of such a call is one exact piece: too short for the approximation, or
    short enough that the backend's exact attention is faster (``Capabilities.exact_below``)."""
    exact_keys, exact_rows = backend.capabilities.exact_below
    if not causal:
        return n_q < config.min_seq_len or n_k < exact_keys
    return n_q < 2 or n_q - n_q // 2 < config.min_seq_len or n_q < exact_rows  # no split (see causal_split)


def plan_attention(
    backend: Backend,
    q,
    k,
    *,
    causal: bool,
    scale: float,
    config: HyperAttentionConfig,
    projections,
    rng,
) -> Plan:
    """Decide the pieces of one call.  q, k native [B, H, N, D].

    ``projections`` (float64 [D, r]) and ``rng`` may be given as functions returning them: they
    are then called (projections first) only when the plan has a sparse piece.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    exact, sparse_calls = None, []
    if is_exact_call(n_q, n_k, causal, config, backend):  # one exact rectangle, the causal prefix included
        exact = ExactPiece(Segments.from_ranges([(0, n_q, 0, n_k)]), causal=causal)
    elif not causal:
        sparse_calls.append([(0, n_q, 0, n_k)])
    else:
        leaves, levels = causal_split(n_q, config.min_seq_len)
        offset = n_k - n_q  # keys [0, offset) are seen by every query: one non-causal rectangle
        if offset > 0:  # it has n_q >= min_seq_len rows (there are levels), so it is sparse
            sparse_calls.append([(0, n_q, 0, offset)])
        leaf_ranges = [(start, end, start + offset, end + offset) for start, end in leaves]
        exact = ExactPiece(Segments.from_ranges(leaf_ranges), causal=True)
        sparse_calls += [[(mid, end, start + offset, mid + offset) for start, mid, end in level] for level in levels]

    def make_pieces():
        if exact is not None:  # first: it needs no hashing, so it runs while the rest is planned
            yield exact
        if not sparse_calls:
            return
        projs = projections() if callable(projections) else projections
        generator = rng() if callable(rng) else rng
        xp = array_namespace(q)
        # cast on the host: one copy to the device, no conversion kernel there
        proj = host_to_device(np.asarray(projs, dtype=np.float64 if q.dtype == xp.float64 else np.float32), q)
        q_codes = backend.lsh_codes(q, proj)
        k_codes = backend.lsh_codes(k, proj)
        for ranges in sparse_calls:
            segments = Segments.from_ranges(ranges)
            yield SparsePiece(sparse_structure(backend, q, k, q_codes, k_codes, segments, config, generator))

    return Plan(Pieces((exact is not None) + len(sparse_calls), make_pieces()), float(scale))


def sparse_structure(backend, q, k, q_codes, k_codes, segments, config, rng) -> SparseStructure:
    """Sort each segment by LSH code and draw its samples (from ``rng``, after the projections)."""
    bits = config.lsh_num_projs
    q_order, _ = backend.segment_sort(q_codes, segments.q_start, segments.q_end, code_bits=bits)
    k_order, k_rank = backend.segment_sort(k_codes, segments.k_start, segments.k_end, code_bits=bits)
    m = config.sample_size
    n_k = segments.k_len
    samples = None
    if m > 0:
        batch, kv_heads = k.shape[0], k.shape[1]
        samples = host_to_device(draw_samples(rng, (batch, kv_heads), segments, m, k.shape[2]), k)
    log_weight = np.log(n_k / m) if m > 0 else np.zeros(len(segments))
    return SparseStructure(segments, config.block_size, q_order, k_order, k_rank, samples, log_weight)


def draw_samples(rng, heads: tuple[int, int], segments: Segments, m: int, n_k: int) -> np.ndarray:
    """[B, Hk, S, m] key indices drawn uniformly with replacement from each segment's key range:
    int32 (int64 from ``n_k`` = 2**31), host NumPy.

    Uniform floats scaled to each segment (about twice as fast as integers with per-segment
    bounds), float32 ones while every segment has at most 2**24 keys: a float32 has 24 random
    bits, so each key is hit by ``2**24 / span`` of them (exactly uniform for a power-of-two
    span), at half the cost of float64 (host time, at every causal level)."""
    spans = segments.k_len[None, None, :, None]
    narrow = n_k < 2**31
    small = int(segments.k_len.max(initial=0)) <= 2**24
    dtype = np.float32 if small else np.float64
    uniform = rng.random((*heads, len(segments), m), dtype=dtype)
    drawn = (uniform * spans.astype(dtype)).astype(np.int32 if narrow else np.int64)
    np.minimum(drawn, spans - 1, out=drawn, casting="unsafe")  # a float product may round up to span
    drawn += segments.k_start[None, None, :, None].astype(drawn.dtype)
    return drawn


def merge_partial(out, lse, o, row_lse) -> None:
    """Merge a partial softmax ``(o [..., n, Dv], row_lse [..., n])`` into the running ``(out, lse)``
    in place, by log-sum-exp, for any array type.  Rows with ``lse = -inf`` take the partial as it
    is: their out is never read (it may be uninitialised)."""
    xp = array_namespace(out)
    untouched = lse == -math.inf
    with np.errstate(invalid="ignore", over="ignore"):  # -inf - -inf in untouched rows (NumPy)
        total = xp.logaddexp(lse, row_lse)
        keep = xp.where(untouched, 0.0, xp.exp(lse - total))
        add = xp.exp(row_lse - total)
    out[...] = xp.where(untouched[..., None], 0.0, out) * keep[..., None] + xp.astype(o, out.dtype) * add[..., None]
    lse[...] = total


def _accumulator_dtype(xp, x):
    return xp.float64 if x.dtype == xp.float64 else xp.float32


def run_forward(backend: Backend, plan: Plan, q, k, v):
    """Run every piece: (out [B, Hq, Nq, Dv], lse [B, Hq, Nq]); lse in the accumulator dtype, out
    in it too unless the plan has one piece or the backend merges in q's dtype
    (``Capabilities.running_out_dtype``): then out is q's dtype, with no buffer to convert.
    """
    xp = array_namespace(q)
    dtype = _accumulator_dtype(xp, q)
    batch, heads, n_q = q.shape[:3]
    out_shape = (batch, heads, n_q, v.shape[3])
    in_input_dtype = len(plan.pieces) == 1 or backend.capabilities.running_out_dtype == "input"
    # the first piece of every plan covers every row (the whole rectangle, or the causal leaves)
    # and writes it without reading, so out needs no fill
    out = xp.empty(out_shape, dtype=q.dtype if in_input_dtype else dtype, device=device(q))
    lse = xp.full((batch, heads, n_q), -math.inf, dtype=dtype, device=device(q))
    for i, piece in enumerate(plan.pieces):
        if isinstance(piece, ExactPiece):
            backend.exact_forward(q, k, v, piece.segments, piece.causal, plan.scale, out, lse, fresh=i == 0)
        else:
            backend.sparse_forward(q, k, v, piece.structure, plan.scale, out, lse, fresh=i == 0)
    return out, lse


#: Bytes of accumulator-dtype gradients (dq, dk, dv) one backward pass holds at most: a larger
#: call runs its backward in chunks of KV heads (with their query heads), each written into the
#: final gradients before the next starts (fp32 accumulators of a whole 131072-token call are
#: 3 GiB next to 1.5 GiB of bf16 gradients, the backward's memory peak).
BACKWARD_CHUNK_BYTES = 1 << 30


def run_backward(backend: Backend, plan: Plan, q, k, v, out, lse, dout, dlse=None, grad_dtype=None):
    """Gradients (dq, dk, dv) of the output ``out`` with final ``lse``.

    ``out`` and ``dout`` may be in q's dtype or the accumulator's; kernels read them as they are.
    ``dlse`` [B, Hq, Nq] (optional) is the gradient with respect to the returned log-sum-exp:
    since d lse_i / d s_ij = p_ij it folds into ``delta_i = dout_i · out_i - dlse_i``.
    The gradients are in the accumulator dtype, or in ``grad_dtype`` when the call is run in
    chunks of heads (see BACKWARD_CHUNK_BYTES); the caller converts what is left.
    """
    xp = array_namespace(q)
    dtype = _accumulator_dtype(xp, q)
    row_dot = getattr(backend, "row_dot", None)  # optional: one fused kernel
    if row_dot is not None:
        delta = row_dot(dout, out)
    else:  # one head at a time: no accumulator-dtype copy of dout or out in memory
        delta = xp.stack([xp.sum(xp.astype(dout[:, h], dtype) * xp.astype(out[:, h], dtype), axis=-1)
                          for h in range(q.shape[1])], axis=1)
    if dlse is not None:
        delta = delta - xp.astype(dlse, dtype)
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    per_kv_head = (group * q.shape[2] * q.shape[3] + k.shape[2] * (k.shape[3] + v.shape[3])) * q.shape[0] * 4
    step = backward_chunk_heads(kv_heads, per_kv_head)
    if step >= kv_heads:
        return _backward_heads(backend, plan, q, k, v, out, lse, dout, delta, dlse is None, dtype)
    final = [xp.empty(x.shape, dtype=grad_dtype or dtype, device=device(q)) for x in (q, k, v)]
    for start in range(0, kv_heads, step):
        stop = min(start + step, kv_heads)
        rows, keys = slice(start * group, stop * group), slice(start, stop)
        chunk = Plan(tuple(_piece_heads(piece, start, stop, group) for piece in plan.pieces), plan.scale)
        grads = _backward_heads(backend, chunk, q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, rows],
                                dout[:, rows], delta[:, rows], dlse is None, dtype)
        for target, heads, grad in zip(final, (rows, keys, keys), grads):
            target[:, heads] = grad
        del grads, grad  # the loop variable too: else one accumulator lives on into the next chunk
    return tuple(final)


def backward_chunk_heads(kv_heads: int, per_kv_head: int) -> int:
    """KV heads per backward chunk: as few chunks as BACKWARD_CHUNK_BYTES allows, of equal size
    (32 heads in 4 chunks of 8, not 10 + 10 + 10 + 2: a small last chunk leaves the GPU idle)."""
    most = max(1, BACKWARD_CHUNK_BYTES // max(per_kv_head, 1))
    chunks = -(-kv_heads // most)
    return -(-kv_heads // chunks)


def _piece_heads(piece, start: int, stop: int, group: int):
    """``piece`` restricted to KV heads [start, stop) (exact pieces do not depend on heads)."""
    if isinstance(piece, ExactPiece):
        return piece
    return SparsePiece(piece.structure.kv_heads(start, stop, group))


def _backward_heads(backend, plan, q, k, v, out, lse, dout, delta, give_out: bool, dtype):
    """(dq, dk, dv) in ``dtype`` of every piece of ``plan`` on these heads."""
    xp = array_namespace(q)
    # the first piece writes its rows and keys (``fresh``) instead of adding to zeros: no fill, no
    # read-modify-write of three fp32 arrays the size of q, k and v; the rest is zeroed here
    dq = xp.empty(q.shape, dtype=dtype, device=device(q))
    dk = xp.empty(k.shape, dtype=dtype, device=device(q))
    dv = xp.empty(v.shape, dtype=dtype, device=device(q))
    for i, piece in enumerate(plan.pieces):
        if i == 0:
            segments = piece.segments if isinstance(piece, ExactPiece) else piece.structure.segments
            zero_outside(dq, segments.q_start, segments.q_end)
            zero_outside(dk, segments.k_start, segments.k_end)
            zero_outside(dv, segments.k_start, segments.k_end)
        if isinstance(piece, ExactPiece):
            backend.exact_backward(q, k, v, lse, dout, delta, piece.segments, piece.causal, plan.scale, dq, dk, dv,
                                   out=out if give_out else None, fresh=i == 0)
        else:
            backend.sparse_backward(q, k, v, lse, dout, delta, piece.structure, plan.scale, dq, dk, dv, fresh=i == 0)
    return dq, dk, dv


def zero_outside(x, starts: np.ndarray, ends: np.ndarray) -> None:
    """Zero x[:, :, i] (x [B, H, N, ...]) for every position i outside the ranges [starts, ends)."""
    n = x.shape[2]
    bounds = sorted(zip(np.asarray(starts).tolist(), np.asarray(ends).tolist()))
    position = 0
    for start, end in [*bounds, (n, n)]:
        if start > position:
            x[:, :, position:start] = 0
        position = max(position, end)


def zero_inside(x, starts: np.ndarray, ends: np.ndarray) -> None:
    """Zero x[:, :, start:end] for every range (for backends that add even into a fresh piece)."""
    for start, end in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist()):
        x[:, :, start:end] = 0
