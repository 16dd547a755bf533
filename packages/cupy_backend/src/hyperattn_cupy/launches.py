"""Launch configurations of every CUDA kernel of the CuPy backend, by head-dim tier: one table, as data.

The tiers are ``max(D, Dv) <= 64``, ``<= 128`` and ``<= 256`` (heads are padded to the tier's
width).  Tile kernels (``"forward"``, ``"dq"``, ``"dkdv"``) take :class:`Launch` (rows ``block_m``,
keys ``block_n`` per step, warps per block); row kernels take :class:`RowLaunch` (rows per block,
threads per block).  Why each launch is what it is: docs/performance.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: The head-dim tiers, in the order of a :class:`Tiers`'s launches.
HEAD_DIM_TIERS = (64, 128, 256)
#: CUDA's limit on a launch grid's second axis (batch x heads in these kernels).
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class Launch:
    """A tile kernel's rows per block, keys per step and warps."""

    block_m: int
    block_n: int
    warps: int


@dataclass(frozen=True)
class RowLaunch:
    """A row-wise kernel's rows (or elements) per block and threads per block."""

    block: int
    threads: int


@dataclass(frozen=True)
class Tiers:
    """One launch per head-dim tier (:data:`HEAD_DIM_TIERS`)."""

    d64: Launch | RowLaunch
    d128: Launch | RowLaunch
    d256: Launch | RowLaunch

    @classmethod
    def same(cls, launch) -> Tiers:
        return cls(launch, launch, launch)

    def for_dim(self, widest: int):
        for limit, launch in zip(HEAD_DIM_TIERS, (self.d64, self.d128, self.d256)):
            if widest <= limit:
                return launch
        raise ValueError(f"no launch for head dim {widest}: the tiers end at {HEAD_DIM_TIERS[-1]}")


DEFAULT_LAUNCHES: dict[str, Tiers] = {
    # forward: the fp16/bf16 kernel gives each warp 16 rows: 64-row tiles of 4 warps (32-key steps at D = 256)
    "forward": Tiers(Launch(64, 64, 4), Launch(64, 64, 4), Launch(64, 32, 4)),
    # dq, dkdv: the fp16/bf16 kernels give each warp 16 rows (dQ) or keys (dK/dV): D = 256 takes 32 x 32, 2 warps
    "dq": Tiers(Launch(64, 64, 4), Launch(64, 64, 4), Launch(32, 32, 2)),
    "dkdv": Tiers(Launch(64, 64, 4), Launch(64, 64, 4), Launch(32, 32, 2)),
    "lsh": Tiers.same(RowLaunch(block=128, threads=128)),
    "sort": Tiers.same(RowLaunch(block=1024, threads=256)),
    "row_dot": Tiers.same(RowLaunch(block=64, threads=256)),
    "cast_rows": Tiers.same(RowLaunch(block=64, threads=256)),
    "draw_samples": Tiers.same(RowLaunch(block=1024, threads=256)),
    "sample_blocks": Tiers.same(RowLaunch(block=1024, threads=256)),
}
KERNELS = tuple(DEFAULT_LAUNCHES)


def launch_for(table, kernel: str, head_dim: int, v_dim: int | None = None):
    """``kernel``'s launch in ``table`` for heads of ``head_dim`` (and ``v_dim``: the wider decides)."""
    try:
        tiers = table[kernel]
    except KeyError:
        raise KeyError(f"no launches for kernel {kernel!r}; the table has {tuple(table)}") from None
    return tiers.for_dim(max(head_dim, head_dim if v_dim is None else v_dim))


def padded_dim(dim: int) -> int:
    """A head dim as the kernels lay it out: the next power of two, at least 16 (a matrix-unit tile)."""
    return max(16, 1 << (max(dim, 1) - 1).bit_length())


def replaced(table, kernel: str, head_dim: int, **fields) -> dict:
    """``table`` with ``kernel``'s launch for ``head_dim``'s tier changed in ``fields``."""
    tiers = table[kernel]
    launch = dataclasses.replace(tiers.for_dim(head_dim), **fields)
    name = next(n for limit, n in zip(HEAD_DIM_TIERS, ("d64", "d128", "d256")) if head_dim <= limit)
    return {**table, kernel: dataclasses.replace(tiers, **{name: launch})}
