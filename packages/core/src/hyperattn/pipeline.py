"""The one path of every entry point (``attention``, ``exact_attention``, ``HyperAttention``):
validate, choose the backend, take the fused exact shortcut where it applies, plan, run.

Torch is imported only when gradients are recorded (the autograd bridge).
"""

from __future__ import annotations

import secrets

from .algorithm import CallSpec, forward_call, is_exact_call, lse_dtype
from .config import HyperAttentionConfig
from .dispatch import resolve_backend
from .validate import check_flag, check_seed, resolve_scale, validate_inputs


def run(q, k, v, *, causal, scale, backend, config: HyperAttentionConfig | None, seed, return_lse,
        projections=None, head_dim: int | None = None):
    """Attention of q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] -> out (, lse).

    ``config`` None: exact attention.  ``seed`` None draws a fresh one (the plan is then still
    decided by one int, shared by the forward and its backward).  ``projections``: the LSH
    hyperplanes [D, r] (a tensor or NumPy array), else drawn from the seed.  ``head_dim``: the
    head dim a caller requires (the module's ``input_dim``).
    """
    problem = validate_inputs(q, k, v, causal=causal)
    if head_dim is not None and problem.head_dim != head_dim:
        raise ValueError(f"query's head dim D must equal the module's input_dim={head_dim}, got {problem.head_dim}")
    scale = resolve_scale(scale, problem.head_dim)
    return_lse = check_flag("return_lse", return_lse)
    check_seed(seed)
    impl = resolve_backend(backend, problem)
    causal = bool(causal)
    exact = config is None or is_exact_call(problem.n_q, problem.n_k, causal, config, impl)
    if exact and not return_lse:  # one fused differentiable kernel, where the backend has one
        out = impl.fused_attention(q, k, v, causal=causal, scale=scale)
        if out is not None:
            return out
    seed = secrets.randbits(63) if seed is None else int(seed)
    if problem.requires_grad:
        from .torch.autograd import planned_attention

        out, lse = planned_attention(q, k, v, backend=impl.name, causal=causal, scale=scale, config=config,
                                     seed=seed, projections=projections)
    else:
        from_host = _host_projections(projections)
        result = forward_call(impl, q, k, v, CallSpec(causal, scale, config, seed, from_host))
        out = impl.from_native(result.out, q)
        lse = impl.from_native(result.lse, q, dtype=lse_dtype(problem.dtype)) if return_lse else None
    return (out, lse) if return_lse else out


def _host_projections(projections):
    if projections is None or not hasattr(projections, "detach"):
        return projections
    from .torch.autograd import host_projections

    return host_projections(projections)
