"""The attention backward's launches (CuPy): one dQ launch over the query tiles, then one dK/dV launch per
key-tile table, of the CUDA kernels in ``kernels/attention_bwd.cu``.

The semantics are the Triton backend's (``hyperattn_triton.attention.backward``): tile tables as in
``hyperattn.tiles`` (int64 [T, 7]), FlashAttention's backward with the final ``lse`` and ``delta``
(both float32 [B, Hq, Nq]), gradients accumulated in float32 ``dq`` [B, Hq, Nq, D], ``dk`` [B, Hk, Nk, D],
``dv`` [B, Hk, Nk, Dv].  q, k, v are float16, bfloat16 (``ml_dtypes.bfloat16``) or float32; ``dout`` has
q's dtype or float32.  Every array may have any strides (passed in elements, int64).

Kernels are named by template instantiation (``dq_name`` / ``dkdv_name``) and compiled on first use by
``compiler.kernel``; the dynamic shared memory of a launch is ``dq_shared_bytes`` / ``dkdv_shared_bytes``,
which mirror the kernels' ``DqSmem`` / ``DkdvSmem`` layouts (the kernels stop at once if given less).
"""

from __future__ import annotations

import numpy as np

from . import compiler
from .arrays import element_strides
from .indices import IndexArrays
from .launches import MAX_GRID_Y, Launch, padded_dim

SOURCE = "attention_bwd.cu"
#: log2(e): the kernels' softmax runs in base 2 (scores scaled by ``scale * LOG2E``).
LOG2E = 1.4426950408889634
#: The kernels' element types by NumPy dtype name (bfloat16 is ml_dtypes').
C_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}


def c_type(dtype) -> str:
    """The CUDA C++ type of a (NumPy / ml_dtypes) dtype the kernels take."""
    name = np.dtype(dtype).name
    try:
        return C_TYPES[name]
    except KeyError:
        raise TypeError(f"attention backward: unsupported dtype {name} (float16, bfloat16 or float32)") from None


def _cpp_bool(flag: bool) -> str:
    return "true" if flag else "false"


def dq_name(dtype, dout_dtype, d_pad: int, dv_pad: int, launch: Launch, permuted: bool, causal: bool,
            has_samples: bool, overwrite: bool, draw_weights: bool = False) -> str:
    """The name expression of ``hyperattn::attention_bwd_dq`` for these template arguments."""
    flags = ", ".join(_cpp_bool(f) for f in (permuted, causal, has_samples, overwrite, draw_weights))
    return (f"hyperattn::attention_bwd_dq<{c_type(dtype)}, {c_type(dout_dtype)}, {d_pad}, {dv_pad}, "
            f"{launch.block_m}, {launch.block_n}, {launch.warps}, {flags}>")


def dkdv_name(dtype, dout_dtype, d_pad: int, dv_pad: int, launch: Launch, permuted: bool, causal: bool,
              samples: bool, overwrite: bool, draw_weights: bool = False) -> str:
    """The name expression of ``hyperattn::attention_bwd_dkdv`` for these template arguments."""
    flags = ", ".join(_cpp_bool(f) for f in (permuted, causal, samples, overwrite, draw_weights))
    return (f"hyperattn::attention_bwd_dkdv<{c_type(dtype)}, {c_type(dout_dtype)}, {d_pad}, {dv_pad}, "
            f"{launch.block_m}, {launch.block_n}, {launch.warps}, {flags}>")


def dq_shared_bytes(dtype, d_pad: int, dv_pad: int, launch: Launch, draw_weights: bool = False) -> int:
    """Dynamic shared memory of a dQ launch: ``DqSmem`` in attention_bwd.cu.  q, dO [BLOCK_M] and k, v
    [BLOCK_N] rows padded by 8 elements (16-bit) or 1 (fp32), the fp32 kernel's dS [BLOCK_M][BLOCK_N + 1],
    and the staged keys' indices (int [BLOCK_N]) and, ``draw_weights``, their per-draw log weights (float
    [BLOCK_N]); 16-bit: two k, v buffers and three key tables."""
    bm, bn = launch.block_m, launch.block_n
    tables = 2 if draw_weights else 1  # keys, and the slots' log weights
    if np.dtype(dtype).name == "float32":
        return (bm + bn) * ((d_pad + 1) + (dv_pad + 1)) * 4 + bm * (bn + 1) * 4 + tables * bn * 4
    return (bm + 2 * bn) * ((d_pad + 8) + (dv_pad + 8)) * 2 + tables * 3 * bn * 4


def dkdv_shared_bytes(dtype, d_pad: int, dv_pad: int, launch: Launch) -> int:
    """Dynamic shared memory of a dK/dV launch: ``DkdvSmem`` in attention_bwd.cu.  k, v [BLOCK_N] and q, dO
    [BLOCK_M] rows padded as in the dQ kernel, the fp32 kernel's P^T / dS^T [BLOCK_N][BLOCK_M + 1], and a
    row table of five int / float [BLOCK_M] arrays; 16-bit: two q, dO buffers and three row tables."""
    bm, bn = launch.block_m, launch.block_n
    if np.dtype(dtype).name == "float32":
        return (bm + bn) * ((d_pad + 1) + (dv_pad + 1)) * 4 + bn * (bm + 1) * 4 + bm * 20
    return (2 * bm + bn) * ((d_pad + 8) + (dv_pad + 8)) * 2 + 3 * bm * 20


def check_launch(kernel_kind: str, dtype, launch: Launch) -> None:
    """Raise ValueError unless the kernel's static_asserts hold for ``launch``: the fp16/bf16 kernels give
    each warp slices of 16 rows (dQ) or keys (dK/dV) and one thread per key (dQ) or row (dK/dV) of a
    step; the fp32 kernels use a 16-column thread grid."""
    bm, bn, warps = launch.block_m, launch.block_n, launch.warps
    if warps < 1:
        raise ValueError(f"attention backward {kernel_kind}: warps must be >= 1, got {launch}")
    split, other = (bm, bn) if kernel_kind == "dq" else (bn, bm)  # the side the warps split, the other
    names = ("block_m", "block_n") if kernel_kind == "dq" else ("block_n", "block_m")
    if np.dtype(dtype).name == "float32":
        ok, need = split % (2 * warps) == 0 and other % 16 == 0, f"{names[0]} a multiple of 2 * warps"
    else:
        ok, need = split % (16 * warps) == 0 and other % 16 == 0, f"{names[0]} a multiple of 16 * warps"
    if not ok:
        raise ValueError(f"attention backward {kernel_kind} ({np.dtype(dtype).name}): {launch} needs "
                         f"{need} and {names[1]} a multiple of 16")
    # the pipelined fp16/bf16 kernels: one thread per key slot (dQ) or row (dK/dV) of a step
    if np.dtype(dtype).name != "float32" and other > 32 * warps:
        raise ValueError(f"attention backward {kernel_kind} ({np.dtype(dtype).name}): {launch} needs "
                         f"{names[1]} <= 32 * warps (one thread per {'key' if kernel_kind == 'dq' else 'row'} of a step)")


def leading_strides(x, n: int) -> tuple:
    """The first ``n`` element strides of ``x`` (np.int64), zeros past its dims: the one-element dummy
    index arrays of exact pieces are never read, any stride will do."""
    strides = element_strides(x)[:n]
    return tuple(strides) + (np.int64(0),) * (n - len(strides))


def _c_contiguous(x):
    return x if x.flags.c_contiguous else x.copy(order="C")


def _unit_last_stride(x):
    """``x`` with unit stride along its last dim (the kernels index positions / slots with stride 1)."""
    return x if x.ndim == 0 or x.shape[-1] <= 1 or x.strides[-1] == x.itemsize else x.copy(order="C")


def _check_shared(kind: str, shared: int, launch: Launch, dtype) -> None:
    limit = compiler.max_shared_bytes()
    if shared > limit:
        raise ValueError(f"attention backward {kind} ({np.dtype(dtype).name}): {launch} needs {shared} bytes of "
                         f"shared memory, the device allows {limit} per block; choose a smaller launch")


def _check_arrays(q, k, v, lse, dout, delta, dq, dk, dv) -> None:
    dtype = np.dtype(q.dtype)
    c_type(dtype)
    for name, x in (("k", k), ("v", v)):
        if np.dtype(x.dtype) != dtype:
            raise TypeError(f"attention backward: {name} is {np.dtype(x.dtype).name}, q is {dtype.name}")
    if np.dtype(dout.dtype) not in (dtype, np.dtype(np.float32)):
        raise TypeError(f"attention backward: dout is {np.dtype(dout.dtype).name}; it must be q's dtype "
                        f"({dtype.name}) or float32")
    for name, x in (("lse", lse), ("delta", delta), ("dq", dq), ("dk", dk), ("dv", dv)):
        if np.dtype(x.dtype) != np.float32:
            raise TypeError(f"attention backward: {name} must be float32, got {np.dtype(x.dtype).name}")


def _tile_table(tiles):
    """A tile table as the kernels read it: int64 [T, 7], C-contiguous (row blockIdx.x at 7 * blockIdx.x)."""
    if np.dtype(tiles.dtype) != np.int64 or tiles.ndim != 2 or tiles.shape[1] != 7:
        raise ValueError(f"attention backward: tile tables are int64 [T, 7], got {np.dtype(tiles.dtype).name} "
                         f"{tuple(tiles.shape)}")
    return _c_contiguous(tiles)


def _index_arrays(ix: IndexArrays):
    """(q_order, k_order, samples, sample_blocks, draw_log_w) with the layouts the kernels assume: unit
    stride along positions and slots; sample_blocks (and per-draw log weights) indexed with the samples'
    strides."""
    q_order, k_order = _unit_last_stride(ix.q_order), _unit_last_stride(ix.k_order)
    samples, sample_blocks, draw_log_w = ix.samples, ix.sample_blocks, ix.draw_log_w
    if ix.sample_size > 0:
        samples = _unit_last_stride(samples)
        alike = [sample_blocks] + ([draw_log_w] if ix.draw_weights else [])
        if any(tuple(x.shape) != tuple(samples.shape) or element_strides(x) != element_strides(samples)
               for x in alike):
            samples, sample_blocks = samples.copy(order="C"), sample_blocks.copy(order="C")
            if ix.draw_weights:
                draw_log_w = draw_log_w.copy(order="C")
    return q_order, k_order, samples, sample_blocks, draw_log_w


def dq_args(q, k, v, dout, lse, delta, dq, tiles, q_order, k_order, samples, sample_blocks, log_w, draw_log_w,
            scale: float, sample_size: int) -> tuple:
    """The arguments of ``attention_bwd_dq``, in its order: 14 arrays, 30 int64 strides, then
    num_heads, group (int32), scale, scale_log2 (float32), num_samples, head_dim, v_dim (int32).
    ``draw_log_w``: a log weight per draw with the samples' strides (read by the DRAW_WEIGHTS kernels)."""
    return (
        q, k, v, dout, lse, delta, dq, tiles, q_order, k_order, samples, sample_blocks, log_w, draw_log_w,
        *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(dout),
        *element_strides(lse), *element_strides(dq),
        *leading_strides(q_order, 2), *leading_strides(k_order, 2), *leading_strides(samples, 3),
        np.int32(q.shape[1]), np.int32(q.shape[1] // k.shape[1]), np.float32(scale), np.float32(scale * LOG2E),
        np.int32(sample_size), np.int32(q.shape[3]), np.int32(v.shape[3]),
    )


def dkdv_args(q, k, v, dout, lse, delta, dk, dv, tiles, q_order, k_order, q_blocks, samples, sample_blocks, log_w,
              draw_log_w, scale: float) -> tuple:
    """The arguments of ``attention_bwd_dkdv``, in its order: 16 arrays, 34 int64 strides, then
    num_kv_heads, group (int32), scale, scale_log2 (float32), head_dim, v_dim (int32)."""
    return (
        q, k, v, dout, lse, delta, dk, dv, tiles, q_order, k_order, q_blocks, samples, sample_blocks, log_w,
        draw_log_w,
        *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(dout),
        *element_strides(lse), *element_strides(dk), *element_strides(dv),
        *leading_strides(q_order, 2), *leading_strides(k_order, 2), *leading_strides(samples, 3),
        np.int32(k.shape[1]), np.int32(q.shape[1] // k.shape[1]), np.float32(scale), np.float32(scale * LOG2E),
        np.int32(q.shape[3]), np.int32(v.shape[3]),
    )


def backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, ix: IndexArrays, permuted: bool, query_blocks,
             scale: float, dq, dk, dv, causal: bool, overwrite: bool, dq_launch: Launch, dkdv_launch: Launch,
             deterministic: bool = False) -> None:
    """dQ over the query tiles ``q_tiles``, then dK/dV over each ``(key tiles, are they sample slots)``
    table of ``k_tiles``, on CuPy's current stream.

    ``permuted``: tile positions index the LSH orders ``ix.q_order`` / ``ix.k_order`` (a sparse piece);
    ``causal`` masks the dQ launch's keys and the key tables' rows (never the sample slots').
    ``overwrite``: dq and the first key table that is not sample slots are written instead of added to
    (their launch is the call's first piece for those rows and keys); sample slots always add, with
    fp32 atomics.  ``query_blocks()`` gives the int32 [Nq] key block of each sorted query position; it
    is called only for sample-slot tables.  Tables must fit the launches: q_tiles rows span at most
    ``dq_launch.block_m`` rows, key tables at most ``dkdv_launch.block_n`` keys or slots.

    ``deterministic`` (fixed-order accumulation of the sample slots' dK/dV, the Triton kernel's
    SLOT_OUTPUT) is not implemented by these kernels: it raises NotImplementedError.
    """
    if deterministic:
        raise NotImplementedError("the CuPy attention backward has no deterministic mode (deterministic=True: "
                                  "fixed-order sample-slot accumulation, SLOT_OUTPUT); its sample slots add "
                                  "with fp32 atomics")
    _check_arrays(q, k, v, lse, dout, delta, dq, dk, dv)
    if element_strides(delta) != element_strides(lse):  # the kernels index delta with lse's strides
        lse, delta = _c_contiguous(lse), _c_contiguous(delta)
    dtype, dout_dtype = np.dtype(q.dtype), np.dtype(dout.dtype)
    d_pad, dv_pad = padded_dim(q.shape[3]), padded_dim(v.shape[3])
    q_order, k_order, samples, sample_blocks, draw_log_w = _index_arrays(ix)
    has_samples = ix.sample_size > 0
    draw_weights = has_samples and ix.draw_weights

    if len(q_tiles):
        check_launch("dq", dtype, dq_launch)
        grid_y = q.shape[0] * q.shape[1]
        if grid_y > MAX_GRID_Y:
            raise ValueError(f"attention backward: batch x heads = {grid_y} exceeds the grid limit {MAX_GRID_Y}")
        tiles = _tile_table(q_tiles)
        shared = dq_shared_bytes(dtype, d_pad, dv_pad, dq_launch, draw_weights)
        _check_shared("dq", shared, dq_launch, dtype)
        name = dq_name(dtype, dout_dtype, d_pad, dv_pad, dq_launch, permuted, causal, has_samples, overwrite,
                       draw_weights)
        compiler.kernel(SOURCE, name).launch(
            (len(tiles), grid_y, 1), (32 * dq_launch.warps, 1, 1),
            dq_args(q, k, v, dout, lse, delta, dq, tiles, q_order, k_order, samples, sample_blocks, ix.log_w,
                    draw_log_w, scale, ix.sample_size),
            shared)

    first_keys = True  # the first key table that is not sample slots may overwrite
    for table, are_samples in k_tiles:
        if len(table) == 0:
            if not are_samples:
                first_keys = False
            continue
        check_launch("dkdv", dtype, dkdv_launch)
        grid_y = k.shape[0] * k.shape[1]
        if grid_y > MAX_GRID_Y:
            raise ValueError(f"attention backward: batch x KV heads = {grid_y} exceeds the grid limit {MAX_GRID_Y}")
        tiles = _tile_table(table)
        write = overwrite and not are_samples and first_keys
        if not are_samples:
            first_keys = False
        # the sample slots' kernel reads the sorted rows' key blocks; the others get any int32 array
        q_blocks = _c_contiguous(query_blocks()) if are_samples else samples
        shared = dkdv_shared_bytes(dtype, d_pad, dv_pad, dkdv_launch)
        _check_shared("dkdv", shared, dkdv_launch, dtype)
        name = dkdv_name(dtype, dout_dtype, d_pad, dv_pad, dkdv_launch, permuted, causal and not are_samples,
                         are_samples, write, draw_weights and are_samples)
        compiler.kernel(SOURCE, name).launch(
            (len(tiles), grid_y, 1), (32 * dkdv_launch.warps, 1, 1),
            dkdv_args(q, k, v, dout, lse, delta, dk, dv, tiles, q_order, k_order, q_blocks, samples, sample_blocks,
                      ix.log_w, draw_log_w, scale),
            shared)
