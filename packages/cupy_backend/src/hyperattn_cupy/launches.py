"""Launch configurations of every CUDA kernel of the CuPy backend, by head-dim tier: one table, as data.

The tiers are ``max(D, Dv) <= 64``, ``<= 128`` and ``<= 256`` (heads are padded to the tier's
width).  Tile kernels (``"forward"``, ``"dq"``, ``"dkdv"``) take :class:`Launch` (rows ``block_m``,
keys ``block_n`` per step, warps per block); row kernels take :class:`RowLaunch` (rows per block,
threads per block).  Why each launch is what it is: docs/performance.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hyperattn.launch_tiers import HEAD_DIM_TIERS, MAX_GRID_Y, Tiers, padded_dim  # noqa: F401  (re-exported)


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


DEFAULT_LAUNCHES: dict[str, Tiers] = {
    # forward: the fp16/bf16 kernel gives each warp 16 rows per m-tile: 128-row tiles of 4 warps (two
    # m-tiles a warp) in 32-key steps at D <= 64, 64-row tiles above (32-key steps at D = 256)
    "forward": Tiers(Launch(128, 32, 4), Launch(64, 64, 4), Launch(64, 32, 4)),
    # dq, dkdv: the fp16/bf16 kernels give each warp 16 rows (dQ) or keys (dK/dV); dK/dV steps over 32
    # rows at D <= 64; D = 256 takes 32 x 32, 2 warps
    "dq": Tiers(Launch(64, 64, 4), Launch(64, 64, 4), Launch(32, 32, 2)),
    "dkdv": Tiers(Launch(32, 64, 4), Launch(64, 64, 4), Launch(32, 32, 2)),
    "lsh": Tiers.same(RowLaunch(block=1024, threads=128)),
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


def replaced(table, kernel: str, head_dim: int, **fields) -> dict:
    """``table`` with ``kernel``'s launch for ``head_dim``'s tier changed in ``fields``."""
    tiers = table[kernel]
    return {**table, kernel: tiers.with_tier(head_dim, dataclasses.replace(tiers.for_dim(head_dim), **fields))}
