"""LSH hashing, host side of ``kernels/lsh.cu``: one launch per call computes x @ projections in
fp32, the sign bits and their reflected-Gray-code rank (``Backend.lsh_codes``).

The kernel reads x through its strides in its own dtype (fp16, bf16 or fp32, widened to fp32 in
registers) and the projections as fp32 [D, r] (float64 projections are rounded to fp32 once, as
the Triton backend does).  Codes are int32 for fewer than 32 projections, else int64.
"""

from __future__ import annotations

import numpy as np

from . import compiler
from .arrays import element_strides
from .launches import RowLaunch, padded_dim
from .utility import c_type, cdiv, i32, i64, kernel_dtype, row_launch

SOURCE = "lsh.cu"
#: Lanes per row and projections per butterfly in the kernel (``LSH_LANES``).
LANES = 8
#: At most this many projections: the kernel builds the code in 64 bits.
MAX_PROJS = 64


def code_dtype(num_projs: int):
    """The codes' dtype for ``num_projs`` projections."""
    return np.int32 if num_projs < 32 else np.int64


def shared_bytes(dim: int, num_projs: int) -> int:
    """Dynamic shared memory of one block: the projections as fp32 [r rounded up to 8, D_PAD]."""
    return cdiv(num_projs, LANES) * LANES * padded_dim(dim) * 4


def name_expression(dtype, num_projs: int, dim: int) -> str:
    """The kernel's instantiation for x of ``dtype`` and [dim] rows, ``num_projs`` projections."""
    code = "int" if code_dtype(num_projs) == np.int32 else "long long"
    return f"hyperattn::lsh_codes<{c_type(dtype)}, {code}, {padded_dim(dim)}>"


def lsh_codes(x, projections, launches, out=None):
    """Gray-code ranks of the sign patterns of ``x @ projections``: [B, H, N] int32 (int64 from 32
    projections).  x [B, H, N, D] (any strides; fp16/bf16/fp32, other float dtypes through fp32);
    projections [D, r] float32/float64; ``out``: codes to write ([B, H, N] of the codes' dtype,
    unit stride along N)."""
    import cupy

    batch, heads, n, dim = x.shape
    if projections.ndim != 2 or projections.shape[0] != dim:
        raise ValueError(f"lsh_codes: projections {projections.shape} do not match rows of {dim}")
    num_projs = projections.shape[1]
    if num_projs > MAX_PROJS:
        raise ValueError(f"lsh_codes: at most {MAX_PROJS} projections, got {num_projs}")
    dtype = code_dtype(num_projs)
    if out is None:
        out = cupy.empty((batch, heads, n), dtype=dtype)
    elif out.shape != (batch, heads, n) or out.dtype != dtype or (n > 1 and out.strides[2] != out.itemsize):
        raise ValueError(f"lsh_codes: out must be {dtype.__name__} [{batch}, {heads}, {n}] with unit stride along N")
    if out.size == 0:
        return out
    if not kernel_dtype(x.dtype):
        x = x.astype(cupy.float32)
    proj = cupy.ascontiguousarray(cupy.asarray(projections), dtype=cupy.float32)
    launch_lsh_codes(x, proj, out, row_launch(launches, "lsh", dim))
    return out


def launch_lsh_codes(x, proj, codes, launch: RowLaunch) -> None:
    """``lsh_codes<T, CodeT, D_PAD>(x, proj, codes, n, num_heads, row_blocks, block_rows, x's 4
    strides, codes' b and h strides, dim, num_projs)``; grid B * H * row_blocks, dynamic shared
    memory :func:`shared_bytes`.  proj: fp32 contiguous [D, r]."""
    batch, heads, n, dim = x.shape
    num_projs = proj.shape[1]
    row_blocks = cdiv(n, launch.block)
    sc_b, sc_h, _ = element_strides(codes)
    args = (x, proj, codes, i64(n), i32(heads), i64(row_blocks), i32(launch.block), *element_strides(x), sc_b, sc_h,
            i32(dim), i32(num_projs))
    kernel = compiler.kernel(SOURCE, name_expression(x.dtype, num_projs, dim))
    kernel.launch((batch * heads * row_blocks,), (launch.threads,), args, shared_bytes(dim, num_projs))


def numpy_lsh_codes(x: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """NumPy mirror of the kernel's arithmetic (fp32 products, sign bits, Gray rank), for tests:
    int64 [..., N] codes of x [..., N, D]."""
    projected = x.astype(np.float32) @ projections.astype(np.float32)
    bits = (projected > 0).astype(np.uint64)
    codes = (bits << np.arange(projected.shape[-1], dtype=np.uint64)).sum(axis=-1, dtype=np.uint64)
    shift = 1
    while shift < 64:
        codes ^= codes >> np.uint64(shift)
        shift *= 2
    return codes.astype(np.int64)
