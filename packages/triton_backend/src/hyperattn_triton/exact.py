"""Exact pieces of the Triton backend through PyTorch's fused kernels (``hyperattn.torch.fused``),
with the backend's options and its vectorised widening copy (:func:`cast_into`).

:func:`flash_exact_forward` / :func:`flash_exact_backward` return False where the Triton kernels
must run (segments that do not fold, or Triton's interpreter).
"""

from __future__ import annotations

from hyperattn.torch import fused

from .kernels.utility import cast_rows_kernel
from .launcher import direct
from .launches import MAX_GRID_Y, cdiv, launch_for, padded_dim
from .options import TritonOptions, interpreting


def cast_into(dst, src, add: bool, options: TritonOptions) -> None:
    """``dst[...] = src`` (``add``: ``dst += src``) for [B, H, N, D] views, in one vectorised launch
    when the dtypes differ on a GPU (PyTorch's widening copy is slower), else through PyTorch."""
    plain = src.dtype == dst.dtype or interpreting() or not dst.is_cuda
    if plain or src.shape != dst.shape or dst.dim() != 4 or dst.shape[0] * dst.shape[1] > MAX_GRID_Y:
        fused.torch_cast_into(dst, src, add)
        return
    batch, heads, n, dim = dst.shape
    launch = launch_for(options.launches, "cast_rows", dim)
    direct(cast_rows_kernel)[(cdiv(n, launch.block), batch * heads)](
        src, dst, n, heads, *src.stride(), *dst.stride(), DIM=dim, D_PAD=padded_dim(dim), BLOCK=launch.block, ADD=add,
        num_warps=launch.warps,
    )


def flash_exact_forward(q, k, v, segments, causal: bool, scale: float, out, lse, overwrite: bool,
                        options: TritonOptions) -> bool:
    """``fused.fused_exact_forward`` with ``options.fused_kernels``; False under the interpreter."""
    if interpreting():
        return False
    return fused.fused_exact_forward(q, k, v, segments, causal, scale, out, lse, overwrite, options.fused_kernels,
                                     lambda dst, src, add: cast_into(dst, src, add, options))


def flash_exact_backward(q, k, v, out, lse, dout, segments, causal: bool, scale: float, dq, dk, dv,
                         overwrite: bool, options: TritonOptions) -> bool:
    """``fused.fused_exact_backward`` with ``options.fused_kernels`` and
    ``options.fused_backward_chunk_bytes``; False under the interpreter."""
    if interpreting():
        return False
    return fused.fused_exact_backward(q, k, v, out, lse, dout, segments, causal, scale, dq, dk, dv, overwrite,
                                      options.fused_kernels, options.fused_backward_chunk_bytes,
                                      lambda dst, src, add: cast_into(dst, src, add, options))
