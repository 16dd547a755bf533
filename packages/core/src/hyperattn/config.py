"""The parameters of HyperAttention, validated once."""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, fields
from types import MappingProxyType

import numpy as np

#: Codes are sorted together with a 31-bit row label in one int64 key, so at most 32 bits.
MAX_LSH_NUM_PROJS = 32
#: The ways of drawing the residual's samples (``HyperAttentionConfig.sampling``).
SAMPLINGS = ("uniform", "stratified", "key_norm")


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
                    just past a leaf's start: the first ``band_keys`` rows of each of its sparse
                    rectangles attend exactly to all of that rectangle
                    (``hyperattn.algorithm.plan.piece_ranges``).  0 (the default): the paper's
                    estimator.  A non-causal call with a band is refused (there is no "previous"
                    there).
    sampling:       how the residual's keys are drawn: ``"stratified"`` (the default: sample j
                    uniform in the j-th of ``sample_size`` equal strata of the key range: the same
                    expected count of every key, so the same unbiased weights, with the draws
                    spread evenly), ``"uniform"`` (the paper's: independent, with replacement) or
                    ``"key_norm"`` (importance sampling: half the draws stratified uniform, half
                    stratified on the CDF of ``||k||**4``, each draw weighted by the inverse of
                    its expected count, so the estimator stays unbiased; heavy keys such as
                    attention sinks are drawn more often.  The weights are constants of the
                    plan: the backward does not differentiate them, see ``hyperattn.sampling``).

    :data:`ESTIMATORS` names sets of these (``estimator="paper"`` for the authors' algorithm).
    """

    block_size: int = 256
    sample_size: int = 256
    lsh_num_projs: int = 7
    min_seq_len: int = 4096
    exact_crossover: bool = True
    sink_keys: int = 0
    band_keys: int = 0
    sampling: str = "stratified"

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
                         "got causal=False: use band_keys=0 (an estimator without a band, e.g. the default) for non-causal calls")


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool (a NumPy bool too), or raise naming ``name`` and the value."""
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


#: Named estimators (``estimator=`` of ``hyperattn.attention``, the module, the transformers and
#: distributed front doors): the parameters each sets.  Their quality and cost are measured in
#: ``benchmarks/results`` (the README's estimator table).
ESTIMATORS = MappingProxyType({
    # the authors' estimator (with this library's fixes): uniform draws with replacement
    "paper": MappingProxyType({"sampling": "uniform", "sink_keys": 0, "band_keys": 0}),
    # the default: one draw per stratum of the key range (lower variance, the same cost and weights)
    "stratified": MappingProxyType({"sampling": "stratified", "sink_keys": 0, "band_keys": 0}),
    # causal calls only: each row's previous 64 keys exactly, and 64 stratified samples instead of
    # 256 (about the default's GPU time; in a language model a fraction of its perplexity gap)
    "band": MappingProxyType({"sampling": "stratified", "sink_keys": 0, "band_keys": 64, "sample_size": 64}),
})


def estimator_params(estimator: str | None, block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover=True,
                     sink_keys=0, band_keys=0, sampling="stratified") -> dict:
    """The config's fields by name, as a front door received them (``make_config``'s order), with
    the fields of ``estimator`` (a name in :data:`ESTIMATORS`; None: as received) set.  A field
    given a value other than its default and other than the estimator's raises: the two ask for
    different estimators."""
    params = dict(block_size=block_size, sample_size=sample_size, lsh_num_projs=lsh_num_projs,
                  min_seq_len=min_seq_len, exact_crossover=exact_crossover, sink_keys=sink_keys,
                  band_keys=band_keys, sampling=sampling)
    if estimator is None:
        return params
    preset = ESTIMATORS.get(estimator) if isinstance(estimator, str) else None
    if preset is None:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)} or None, got {estimator!r}")
    for name, value in preset.items():
        given = params[name]
        if given != _FIELD_DEFAULTS[name] and given != value:
            raise ValueError(f"estimator={estimator!r} sets {name}={value!r}, got {name}={given!r} too: "
                             f"pass either the estimator or {name}")
        params[name] = value
    return params


_FIELD_DEFAULTS = MappingProxyType({f.name: f.default for f in fields(HyperAttentionConfig)})


def make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover=True,
                sink_keys=0, band_keys=0, sampling="stratified", estimator=None) -> HyperAttentionConfig:
    """The validated config, made once per distinct plain parameters (short calls are host-bound);
    ``estimator`` sets the fields of a named one (see :func:`estimator_params`)."""
    if estimator is not None:
        return make_config(**estimator_params(estimator, block_size, sample_size, lsh_num_projs, min_seq_len,
                                              exact_crossover, sink_keys, band_keys, sampling))
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
