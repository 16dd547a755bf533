"""What the GPU backends' launch tables share: head-dim tiers and one launch per tier.

A backend keeps one launch per kernel and tier (``max(D, Dv) <= 64``, ``<= 128``, ``<= 256``;
heads are padded to a power of two, so a tier's launch fits all of it), in a :class:`Tiers` of its
own launch records; plus the integer helpers its host code sizes launches with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: CUDA's limit on a launch grid's second axis (batch x heads in most kernels).
MAX_GRID_Y = 65535

#: The head-dim tiers, in the order of a :class:`Tiers`'s launches.
HEAD_DIM_TIERS = (64, 128, 256)
TIER_NAMES = ("d64", "d128", "d256")


def tier_name(head_dim: int) -> str:
    """The tier that holds heads of ``head_dim`` ("d64", "d128", "d256"; the widest above)."""
    for limit, name in zip(HEAD_DIM_TIERS, TIER_NAMES):
        if head_dim <= limit:
            return name
    return TIER_NAMES[-1]


@dataclass(frozen=True)
class Tiers:
    """One launch (a backend's launch record) per head-dim tier (:data:`HEAD_DIM_TIERS`)."""

    d64: Any
    d128: Any
    d256: Any

    @classmethod
    def same(cls, launch) -> Tiers:
        """The same launch at every head dim."""
        return cls(launch, launch, launch)

    def for_dim(self, widest: int):
        """The launch of the smallest tier that holds head dim ``widest``."""
        for limit, launch in zip(HEAD_DIM_TIERS, (self.d64, self.d128, self.d256)):
            if widest <= limit:
                return launch
        raise ValueError(f"no launch for head dim {widest}: the tiers end at {HEAD_DIM_TIERS[-1]}")

    def with_tier(self, head_dim: int, launch) -> Tiers:
        """These tiers with the one that holds ``head_dim`` replaced by ``launch``."""
        for limit, name in zip(HEAD_DIM_TIERS, TIER_NAMES):
            if head_dim <= limit:
                return dataclasses.replace(self, **{name: launch})
        raise ValueError(f"no tier holds head dim {head_dim}: the tiers end at {HEAD_DIM_TIERS[-1]}")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1), in plain Python (``triton.next_power_of_2`` is a
    constexpr function in Triton 3.7: microseconds per call on the host)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints."""
    return -(-a // b)


def padded_dim(dim: int) -> int:
    """A head dim as the kernels lay it out: the next power of two, at least 16 (a matrix-unit tile)."""
    return max(16, next_power_of_2(dim))
