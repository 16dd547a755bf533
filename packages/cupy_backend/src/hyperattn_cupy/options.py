"""The CuPy backend's options: its launch table and cache sizes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hyperattn.protocol import BackendOptions
from hyperattn.torch.kernel_names import FUSED_KERNELS, SDPA_KERNELS, check_kernel_names

from .launches import DEFAULT_LAUNCHES, KERNELS, Tiers


@dataclass(frozen=True)
class CupyOptions(BackendOptions):
    """Options of the CuPy backend, validated.

    ``launches``: {kernel: Tiers} (see ``launches.py``; every kernel of ``launches.KERNELS``);
    ``sample_row_chunk``: rows per program of the sample slots' dK/dV kernel (each chunk adds its
    partial gradients with atomics); ``device_tables_capacity``: device tables kept per instance.
    ``fused_kernels``: PyTorch's fused kernels for exact pieces with torch inputs, tried in this
    order (names of ``FUSED_KERNELS``); ``fused_backward_chunk_bytes``: gradients one fused backward
    call produces at most (it is chunked over heads and segments beyond that); ``sdpa_order``:
    SDPA's kernels tried first for whole exact calls with torch inputs (names of ``SDPA_KERNELS``).
    The exact crossover (``exact_below``) is off until it has been measured for this backend.
    """

    launches: Mapping[str, Tiers] = field(default_factory=lambda: MappingProxyType(dict(DEFAULT_LAUNCHES)))
    sample_row_chunk: int = 1024
    device_tables_capacity: int = 512
    fused_kernels: tuple[str, ...] = FUSED_KERNELS
    fused_backward_chunk_bytes: int = 256 << 20
    sdpa_order: tuple[str, ...] = SDPA_KERNELS

    def __post_init__(self) -> None:
        super().__post_init__()
        launches = dict(self.launches)
        missing = [k for k in KERNELS if k not in launches]
        unknown = [k for k in launches if k not in KERNELS]
        if missing or unknown:
            raise ValueError(f"CupyOptions.launches: kernels {KERNELS} expected, missing {missing}, unknown {unknown}")
        for name, tiers in launches.items():
            if not isinstance(tiers, Tiers):
                raise TypeError(f"CupyOptions.launches[{name!r}] must be Tiers, got {type(tiers).__name__}")
        object.__setattr__(self, "launches", MappingProxyType(launches))
        check_kernel_names("CupyOptions", "fused_kernels", self.fused_kernels, FUSED_KERNELS)
        check_kernel_names("CupyOptions", "sdpa_order", self.sdpa_order, SDPA_KERNELS)
        for name in ("sample_row_chunk", "device_tables_capacity", "fused_backward_chunk_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"CupyOptions.{name} must be an int >= 1, got {value!r}")

    def __hash__(self):
        return hash((self.exact_below, self.backward_chunk_bytes, tuple(self.launches.items()),
                     self.sample_row_chunk, self.device_tables_capacity, self.fused_kernels,
                     self.fused_backward_chunk_bytes, self.sdpa_order))
