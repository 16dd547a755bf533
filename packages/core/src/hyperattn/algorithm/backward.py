"""Running a plan backward: the gradient of the whole is the sum of the pieces' gradients, each
computed with the call's *final* ``out`` and ``lse`` (FlashAttention's formula on each piece)."""

from __future__ import annotations

from array_api_compat import array_namespace, device

from ..kernel_utils import zero_outside
from ..protocol import Backend
from .forward import accumulator_dtype
from .plan import ExactPiece, Plan, SparsePiece, check_draw_weights


def run_backward(backend: Backend, plan: Plan, q, k, v, out, lse, dout, dlse=None, grad_dtype=None):
    """Gradients (dq, dk, dv) of the output ``out`` with final ``lse``.

    ``out`` and ``dout`` may be in q's dtype or the accumulator's; kernels read them as they are.
    ``dlse`` [B, Hq, Nq] (optional) is the gradient with respect to the returned log-sum-exp:
    since d lse_i / d s_ij = p_ij it folds into ``delta_i = dout_i · out_i - dlse_i``.
    The gradients are in the accumulator dtype, or in ``grad_dtype`` when the call is run in
    chunks of KV heads (``backend.options.backward_chunk_bytes`` bounds the accumulators one chunk
    holds; each chunk is written into the final gradients before the next starts); the caller
    converts what is left.
    """
    with backend.call_scope(q):
        return _run_backward(backend, plan, q, k, v, out, lse, dout, dlse, grad_dtype)


def _run_backward(backend: Backend, plan: Plan, q, k, v, out, lse, dout, dlse, grad_dtype):
    xp = array_namespace(q)
    dtype = accumulator_dtype(xp, q)
    delta = backend.row_dot(dout, out)
    if dlse is not None:
        delta = delta - xp.astype(dlse, dtype)
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    per_kv_head = (group * q.shape[2] * q.shape[3] + k.shape[2] * (k.shape[3] + v.shape[3])) * q.shape[0] * 4
    step = backward_chunk_heads(kv_heads, per_kv_head, backend.options.backward_chunk_bytes)
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


def backward_chunk_heads(kv_heads: int, per_kv_head: int, chunk_bytes: int) -> int:
    """KV heads per backward chunk: as few chunks as ``chunk_bytes`` allows, of equal size
    (32 heads in 4 chunks of 8, not 10 + 10 + 10 + 2: a small last chunk leaves the GPU idle)."""
    most = max(1, chunk_bytes // max(per_kv_head, 1))
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
    # the first piece writes its rows and keys (``overwrite``) instead of adding to zeros: no fill, no
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
                                   out=out if give_out else None, overwrite=i == 0)
        else:
            check_draw_weights(backend, piece.structure)
            backend.sparse_backward(q, k, v, lse, dout, delta, piece.structure, plan.scale, dq, dk, dv, overwrite=i == 0)
    return dq, dk, dv
