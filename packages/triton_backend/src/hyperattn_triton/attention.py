"""The attention kernels' launches: one forward, or one dQ and one dK/dV launch per key-tile table,
over device tile tables (see ``tiles.py`` and ``kernels/attention.py``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .indices import IndexTensors
from .kernels.attention import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel, attention_fwd_kernel
from .kernels.common import LOG2E
from .launcher import direct
from .launches import Launch, padded_dim


def needs_int64_offsets(*tensors) -> bool:
    """True when an element offset inside one (batch, head) slice of a tensor may reach 2**31:
    the kernels then index in int64 (else int32, which needs fewer registers)."""
    for x in tensors:
        # a contiguous tensor's offsets stay below its size: the common case, without the sum
        if (x.numel() >= _INT32_OFFSETS or not x.is_contiguous()) and _max_slice_offset(x) >= _INT32_OFFSETS:
            return True
    return False


_INT32_OFFSETS = 2**31 - 1


def _max_slice_offset(x) -> int:
    """The largest element offset inside one (batch, head) slice of ``x`` (dims 2 onwards)."""
    return sum((n - 1) * abs(st) for n, st in zip(x.shape[2:], x.stride()[2:]))


def launch_meta(q, v, launch: Launch, permuted: bool, *tensors) -> dict:
    """The compile-time arguments and launch options shared by the attention kernels."""
    return dict(
        HEAD_DIM=q.shape[3], D_PAD=padded_dim(q.shape[3]), V_DIM=v.shape[3], DV_PAD=padded_dim(v.shape[3]),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_stages=launch.stages, num_warps=launch.warps,
        PERMUTED=permuted, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INT64_OFFSETS=needs_int64_offsets(q, v, *tensors),
        **({} if launch.maxnreg is None else {"maxnreg": launch.maxnreg}),
    )


def forward(q, k, v, tiles, ix: IndexTensors, permuted: bool, scale: float, out, lse, causal: bool, overwrite: bool,
            launch: Launch) -> None:
    """One forward launch over the query tiles ``tiles``, merged into (or, ``overwrite``, written to)
    ``(out, lse)``."""
    if tiles.shape[0] == 0:
        return
    meta = launch_meta(q, v, launch, permuted, k, out, lse)
    direct(attention_fwd_kernel)[(tiles.shape[0], q.shape[0] * q.shape[1])](
        q, k, v, out, lse, tiles,
        ix.q_order, ix.k_order, ix.samples, ix.sample_blocks, ix.log_w,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *ix.order_strides, *ix.sample_strides,
        q.shape[1], q.shape[1] // k.shape[1], scale * LOG2E.value, ix.sample_size,
        CAUSAL=causal, HAS_SAMPLES=ix.sample_size > 0, DRAW_WEIGHTS=ix.draw_weights, OVERWRITE=overwrite, **meta,
    )


class KeyTiles(NamedTuple):
    """One dK/dV launch's key-side tiles: block or exact keys (each tile owns its keys), sample slots
    (``samples``: partial sums added atomically), or exact keys in row chunks (``atomic``)."""

    tiles: torch.Tensor
    samples: bool = False
    atomic: bool = False


def backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, ix: IndexTensors, permuted: bool, query_blocks, scale: float,
             dq, dk, dv, causal: bool, overwrite: bool, dq_launch: Launch, dkdv_launch: Launch,
             deterministic: bool = False) -> None:
    """dQ over the query tiles, then dK/dV over each :class:`KeyTiles` of ``k_tiles``; ``overwrite``:
    the dQ and the first key table's kernels write instead of adding (sample slots, later in the
    same stream, always add; atomic exact tiles need their keys zeroed by the caller).
    ``query_blocks()`` gives the sorted queries' key blocks, which the sample slots' kernel reads.

    ``deterministic``: the sample slots' gradients are stored one row per slot (their tiles must
    give each slot one program: one chunk of rows per segment) and added into dk, dv by
    ``index_put_(accumulate=True)``, which PyTorch runs deterministically in deterministic mode,
    instead of by atomics whose order varies between runs."""
    delta = delta.contiguous() if delta.stride() != lse.stride() else delta
    group = q.shape[1] // k.shape[1]
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    scale_log2 = scale * LOG2E.value
    if q_tiles.shape[0]:
        meta = launch_meta(q, v, dq_launch, permuted, k, dout, dq, lse)
        direct(attention_bwd_dq_kernel)[(q_tiles.shape[0], q.shape[0] * q.shape[1])](
            q, k, v, dout, lse, delta, dq, q_tiles,
            ix.q_order, ix.k_order, ix.samples, ix.sample_blocks, ix.log_w,
            *common, *dq.stride(), *ix.order_strides, *ix.sample_strides,
            q.shape[1], group, scale, scale_log2, ix.sample_size,
            CAUSAL=causal, HAS_SAMPLES=ix.sample_size > 0, DRAW_WEIGHTS=ix.draw_weights, OVERWRITE=overwrite,
            **meta,
        )
    for tiles, samples, atomic in k_tiles:
        if tiles.shape[0] == 0:
            continue
        q_blocks = query_blocks() if samples else ix.samples  # unused unless samples
        slot_output = samples and deterministic
        if slot_output:  # one row per (segment, slot), every one written by its one program
            slots = ix.samples.shape[2] * ix.samples.shape[3]
            dk_out = torch.empty(k.shape[0], k.shape[1], slots, k.shape[3], dtype=dk.dtype, device=dk.device)
            dv_out = torch.empty(v.shape[0], v.shape[1], slots, v.shape[3], dtype=dv.dtype, device=dv.device)
        else:
            dk_out, dv_out = dk, dv
        meta = launch_meta(q, v, dkdv_launch, permuted, k, dout, dk_out, dv_out, lse)
        direct(attention_bwd_dkdv_kernel)[(tiles.shape[0], k.shape[0] * k.shape[1])](
            q, k, v, dout, lse, delta, dk_out, dv_out, tiles,
            ix.q_order, ix.k_order, q_blocks, ix.samples, ix.sample_blocks, ix.log_w,
            *common, *dk_out.stride(), *dv_out.stride(), *ix.order_strides, *ix.sample_strides,
            k.shape[1], group, scale, scale_log2,
            CAUSAL=causal and not samples, SAMPLES=samples, OVERWRITE=overwrite and not (samples or atomic),
            SLOT_OUTPUT=slot_output, ATOMIC=atomic and not samples, DRAW_WEIGHTS=ix.draw_weights and samples, **meta,
        )
        if slot_output:
            add_slots(dk, dk_out, ix.samples)
            add_slots(dv, dv_out, ix.samples)


def add_slots(grad, slot_grads, samples) -> None:
    """grad[b, h, samples[b, h, s, j]] += slot_grads[b, h, s * m + j], deterministically (PyTorch's
    sorted accumulation in deterministic mode; duplicate draws add up)."""
    batch, heads = samples.shape[:2]
    keys = samples.reshape(batch, heads, -1).long()
    b = torch.arange(batch, device=grad.device)[:, None, None]
    h = torch.arange(heads, device=grad.device)[None, :, None]
    grad.index_put_((b, h, keys), slot_grads, accumulate=True)
