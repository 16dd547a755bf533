"""The Triton backend's options: what its launches, crossovers and chunk sizes are.

A :class:`TritonOptions` is immutable; ``hyperattn.configure("triton", **changes)`` replaces the
backend's with ``dataclasses.replace(options, **changes)`` (validated here), and the backend reads
its options on every call.  ``TritonBackend(options)`` makes a backend with its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hyperattn.protocol import BackendOptions

from .launches import DEFAULT_LAUNCHES, LaunchTable

#: (keys, rows) below which exact attention (cuDNN) beats this backend's HyperAttention on a GPU:
#: see scripts/gpu_crossover.py, which measures it.
GPU_EXACT_BELOW = (16384, 40960)
#: PyTorch SDPA's kernels by name (``torch.nn.attention.SDPBackend``).
SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
#: PyTorch's fused kernels that return the log-sum-exp (used for exact pieces).
FUSED_KERNELS = ("cudnn", "flash")


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``: on CPU tensors too)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _default_exact_below() -> tuple[int, int]:
    # the interpreter has no fast exact attention to prefer: it approximates above min_seq_len
    return (0, 0) if interpreting() else GPU_EXACT_BELOW


def _power_of_two(value) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    """Options of :class:`hyperattn_triton.backend.TritonBackend` (see ``BackendOptions`` for
    ``exact_below`` and ``backward_chunk_bytes``)."""

    #: (keys, rows): non-causal calls with fewer keys, causal calls with fewer rows run exactly
    #: (GPU_EXACT_BELOW on a GPU, (0, 0) under the interpreter)
    exact_below: tuple[int, int] = field(default_factory=_default_exact_below)
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
        super().__post_init__()  # exact_below, backward_chunk_bytes
        _check_names("sdpa_order", self.sdpa_order, SDPA_KERNELS)
        _check_names("fused_kernels", self.fused_kernels, FUSED_KERNELS)
        for name in ("fused_backward_chunk_bytes", "sample_row_chunk", "sort_starts_part", "device_tables_capacity"):
            _check_positive(name, getattr(self, name))
        for name in ("sort_chunk", "sort_interpreter_chunk", "sort_scatter_warps", "sort_starts_chunks"):
            value = getattr(self, name)
            if not _power_of_two(value):
                raise ValueError(f"TritonOptions.{name}: expected a power of two, got {value!r}")
        if not isinstance(self.launches, LaunchTable):
            raise TypeError(f"TritonOptions.launches: expected a LaunchTable, got {type(self.launches).__name__}")

    def changed(self, **changes) -> TritonOptions:
        """These options with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"TritonOptions.{name}: expected a positive int, got {value!r}")


def _check_names(name: str, value, allowed: tuple[str, ...]) -> None:
    if not (isinstance(value, tuple) and value and all(v in allowed for v in value) and len(set(value)) == len(value)):
        raise ValueError(f"TritonOptions.{name}: expected a non-empty tuple of distinct names from {allowed}, "
                         f"got {value!r}")
