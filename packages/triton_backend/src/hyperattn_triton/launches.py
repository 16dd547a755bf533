"""Launch configurations of every kernel, by head-dim tier: one table, as data.

A table maps a kernel name to its launches for the tiers ``max(D, Dv) <= 64``, ``<= 128`` and
``<= 256`` (heads are padded to a power of two, so a tier's launch fits all of it):

* ``"forward"``, ``"dq"``: query tiles of ``block_m`` rows in steps of ``block_n`` keys;
* ``"dkdv"``: key tiles of ``block_n`` keys in steps of ``block_m`` rows (the dK/dV kernel);
* ``"lsh_split"``, ``"lsh_reduce"``: the hashing kernel for fp16/bf16 rows (``terms`` split
  matrix-unit products; ``terms=0`` sends such rows through the reduce passes too) and for fp32 rows;
* ``"row_dot"``, ``"cast_rows"``, ``"draw_samples"``, ``"sample_blocks"``: rows (``block``) per
  program of the small kernels.

Why each launch is what it is, with the measurements and their commits: docs/performance.md.
Use :func:`launch_for` to read a table and :meth:`LaunchTable.changed` to derive another (tables
are immutable; a backend takes one through ``TritonOptions(launches=...)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hyperattn.launch_tiers import (  # noqa: F401  (re-exported: the backend's modules read them here)
    HEAD_DIM_TIERS,
    MAX_GRID_Y,
    TIER_NAMES,
    Tiers,
    cdiv,
    next_power_of_2,
    padded_dim,
    tier_name,
)


@dataclass(frozen=True)
class Launch:
    """An attention kernel's tiles, pipeline stages and warps."""

    block_m: int
    block_n: int
    stages: int
    warps: int
    #: registers per thread at most (ptxas spills beyond): fewer registers, more programs per SM
    maxnreg: int | None = None


@dataclass(frozen=True)
class RowLaunch:
    """A row-wise kernel's rows per program (``block``) and warps; ``terms`` for the hashing kernel
    (how many fp16/bf16 parts the fp32 projections are split into; 0: multiply-and-reduce passes)."""

    block: int
    warps: int
    terms: int = 0


KERNELS = ("forward", "dq", "dkdv", "lsh_split", "lsh_reduce", "row_dot", "cast_rows", "draw_samples",
           "sample_blocks")
#: The kernels whose launches are RowLaunch (rows per program), not tiles.
ROW_KERNELS = ("lsh_split", "lsh_reduce", "row_dot", "cast_rows", "draw_samples", "sample_blocks")


@dataclass(frozen=True)
class LaunchTable:
    """Every kernel's :class:`Tiers` (see the module docstring for the names), read only."""

    kernels: Mapping[str, Tiers]

    def __post_init__(self):
        kernels = dict(self.kernels)
        missing = [name for name in KERNELS if name not in kernels]
        unknown = [name for name in kernels if name not in KERNELS]
        if missing or unknown:
            raise ValueError(f"LaunchTable: kernels {KERNELS} expected, missing {missing}, unknown {unknown}")
        for name, tiers in kernels.items():
            if not isinstance(tiers, Tiers):
                raise TypeError(f"LaunchTable: kernel {name!r} expected Tiers, got {type(tiers).__name__}")
            kind = RowLaunch if name in ROW_KERNELS else Launch
            for launch in (tiers.d64, tiers.d128, tiers.d256):
                if not isinstance(launch, kind):
                    raise TypeError(f"LaunchTable: kernel {name!r} expected {kind.__name__} launches, got {launch!r}")
        object.__setattr__(self, "kernels", MappingProxyType(kernels))

    def changed(self, kernel: str, head_dim: int, **fields) -> LaunchTable:
        """This table with ``kernel``'s launch for ``head_dim``'s tier changed in ``fields``, e.g.
        ``table.changed("forward", 64, block_n=16)``."""
        tiers = self.kernels[kernel]
        launch = dataclasses.replace(tiers.for_dim(head_dim), **fields)
        return LaunchTable({**self.kernels, kernel: tiers.with_tier(head_dim, launch)})

    def with_launch(self, kernel: str, head_dim: int, launch) -> LaunchTable:
        """This table with ``kernel``'s launch for ``head_dim``'s tier replaced by ``launch``."""
        return LaunchTable({**self.kernels, kernel: self.kernels[kernel].with_tier(head_dim, launch)})

    def __repr__(self):
        return f"LaunchTable({dict(self.kernels)!r})"

    def __hash__(self):
        return hash(tuple(self.kernels.items()))

    def __eq__(self, other):
        return isinstance(other, LaunchTable) and dict(self.kernels) == dict(other.kernels)

    def lines(self) -> list[str]:
        """The table as text, one line per kernel and tier."""
        return [f"{name:<13} D<={limit:<3} {launch}" for name, tiers in self.kernels.items()
                for limit, launch in zip(HEAD_DIM_TIERS, (tiers.d64, tiers.d128, tiers.d256))]


#: Above D = 128: small tiles, so that shared memory fits.
_WIDEST = Launch(32, 32, 1, 4)

DEFAULT_LAUNCHES = LaunchTable({
    # forward at D <= 64: registers capped, so that 3 programs run per SM instead of 2, with 32-key steps
    "forward": Tiers(Launch(128, 32, 5, 4, maxnreg=168), Launch(128, 32, 3, 4), _WIDEST),
    "dq": Tiers(Launch(128, 64, 3, 4), Launch(64, 64, 3, 4), _WIDEST),
    # dK/dV at D <= 128: 64 x 128 tiles on 8 warps, faster than the launches that do not spill at all
    # (ptxas spills a little there: tests/triton/sm90.py allows it)
    "dkdv": Tiers(Launch(32, 128, 3, 4), Launch(64, 128, 2, 8), _WIDEST),
    "lsh_split": Tiers.same(RowLaunch(block=128, warps=2, terms=3)),
    "lsh_reduce": Tiers.same(RowLaunch(block=128, warps=2)),
    "row_dot": Tiers.same(RowLaunch(block=64, warps=4)),
    "cast_rows": Tiers.same(RowLaunch(block=64, warps=4)),
    "draw_samples": Tiers.same(RowLaunch(block=1024, warps=4)),
    "sample_blocks": Tiers.same(RowLaunch(block=1024, warps=4)),
})


def launch_for(table: LaunchTable, kernel: str, head_dim: int, v_dim: int | None = None):
    """``kernel``'s launch in ``table`` for heads of ``head_dim`` (and ``v_dim``: the wider decides)."""
    try:
        tiers = table.kernels[kernel]
    except KeyError:
        raise KeyError(f"no launches for kernel {kernel!r}; the table has {tuple(table.kernels)}") from None
    return tiers.for_dim(max(head_dim, head_dim if v_dim is None else v_dim))

