"""One call's forward on a backend, from plain values: what the pipeline and the autograd bridge share."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._arrays import dtype_name
from ..config import HyperAttentionConfig
from ..protocol import Backend, Segments
from .forward import run_forward
from .plan import ExactPiece, Plan, draw_projections, plan_attention


@dataclass(frozen=True)
class CallSpec:
    """Everything besides q, k, v that decides a call's plan: plain values only.

    ``config`` None means exact attention.  ``seed`` seeds the call's one NumPy generator: the LSH
    projections are drawn from it first (unless ``projections`` [D, r] float64 is given, or a
    function returning it), then the samples in piece order; so one seed gives every backend the
    same plan.
    """

    causal: bool
    scale: float
    config: HyperAttentionConfig | None
    seed: int
    projections: object = None

    def plan(self, backend: Backend, q, k) -> Plan:
        """The plan for native q, k [B, H, N, D] (sparse pieces made lazily, see ``Pieces``)."""
        n_q, n_k = q.shape[2], k.shape[2]
        if self.config is None:
            return Plan((ExactPiece(Segments.from_ranges([(0, n_q, 0, n_k)]), self.causal),), self.scale)
        rng = functools.cache(lambda: np.random.default_rng(self.seed))  # made only for a sparse piece
        config = self.config
        projections = self.projections
        if projections is None:
            projections = lambda: draw_projections(rng(), q.shape[-1], config.lsh_num_projs)
        return plan_attention(backend, q, k, causal=self.causal, scale=self.scale, config=config,
                              projections=projections, rng=rng)


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


def forward_call(backend: Backend, q, k, v, spec: CallSpec) -> ForwardResult:
    """Run ``spec``'s plan on ``backend``: native out [B, Hq, Nq, Dv] and lse [B, Hq, Nq]."""
    qn, kn, vn = (backend.to_native(x) for x in (q, k, v))
    plan = spec.plan(backend, qn, kn)
    out, lse = run_forward(backend, plan, qn, kn, vn)
    return ForwardResult(plan, (qn, kn, vn), out, lse)


def lse_dtype(dtype: str) -> str:
    """The log-sum-exp is float32, float64 for float64 inputs."""
    return "float64" if dtype == "float64" else "float32"
