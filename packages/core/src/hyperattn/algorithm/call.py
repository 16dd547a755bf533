"""One call's forward on a backend, from plain values: what the pipeline and the autograd bridge share."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._arrays import dtype_name
from ..config import HyperAttentionConfig
from ..protocol import Backend, Segments
from .forward import run_forward
from .plan import ExactPiece, GlobalHeads, Plan, draw_projections, plan_attention


@dataclass(frozen=True)
class CallSpec:
    """Everything besides q, k, v that decides a call's plan: plain values only.

    ``config`` None means exact attention.  ``seed`` (an int, or a device seed: an int64 0-d array
    on the inputs' device, read only by the kernels) decides the samples
    (``hyperattn.sampling``); the LSH projections are drawn from an int seed's NumPy generator
    unless ``projections`` is given (host float64 [D, r], a native array on the inputs' device, or
    a function returning one).  So one seed gives every backend the same plan.  ``global_heads``:
    the call is some heads of a larger one, whose samples it takes (:class:`GlobalHeads`).
    """

    causal: bool
    scale: float
    config: HyperAttentionConfig | None
    seed: object
    projections: object = None
    global_heads: GlobalHeads | None = None

    def plan(self, backend: Backend, q, k) -> Plan:
        """The plan for native q, k [B, H, N, D] (sparse pieces made lazily, see ``Pieces``)."""
        n_q, n_k = q.shape[2], k.shape[2]
        if self.config is None:
            return Plan((ExactPiece(Segments.from_ranges([(0, n_q, 0, n_k)]), self.causal),), self.scale)
        config, projections, seed = self.config, self.projections, self.seed
        if projections is None:
            if not isinstance(seed, int):
                raise ValueError("projections must be given with a device seed (the LSH hyperplanes are drawn on the "
                                 "host from an int seed)")
            projections = functools.partial(seed_projections, seed, q.shape[-1], config.lsh_num_projs)
        return plan_attention(backend, q, k, causal=self.causal, scale=self.scale, config=config,
                              projections=projections, seed=seed, global_heads=self.global_heads)


@dataclass
class ForwardResult:
    """A forward's plan, native inputs and native (out, lse): what a backward needs again."""

    plan: Plan
    native: tuple
    out: object
    lse: object

    def outputs(self, backend: Backend, like, with_lse: bool = True):
        """(out, lse) as arrays of ``like``'s type and device: out in its dtype, lse in float32
        (float64 for float64 inputs); lse None unless ``with_lse``."""
        out = backend.from_native(self.out, like)
        lse = backend.from_native(self.lse, like, dtype=lse_dtype(dtype_name(like))) if with_lse else None
        return out, lse


@functools.lru_cache(maxsize=64)
def seed_projections(seed: int, head_dim: int, num_projs: int) -> np.ndarray:
    """The LSH projections of an int seed: float64 [D, r] from ``np.random.default_rng(seed)``,
    kept for the seeds used last (read-only: they are shared)."""
    projections = draw_projections(np.random.default_rng(seed), head_dim, num_projs)
    projections.flags.writeable = False
    return projections


def forward_call(backend: Backend, q, k, v, spec: CallSpec) -> ForwardResult:
    """Run ``spec``'s plan on ``backend``: native out [B, Hq, Nq, Dv] and lse [B, Hq, Nq]."""
    qn, kn, vn = (backend.to_native(x) for x in (q, k, v))
    plan = spec.plan(backend, qn, kn)
    out, lse = run_forward(backend, plan, qn, kn, vn)
    return ForwardResult(plan, (qn, kn, vn), out, lse)


def lse_dtype(dtype: str) -> str:
    """The log-sum-exp is float32, float64 for float64 inputs."""
    return "float64" if dtype == "float64" else "float32"
