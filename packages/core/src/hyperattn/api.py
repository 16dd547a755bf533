"""The front door: ``attention``, ``exact_attention`` and ``configure``.  Thin: every call goes
through :func:`hyperattn.pipeline.run`."""

from __future__ import annotations

from . import pipeline, registry
from .config import HyperAttentionConfig, estimator_params, make_config
from .protocol import BackendOptions


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int = 256,
    sample_size: int = 256,
    lsh_num_projs: int = 7,
    min_seq_len: int = 4096,
    exact_crossover: bool = True,
    sink_keys: int = 0,
    band_keys: int = 0,
    sampling: str = "stratified",
    estimator: str | None = None,
    seed=None,
    return_lse: bool = False,
    projections=None,
):
    """HyperAttention of q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] -> out [B, Hq, Nq, Dv].

    With ``return_lse=True`` returns ``(out, lse)``, lse [B, Hq, Nq] float32 (float64 for float64
    inputs), natural log of the softmax normaliser of the scaled scores.  ``Hq % Hk == 0`` (GQA /
    MQA without copying K and V).  ``causal`` aligns the mask bottom-right and needs Nq <= Nk.
    ``seed`` (an int) makes the call deterministic and identical on every backend; None draws
    fresh.  A 0-d int64 tensor on the inputs' GPU is a *device seed*: only the kernels read it (no
    synchronisation; a CUDA graph replay reads its value then); it needs ``projections``, the LSH
    hyperplanes [D, lsh_num_projs] (a tensor or float64 NumPy array; drawn from an int seed when
    not given).

    When the result is exact: a non-causal call with fewer than ``min_seq_len`` query rows, or a
    causal one whose recursion would not split (fewer than ``2 * min_seq_len`` rows), is computed
    exactly.  With ``exact_crossover=True`` (the default, the fast choice) so is a call short enough
    that the backend's exact attention is faster: fewer keys (non-causal) or query rows (causal)
    than the backend's crossover (its options' ``exact_below_for(head_dim, backward)``, see
    :func:`configure`).  With ``exact_crossover=False``
    only ``min_seq_len`` decides: the approximation at any length above it (to measure it, or to
    compare backends with one seed).

    ``sink_keys``: the first keys every row attends to exactly, the approximation covering the
    others (see :class:`hyperattn.config.HyperAttentionConfig`); 0 is the paper's estimator.
    ``band_keys`` (causal only): every row also attends exactly to its previous ``band_keys``
    keys (the first ``band_keys`` rows of each sparse rectangle of the causal recursion attend
    exactly to all of it), the approximation covering the rest; 0 is the paper's estimator.  ``sampling``:
    ``"stratified"`` (the default: one draw per stratum of the key range) or ``"uniform"`` (the
    paper's independent draws).  ``estimator``: a named set of these (``hyperattn.config.ESTIMATORS``):
    ``"paper"`` (the authors' estimator: uniform draws), ``"stratified"`` (the default's), or
    ``"band"`` (causal calls: 64 previous keys exactly plus 64 samples, at about the default's cost);
    a parameter passed with another non-default value alongside it raises.
    """
    if pipeline.compiling(q):  # traced by torch.compile: the config is checked when the operator runs
        config = HyperAttentionConfig(**estimator_params(estimator, block_size, sample_size, lsh_num_projs, min_seq_len,
                                                         exact_crossover, sink_keys, band_keys, sampling))
    else:
        config = make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys, band_keys,
                             sampling, estimator)
    return pipeline.run(q, k, v, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                        return_lse=return_lse, projections=projections)


def exact_attention(q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto",
                    return_lse: bool = False):
    """Exact softmax attention (same shapes, GQA and causal convention as :func:`attention`)."""
    return pipeline.run(q, k, v, causal=causal, scale=scale, backend=backend, config=None, seed=0,
                        return_lse=return_lse)


def configure(backend: str, *, reset: bool = False, **options) -> BackendOptions:
    """Set options of a backend and return the options now in force, e.g.
    ``hyperattn.configure("triton", exact_below=(0, 0))`` (approximate above ``min_seq_len`` at
    every length) or ``hyperattn.configure("triton", reset=True)`` (the defaults again).

    Every backend has ``exact_below`` (keys, rows) and ``backward_chunk_bytes``; each adds its own
    (``hyperattn.configure(name)`` returns them all).  Takes effect on the next call, also after
    the backend has run; process-wide, like ``torch.backends`` flags.
    """
    return registry.configure(backend, reset=reset, **options)


__all__ = ["attention", "configure", "exact_attention"]
