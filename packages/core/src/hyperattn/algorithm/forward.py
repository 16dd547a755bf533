"""Running a plan forward: each piece's kernel merges its partial softmax into ``(out, lse)``."""

from __future__ import annotations

import math

from array_api_compat import array_namespace, device

from ..protocol import Backend
from .plan import ExactPiece, Plan, check_draw_weights


def accumulator_dtype(xp, x):
    """float64 for float64 arrays, else float32: the dtype of lse and of the gradients' sums."""
    return xp.float64 if x.dtype == xp.float64 else xp.float32


def run_forward(backend: Backend, plan: Plan, q, k, v):
    """Run every piece: (out [B, Hq, Nq, Dv], lse [B, Hq, Nq]); lse in the accumulator dtype, out
    in it too unless the plan has one piece or the backend merges in q's dtype
    (``Capabilities.running_out_dtype``): then out is q's dtype, with no buffer to convert.
    """
    with backend.call_scope(q):
        return _run_forward(backend, plan, q, k, v)


def _run_forward(backend: Backend, plan: Plan, q, k, v):
    xp = array_namespace(q)
    dtype = accumulator_dtype(xp, q)
    batch, heads, n_q = q.shape[:3]
    out_shape = (batch, heads, n_q, v.shape[3])
    in_input_dtype = len(plan.pieces) == 1 or backend.capabilities.running_out_dtype == "input"
    # the first piece of every plan covers every row (the whole rectangle, or the causal leaves)
    # and writes it without reading, so out needs no fill
    out = xp.empty(out_shape, dtype=q.dtype if in_input_dtype else dtype, device=device(q))
    lse = xp.full((batch, heads, n_q), -math.inf, dtype=dtype, device=device(q))
    for i, piece in enumerate(plan.pieces):
        if isinstance(piece, ExactPiece):
            backend.exact_forward(q, k, v, piece.segments, piece.causal, plan.scale, out, lse, overwrite=i == 0)
        else:
            check_draw_weights(backend, piece.structure)
            backend.sparse_forward(q, k, v, piece.structure, plan.scale, out, lse, overwrite=i == 0)
    return out, lse
