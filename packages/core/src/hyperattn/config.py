"""The parameters of HyperAttention, validated once."""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np

#: Codes are sorted together with a 31-bit row label in one int64 key, so at most 32 bits.
MAX_LSH_NUM_PROJS = 32
#: The ways of drawing the residual's samples (``HyperAttentionConfig.sampling``).
SAMPLINGS = ("uniform", "stratified")


def check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name``, the expected and the actual value."""
    if type(value) is not int:  # plain ints skip the slower abstract-class check
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {expected}, got {value}")
    return value


@dataclass(frozen=True)
class HyperAttentionConfig:
    """Parameters of the approximation (defaults of arXiv 2310.05869).

    block_size:     rows per block of the sorted block diagonal (>= 1).
    sample_size:    uniformly sampled keys per batch, KV head and rectangle (>= 0; 0 = none).
    lsh_num_projs:  random hyperplanes of the sortLSH, i.e. bits of the bucket code (1..32).
    min_seq_len:    pieces with fewer query rows than this are computed exactly (>= 1).
    exact_crossover: also compute exactly the calls that the backend's exact attention runs
                    faster (its options' ``exact_below``); False: only ``min_seq_len`` decides,
                    so the approximation runs at any length above it.
    sink_keys:      the first keys every row attends to exactly (attention sinks: where trained
                    models' heads put much of their mass); the block diagonal and the samples
                    then cover the other keys.  0 (the default): the paper's estimator.  At most
                    ``min_seq_len`` (a causal call's first leaf computes them exactly for its rows).
    band_keys:      causal calls only: every row also attends exactly to (at least) its previous
                    ``band_keys`` keys, which the causal recursion's exact leaves miss for the rows
                    just past a leaf's start; the approximation covers the keys before the band.
                    0 (the default): the paper's estimator.  A non-causal call with a band is
                    refused (there is no "previous" there).
    sampling:       how the residual's keys are drawn: ``"uniform"`` (the paper's: independent,
                    with replacement) or ``"stratified"`` (sample j uniform in the j-th of
                    ``sample_size`` equal strata of the key range: the same expected count of
                    every key, so the same unbiased weights, with the draws spread evenly).
    """

    block_size: int = 256
    sample_size: int = 256
    lsh_num_projs: int = 7
    min_seq_len: int = 4096
    exact_crossover: bool = True
    sink_keys: int = 0
    band_keys: int = 0
    sampling: str = "uniform"

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", check_int("block_size", self.block_size, minimum=1))
        object.__setattr__(self, "sample_size", check_int("sample_size", self.sample_size, minimum=0))
        object.__setattr__(
            self,
            "lsh_num_projs",
            check_int("lsh_num_projs", self.lsh_num_projs, minimum=1, maximum=MAX_LSH_NUM_PROJS),
        )
        object.__setattr__(self, "min_seq_len", check_int("min_seq_len", self.min_seq_len, minimum=1))
        object.__setattr__(self, "exact_crossover", check_bool("exact_crossover", self.exact_crossover))
        object.__setattr__(self, "sink_keys",
                           check_int("sink_keys", self.sink_keys, minimum=0, maximum=self.min_seq_len))
        object.__setattr__(self, "band_keys", check_int("band_keys", self.band_keys, minimum=0))
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")


def check_band(config: HyperAttentionConfig, causal: bool) -> None:
    """Refuse a band of previous keys (``config.band_keys``) on a non-causal call."""
    if config.band_keys and not causal:
        raise ValueError(f"band_keys={config.band_keys} needs causal=True (a band of each row's previous keys); "
                         "got causal=False: use band_keys=0 for non-causal calls")


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool (a NumPy bool too), or raise naming ``name`` and the value."""
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover=True,
                sink_keys=0, band_keys=0, sampling="uniform") -> HyperAttentionConfig:
    """The validated config, made once per distinct plain parameters (short calls are host-bound)."""
    params = (block_size, sample_size, lsh_num_projs, min_seq_len)
    if all(type(x) is int for x in (*params, sink_keys, band_keys)) and type(exact_crossover) is bool \
            and type(sampling) is str:
        return _cached_config(*params, exact_crossover, sink_keys, band_keys, sampling)
    return HyperAttentionConfig(*params, exact_crossover, sink_keys, band_keys, sampling)


@functools.lru_cache(maxsize=64)
def _cached_config(block_size: int, sample_size: int, lsh_num_projs: int, min_seq_len: int,
                   exact_crossover: bool, sink_keys: int, band_keys: int, sampling: str) -> HyperAttentionConfig:
    return HyperAttentionConfig(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys,
                                band_keys, sampling)
