"""The small kernels of ``kernels/utility.cu``, host side: the backward's delta (:func:`row_dot`), the
widening copy of the exact path's results (:func:`cast_into`), the residual's samples
(:func:`draw_samples`, ``hyperattn.sampling.sample_keys`` bit for bit, on the device, and
:func:`draw_samples_by_key_norm` of ``sampling="key_norm"``) and each sample's key block
(:func:`sample_blocks`); and the helpers the structure kernels' hosts share
(:func:`c_type`, :func:`row_launch`; ``arrays.element_strides``).

Every ``launch_*`` function only packs arguments and launches: it takes arrays with ``shape``,
``strides``, ``dtype`` (cupy on a GPU; NumPy ones in the CPU tests, with a fake kernel), so what a
kernel receives can be checked without a GPU.  Kernels are named by name expressions (see
``compiler.py``); scalars go as NumPy scalars of the parameters' exact C types.
"""

from __future__ import annotations

import numpy as np

from hyperattn import sampling

from . import compiler
from .arrays import element_strides
from .launches import DEFAULT_LAUNCHES, HEAD_DIM_TIERS, RowLaunch, launch_for, padded_dim

SOURCE = "utility.cu"


# -- helpers shared by lsh.py and sorting.py -----------------------------------------------------
def c_type(dtype) -> str:
    """The C++ element type of a float dtype the kernels read: ``__half``, ``__nv_bfloat16`` or ``float``."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "__half"
    if dtype == np.float32:
        return "float"
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return "__nv_bfloat16"
    raise TypeError(f"no kernel element type for dtype {dtype}")


def int_type(dtype) -> str:
    """The C++ type of an int32 / int64 index array: ``int`` or ``long long``."""
    dtype = np.dtype(dtype)
    if dtype == np.int32:
        return "int"
    if dtype == np.int64:
        return "long long"
    raise TypeError(f"no kernel index type for dtype {dtype}")


def kernel_dtype(dtype) -> bool:
    """Whether the float kernels take ``dtype`` (fp16, bf16, fp32)."""
    try:
        c_type(dtype)
    except TypeError:
        return False
    return True


def row_launch(launches, kernel: str, dim: int | None = None) -> RowLaunch:
    """``kernel``'s :class:`RowLaunch` for heads of ``dim`` (None: the first tier, for kernels that do
    not depend on a head dim); ``launches`` is a launch table ({kernel: Tiers}), None for the
    defaults, or a RowLaunch itself."""
    if isinstance(launches, RowLaunch):
        launch = launches
    else:
        launch = launch_for(DEFAULT_LAUNCHES if launches is None else launches, kernel,
                            HEAD_DIM_TIERS[0] if dim is None else dim)
    if launch.threads % 32 or not 32 <= launch.threads <= 1024 or launch.block < 1:
        raise ValueError(f"{kernel}: a launch needs 32..1024 threads, a multiple of 32, and block >= 1; got {launch}")
    return launch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


i32, i64, u64 = np.int32, np.int64, np.uint64


# -- row_dot ---------------------------------------------------------------------------------------
def row_dot_lanes(dim: int) -> int:
    """Lanes per row of ``row_dot``: about 8 values of each input per lane, 4 to 32 lanes."""
    return min(32, max(4, padded_dim(dim) // 8))


def row_dot(a, b, launches):
    """float32 [B, H, N]: ``sum(a * b, -1)`` of two [B, H, N, Dv] arrays (any strides, one dtype) in
    fp32, in one launch (the backward's delta)."""
    import cupy

    batch, heads, n, dim = a.shape
    if b.shape != a.shape:
        raise ValueError(f"row_dot: shapes {a.shape} and {b.shape} differ")
    if not (kernel_dtype(a.dtype) and kernel_dtype(b.dtype)):  # e.g. float64: summed in its own dtype
        return cupy.sum(a * b, axis=-1)
    if b.dtype != a.dtype:  # one element type per launch
        a, b = a.astype(cupy.float32), b.astype(cupy.float32)
    out = cupy.empty((batch, heads, n), dtype=cupy.float32)
    if out.size == 0:
        return out
    if dim == 0:
        out.fill(0)
        return out
    launch_row_dot(a, b, out, row_launch(launches, "row_dot", dim))
    return out


def launch_row_dot(a, b, out, launch: RowLaunch) -> None:
    """``row_dot<T, LANES>(a, b, out, n, num_heads, row_blocks, block_rows, a's 4 strides, b's 4
    strides, dim)``; grid B * H * row_blocks, out contiguous [B, H, N]."""
    batch, heads, n, dim = a.shape
    row_blocks = cdiv(n, launch.block)
    name = f"hyperattn::row_dot<{c_type(a.dtype)}, {row_dot_lanes(dim)}>"
    args = (a, b, out, i64(n), i32(heads), i64(row_blocks), i32(launch.block), *element_strides(a),
            *element_strides(b), i32(dim))
    compiler.kernel(SOURCE, name).launch((batch * heads * row_blocks,), (launch.threads,), args)


# -- cast_into -------------------------------------------------------------------------------------
def cast_into(dst, src, add: bool, launches=None) -> None:
    """``dst[...] = src`` (``add``: ``dst += src``, summed in fp32) for [B, H, N, D] arrays of any
    strides and of possibly different dtypes (fp16/bf16/fp32; e.g. float32 -> bfloat16) in one
    launch; other dtypes or ranks through cupy's elementwise operations."""
    if dst.shape != src.shape:
        raise ValueError(f"cast_into: shapes {dst.shape} and {src.shape} differ")
    if dst.size == 0:
        return
    if dst.ndim != 4 or not (kernel_dtype(dst.dtype) and kernel_dtype(src.dtype)):
        if add:
            dst += src.astype(dst.dtype)
        else:
            dst[...] = src
        return
    launch_cast_rows(dst, src, add, row_launch(launches, "cast_rows", dst.shape[3]))


def launch_cast_rows(dst, src, add: bool, launch: RowLaunch) -> None:
    """``cast_rows<S, D, ADD>(src, dst, n, num_heads, row_blocks, block_rows, src's 4 strides, dst's 4
    strides, dim)``; grid B * H * row_blocks."""
    batch, heads, n, dim = dst.shape
    row_blocks = cdiv(n, launch.block)
    name = f"hyperattn::cast_rows<{c_type(src.dtype)}, {c_type(dst.dtype)}, {'true' if add else 'false'}>"
    args = (src, dst, i64(n), i32(heads), i64(row_blocks), i32(launch.block), *element_strides(src),
            *element_strides(dst), i32(dim))
    compiler.kernel(SOURCE, name).launch((batch * heads * row_blocks,), (launch.threads,), args)


# -- draw_samples ----------------------------------------------------------------------------------
def sample_dtype(n_k: int):
    """The samples' dtype: int32, or int64 once ``n_k`` reaches 2**31 (as ``sampling.sample_keys``)."""
    return np.int32 if n_k < 2**31 else np.int64


def draw_samples(seed, stream: int, batch: int, kv_heads: int, k_start, k_len, m: int, n_k: int, launches,
                 stratified: bool = False):
    """[B, Hk, S, m] key samples equal bit for bit to ``hyperattn.sampling.sample_keys(seed, stream,
    (batch, kv_heads), k_start, k_len, m, n_k, stratified)``, in one launch (and, ``stratified``,
    three elementwise CuPy operations: :func:`stratify`).  ``k_start``, ``k_len``: int64
    [S] device arrays; ``seed``: an int in [0, 2**63), or a 0-d int64 device array, read when the
    kernel runs (a CUDA graph replays its current value)."""
    import cupy

    out = cupy.empty((batch, kv_heads, len(k_start), m), dtype=sample_dtype(n_k))
    if out.size == 0:
        return out
    k_start = cupy.ascontiguousarray(k_start, dtype=cupy.int64)
    k_len = cupy.ascontiguousarray(k_len, dtype=cupy.int64)
    seed, seed_in_memory = _seed_argument(seed)
    launch_draw_samples(out, k_start, k_len, seed, seed_in_memory, stream, m, row_launch(launches, "draw_samples"))
    if stratified:
        out[...] = stratify(cupy, out, k_start, k_len, m)
    return out


def stratify(xp, drawn, k_start, k_len, m: int):
    """Uniform draws [B, Hk, S, m] (``hyperattn.sampling``'s) turned into its stratified ones: the
    uniform draw's offset is ``(bits * span) >> 32``, and draw j of the stratified ones is
    ``k_start + (j * span + offset) // m`` (int64: j * span < 2**63).  ``xp``: the array module."""
    start = xp.asarray(k_start, dtype=xp.int64).reshape(1, 1, -1, 1)
    span = xp.asarray(k_len, dtype=xp.int64).reshape(1, 1, -1, 1)
    slot = xp.arange(m, dtype=xp.int64)
    return (start + (slot * span + (drawn.astype(xp.int64) - start)) // m).astype(drawn.dtype)


def launch_draw_samples(out, k_start, k_len, seed, seed_in_memory: bool, stream: int, m: int,
                        launch: RowLaunch) -> None:
    """``draw_samples<OutT>(out, k_start, k_len, seed, seed_ptr, seed_in_memory, stream, total,
    per_head, m, block_elems)``; grid ceil(total / block).  ``seed``: an int, or (seed_in_memory)
    the device array the kernel reads it from (then the seed argument is 0; else seed_ptr is
    k_start, never read)."""
    total = int(np.prod(out.shape))
    per_head = out.shape[2] * out.shape[3]
    seed_value, seed_ptr = (u64(0), seed) if seed_in_memory else (u64(seed), k_start)
    name = f"hyperattn::draw_samples<{int_type(out.dtype)}>"
    args = (out, k_start, k_len, seed_value, seed_ptr, i32(seed_in_memory), u64(stream), i64(total), i64(per_head),
            i64(m), i32(launch.block))
    compiler.kernel(SOURCE, name).launch((cdiv(total, launch.block),), (launch.threads,), args)


def _seed_argument(seed):
    """``(seed, seed_in_memory)`` of a draw launch: an int in [0, 2**63), or a 0-d int64 device array."""
    import cupy

    if isinstance(seed, cupy.ndarray):
        if seed.size != 1 or seed.dtype != cupy.int64:
            raise TypeError(f"draw_samples: a device seed is a 0-d int64 array, got {seed.dtype} {seed.shape}")
        return seed, True
    seed = int(seed)
    if not 0 <= seed < sampling.SEED_LIMIT:
        raise ValueError(f"draw_samples: seed {seed} is outside [0, 2**63)")
    return seed, False


# -- draw_key_norm_samples -------------------------------------------------------------------------
def key_norm_weights(k, launches):
    """``(weights, prefix)``: float32 [B, Hk, Nk] ``||k||**4`` (:func:`row_dot` of k with itself,
    squared) and their inclusive float64 prefix sums along the keys (contiguous), made once per call."""
    import cupy

    squared = row_dot(k, k, launches)
    weights = cupy.ascontiguousarray(squared * squared, dtype=cupy.float32)
    return weights, cupy.cumsum(weights, axis=-1, dtype=cupy.float64)


def draw_samples_by_key_norm(seed, stream: int, key_weights, k_start, k_len, max_span: int, m: int, head_ids,
                             kv_total: int, launches):
    """``(keys, log_weights)`` [B, Hk, S, m] of ``sampling="key_norm"``: ``hyperattn.sampling.
    sample_keys_by_key_norm`` (up to the rounding of the float64 prefix sums) in one launch.
    ``key_weights``: :func:`key_norm_weights`; ``k_start``, ``k_len``: int64 [S] device arrays, the
    longest span ``max_span``; ``head_ids``: int64 [Hk] device array, each KV head's index in a call of
    ``kv_total`` KV heads; ``seed`` as in :func:`draw_samples`."""
    import cupy

    weights, prefix = key_weights
    batch, kv_heads, n_k = weights.shape
    keys = cupy.empty((batch, kv_heads, len(k_start), m), dtype=sample_dtype(n_k))
    log_w = cupy.empty(keys.shape, dtype=cupy.float32)
    if keys.size == 0:
        return keys, log_w
    seed, seed_in_memory = _seed_argument(seed)
    launch_draw_key_norm_samples(keys, log_w, weights, prefix, k_start, k_len, head_ids, seed, seed_in_memory, stream,
                                 m, kv_total, max_span.bit_length() + 1, row_launch(launches, "draw_samples"))
    return keys, log_w


def launch_draw_key_norm_samples(keys, log_w, weights, prefix, k_start, k_len, head_ids, seed, seed_in_memory: bool,
                                 stream: int, m: int, kv_total: int, search_steps: int, launch: RowLaunch) -> None:
    """``draw_key_norm_samples<OutT>(keys, log_w, weights, prefix, k_start, k_len, head_ids, seed, seed_ptr,
    seed_in_memory, stream, total, per_head, m, m_u, m_n, kv_heads, kv_total, n_k, search_steps,
    block_elems)``; grid ceil(total / block); the seed as in :func:`launch_draw_samples`."""
    batch, kv_heads, segments, _ = keys.shape
    total = batch * kv_heads * segments * m
    m_u, m_n = sampling.split_key_norm_draws(m)
    seed_value, seed_ptr = (u64(0), seed) if seed_in_memory else (u64(seed), k_start)
    name = f"hyperattn::draw_key_norm_samples<{int_type(keys.dtype)}>"
    args = (keys, log_w, weights, prefix, k_start, k_len, head_ids, seed_value, seed_ptr, i32(seed_in_memory),
            u64(stream), i64(total), i64(segments * m), i64(m), i64(m_u), i64(m_n), i32(kv_heads), i64(kv_total),
            i64(weights.shape[2]), i32(search_steps), i32(launch.block))
    compiler.kernel(SOURCE, name).launch((cdiv(total, launch.block),), (launch.threads,), args)


# -- sample_blocks ---------------------------------------------------------------------------------
def sample_blocks(samples, k_rank, block_size: int, launches):
    """int32 [B, Hk, S, m]: ``k_rank[b, h, samples[b, h, s, j]] // block_size``, each sample's key
    block (samples int32/int64 [B, Hk, S, m], copied when not contiguous; k_rank int32/int64
    [B, Hk, Nk], any strides)."""
    import cupy

    samples = cupy.ascontiguousarray(samples)
    if samples.dtype not in (cupy.int32, cupy.int64):
        samples = samples.astype(cupy.int32)
    if k_rank.dtype not in (cupy.int32, cupy.int64):
        k_rank = k_rank.astype(cupy.int64)
    out = cupy.empty(samples.shape, dtype=cupy.int32)
    if out.size == 0:
        return out
    launch_sample_blocks(samples, k_rank, out, block_size, row_launch(launches, "sample_blocks"))
    return out


def launch_sample_blocks(samples, k_rank, out, block_size: int, launch: RowLaunch) -> None:
    """``sample_blocks<SampleT, RankT>(samples, k_rank, out, total, count, kv_heads, k_rank's 3
    strides, block_size, block_elems)``; grid ceil(total / block)."""
    batch, kv_heads, segments, m = samples.shape
    total = batch * kv_heads * segments * m
    name = f"hyperattn::sample_blocks<{int_type(samples.dtype)}, {int_type(k_rank.dtype)}>"
    args = (samples, k_rank, out, i64(total), i64(segments * m), i32(kv_heads), *element_strides(k_rank),
            i64(block_size), i32(launch.block))
    compiler.kernel(SOURCE, name).launch((cdiv(total, launch.block),), (launch.threads,), args)
