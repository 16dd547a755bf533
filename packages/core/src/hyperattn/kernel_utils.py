"""Helpers for backend authors: merging partial softmaxes, zeroing ranges, segment labels.

Public and stable, like :mod:`hyperattn.protocol`: a backend imports these two modules of the
core and nothing else.  Everything here works on any array-API array (NumPy, torch, cupy).
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import array_namespace


def merge_partial(out, lse, o, row_lse) -> None:
    """Merge a partial softmax ``(o [..., n, Dv], row_lse [..., n])`` into the running ``(out, lse)``
    in place, by log-sum-exp, for any array type.  Rows with ``lse = -inf`` take the partial as it
    is: their out is never read (it may be uninitialised)."""
    xp = array_namespace(out)
    untouched = lse == -math.inf
    with np.errstate(invalid="ignore", over="ignore"):  # -inf - -inf in untouched rows (NumPy)
        total = xp.logaddexp(lse, row_lse)
        keep = xp.where(untouched, 0.0, xp.exp(lse - total))
        add = xp.exp(row_lse - total)
    out[...] = xp.where(untouched[..., None], 0.0, out) * keep[..., None] + xp.astype(o, out.dtype) * add[..., None]
    lse[...] = total


def zero_outside(x, starts: np.ndarray, ends: np.ndarray) -> None:
    """Zero x[:, :, i] (x [B, H, N, ...]) for every position i outside the ranges [starts, ends)."""
    n = x.shape[2]
    bounds = sorted(zip(np.asarray(starts).tolist(), np.asarray(ends).tolist()))
    position = 0
    for start, end in [*bounds, (n, n)]:
        if start > position:
            x[:, :, position:start] = 0
        position = max(position, end)


def zero_inside(x, starts: np.ndarray, ends: np.ndarray) -> None:
    """Zero x[:, :, start:end] for every range (for backends whose kernels add even when told to
    overwrite)."""
    for start, end in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist()):
        x[:, :, start:end] = 0


def segment_labels(n: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int64 [n]: the start of each position's segment, or the position itself outside every segment.

    Non-decreasing, so a stable sort by ``(label << 32) + code`` reorders rows only inside their
    segments, leaves other rows in place, and ``position - label`` is the rank in the segment.
    """
    labels = np.arange(n, dtype=np.int64)
    for start, end in zip(starts.tolist(), ends.tolist()):
        labels[start:end] = start
    return labels


__all__ = ["merge_partial", "segment_labels", "zero_inside", "zero_outside"]
