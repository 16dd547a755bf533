"""Exact pieces through PyTorch's fused CPU attention, when torch is installed.

PyTorch's CPU flash-attention kernel returns the log-sum-exp (natural log) and has a backward that
takes O and lse, so it runs the exact pieces that fold into one batched call
(``Segments.equal_tiling``: a whole rectangle, or the causal leaves) several times faster than
the NumPy tiles (docs/performance.md).
It takes float32 and float64 and is accurate to rounding (checked against the dense float64
oracle like every other path).  The option ``use_torch_exact=False`` runs the NumPy tiles only.
"""

from __future__ import annotations

import numpy as np

from hyperattn.kernel_utils import merge_partial
from hyperattn.protocol import Segments


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _fold(segments: Segments, causal: bool, q, k, v):
    """(torch views or copies of q, k, v as [B, H * L, n, .], their Tiling), or None when the
    segments do not fold (GQA, D != Dv, or not one batch of equal attentions)."""
    torch = _torch()
    if torch is None or q.shape[1] != k.shape[1] or q.shape[3] != v.shape[3]:
        return None
    tiling = segments.equal_tiling(q.shape[2], causal)
    if tiling is None:
        return None
    arrays = (tiling.fold_rows(q), tiling.fold_keys(k), tiling.fold_keys(v))
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in arrays], tiling


def exact_forward(q, k, v, segments: Segments, causal: bool, scale: float, out, lse, overwrite: bool) -> bool:
    """Merge exact attention of the segments into (out, lse); False when they do not fold."""
    folded = _fold(segments, causal, q, k, v)
    if folded is None:
        return False
    (tq, tk, tv), _ = folded
    o, row_lse = _torch().ops.aten._scaled_dot_product_flash_attention_for_cpu(tq, tk, tv, 0.0, causal, scale=scale)
    o, row_lse = o.numpy().reshape(out.shape), row_lse.numpy().reshape(lse.shape)
    if overwrite:
        out[...] = o
        lse[...] = row_lse
    else:
        merge_partial(out, lse, o, row_lse)
    return True


def exact_backward(q, k, v, out, lse, dout, segments: Segments, causal: bool, scale: float, dq, dk, dv) -> bool:
    """Add the segments' gradients, given the call's *final* out and lse (so delta = rowsum(dO * O):
    only without an lse gradient); False when they do not fold or out is not given."""
    if out is None:
        return False
    folded = _fold(segments, causal, q, k, v)
    if folded is None:
        return False
    (tq, tk, tv), tiling = folded
    torch = _torch()
    tout, tdout, tlse = (torch.from_numpy(np.ascontiguousarray(tiling.fold_rows(x.astype(q.dtype, copy=False))))
                         for x in (out, dout, lse))
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        tdout, tq, tk, tv, tout, tlse, 0.0, causal, scale=scale)
    dq += grad_q.numpy().reshape(dq.shape)
    for acc, grad in ((dk, grad_k), (dv, grad_v)):
        acc[:, :, tiling.k_start:tiling.k_end] += grad.numpy().reshape(
            acc.shape[0], acc.shape[1], tiling.k_end - tiling.k_start, acc.shape[3])
    return True
