"""The torch side: the autograd bridge and the ``HyperAttention`` module."""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import draw_projections, plan_attention, run_backward, run_forward
from .api import execute, fused_exact, lse_dtype, make_rng, resolve_backend, resolve_scale, validate_inputs
from .config import HyperAttentionConfig
from .protocol import Backend


class _PlannedAttention(torch.autograd.Function):
    """Forward runs a plan's pieces; backward runs each piece's backward with the final out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, backend: Backend, make_plan):
        qn, kn, vn = (backend.to_native(x) for x in (q, k, v))
        plan = make_plan(qn, kn)
        out_n, lse_n = run_forward(backend, plan, qn, kn, vn)
        out = backend.from_native(out_n, q)
        lse = backend.from_native(lse_n, q, dtype=lse_dtype(str(q.dtype).removeprefix("torch.")))
        del out_n  # the backward reads the returned out (q's dtype, as FlashAttention does): less memory
        ctx.backend, ctx.plan, ctx.native = backend, plan, (qn, kn, vn)
        ctx.like = (q, k, v)  # kept for dtype/device of the gradients only
        # outputs only through save_for_backward (which also catches in-place changes before the
        # backward): an output kept on ctx (lse_n is the returned lse) would hold its own graph
        # node in a reference cycle, and the call's plan (~0.35 GB at N=131072) until Python's gc
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
        return (*grads, None, None)


def planned_attention(backend: Backend, q, k, v, make_plan):
    """Differentiable (out, lse) of torch tensors through ``backend``'s kernels."""
    return _PlannedAttention.apply(q, k, v, backend, make_plan)


class HyperAttention(torch.nn.Module):
    """Drop-in for the authors' module: same constructor and forward signature.

    The LSH projections are drawn once (reproducibly with ``seed``) and kept as the buffer
    ``lsh_projections`` [input_dim, lsh_num_projs]; samples are drawn fresh on every call from the
    module's own generator, itself seeded by ``seed``.
    """

    def __init__(
        self,
        input_dim: int = 64,
        lsh_num_projs: int = 7,
        block_size: int = 256,
        sample_size: int = 256,
        min_seq_len: int = 4096,
        seed: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.config = HyperAttentionConfig(block_size, sample_size, lsh_num_projs, min_seq_len)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an int >= 1 (the head dim D), got {input_dim!r}")
        self.input_dim = input_dim
        self.backend = backend
        self._rng = make_rng(seed)
        projections = draw_projections(self._rng, input_dim, lsh_num_projs)
        self.register_buffer("lsh_projections", torch.from_numpy(projections))

    # the original module's attribute names
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def min_seq_len(self) -> int:
        return self.config.min_seq_len

    @property
    def lsh_num_projs(self) -> int:
        return self.config.lsh_num_projs

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"input_dim={self.input_dim}, lsh_num_projs={c.lsh_num_projs}, block_size={c.block_size}, "
            f"sample_size={c.sample_size}, min_seq_len={c.min_seq_len}, backend={self.backend!r}"
        )

    def forward(self, query, key, value, scale=None, causal=False, return_lse=False):
        """query [B, Hq, Nq, D], key [B, Hk, Nk, D], value [B, Hk, Nk, Dv] -> out (, lse)."""
        problem = validate_inputs(query, key, value, causal=causal)
        if problem.head_dim != self.input_dim:
            raise ValueError(
                f"query's head dim D must equal the module's input_dim={self.input_dim}, got {problem.head_dim}"
            )
        scale = resolve_scale(scale, problem.head_dim)
        impl = resolve_backend(self.backend, problem)
        out = fused_exact(impl, query, key, value, problem, causal=bool(causal), scale=scale,
                          return_lse=bool(return_lse), config=self.config)
        if out is not None:
            return out
        projections = self.lsh_projections.detach().cpu().numpy().astype(np.float64)
        config, rng = self.config, self._rng

        def make_plan(qn, kn):
            return plan_attention(
                impl, qn, kn, causal=bool(causal), scale=scale, config=config, projections=projections, rng=rng
            )

        return execute(impl, query, key, value, make_plan, return_lse=bool(return_lse), problem=problem)
