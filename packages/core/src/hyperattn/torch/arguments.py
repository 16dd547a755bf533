"""A call's plan inputs as the plain values the autograd bridge and the operators take."""

from __future__ import annotations

import numpy as np

from ..config import HyperAttentionConfig

#: Stand-ins for the parameters of an exact call (no config): never read.
_EXACT_PARAMS = (1, 0, 1, 1, True, 0, 0, "uniform")


def config_arguments(config: HyperAttentionConfig | None) -> tuple:
    """(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys, band_keys,
    sampling, exact): a
    config as the plain values the operators take."""
    if config is None:
        return (*_EXACT_PARAMS, True)
    return (config.block_size, config.sample_size, config.lsh_num_projs, config.min_seq_len, config.exact_crossover,
            config.sink_keys, config.band_keys, config.sampling, False)


def plan_projections(projections, like):
    """The projections as a plan takes them: None (drawn from the seed), float64 NumPy [D, r], a
    tensor on ``like``'s device as it is (the kernels read it there: no copy, no synchronisation),
    or for a tensor elsewhere a function copying it to the host (called only when the plan has a
    sparse piece)."""
    if projections is None or isinstance(projections, np.ndarray):
        return projections
    if getattr(like, "device", None) == projections.device:
        return projections.detach()
    return lambda: projections.detach().cpu().numpy().astype(np.float64)
