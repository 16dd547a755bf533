"""A call's arguments checked and resolved once: what every way of running it starts from."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .algorithm import CallSpec, GlobalHeads, is_exact_call
from .config import HyperAttentionConfig, check_band
from .dispatch import resolve_backend
from .protocol import Backend, Problem
from .validate import check_flag, check_projections, check_seed, resolve_scale, resolve_seed, validate_inputs


@dataclass(frozen=True)
class Request:
    """A validated call: its problem, the backend that runs it, and the plain values of its plan."""

    problem: Problem
    backend: Backend
    causal: bool
    scale: float
    config: HyperAttentionConfig | None  # None: exact attention
    seed: object  # an int, or a device seed (see validate.resolve_seed)
    return_lse: bool
    #: The plan is one exact piece (``config`` None, too short, or below the backend's crossover).
    exact: bool
    #: Some heads of a larger call, whose samples this one takes (``hyperattn.distributed``).
    global_heads: GlobalHeads | None = None

    @property
    def plan_config(self) -> HyperAttentionConfig | None:
        """The config its plan takes: None if exact, else without the crossover, which this request
        has applied already (the plan's pieces then do not depend on the options any more)."""
        if self.exact:
            return None
        return replace(self.config, exact_crossover=False) if self.config.exact_crossover else self.config

    def spec(self, projections=None) -> CallSpec:
        return CallSpec(self.causal, self.scale, self.plan_config, self.seed, projections, self.global_heads)


def prepare(q, k, v, *, causal, scale, backend, config: HyperAttentionConfig | None, seed, return_lse,
            head_dim: int | None = None, projections=None, global_heads: GlobalHeads | None = None) -> Request:
    """Check the arguments (raising with the argument, expected and actual value), choose the
    backend, and decide whether the call is exact.  ``seed`` None draws a fresh int; a device
    seed is read on the host by backends that draw samples there and needs ``projections`` for an
    approximate call."""
    problem = validate_inputs(q, k, v, causal=causal)
    if head_dim is not None and problem.head_dim != head_dim:
        raise ValueError(f"query's head dim D must equal the module's input_dim={head_dim}, got {problem.head_dim}")
    scale = resolve_scale(scale, problem.head_dim)
    return_lse = check_flag("return_lse", return_lse)
    seed = resolve_seed(seed, problem.device)
    if config is not None:
        check_projections(projections, problem.head_dim, config.lsh_num_projs)
        if config.sample_size and config.sampling != problem.sampling:  # backends say whether they draw this way
            problem = replace(problem, sampling=config.sampling)
    impl = resolve_backend(backend, problem)
    causal = bool(causal)
    if config is not None:
        check_band(config, causal)
    exact = config is None or is_exact_call(problem.n_q, problem.n_k, causal, config, impl, max(problem.head_dims),
                                            problem.requires_grad)
    if not isinstance(seed, int):
        if not impl.capabilities.device_seed:  # it draws on the host: read the value (it copies inputs there too)
            seed = int(seed)
            check_seed(seed)
        elif projections is None and not exact:
            raise ValueError("projections must be given with a device seed (the LSH hyperplanes are drawn on the "
                             "host from an int seed)")
    if global_heads is not None and len(global_heads.kv_index) != problem.kv_heads:
        raise ValueError(f"global_heads names {len(global_heads.kv_index)} KV heads, the call has {problem.kv_heads}")
    return Request(problem, impl, causal, scale, config, seed, return_lse, exact, global_heads)
