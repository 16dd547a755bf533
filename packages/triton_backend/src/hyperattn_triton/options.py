"""The Triton backend's options: what its launches, crossovers and chunk sizes are.

A :class:`TritonOptions` is immutable; ``hyperattn.configure("triton", **changes)`` replaces the
backend's with ``dataclasses.replace(options, **changes)`` (validated here), and the backend reads
its options on every call.  ``TritonBackend(options)`` makes a backend with its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hyperattn.protocol import BackendOptions, check_exact_below
from hyperattn.torch.kernel_names import FUSED_KERNELS, SDPA_KERNELS, check_kernel_names

from .launches import DEFAULT_LAUNCHES, LaunchTable, tier_name

#: (keys, rows) below which exact attention (cuDNN) beats this backend's HyperAttention on a GPU,
#: by head-dim tier and mode ("fwd": no gradients recorded, "fwd+bwd": they are): measured by
#: ``scripts/gpu_crossover.py`` (its output, with the card, in benchmarks/results/crossover_h200.txt).
GPU_CROSSOVER = MappingProxyType({
    ("d64", "fwd"): (8192, 16384), ("d64", "fwd+bwd"): (6144, 12288),
    ("d128", "fwd"): (6144, 12288), ("d128", "fwd+bwd"): (4096, 8192),
    # not measured: the D = 128 tier's
    ("d256", "fwd"): (6144, 12288), ("d256", "fwd+bwd"): (4096, 8192),
})
#: The interpreter has no fast exact attention to prefer: it approximates above min_seq_len.
NO_CROSSOVER = MappingProxyType({key: (0, 0) for key in GPU_CROSSOVER})


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``: on CPU tensors too)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _default_crossover():
    return NO_CROSSOVER if interpreting() else GPU_CROSSOVER


def _power_of_two(value) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    """Options of :class:`hyperattn_triton.backend.TritonBackend` (see ``BackendOptions`` for
    ``exact_below`` and ``backward_chunk_bytes``)."""

    #: (keys, rows) for every call, overriding ``crossover`` (``(0, 0)`` switches it off); None:
    #: ``crossover`` decides
    exact_below: tuple[int, int] | None = None
    #: (head-dim tier, "fwd" | "fwd+bwd") -> (keys, rows): non-causal calls with fewer keys and causal
    #: calls with fewer rows run exactly (GPU_CROSSOVER on a GPU, NO_CROSSOVER under the interpreter)
    crossover: Mapping = field(default_factory=_default_crossover)
    #: SDPA kernels for whole exact calls (``fused_attention``), tried in this order first, then the
    #: others in PyTorch's order; names from SDPA_KERNELS
    sdpa_order: tuple[str, ...] = SDPA_KERNELS
    #: fused kernels for exact pieces, tried in this order (one that rejects the inputs passes to the
    #: next); names from FUSED_KERNELS
    fused_kernels: tuple[str, ...] = FUSED_KERNELS
    #: bytes of gradients one fused backward call of exact pieces produces at most (it is chunked
    #: over heads and segments beyond that): they sit next to the fp32 accumulators at the memory peak
    fused_backward_chunk_bytes: int = 256 << 20
    #: rows of one partial sum of the sample keys' dK/dV (one atomic add per chunk and sample slot)
    sample_row_chunk: int = 4096
    #: rows of one partial sum of an exact piece's dK/dV where its segments have more rows than this
    #: (a sink rectangle: few keys, many rows), added atomically; not in deterministic mode
    exact_key_row_chunk: int = 2048
    #: positions per chunk of the counting sort (one program of each launch), on a GPU and under the
    #: interpreter (which sorts long chunks very slowly)
    sort_chunk: int = 256
    sort_interpreter_chunk: int = 32
    #: warps of the sort's in-register scatter and presort
    sort_scatter_warps: int = 2
    #: chunks per step of the sort's prefix sums (at most), and per part of a segment (one program
    #: per part and row)
    sort_starts_chunks: int = 64
    sort_starts_part: int = 128
    #: device copies of host tables kept (least recently used first out): the same shapes come back
    #: on every call of a layer, so each table is built and copied once
    device_tables_capacity: int = 512
    #: every kernel's launch configurations (see launches.py)
    launches: LaunchTable = DEFAULT_LAUNCHES

    def __post_init__(self):
        if self.exact_below is not None:
            check_exact_below("TritonOptions.exact_below", self.exact_below)
        if not (isinstance(self.crossover, Mapping) and set(self.crossover) == set(GPU_CROSSOVER)):
            raise ValueError(f"TritonOptions.crossover: expected a mapping with the keys {sorted(GPU_CROSSOVER)}, "
                             f"got {self.crossover!r}")
        for key, below in self.crossover.items():
            check_exact_below(f"TritonOptions.crossover[{key}]", below)
        chunk = self.backward_chunk_bytes
        if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1):
            raise ValueError(f"backward_chunk_bytes must be an int >= 1, got {self.backward_chunk_bytes!r}")
        check_kernel_names("TritonOptions", "sdpa_order", self.sdpa_order, SDPA_KERNELS)
        check_kernel_names("TritonOptions", "fused_kernels", self.fused_kernels, FUSED_KERNELS)
        for name in ("fused_backward_chunk_bytes", "sample_row_chunk", "exact_key_row_chunk", "sort_starts_part",
                     "device_tables_capacity"):
            _check_positive(name, getattr(self, name))
        for name in ("sort_chunk", "sort_interpreter_chunk", "sort_scatter_warps", "sort_starts_chunks"):
            value = getattr(self, name)
            if not _power_of_two(value):
                raise ValueError(f"TritonOptions.{name}: expected a power of two, got {value!r}")
        if not isinstance(self.launches, LaunchTable):
            raise TypeError(f"TritonOptions.launches: expected a LaunchTable, got {type(self.launches).__name__}")

    def exact_below_for(self, head_dim: int, backward: bool) -> tuple[int, int]:
        if self.exact_below is not None:
            return self.exact_below
        return self.crossover[(tier_name(head_dim), "fwd+bwd" if backward else "fwd")]

    def changed(self, **changes) -> TritonOptions:
        """These options with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"TritonOptions.{name}: expected a positive int, got {value!r}")
