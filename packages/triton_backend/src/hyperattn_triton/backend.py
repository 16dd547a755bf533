"""The Triton backend: torch CUDA tensors, fp16/bf16 (fp32 accumulation) and fp32.

Hashing and sorting use torch (a matmul with the r projections, sign bits, Gray rank, one stable
sort per call); every attention piece is one launch of the kernels in ``kernels.py`` over a
host-built tile table.  Inputs are read through their strides, never copied.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (for CI).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import triton

from hyperattn.protocol import Capabilities, Segments, SparseStructure, query_block_bounds, segment_labels

from . import kernels

#: Launch configuration for head dims up to 128 (tuned on an H200, see benchmarks/results/).
TUNING = {"block_m": 128, "block_n": 32, "warps": 4, "stages": 3}
BLOCK_M = TUNING["block_m"]


def block_sizes(head_dim: int, v_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_stages, num_warps): smaller tiles for wide heads so shared memory fits."""
    if max(head_dim, v_dim) > 128:
        return 32, 32, 1, 4
    return TUNING["block_m"], TUNING["block_n"], TUNING["stages"], TUNING["warps"]
MAX_HEAD_DIM = 256
_DTYPES = ("float16", "bfloat16", "float32")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------- tile tables
def exact_tiles(segments: Segments, causal: bool, block_m: int = BLOCK_M) -> np.ndarray:
    """[T, 7] int64 rows (segment, 0, q0, q1, k0, k1, diag) covering every segment's rows."""
    tiles = []
    for s, (qs, qe, ks, ke) in enumerate(segments.table.tolist()):
        diag = ke - qe  # causal, bottom-right aligned: key j is visible to row i when j <= i + diag
        for q0 in range(qs, qe, block_m):
            q1 = min(q0 + block_m, qe)
            k1 = min(ke, q1 - 1 + diag + 1) if causal else ke
            tiles.append((s, 0, q0, q1, ks, k1, diag))
    return np.asarray(tiles, dtype=np.int64).reshape(-1, 7)


def sparse_tiles(structure: SparseStructure, block_m: int = BLOCK_M) -> np.ndarray:
    """[T, 7] int64 rows (segment, block, sorted q0, q1, sorted k0, k1, 0): each block's queries in tiles."""
    tiles = []
    bs = structure.block_size
    for s, (qs, qe, ks, ke) in enumerate(structure.segments.table.tolist()):
        n_q, n_k = qe - qs, ke - ks
        n_blocks = -(-n_k // bs)
        bounds = query_block_bounds(np.arange(n_blocks + 1), bs, n_q, n_k).tolist()
        for blk in range(n_blocks):
            k0, k1 = ks + blk * bs, ks + min((blk + 1) * bs, n_k)
            for r in range(bounds[blk], bounds[blk + 1], block_m):
                tiles.append((s, blk, qs + r, qs + min(r + block_m, bounds[blk + 1]), k0, k1, 0))
    return np.asarray(tiles, dtype=np.int64).reshape(-1, 7)


def _equal_tiling(segments: Segments, n_q: int, causal: bool):
    """(L, n) when the segments are L equal squares tiling all rows [0, n_q), aligned with their keys."""
    table = segments.table
    n = int(table[0, 1] - table[0, 0])
    starts = np.arange(len(table)) * n
    ok = (
        len(table) * n == n_q
        and (table[:, 0] == starts).all()
        and (table[:, 1] - table[:, 0] == n).all()
        and (table[:, 3] - table[:, 2] == n).all()
        and (table[:, 2] - table[:, 0] == table[0, 2]).all()
    )
    if not ok and len(table) == 1 and not causal and table[0, 0] == 0 and table[0, 1] == n_q:
        return 1, n  # one non-causal rectangle over all rows (any key range)
    return (len(table), n) if ok else None


def flash_exact_forward(q, k, v, segments: Segments, causal: bool, scale: float, out, lse) -> bool:
    """Exact pieces through PyTorch's fused flash attention (it returns the log-sum-exp).

    Used when the segments are one rectangle over all rows, or equal causal squares tiling the rows
    (the recursion's leaves), with fp16/bf16, D == Dv <= 256 and as many KV heads as query heads:
    then (heads, segments) fold into one head axis without copies.  Returns False otherwise, and
    the Triton kernel runs instead.
    """
    if interpreting() or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[3] != v.shape[3] or q.shape[3] > MAX_HEAD_DIM or q.shape[1] != k.shape[1]:
        return False
    tiling = _equal_tiling(segments, q.shape[2], causal)
    if tiling is None:
        return False
    count, n = tiling
    k_start, k_end = int(segments.k_start[0]), int(segments.k_end[-1])
    batch, heads = q.shape[:2]
    try:
        n_k = (k_end - k_start) // count
        folded = [x.view(batch, heads * count, n if x is q else n_k, x.shape[3]) for x in (q, k[:, :, k_start:k_end], v[:, :, k_start:k_end])]
        out_view = out.view(batch, heads * count, n, out.shape[3])
        lse_view = lse.view(batch, heads * count, n)
    except RuntimeError:  # strides that do not fold
        return False
    o, row_lse = torch.ops.aten._scaled_dot_product_flash_attention(*folded, 0.0, causal, False, scale=scale)[:2]
    fresh = lse_view == -torch.inf
    if bool(fresh.all()):  # the usual case (exact pieces run first): no merge, no fp32 temporaries
        out_view.copy_(o)
        lse_view.copy_(row_lse)
        return True
    total = torch.logaddexp(lse_view, row_lse)
    keep = torch.where(fresh, 0.0, torch.exp(lse_view - total))
    add = torch.exp(row_lse - total)
    merged = out_view * keep[..., None] + o.float() * add[..., None]
    out_view.copy_(torch.where(fresh[..., None], o.float(), merged))
    lse_view.copy_(total)
    return True


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class TritonBackend:
    name = "triton"
    capabilities = Capabilities(
        array_types=("torch",),
        devices=("cuda",),
        dtypes=_DTYPES,
        max_head_dim=MAX_HEAD_DIM,
        priority=10,
        notes="Triton kernels on NVIDIA GPUs; fp16/bf16 with fp32 accumulation, fp32 exact (no tf32).",
    )

    def __init__(self):
        if interpreting():  # CPU tensors are accepted then, but "auto" must still prefer the reference
            self.capabilities = dataclasses.replace(self.capabilities, devices=("cuda", "cpu"), priority=-1)

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
        """One fused launch: x (any float dtype) times the fp32 projections, sign bits, Gray rank."""
        batch, heads, n, dim = x.shape
        num_projs = projections.shape[1]
        r_pad = _pad(num_projs)
        padded = torch.zeros(dim, r_pad, dtype=torch.float32, device=x.device)
        padded[:, :num_projs] = projections.to(torch.float32)
        codes = torch.empty(batch, heads, n, dtype=torch.int64, device=x.device)
        block = 128
        kernels.lsh_codes_kernel[(triton.cdiv(n, block), batch * heads)](
            x, padded, codes, n, heads, *x.stride(), codes.stride(0), codes.stride(1),
            HEAD_DIM=dim, D_PAD=_pad(dim), NUM_PROJS=num_projs, R_PAD=r_pad, BLOCK=block,
        )
        return codes

    def segment_sort(self, codes, starts: np.ndarray, ends: np.ndarray):
        n = codes.shape[-1]
        labels = torch.from_numpy(segment_labels(n, starts, ends)).to(codes.device)
        _, order = torch.sort((labels << 32) + codes, dim=-1, stable=True)
        positions = torch.arange(n, device=codes.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions - labels)
        return order, rank

    # -- kernels --------------------------------------------------------------------------------
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse):
        if flash_exact_forward(q, k, v, segments, bool(causal), scale, out, lse):
            return
        tiles = exact_tiles(segments, causal, block_sizes(q.shape[3], v.shape[3])[0])
        self._forward(q, k, v, tiles, None, scale, out, lse, causal=bool(causal))

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse):
        tiles = sparse_tiles(structure, block_sizes(q.shape[3], v.shape[3])[0])
        self._forward(q, k, v, tiles, structure, scale, out, lse, causal=False)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv):
        tiles = exact_tiles(segments, causal, block_sizes(q.shape[3], v.shape[3])[0])
        self._backward(q, k, v, lse, dout, delta, tiles, None, scale, dq, dk, dv, bool(causal))

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv):
        tiles = sparse_tiles(structure, block_sizes(q.shape[3], v.shape[3])[0])
        self._backward(q, k, v, lse, dout, delta, tiles, structure, scale, dq, dk, dv, False)

    # -- launches -------------------------------------------------------------------------------
    def _common(self, q, k, v, tiles, structure, scale):
        device = q.device
        dummy = torch.zeros(1, dtype=torch.int64, device=device)
        if structure is None:
            q_order = k_order = k_rank = samples = dummy
            log_w = torch.zeros(1, dtype=torch.float32, device=device)
            order_strides, sample_strides, block_size, m = (0, 0, 0, 0), (0, 0, 0), 1, 0
        else:
            q_order, k_order, k_rank = structure.q_order, structure.k_order, structure.k_rank
            samples = structure.samples if structure.samples is not None else dummy
            log_w = torch.from_numpy(np.asarray(structure.log_sample_weight, dtype=np.float32)).to(device)
            order_strides = (q_order.stride(0), q_order.stride(1), k_order.stride(0), k_order.stride(1))
            sample_strides = samples.stride()[:3] if structure.samples is not None else (0, 0, 0)
            block_size, m = structure.block_size, structure.sample_size
        block_m, block_n, stages, warps = block_sizes(q.shape[3], v.shape[3])
        meta = dict(
            HEAD_DIM=q.shape[3], D_PAD=_pad(q.shape[3]), V_DIM=v.shape[3], DV_PAD=_pad(v.shape[3]),
            BLOCK_M=block_m, BLOCK_N=block_n, num_stages=stages, num_warps=warps, PERMUTED=structure is not None,
            HAS_SAMPLES=structure is not None and m > 0,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
        tile_table = torch.from_numpy(tiles).to(device)
        grid = (len(tiles), q.shape[0] * q.shape[1])
        args = (tile_table, q_order, k_order, k_rank, samples, log_w)
        return args, order_strides, sample_strides, block_size, m, meta, grid

    def _forward(self, q, k, v, tiles, structure, scale, out, lse, causal):
        if len(tiles) == 0:
            return
        args, order_strides, sample_strides, block_size, m, meta, grid = self._common(q, k, v, tiles, structure, scale)
        kernels.attention_fwd_kernel[grid](
            q, k, v, out, lse, *args,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            *order_strides, *sample_strides,
            q.shape[1], q.shape[1] // k.shape[1], scale * kernels.LOG2E, block_size, m,
            CAUSAL=causal, **meta,
        )

    def _backward(self, q, k, v, lse, dout, delta, tiles, structure, scale, dq, dk, dv, causal):
        if len(tiles) == 0:
            return
        args, order_strides, sample_strides, block_size, m, meta, grid = self._common(q, k, v, tiles, structure, scale)
        delta = delta.contiguous() if delta.stride() != lse.stride() else delta
        kernels.attention_bwd_kernel[grid](
            q, k, v, dout, lse, delta, dq, dk, dv, *args,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            *order_strides, *sample_strides,
            q.shape[1], q.shape[1] // k.shape[1], scale, scale * kernels.LOG2E, block_size, m,
            CAUSAL=causal, **meta,
        )
