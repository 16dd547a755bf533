"""The reference backend: NumPy arrays on the CPU, float32 (float64 for float64 inputs).

It accepts NumPy arrays and CPU torch tensors; float16 and bfloat16 inputs are computed in
float32 (a documented copy) and the outputs cast back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hyperattn.kernel_utils import segment_labels, zero_inside
from hyperattn.protocol import Backend, BackendOptions, Capabilities, Segments, SparseStructure

from . import numpy_kernels, torch_exact


@dataclasses.dataclass(frozen=True)
class ReferenceOptions(BackendOptions):
    """The reference backend's options (``hyperattn.configure("reference", ...)``)."""

    #: Run the exact pieces that fold into one batched call through PyTorch's fused CPU
    #: attention when torch is installed (else, and with False, the NumPy tiles).
    use_torch_exact: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_torch_exact, bool):
            raise TypeError(f"use_torch_exact must be a bool, got {type(self.use_torch_exact).__name__} "
                            f"{self.use_torch_exact!r}")


def _is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def gray_rank(codes: np.ndarray) -> np.ndarray:
    """Rank of each code in the reflected Gray-code sequence: ``c ^ (c >> 1) ^ (c >> 2) ^ ...``."""
    rank = codes.copy()
    shift = 1
    while shift < 64:
        rank ^= rank >> shift
        shift *= 2
    return rank


class ReferenceBackend(Backend):
    """NumPy + numba on the CPU; the oracle of the other backends.  fp16/bf16 computed in fp32."""

    name = "reference"
    capabilities = Capabilities(
        array_types=("numpy", "torch"),
        devices=("cpu",),
        dtypes=("float16", "bfloat16", "float32", "float64"),
        priority=0,
        samplings=("uniform", "stratified", "key_norm"),
        per_draw_weights=True,
    )

    def __init__(self, options: ReferenceOptions | None = None):
        self.options = ReferenceOptions() if options is None else options

    def version(self) -> str:
        from . import __version__

        return f"{__version__} (numpy {np.__version__}, numba {numpy_kernels.numba.__version__})"

    # -- arrays ---------------------------------------------------------------------------------
    def to_native(self, x) -> np.ndarray:
        if _is_torch_tensor(x):
            import torch

            x = x.detach().cpu()  # CUDA tensors too: the tests compare GPU backends against it
            x = (x if x.dtype == torch.float64 else x.to(torch.float32)).numpy()
        compute = np.float64 if x.dtype == np.float64 else np.float32
        return np.ascontiguousarray(x, dtype=compute)

    def from_native(self, y: np.ndarray, like, dtype: str | None = None):
        if _is_torch_tensor(like):
            import torch

            target = like.dtype if dtype is None else getattr(torch, dtype)
            return torch.from_numpy(np.ascontiguousarray(y)).to(device=like.device, dtype=target)
        return y.astype(like.dtype if dtype is None else dtype, copy=False)

    def from_host(self, values: np.ndarray, like) -> np.ndarray:
        return values

    # -- structure ------------------------------------------------------------------------------
    def lsh_codes(self, x: np.ndarray, projections: np.ndarray) -> np.ndarray:
        bits = (x @ projections.astype(x.dtype)) > 0  # [B, H, N, r]
        # sum of bit j * 2**j as one float64 matmul (exact below 2**53; faster than integer shifts)
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
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse, *, overwrite=False):
        use_torch = self.options.use_torch_exact
        if not (use_torch and torch_exact.exact_forward(q, k, v, segments, bool(causal), float(scale), out, lse,
                                                   overwrite)):
            numpy_kernels.exact_forward(q, k, v, segments, bool(causal), float(scale), out, lse)

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse, *, overwrite=False):
        numpy_kernels.sparse_forward(q, k, v, structure, float(scale), out, lse)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv, out=None, *,
                       overwrite=False):
        if overwrite:  # these kernels add: start from zeros
            _zero_segments(segments, dq, dk, dv)
        use_torch = self.options.use_torch_exact
        if not (use_torch and torch_exact.exact_backward(q, k, v, out, lse, dout, segments, bool(causal), float(scale),
                                                    dq, dk, dv)):
            numpy_kernels.exact_backward(q, k, v, lse, dout, delta, segments, bool(causal), float(scale), dq, dk, dv)

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv, *,
                        overwrite=False):
        if overwrite:
            _zero_segments(structure.segments, dq, dk, dv)
        numpy_kernels.sparse_backward(q, k, v, lse, dout, delta, structure, float(scale), dq, dk, dv)


def _zero_segments(segments: Segments, dq, dk, dv) -> None:
    """Zero the rows of dq and the keys of dk, dv that the segments reach."""
    zero_inside(dq, segments.q_start, segments.q_end)
    zero_inside(dk, segments.k_start, segments.k_end)
    zero_inside(dv, segments.k_start, segments.k_end)
