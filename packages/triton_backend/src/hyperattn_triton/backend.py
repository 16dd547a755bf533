"""The Triton backend: torch CUDA tensors, fp16/bf16 (fp32 accumulation) and fp32.

Hashing is one fused kernel (projections, sign bits, Gray rank) and sorting a counting sort
(``sorting.py``); every attention piece is one launch of the kernels in ``kernels.py`` over a tile
table (``tiles.py``) built on the host and copied to the GPU once per shape.  Inputs are read
through their strides, never copied.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (for CI).
"""

from __future__ import annotations

import dataclasses
import os
import weakref

import numpy as np
import torch
import torch.nn.attention
import triton

from hyperattn._arrays import host_to_device
from hyperattn.algorithm import merge_partial
from hyperattn.protocol import Capabilities, Segments, SparseStructure

from . import kernels, sorting
from . import tiles as tile_tables
from .tiles import (
    DerivedTensors,
    exact_key_tiles,
    exact_tiles,
    log_sample_weights,
    on_device,
    query_blocks,
    sample_key_tiles,
    sparse_key_tiles,
    sparse_tiles,
)

#: Launch configurations for head dims up to 128 (tuned on an H200, see benchmarks/results/):
#: the dQ kernel walks query tiles of ``block_m`` rows in steps of ``block_n`` keys, the forward
#: the same tiles in steps of ``fwd_block_n`` keys with its registers capped at ``fwd_maxnreg``
#: (3 programs per SM instead of 2, and twice the steps per loop: 6% faster,
#: benchmarks/results/experiments_2026-11-28c/); the dK/dV kernel walks key tiles of
#: ``kv_block_n`` keys in steps of ``kv_block_m`` rows.
TUNING = {"block_m": 128, "block_n": 64, "warps": 4, "stages": 3,
          "fwd_block_n": 32, "fwd_stages": 5, "fwd_maxnreg": 168,
          "kv_block_n": 128, "kv_block_m": 32, "kv_warps": 4, "kv_stages": 3}
#: (keys, rows) below which exact attention (cuDNN) beats this backend's HyperAttention on an
#: H200 (non-causal calls by their keys, causal calls by their rows): such calls run exactly.
#: Measured with scripts/gpu_crossover.py; set to (0, 0) to always approximate above min_seq_len.
EXACT_BELOW = (16384, 40960)
#: SDPA kernels for whole exact calls, fastest first on Hopper.
SDPA_ORDER = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION, torch.nn.attention.SDPBackend.FLASH_ATTENTION,
              torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]


def sdpa_in_order(q, k, v, causal: bool, scale: float):
    """SDPA with SDPA_ORDER's kernels tried first (cuDNN, unlike PyTorch's default order), then the
    rest in PyTorch's order.  Only the priority changes, for this call: the kernels a user disabled
    stay disabled.  Two C calls instead of ``sdpa_kernel(..., set_priority=True)`` (~15 us of
    Python, which short host-bound calls feel)."""
    previous = torch._C._get_sdp_priority_order()
    first = [int(backend) for backend in SDPA_ORDER]
    torch._C._set_sdp_priority_order(first + [backend for backend in previous if backend not in first])
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    finally:
        torch._C._set_sdp_priority_order(previous)


#: The LSH hashing kernel's rows per program and warps: fp16/bf16 inputs as ``split`` matrix-unit
#: products (``terms`` of ``split_projections``; 155 us per 131072 x 32 x 64 bf16 tensor on an
#: H200 against 263 us for the reduce passes: experiments_2026-11-28c/sort_launches), fp32 ones as
#: multiply-and-reduce passes (``reduce``; benchmarks/results/lsh_tuning_h200.txt).  An fp32
#: ``tl.dot`` (ieee) ran at half the reduce passes' speed (benchmarks/results/micro_h200_cd0fbf2.txt).
LSH_LAUNCH = {"split": {"block": 128, "warps": 2, "terms": 3}, "reduce": {"block": 128, "warps": 2}}
#: Rows per program of the backward's delta kernel and of the widening copy (``cast_into``).
ROW_DOT_BLOCK = 64
CAST_BLOCK = 64
#: CUDA's limit on a launch grid's second axis (batch x heads in these kernels).
MAX_GRID_Y = 65535


@dataclasses.dataclass(frozen=True)
class Launch:
    block_m: int
    block_n: int
    stages: int
    warps: int
    #: registers per thread at most (ptxas spills beyond): fewer registers, more programs per SM
    maxnreg: int | None = None


#: Launches for 64 < D <= 128 (padded to 128), from H200 sweeps at N = 131072, H = 32, bf16
#: (benchmarks/results/h200_d095354_d128, h200_1cb7937_d128: ``scripts/gpu_tune.py {forward,dq,key}
#: 131072 128``).  TUNING's, tuned at D = 64, spill at D = 128 (sm_90 ptxas: forward 400 B of stack,
#: dQ 720 B, dK/dV 2464 B).  The dK/dV launch keeps 64 x 128 tiles on 8 warps although ptxas spills
#: up to 80 B there: 27.5 / 107.4 ms per fwd+bwd step (non-causal / causal) against 28.5 / 109.9 ms
#: for the fastest launch without spills (32 x 128) and 39.7 / 134.9 ms for the previous one.
WIDE_HEAD_LAUNCHES = {"forward": Launch(128, 32, 3, 4), "dq": Launch(64, 64, 3, 4), "key": Launch(64, 128, 2, 8)}
#: Above D = 128: small tiles, so that shared memory fits.
WIDEST_HEAD_LAUNCH = Launch(32, 32, 1, 4)


def _wide_head_launch(kernel: str, head_dim: int, v_dim: int) -> Launch | None:
    """``kernel``'s launch for heads wider than 64, or None for the tuned ones (TUNING)."""
    widest = max(head_dim, v_dim)
    if widest <= 64:
        return None
    return WIDE_HEAD_LAUNCHES[kernel] if widest <= 128 else WIDEST_HEAD_LAUNCH


def forward_launch(head_dim: int, v_dim: int) -> Launch:
    """Forward: query tiles of ``block_m`` rows in steps of ``block_n`` keys."""
    return _wide_head_launch("forward", head_dim, v_dim) or Launch(
        TUNING["block_m"], TUNING["fwd_block_n"], TUNING["fwd_stages"], TUNING["warps"], TUNING["fwd_maxnreg"])


def dq_launch(head_dim: int, v_dim: int) -> Launch:
    """dQ (its own query tiles: they need not be the forward's)."""
    return _wide_head_launch("dq", head_dim, v_dim) or Launch(
        TUNING["block_m"], TUNING["block_n"], TUNING["stages"], TUNING["warps"])


def key_launch(head_dim: int, v_dim: int) -> Launch:
    """dK/dV: key tiles of ``block_n`` keys in steps of ``block_m`` rows."""
    return _wide_head_launch("key", head_dim, v_dim) or Launch(
        TUNING["kv_block_m"], TUNING["kv_block_n"], TUNING["kv_stages"], TUNING["kv_warps"])


MAX_HEAD_DIM = 256
_DTYPES = ("float16", "bfloat16", "float32")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


#: Bytes of gradients one fused backward call of exact pieces produces at most (it is chunked over
#: heads and segments beyond that): they sit next to the fp32 accumulators at the memory peak.
FUSED_BACKWARD_CHUNK_BYTES = 256 << 20
#: PyTorch's fused kernels that return the log-sum-exp, fastest first (cuDNN's is about 1.5x
#: FlashAttention-2's on Hopper); a kernel that rejects the shapes passes to the next.
FUSED_KERNELS = ["cudnn", "flash"]


def _first_fused(cudnn, flash):
    """``cudnn()`` or ``flash()``, whichever comes first in FUSED_KERNELS and accepts the inputs
    (cuDNN raises RuntimeError on shapes or layouts it does not take, and may be disabled)."""
    for name in FUSED_KERNELS:
        if name == "cudnn" and torch.backends.cuda.cudnn_sdp_enabled():
            try:
                return cudnn()
            except RuntimeError:
                continue
        if name == "flash":
            return flash()
    raise RuntimeError(f"no fused attention kernel among {FUSED_KERNELS}")


def _fused_attention(q, k, v, causal: bool, scale: float):
    """(out, lse) of exact attention through the first of FUSED_KERNELS that accepts the inputs."""
    return _first_fused(
        lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2],
        lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2])


def _fold(segments: Segments, causal: bool, q, k, v, query_side=(), key_side=()):
    """Views of the exact segments as one batched attention, or None when they do not fold.

    They fold when the segments are one rectangle over all rows, or equal causal squares tiling
    the rows (the recursion's leaves), with fp16/bf16, D == Dv <= 256 and as many KV heads as query
    heads: then (heads, segments) merge into one head axis without copies.  Returns
    ``(q, k, v, *query_side, *key_side)`` as [B, H * S, n, .] views (``query_side`` arrays have
    q's rows, ``key_side`` arrays k's keys), or None.
    """
    if interpreting() or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if q.shape[3] != v.shape[3] or q.shape[3] > MAX_HEAD_DIM or q.shape[1] != k.shape[1]:
        return None
    tiling = segments.equal_tiling(q.shape[2], causal)
    return None if tiling is None else fold_views(tiling, q, k, v, query_side, key_side)


def fold_views(tiling, q, k, v, query_side=(), key_side=()):
    """``(q, k, v, *query_side, *key_side)`` folded by ``tiling`` (see ``_fold``), or None unless
    every one is a view: outputs are written through them, and inputs are not to be copied."""
    sources = (q, *query_side, k, v, *key_side)
    rows = [tiling.fold_rows(x) for x in (q, *query_side)]
    keys = [tiling.fold_keys(x) for x in (k, v, *key_side)]
    if any(f.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for f, x in zip(rows + keys, sources)):
        return None  # strides that do not fold
    return (rows[0], keys[0], keys[1], *rows[1:], *keys[2:])


def split_projections(projections, dtype, terms: int, d_pad: int, r_pad: int):
    """The projections [D, r] as the LSH kernel reads them, in one launch: zero-padded to
    [d_pad, r_pad], and for ``terms > 0`` as [terms, d_pad, r_pad] in ``dtype`` (fp16/bf16) whose
    fp32 sum is the fp32 projections (see ``kernels.split_projections_kernel``)."""
    dim, num_projs = projections.shape
    shape, out_dtype = ((terms, d_pad, r_pad), dtype) if terms > 0 else ((d_pad, r_pad), torch.float32)
    out = torch.empty(shape, dtype=out_dtype, device=projections.device)
    kernels.split_projections_kernel[(1,)](projections, out, *projections.stride(), HEAD_DIM=dim, NUM_PROJS=num_projs,
                                           D_PAD=d_pad, R_PAD=r_pad, TERMS=terms, num_warps=1)
    return out


def torch_cast_into(dst, src, add: bool = False) -> None:
    """``dst[...] = src`` (``add``: ``dst += src``) through PyTorch."""
    if add:
        dst += src
    else:
        dst.copy_(src)


def cast_into(dst, src, add: bool = False) -> None:
    """``dst[...] = src`` (``add``: ``dst += src``) for [B, H, N, D] views, in one vectorised launch
    when the dtypes differ on a GPU (PyTorch's widening copy runs at about half the bandwidth)."""
    plain = src.dtype == dst.dtype or interpreting() or not dst.is_cuda
    if plain or src.shape != dst.shape or dst.dim() != 4 or dst.shape[0] * dst.shape[1] > MAX_GRID_Y:
        torch_cast_into(dst, src, add)
        return
    batch, heads, n, dim = dst.shape
    kernels.cast_rows_kernel[(triton.cdiv(n, CAST_BLOCK), batch * heads)](
        src, dst, n, heads, *src.stride(), *dst.stride(), DIM=dim, D_PAD=_pad(dim), BLOCK=CAST_BLOCK, ADD=add,
        num_warps=4,
    )


def flash_exact_forward(q, k, v, segments: Segments, causal: bool, scale: float, out, lse, fresh: bool = False) -> bool:
    """Exact pieces through PyTorch's fused attention (which returns the log-sum-exp), merged into
    ``(out, lse)`` (copied when ``fresh``: no earlier piece wrote).  Returns False when the segments
    do not fold (see ``_fold``); the Triton kernel runs instead."""
    folded = _fold(segments, causal, q, k, v, query_side=(out, lse))
    if folded is None:
        return False
    qf, kf, vf, out_view, lse_view = folded
    o, row_lse = _fused_attention(qf, kf, vf, causal, scale)
    row_lse = row_lse.reshape(lse_view.shape)
    if fresh:  # the usual case (exact pieces run first): no merge, no fp32 temporaries
        if not _adopt_storage(out, out_view, o):
            cast_into(out_view, o)
        lse_view.copy_(row_lse)
    else:
        merge_partial(out_view, lse_view, o, row_lse)
    return True


def _adopt_storage(whole, view, result) -> bool:
    """Point ``whole`` at ``result``'s memory instead of copying ``result`` into ``view`` (a view of
    all of ``whole``) when both lay the same elements out alike: a causal call's leaves are its
    first piece, and their output is already the running output (a 0.5 GB copy at N=131072)."""
    same_layout = (
        result.dtype == whole.dtype and result.shape == view.shape and result.stride() == view.stride()
        and result.storage_offset() == 0 and view.storage_offset() == 0 and whole.is_contiguous()
        and result.untyped_storage().nbytes() >= whole.untyped_storage().nbytes()
    )
    if same_layout:
        whole.set_(result.untyped_storage(), 0, whole.shape, whole.stride())
    return same_layout


def flash_exact_backward(q, k, v, out, lse, dout, segments: Segments, causal: bool, scale: float, dq, dk, dv,
                         fresh: bool = False) -> bool:
    """This piece's gradients through PyTorch's fused backward (cuDNN's, else FlashAttention-2's),
    added to ``dq, dk, dv`` (copied into them when ``fresh``).

    Given the *final* ``out`` and ``lse`` it computes ``P = exp(S - lse)`` and
    ``delta = rowsum(dout * out)``: exactly this piece's share of the whole call's gradient (the
    usual trick of ring attention), so only without a log-sum-exp gradient.  Returns False when
    the segments do not fold.
    """
    if out is None:
        return False
    folded = _fold(segments, causal, q, k, v, query_side=(out, dout, lse, dq), key_side=(dk, dv))
    if folded is None:
        return False
    qf, kf, vf, out_f, dout_f, lse_f, dq_f, dk_f, dv_f = folded
    out_f, dout_f = out_f.to(q.dtype), dout_f.to(q.dtype)  # the kernel's dtype (dout came from it)
    # in chunks of (head, segment) pairs: the fused kernel's own gradients (and workspace) for the
    # whole call would sit next to our fp32 accumulators, at the backward's memory peak
    per_head = sum(x[:, :1].numel() * x.element_size() for x in (qf, kf, vf))
    step = max(1, FUSED_BACKWARD_CHUNK_BYTES // max(per_head, 1))
    for h0 in range(0, qf.shape[1], step):
        part = slice(h0, h0 + step)
        grads = _fused_attention_backward(qf[:, part], kf[:, part], vf[:, part], out_f[:, part], dout_f[:, part],
                                          lse_f[:, part].contiguous(), causal, scale)
        for acc, grad in zip((dq_f[:, part], dk_f[:, part], dv_f[:, part]), grads):
            cast_into(acc, grad, add=not fresh)
        del grads
    return True


def _fused_attention_backward(q, k, v, out, dout, lse, causal: bool, scale: float):
    """(dq, dk, dv) of exact attention through the first of FUSED_KERNELS that accepts the inputs,
    given out and lse (which may be the final ones of a larger call)."""
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout is off: never read
    n_q, n_k = q.shape[2], k.shape[2]
    return _first_fused(
        lambda: torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, n_q, n_k, 0.0, causal, scale=scale),
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, n_q, n_k, 0.0, causal, seed, seed, scale=scale))


def _segment_labels(positions, starts: np.ndarray, ends: np.ndarray):
    """protocol.segment_labels computed on the device (no large host-to-device copy)."""
    if len(starts) == 0:
        return positions
    bounds = host_to_device(np.stack([starts, ends]).astype(np.int64), positions)
    owner = (torch.searchsorted(bounds[0], positions, right=True) - 1).clamp_(min=0)
    inside = (positions >= bounds[0][owner]) & (positions < bounds[1][owner])
    return torch.where(inside, bounds[0][owner], positions)


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _wide(*tensors) -> bool:
    """True when an element offset inside one (batch, head) slice of a tensor may reach 2**31:
    the kernels then index in int64 (else int32, which needs fewer registers)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(x.shape[2:], x.stride()[2:])) >= 2**31 - 1 for x in tensors)


class TritonBackend:
    name = "triton"
    capabilities = Capabilities(
        array_types=("torch",),
        devices=("cuda",),
        dtypes=_DTYPES,
        max_head_dim=MAX_HEAD_DIM,
        priority=10,
        # a causal call's fp32 running output cost 1.1 GB of reads and writes per recursion level at
        # N=131072 (B=1, H=32, D=64), plus a widening and a narrowing copy of the whole output
        running_out_dtype="input",
        notes="Triton kernels on NVIDIA GPUs; fp16/bf16 with fp32 accumulation, fp32 exact (no tf32).",
    )

    def __init__(self):
        self._index_cache = weakref.WeakKeyDictionary()  # SparseStructure -> its device index tensors
        self._projections = DerivedTensors()  # projections -> {(dtype, terms): prepared}
        if interpreting():  # CPU tensors are accepted then, but "auto" must still prefer the reference
            self.capabilities = dataclasses.replace(self.capabilities, devices=("cuda", "cpu"), priority=-1)
        else:
            self.capabilities = dataclasses.replace(self.capabilities, exact_below=EXACT_BELOW)

    def fused_attention(self, q, k, v, *, causal: bool, scale: float):
        """A whole exact call through PyTorch SDPA (cuDNN or FlashAttention, with its own backward):
        as fast as SDPA itself wherever HyperAttention computes exactly.  None where SDPA's
        conventions differ (GQA, causal with Nq != Nk: SDPA aligns the mask top-left)."""
        if interpreting() or not q.is_cuda or q.shape[1] != k.shape[1] or (causal and q.shape[2] != k.shape[2]):
            return None
        return sdpa_in_order(q, k, v, causal, scale)

    def version(self) -> str:
        from . import __version__

        return f"{__version__} (triton {triton.__version__}, torch {torch.__version__})"

    def unsupported_reason(self, array_type, device, dtype, head_dims):
        if array_type != "torch":
            return f"needs torch tensors, got {array_type} arrays"
        if not device.startswith("cuda") and not (interpreting() and device == "cpu"):
            return f"runs on CUDA GPUs, inputs are on {device}"
        if device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported {_DTYPES}"
        if max(head_dims) > MAX_HEAD_DIM:
            return f"head dims up to {MAX_HEAD_DIM} are supported, got D={head_dims[0]}, Dv={head_dims[1]}"
        return None

    # -- arrays ---------------------------------------------------------------------------------
    def to_native(self, x):
        return x.detach()

    def from_native(self, y, like, dtype: str | None = None):
        return y.to(like.dtype if dtype is None else getattr(torch, dtype))

    # -- structure ------------------------------------------------------------------------------
    def lsh_codes(self, x, projections):
        """One fused launch: x times the projections (fp32-accurate), sign bits, Gray rank."""
        batch, heads, n, dim = x.shape
        num_projs = projections.shape[1]
        d_pad, r_pad = _pad(dim), _pad(num_projs)
        split = x.dtype in (torch.float16, torch.bfloat16) and LSH_LAUNCH["split"]["terms"] > 0
        launch = LSH_LAUNCH["split" if split else "reduce"]
        terms = launch["terms"] if split else 0
        # q and k share their projections: prepared once per call (and again if changed in place)
        prepared = self._projections.get(projections, (x.dtype if split else torch.float32, terms),
                                         lambda: split_projections(projections, x.dtype, terms, d_pad, r_pad))
        code_dtype = torch.int32 if num_projs < 32 else torch.int64
        codes = torch.empty(batch, heads, n, dtype=code_dtype, device=x.device)
        kernels.lsh_codes_kernel[(triton.cdiv(n, launch["block"]), batch * heads)](
            x, prepared, codes, n, heads, *x.stride(), codes.stride(0), codes.stride(1),
            HEAD_DIM=dim, D_PAD=d_pad, NUM_PROJS=num_projs, R_PAD=r_pad, BLOCK=launch["block"],
            SPLIT=terms, num_warps=launch["warps"],
        )
        return codes

    def segment_sort(self, codes, starts: np.ndarray, ends: np.ndarray, code_bits: int = 64):
        """int32 (order, rank): a counting sort for codes of up to ``sorting.MAX_BITS`` bits (see
        sorting.py), else one stable torch sort of ``(segment label, code)`` keys."""
        counted = sorting.counting_segment_sort(codes, starts, ends, code_bits)
        if counted is not None:
            return counted
        n = codes.shape[-1]
        positions = torch.arange(n, device=codes.device)
        labels = _segment_labels(positions, starts, ends)
        if code_bits < 31 and (n << code_bits) < 2**31:
            keys = (labels.to(torch.int32) << code_bits) + codes.to(torch.int32)
        else:  # labels < 2**31 above any 32-bit code
            keys = (labels << 32) + codes
        _, order = torch.sort(keys, dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, (positions - labels).expand_as(order))
        return order.to(torch.int32), rank.to(torch.int32)

    def row_dot(self, a, b):
        """float32 [B, H, N]: ``sum(a * b, -1)`` of two [B, H, N, D] tensors in one launch (the
        backward's delta), without fp32 copies of either."""
        batch, heads, n, dim = a.shape
        result = torch.empty(batch, heads, n, dtype=torch.float32, device=a.device)
        block = ROW_DOT_BLOCK
        kernels.row_dot_kernel[(triton.cdiv(n, block), batch * heads)](
            a, b, result, n, heads, *a.stride(), *b.stride(), *result.stride(),
            DIM=dim, D_PAD=_pad(dim), BLOCK=block, num_warps=4,
        )
        return result

    # -- kernels --------------------------------------------------------------------------------
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse, *, fresh=False):
        if flash_exact_forward(q, k, v, segments, bool(causal), scale, out, lse, fresh):
            return
        tiles = on_device(exact_tiles, q, segments, bool(causal), forward_launch(q.shape[3], v.shape[3]).block_m)
        self._forward(q, k, v, tiles, None, scale, out, lse, bool(causal), fresh)

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse, *, fresh=False):
        tiles = on_device(sparse_tiles, q, structure, forward_launch(q.shape[3], v.shape[3]).block_m)
        self._forward(q, k, v, tiles, structure, scale, out, lse, False, fresh)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv, out=None, *,
                       fresh=False):
        causal = bool(causal)
        if flash_exact_backward(q, k, v, out, lse, dout, segments, causal, scale, dq, dk, dv, fresh):
            return
        q_tiles = on_device(exact_tiles, q, segments, causal, dq_launch(q.shape[3], v.shape[3]).block_m)
        k_tiles = on_device(exact_key_tiles, q, segments, causal, key_launch(q.shape[3], v.shape[3]).block_n, fresh)
        self._backward(q, k, v, lse, dout, delta, q_tiles, [(k_tiles, False)], None, scale, dq, dk, dv, causal, fresh)

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv, *,
                        fresh=False):
        q_tiles = on_device(sparse_tiles, q, structure, dq_launch(q.shape[3], v.shape[3]).block_m)
        block_n = key_launch(q.shape[3], v.shape[3]).block_n
        # fresh: blocks without queries too, so that every key of the segments is written
        k_tiles = [(on_device(sparse_key_tiles, q, structure, block_n, fresh), False)]
        if structure.sample_size > 0:
            row_chunk = tile_tables.SAMPLE_ROW_CHUNK
            k_tiles.append((on_device(sample_key_tiles, q, structure, block_n, row_chunk), True))
        self._backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, False, fresh)

    # -- launches -------------------------------------------------------------------------------
    def _indices(self, q, structure):
        """The structure's index tensors as the kernels read them (int32), plus their strides;
        made once per structure (its forward and backward share them)."""
        if structure is None:
            return self._make_indices(q, None)
        cached = self._index_cache.get(structure)
        if cached is None:
            cached = self._index_cache[structure] = self._make_indices(q, structure)
        return cached

    def _query_blocks(self, q, structure):
        """int32 [Nq] on the device: see ``query_blocks`` (cached with the structure's indices)."""
        ix = self._indices(q, structure)
        if "q_blocks" not in ix:
            ix["q_blocks"] = on_device(query_blocks, q, structure, q.shape[2])
        return ix["q_blocks"]

    def _make_indices(self, q, structure):
        device = q.device
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        if structure is None:
            log_w = torch.zeros(1, dtype=torch.float32, device=device)
            return dict(q_order=dummy, k_order=dummy, samples=dummy, sample_blocks=dummy, log_w=log_w,
                        order_strides=(0, 0, 0, 0), sample_strides=(0, 0, 0), m=0)
        q_order = structure.q_order.to(torch.int32)
        k_order = structure.k_order.to(torch.int32)
        samples = sample_blocks = dummy
        sample_strides = (0, 0, 0)
        if structure.samples is not None:
            samples = structure.samples.to(torch.int32).contiguous()  # the kernels read both with its strides
            batch, kv_heads, segments, m = samples.shape
            sample_blocks = torch.empty(samples.shape, dtype=torch.int32, device=device)
            kernels.sample_blocks_kernel[(batch * kv_heads,)](
                samples, structure.k_rank, sample_blocks, segments * m, kv_heads, *samples.stride()[:2],
                *structure.k_rank.stride(), structure.block_size, BLOCK=1024, num_warps=4)
            sample_strides = samples.stride()[:3]
        log_w = on_device(log_sample_weights, q, structure)
        return dict(q_order=q_order, k_order=k_order, samples=samples, sample_blocks=sample_blocks, log_w=log_w,
                    order_strides=(*q_order.stride()[:2], *k_order.stride()[:2]), sample_strides=sample_strides,
                    m=structure.sample_size)

    @staticmethod
    def _meta(q, v, launch: Launch, permuted: bool, *tensors):
        return dict(
            HEAD_DIM=q.shape[3], D_PAD=_pad(q.shape[3]), V_DIM=v.shape[3], DV_PAD=_pad(v.shape[3]),
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_stages=launch.stages, num_warps=launch.warps,
            PERMUTED=permuted, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", WIDE=_wide(q, v, *tensors),
            **({} if launch.maxnreg is None else {"maxnreg": launch.maxnreg}),
        )

    def _forward(self, q, k, v, tiles, structure, scale, out, lse, causal, fresh):
        if len(tiles) == 0:
            return
        ix = self._indices(q, structure)
        meta = self._meta(q, v, forward_launch(q.shape[3], v.shape[3]), structure is not None, k, out, lse)
        kernels.attention_fwd_kernel[(len(tiles), q.shape[0] * q.shape[1])](
            q, k, v, out, lse, tiles,
            ix["q_order"], ix["k_order"], ix["samples"], ix["sample_blocks"], ix["log_w"],
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            *ix["order_strides"], *ix["sample_strides"],
            q.shape[1], q.shape[1] // k.shape[1], scale * kernels.LOG2E, ix["m"],
            CAUSAL=causal, HAS_SAMPLES=ix["m"] > 0, FRESH=fresh, **meta,
        )

    def _backward(self, q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, causal, fresh):
        """dQ over the query tiles, then dK/dV over each (key tiles, are they sample slots) table;
        ``fresh``: the dQ and the first key table's kernels write instead of adding (sample slots,
        later in the same stream, always add)."""
        ix = self._indices(q, structure)
        delta = delta.contiguous() if delta.stride() != lse.stride() else delta
        group = q.shape[1] // k.shape[1]
        common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
        if len(q_tiles):
            meta = self._meta(q, v, dq_launch(q.shape[3], v.shape[3]), structure is not None, k, dout, dq, lse)
            kernels.attention_bwd_dq_kernel[(len(q_tiles), q.shape[0] * q.shape[1])](
                q, k, v, dout, lse, delta, dq, q_tiles,
                ix["q_order"], ix["k_order"], ix["samples"], ix["sample_blocks"], ix["log_w"],
                *common, *dq.stride(), *ix["order_strides"], *ix["sample_strides"],
                q.shape[1], group, scale, scale * kernels.LOG2E, ix["m"],
                CAUSAL=causal, HAS_SAMPLES=ix["m"] > 0, FRESH=fresh, **meta,
            )
        meta = self._meta(q, v, key_launch(q.shape[3], v.shape[3]), structure is not None, k, dout, dk, dv, lse)
        for tiles, samples in k_tiles:
            if len(tiles) == 0:
                continue
            q_blocks = self._query_blocks(q, structure) if samples else ix["samples"]  # unused unless samples
            kernels.attention_bwd_dkdv_kernel[(len(tiles), k.shape[0] * k.shape[1])](
                q, k, v, dout, lse, delta, dk, dv, tiles,
                ix["q_order"], ix["k_order"], q_blocks, ix["samples"], ix["sample_blocks"], ix["log_w"],
                *common, *dk.stride(), *dv.stride(), *ix["order_strides"], *ix["sample_strides"],
                k.shape[1], group, scale, scale * kernels.LOG2E,
                CAUSAL=causal and not samples, SAMPLES=samples, FRESH=fresh and not samples, **meta,
            )
