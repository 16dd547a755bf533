"""Exact pieces through PyTorch's fused kernels (cuDNN, FlashAttention: ``hyperattn.torch.fused``)
when the caller gave torch tensors: the cupy arrays are seen as torch tensors over the same memory
(DLPack, no copies), and the kernels run on the caller's torch stream, as every launch of the call.

:func:`whole_call` is a whole exact call through SDPA (or None); the piece functions return False
where the CuPy kernels must run: cupy inputs (torch need not be installed, and its stream is not
the caller's), or segments and shapes the fused kernels do not take (see
``hyperattn.torch.fused.fold``).
"""

from __future__ import annotations

from . import arrays
from .options import CupyOptions


def whole_call(q, k, v, causal: bool, scale: float, options: CupyOptions):
    """``hyperattn.torch.fused.whole_exact_call`` on the caller's torch tensors; None for cupy arrays
    (see ``CupyBackend.fused_attention``)."""
    if not arrays.is_torch(q):
        return None
    from hyperattn.torch import fused

    return fused.whole_exact_call(q, k, v, causal, scale, options.sdpa_order)


def _may_fold(q, v) -> bool:
    """The cheap part of ``fold``'s test, before any array is converted (host time per piece)."""
    return q.dtype.name in ("float16", "bfloat16") and q.shape[3] == v.shape[3]


def exact_forward(q, k, v, segments, causal: bool, scale: float, out, lse, overwrite: bool,
                  streams: arrays.StreamBridge, options: CupyOptions) -> bool:
    """``fused_exact_forward`` on torch views of the arrays; ``out`` receives a copy (it is not a
    torch tensor that could adopt the fused kernel's memory)."""
    if not (streams.torch_inputs() and _may_fold(q, v)):
        return False
    from hyperattn.torch import fused

    tq, tk, tv, tout, tlse = (arrays.cupy_to_torch(x) for x in (q, k, v, out, lse))
    return fused.fused_exact_forward(tq, tk, tv, segments, causal, scale, tout, tlse, overwrite,
                                     options.fused_kernels, adopt=False)


def exact_backward(q, k, v, out, lse, dout, segments, causal: bool, scale: float, dq, dk, dv, overwrite: bool,
                   streams: arrays.StreamBridge, options: CupyOptions) -> bool:
    """``fused_exact_backward`` on torch views of the arrays (``out``: the final output, None when
    there is an lse gradient: then the CuPy kernels run)."""
    if out is None or not (streams.torch_inputs() and _may_fold(q, v)):
        return False
    from hyperattn.torch import fused

    views = (arrays.cupy_to_torch(x) for x in (q, k, v, out, lse, dout, dq, dk, dv))
    tq, tk, tv, tout, tlse, tdout, tdq, tdk, tdv = views
    return fused.fused_exact_backward(tq, tk, tv, tout, tlse, tdout, segments, causal, scale, tdq, tdk, tdv,
                                      overwrite, options.fused_kernels, options.fused_backward_chunk_bytes)
