"""A call's arguments checked and resolved once: what every way of running it starts from."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from .algorithm import CallSpec, is_exact_call
from .config import HyperAttentionConfig
from .dispatch import resolve_backend
from .protocol import Backend, Problem
from .validate import check_flag, check_seed, resolve_scale, validate_inputs


@dataclass(frozen=True)
class Request:
    """A validated call: its problem, the backend that runs it, and the plain values of its plan."""

    problem: Problem
    backend: Backend
    causal: bool
    scale: float
    config: HyperAttentionConfig | None  # None: exact attention
    seed: int
    return_lse: bool
    #: The plan is one exact piece (``config`` None, too short, or below the backend's crossover).
    exact: bool

    def spec(self, projections=None) -> CallSpec:
        return CallSpec(self.causal, self.scale, self.config, self.seed, projections)


def prepare(q, k, v, *, causal, scale, backend, config: HyperAttentionConfig | None, seed, return_lse,
            head_dim: int | None = None) -> Request:
    """Check the arguments (raising with the argument, expected and actual value), choose the
    backend, and decide whether the call is exact.  ``seed`` None draws a fresh int."""
    problem = validate_inputs(q, k, v, causal=causal)
    if head_dim is not None and problem.head_dim != head_dim:
        raise ValueError(f"query's head dim D must equal the module's input_dim={head_dim}, got {problem.head_dim}")
    scale = resolve_scale(scale, problem.head_dim)
    return_lse = check_flag("return_lse", return_lse)
    check_seed(seed)
    impl = resolve_backend(backend, problem)
    causal = bool(causal)
    exact = config is None or is_exact_call(problem.n_q, problem.n_k, causal, config, impl)
    seed = secrets.randbits(63) if seed is None else int(seed)
    return Request(problem, impl, causal, scale, config, seed, return_lse, exact)
