"""The autograd bridge: a plan's forward, and the backward of the same plan.

``PlannedAttention.apply`` takes tensors and plain values only (the backend by name, the
parameters, an int seed), so that it can be wrapped in a ``torch.library`` operator: everything
random is decided by the seed, and the backward reuses the forward's plan (same samples), so the
gradients are exact gradients of the function that was computed.
"""

from __future__ import annotations

import torch

from ..algorithm import CallSpec, forward_call, run_backward
from ..config import make_config
from ..registry import backend_status
from .arguments import config_arguments, plan_projections


class PlannedAttention(torch.autograd.Function):
    """Forward runs a plan's pieces; backward runs each piece's backward with the final out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, projections, backend: str, causal: bool, scale: float, block_size: int,
                sample_size: int, lsh_num_projs: int, min_seq_len: int, exact_crossover: bool, sink_keys: int,
                band_keys: int, sampling: str, exact: bool, seed, global_heads):
        impl = backend_status(backend).backend
        config = None if exact else make_config(block_size, sample_size, lsh_num_projs, min_seq_len,
                                             exact_crossover, sink_keys, band_keys, sampling)
        spec = CallSpec(causal, scale, config, seed, plan_projections(projections, q), global_heads)
        result = forward_call(impl, q, k, v, spec)
        out, lse = result.outputs(impl, q)
        # the backward reads the returned out (q's dtype, as FlashAttention does): less memory
        ctx.backend, ctx.plan, ctx.native = impl, result.plan, result.native
        ctx.like = (q, k, v)  # kept for dtype/device of the gradients only
        # outputs only through save_for_backward (which also catches in-place changes before the
        # backward): an output kept on ctx (the native lse is the returned lse) would hold its own
        # graph node in a reference cycle, and the call's plan until Python's gc
        lse_n = result.lse
        del result
        if isinstance(lse_n, torch.Tensor):
            ctx.save_for_backward(out, lse_n)
            ctx.host_lse = None
        else:  # another array type (NumPy): part of no graph
            ctx.save_for_backward(out)
            ctx.host_lse = lse_n
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        backend, plan = ctx.backend, ctx.plan
        qn, kn, vn = ctx.native
        out, *saved_lse = ctx.saved_tensors
        lse_n = saved_lse[0] if saved_lse else ctx.host_lse
        q, k, v = ctx.like
        if dout is None:
            dout = torch.zeros_like(out)
        dout_n = backend.to_native(dout)
        dlse_n = None if dlse is None else backend.to_native(dlse)
        dq, dk, dv = run_backward(backend, plan, qn, kn, vn, backend.to_native(out), lse_n, dout_n, dlse_n,
                                  grad_dtype=qn.dtype)
        # one gradient at a time: each accumulator is freed as soon as it is converted
        grads = [dq, dk, dv]
        del dq, dk, dv
        for i, like in enumerate((q, k, v)):
            grads[i] = backend.from_native(grads[i], like)
        return (*grads, *([None] * 15))


def planned_attention(q, k, v, request, projections=None):
    """Differentiable (out, lse) of torch tensors for a prepared ``request`` (``projections``: None
    or a tensor [D, r])."""
    return PlannedAttention.apply(q, k, v, projections, request.backend.name, request.causal, request.scale,
                                  *config_arguments(request.plan_config), request.seed, request.global_heads)
