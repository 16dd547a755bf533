"""The one path of every entry point (``attention``, ``exact_attention``, ``HyperAttention``):
check and resolve the call (``request.prepare``), take the fused exact shortcut where it applies,
then plan and run it, through the autograd bridge when gradients are recorded, or as a
``torch.library`` operator under ``torch.compile``.

Torch is imported only when one of those needs it.
"""

from __future__ import annotations

from ._arrays import is_torch_type
from .algorithm import forward_call
from .config import HyperAttentionConfig
from .request import prepare
from .torch.arguments import plan_projections  # NumPy only: torch is not imported
from .torch.autocast import autocast_inputs  # torch is imported only for torch tensors


def run(q, k, v, *, causal, scale, backend, config: HyperAttentionConfig | None, seed, return_lse,
        projections=None, head_dim: int | None = None, global_heads=None):
    """Attention of q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] -> out (, lse).

    ``config`` None: exact attention.  ``seed`` None draws a fresh one (the plan is then still
    decided by one int, shared by the forward and its backward); under ``torch.compile`` it may be
    an int64 tensor.  ``projections``: the LSH hyperplanes [D, r] (a tensor or NumPy array), else
    drawn from the seed.  ``head_dim``: the head dim a caller requires (the module's ``input_dim``).
    ``global_heads``: the call is some heads of a larger one (``hyperattn.algorithm.GlobalHeads``).
    """
    if compiling(q):
        if global_heads is not None:
            raise NotImplementedError("a call of some heads of a larger one (hyperattn.distributed) does not run "
                                      "under torch.compile yet: call it outside the compiled region")
        from .torch.op import compiled_attention

        return compiled_attention(q, k, v, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                                  return_lse=return_lse, projections=projections, head_dim=head_dim)
    q, k, v = autocast_inputs(q, k, v)  # compiled_attention casts its own
    request = prepare(q, k, v, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                      return_lse=return_lse, head_dim=head_dim, projections=projections, global_heads=global_heads)
    impl = request.backend
    if request.exact and not request.return_lse:  # one fused differentiable kernel, where there is one
        out = impl.fused_attention(q, k, v, causal=request.causal, scale=request.scale)
        if out is not None:
            return out
    if request.problem.requires_grad:
        from .torch.autograd import planned_attention

        out, lse = planned_attention(q, k, v, request, projections)
    else:
        result = forward_call(impl, q, k, v, request.spec(plan_projections(projections, q)))
        out, lse = result.outputs(impl, q, with_lse=request.return_lse)
    return (out, lse) if request.return_lse else out


def compiling(q) -> bool:
    """True while torch.compile traces a call on ``q`` (then a torch tensor).  It looks at q's type,
    not at ``sys.modules``: dynamo would wrap that whole dictionary, and a module imported while it
    walks it breaks the trace."""
    if not is_torch_type(q):
        return False
    import torch

    return torch.compiler.is_compiling()

