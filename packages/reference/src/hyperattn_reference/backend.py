"""The reference backend: NumPy arrays on the CPU, float32 (float64 for float64 inputs).

It accepts NumPy arrays and CPU torch tensors; float16 and bfloat16 inputs are computed in
float32 (a documented copy) and the outputs cast back.
"""

from __future__ import annotations

import numpy as np

from hyperattn._arrays import array_type
from hyperattn.algorithm import zero_inside
from hyperattn.protocol import Capabilities, Segments, SparseStructure, segment_labels

from . import _fused, _kernels

_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


def gray_rank(codes: np.ndarray) -> np.ndarray:
    """Rank of each code in the reflected Gray-code sequence: ``c ^ (c >> 1) ^ (c >> 2) ^ ...``."""
    rank = codes.copy()
    shift = 1
    while shift < 64:
        rank ^= rank >> shift
        shift *= 2
    return rank


class ReferenceBackend:
    name = "reference"
    capabilities = Capabilities(
        array_types=("numpy", "torch"),
        devices=("cpu",),
        dtypes=_TORCH_DTYPES,
        priority=0,
        notes="NumPy + numba on the CPU; the oracle of the other backends. fp16/bf16 computed in fp32.",
    )

    def version(self) -> str:
        from . import __version__

        return f"{__version__} (numpy {np.__version__}, numba {_kernels.numba.__version__})"

    def unsupported_reason(self, array_type_name, device, dtype, head_dims):
        if array_type_name not in self.capabilities.array_types:
            return f"arrays of type {array_type_name} are not supported (NumPy arrays or CPU torch tensors)"
        if not device.startswith("cpu"):
            return f"runs on the CPU only, inputs are on {device}"
        if dtype not in self.capabilities.dtypes:
            return f"dtype {dtype} is not supported {self.capabilities.dtypes}"
        return None

    # -- arrays ---------------------------------------------------------------------------------
    def to_native(self, x) -> np.ndarray:
        if array_type(x) == "torch":
            import torch

            x = x.detach().cpu()  # CUDA tensors too: the tests compare GPU backends against it
            x = (x if x.dtype == torch.float64 else x.to(torch.float32)).numpy()
        compute = np.float64 if x.dtype == np.float64 else np.float32
        return np.ascontiguousarray(x, dtype=compute)

    def from_native(self, y: np.ndarray, like, dtype: str | None = None):
        if array_type(like) == "torch":
            import torch

            target = like.dtype if dtype is None else getattr(torch, dtype)
            return torch.from_numpy(np.ascontiguousarray(y)).to(device=like.device, dtype=target)
        return y.astype(like.dtype if dtype is None else dtype, copy=False)

    # -- structure ------------------------------------------------------------------------------
    def lsh_codes(self, x: np.ndarray, projections: np.ndarray) -> np.ndarray:
        bits = (x @ projections.astype(x.dtype)) > 0  # [B, H, N, r]
        # sum of bit j * 2**j as one float64 matmul (exact below 2**53; 8x faster than int shifts)
        powers = np.exp2(np.arange(bits.shape[-1], dtype=np.float64))
        codes = (bits.astype(np.float64) @ powers).astype(np.int64)
        return gray_rank(codes)

    def segment_sort(self, codes: np.ndarray, starts: np.ndarray, ends: np.ndarray, code_bits: int = 64):
        n = codes.shape[-1]
        labels = segment_labels(n, starts, ends)
        order = np.argsort((labels << 32) + codes, axis=-1, kind="stable")
        positions = np.broadcast_to(np.arange(n, dtype=np.int64), codes.shape)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, positions - labels, axis=-1)  # 0 outside every segment
        return order, rank

    # -- kernels --------------------------------------------------------------------------------
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse, *, fresh=False):
        if not _fused.exact_forward(q, k, v, segments, bool(causal), float(scale), out, lse, fresh):
            _kernels.exact_forward(q, k, v, segments, bool(causal), float(scale), out, lse)

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse, *, fresh=False):
        _kernels.sparse_forward(q, k, v, structure, float(scale), out, lse)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv, out=None, *,
                       fresh=False):
        if fresh:  # these kernels add: start from zeros
            _zero_segments(segments, dq, dk, dv)
        if not _fused.exact_backward(q, k, v, out, lse, dout, segments, bool(causal), float(scale), dq, dk, dv):
            _kernels.exact_backward(q, k, v, lse, dout, delta, segments, bool(causal), float(scale), dq, dk, dv)

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv, *, fresh=False):
        if fresh:
            _zero_segments(structure.segments, dq, dk, dv)
        _kernels.sparse_backward(q, k, v, lse, dout, delta, structure, float(scale), dq, dk, dv)


def _zero_segments(segments: Segments, dq, dk, dv) -> None:
    """Zero the rows of dq and the keys of dk, dv that the segments reach."""
    zero_inside(dq, segments.q_start, segments.q_end)
    zero_inside(dk, segments.k_start, segments.k_end)
    zero_inside(dv, segments.k_start, segments.k_end)
