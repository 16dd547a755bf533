"""The forward attention launch of the CuPy backend: ``kernels/attention_fwd.cu`` over a query-tile
table (``hyperattn.tiles``), the same semantics as the Triton backend's ``attention.forward``.

One launch covers every tile (grid x) of every (batch, query head) (grid y); a block of
``launch.warps`` warps computes one tile's rows against its keys (and, for a sparse structure, its
segment's sample slots) and merges the result into the running ``(out, lse)`` by log-sum-exp, or
writes it (``overwrite``: the call's first piece).  The kernel is a template: dtypes, head dims,
block sizes and flags are compile-time, so each combination is its own NVRTC compile (cached by
``compiler.kernel``); :func:`name_expression` spells the instantiation.

Everything here but :func:`forward`'s launch is plain host logic on the arrays' shapes, strides and
dtypes (``tests/cupy/test_cupy_forward_host.py`` runs it on NumPy arrays and a fake kernel).
"""

from __future__ import annotations

import numpy as np

from . import compiler
from .arrays import element_strides
from .indices import IndexArrays
from .launches import MAX_GRID_Y, Launch, padded_dim

#: The kernel's source (``kernels/``) and template.
SOURCE = "attention_fwd.cu"
TEMPLATE = "hyperattn::attention_fwd"
#: log2(e): the kernel's softmax runs in base 2, on scores scaled by ``scale * LOG2E``.
LOG2E = 1.4426950408889634
#: NumPy dtype name -> the kernel's element type.
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
_ZERO_STRIDES = (np.int64(0),) * 4


def cuda_type(dtype) -> str:
    """The C++ element type of a NumPy / cupy dtype (bfloat16 is ``ml_dtypes.bfloat16``)."""
    name = np.dtype(dtype).name
    try:
        return CUDA_TYPES[name]
    except KeyError:
        raise TypeError(f"the forward kernel takes float16, bfloat16 or float32 arrays, not {name}") from None


def _cpp_bool(flag: bool) -> str:
    return "true" if flag else "false"


def name_expression(dtype, out_dtype, head_dim: int, v_dim: int, launch: Launch, permuted: bool, causal: bool,
                    has_samples: bool, overwrite: bool, draw_weights: bool = False) -> str:
    """The kernel instantiation, in the template's parameter order: ``<T, TOut, HEAD_DIM, D_PAD,
    V_DIM, DV_PAD, BLOCK_M, BLOCK_N, WARPS, PERMUTED, CAUSAL, HAS_SAMPLES, OVERWRITE, DRAW_WEIGHTS>``."""
    t, t_out = cuda_type(dtype), cuda_type(out_dtype)
    if t_out not in (t, "float"):
        raise TypeError(f"out must be in the inputs' dtype or float32, not {np.dtype(out_dtype).name}")
    values = (t, t_out, head_dim, padded_dim(head_dim), v_dim, padded_dim(v_dim), launch.block_m, launch.block_n,
              launch.warps, _cpp_bool(permuted), _cpp_bool(causal), _cpp_bool(has_samples), _cpp_bool(overwrite),
              _cpp_bool(draw_weights))
    return f"{TEMPLATE}<{', '.join(str(v) for v in values)}>"


def check_launch(dtype, head_dim: int, v_dim: int, launch: Launch) -> None:
    """Raise ValueError where the kernel's static_asserts would refuse ``launch`` (a clear message
    instead of an NVRTC compile error)."""
    threads = launch.warps * 32
    problems = []
    if launch.block_n > threads:
        problems.append("block_n must be at most warps * 32 (one thread per key slot)")
    if cuda_type(dtype) == "float":  # SIMT: threads / block_m lanes per row
        per_row = threads // launch.block_m if launch.block_m else 0
        if threads % max(launch.block_m, 1) or not 1 <= per_row <= 32:
            problems.append("fp32: warps * 32 must be a multiple of block_m, at most 32 threads per row")
        elif launch.block_n % per_row or padded_dim(v_dim) % (4 * per_row):
            problems.append("fp32: block_n and the padded Dv must split over a row's threads")
    else:  # tensor cores: 16 rows per warp and m-tile, 16-key mma steps
        if launch.block_m % (16 * launch.warps) or launch.block_m == 0:
            problems.append("fp16/bf16: block_m must be a multiple of 16 * warps")
        if launch.block_n % 16 or launch.block_n == 0:
            problems.append("fp16/bf16: block_n must be a multiple of 16")
    if problems:
        raise ValueError(f"forward launch {launch} for {np.dtype(dtype).name}, D={head_dim}, Dv={v_dim}: "
                         + "; ".join(problems))


def shared_bytes(dtype, head_dim: int, v_dim: int, launch: Launch) -> int:
    """Dynamic shared memory of one block (the kernel's ``SmemLayout::BYTES``): the Q, K and V
    tiles with 16 bytes of padding per row, P (fp32 only), the row indices and the two halves of
    the step key table (indices and biases)."""
    itemsize = np.dtype(dtype).itemsize
    pad = 16 // itemsize
    ldq, ldv = padded_dim(head_dim) + pad, padded_dim(v_dim) + pad
    bm, bn = launch.block_m, launch.block_n
    tiles = (bm * ldq + bn * ldq + bn * ldv) * itemsize
    probabilities = bm * (bn + 1) * 4 if cuda_type(dtype) == "float" else 0
    return tiles + probabilities + bm * 4 + 2 * bn * 4 + 2 * bn * 4


def _rows_contiguous(x):
    """``x`` with a unit last stride (the kernel reads the orders' and samples' positions
    contiguously); a copy only where it has not."""
    return x if x.strides[-1] == x.itemsize else x.copy()


def kernel_args(q, k, v, tiles, ix: IndexArrays, permuted: bool, scale: float, out, lse) -> tuple:
    """The kernel's arguments in its parameter order (arrays for pointers, NumPy scalars of the
    parameters' C types):

    Q, K, V, Out, Lse, Tiles, QOrder, KOrder, Samples, SampleBlock, LogW, DrawLogW,
    sq_b, sq_h, sq_n, sq_d, sk_*, sv_*, so_* (int64, 4 each), sl_b, sl_h, sl_n,
    sqo_b, sqo_h, sko_b, sko_h, ss_b, ss_h, ss_s (int64),
    num_heads (int32 Hq), group (int32 Hq / Hk), scale_log2 (float32), num_samples (int32 m)
    (DrawLogW: a log weight per draw with the samples' strides, read by the DRAW_WEIGHTS kernels)
    """
    if permuted:
        q_order, k_order = _rows_contiguous(ix.q_order), _rows_contiguous(ix.k_order)
        order_strides = (*element_strides(q_order)[:2], *element_strides(k_order)[:2])
    else:  # not read
        q_order, k_order, order_strides = ix.q_order, ix.k_order, _ZERO_STRIDES
    samples, sample_blocks = ix.samples, ix.sample_blocks
    if ix.sample_size > 0:
        # one set of strides serves both (IndexArrays makes them contiguous, of one shape)
        if samples.shape != sample_blocks.shape or samples.strides != sample_blocks.strides \
                or samples.strides[-1] != samples.itemsize:
            raise ValueError("samples and sample_blocks must be contiguous arrays of one shape [B, Hk, S, m]")
        sample_strides = element_strides(samples)[:3]
        check_draw_weights(ix)
    else:  # not read
        sample_strides = _ZERO_STRIDES[:3]
    num_heads, kv_heads = q.shape[1], k.shape[1]
    return (
        q, k, v, out, lse, tiles, q_order, k_order, samples, sample_blocks, ix.log_w, ix.draw_log_w,
        *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(out),
        *element_strides(lse), *order_strides, *sample_strides,
        np.int32(num_heads), np.int32(num_heads // kv_heads), np.float32(scale * LOG2E), np.int32(ix.sample_size),
    )


def check_draw_weights(ix: IndexArrays) -> None:
    """Raise ValueError unless per-draw log weights (where the structure has them) are float32 of the
    samples' shape and strides: the kernels index them with the samples' offsets."""
    if not ix.draw_weights:
        return
    w, samples = ix.draw_log_w, ix.samples
    if np.dtype(w.dtype) != np.float32 or w.shape != samples.shape \
            or element_strides(w) != element_strides(samples):
        raise ValueError(f"draw_log_w must be float32 with the samples' shape {tuple(samples.shape)} and element "
                         f"strides; got {np.dtype(w.dtype).name} {tuple(w.shape)}")


def _check_arrays(q, k, v, out, lse) -> None:
    batch, heads, n_q, head_dim = q.shape
    v_dim = v.shape[3]
    if k.shape[:1] != (batch,) or k.shape[3] != head_dim or v.shape[:3] != k.shape[:3] or heads % k.shape[1]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: want [B, Hq, Nq, D], [B, Hk, Nk, D], "
                         "[B, Hk, Nk, Dv] with Hk dividing Hq")
    if tuple(out.shape) != (batch, heads, n_q, v_dim) or tuple(lse.shape) != (batch, heads, n_q):
        raise ValueError(f"out {out.shape}, lse {lse.shape}: want [B, Hq, Nq, Dv], [B, Hq, Nq]")
    if k.dtype != q.dtype or v.dtype != q.dtype or np.dtype(lse.dtype) != np.float32:
        raise TypeError(f"q, k, v must share a dtype and lse be float32 (q {q.dtype}, k {k.dtype}, v {v.dtype}, "
                        f"lse {lse.dtype})")
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"batch x heads = {batch * heads} exceeds the launch grid's {MAX_GRID_Y}")


def forward(q, k, v, tiles, ix: IndexArrays, permuted: bool, scale: float, out, lse, causal: bool, overwrite: bool,
            launch: Launch) -> None:
    """One forward launch over the query tiles ``tiles`` (int64 cupy [T, 7]), merged into (or,
    ``overwrite``, written to) ``(out, lse)``.

    q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] (any strides; one dtype: float16,
    bfloat16 or float32); out [B, Hq, Nq, Dv] (q's dtype or float32), lse float32 [B, Hq, Nq];
    ``ix``: the structure's index arrays (``permuted``: gather rows and keys through its orders;
    samples when ``ix.sample_size > 0``).  The tiles must have been cut with ``launch.block_m``
    rows: the kernel computes the first ``block_m`` rows of a tile.  Runs on CuPy's current stream.
    """
    if len(tiles) == 0:
        return
    _check_arrays(q, k, v, out, lse)
    head_dim, v_dim = q.shape[3], v.shape[3]
    check_launch(q.dtype, head_dim, v_dim, launch)
    if np.dtype(tiles.dtype) != np.int64 or not tiles.flags.c_contiguous:  # the kernel reads rows of 7 int64
        tiles = tiles.astype(np.int64, order="C")
    has_samples = ix.sample_size > 0
    name = name_expression(q.dtype, out.dtype, head_dim, v_dim, launch, permuted, causal, has_samples, overwrite,
                           has_samples and ix.draw_weights)
    args = kernel_args(q, k, v, tiles, ix, permuted, scale, out, lse)
    grid = (len(tiles), q.shape[0] * q.shape[1], 1)
    compiler.kernel(SOURCE, name).launch(grid, (launch.warps * 32, 1, 1), args,
                                         shared_bytes(q.dtype, head_dim, v_dim, launch))
