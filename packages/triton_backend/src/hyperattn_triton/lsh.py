"""LSH hashing, host side: the projections prepared for the hashing kernel (``split_projections``)
and its launch (``lsh_codes``)."""

from __future__ import annotations

import torch

from .kernels.lsh import lsh_codes_kernel, split_projections_kernel
from .launcher import direct
from .launches import LaunchTable, cdiv, launch_for, padded_dim
from .staging import DerivedTensors


def split_projections(projections, dtype, terms: int, d_pad: int, r_pad: int):
    """The projections [D, r] as the LSH kernel reads them, in one launch: zero-padded to
    [d_pad, r_pad], and for ``terms > 0`` as [terms, d_pad, r_pad] in ``dtype`` (fp16/bf16) whose
    fp32 sum is the fp32 projections (see ``kernels.lsh.split_projections_kernel``)."""
    dim, num_projs = projections.shape
    shape, out_dtype = ((terms, d_pad, r_pad), dtype) if terms > 0 else ((d_pad, r_pad), torch.float32)
    out = torch.empty(shape, dtype=out_dtype, device=projections.device)
    direct(split_projections_kernel)[(1,)](projections, out, *projections.stride(), HEAD_DIM=dim, NUM_PROJS=num_projs,
                                   D_PAD=d_pad, R_PAD=r_pad, TERMS=terms, num_warps=1)
    return out


def code_dtype(num_projs: int):
    """The codes' dtype for ``num_projs`` projections."""
    return torch.int32 if num_projs < 32 else torch.int64


def lsh_codes_pair(q, k, projections, launches: LaunchTable, prepared: DerivedTensors):
    """``(lsh_codes(q), lsh_codes(k))`` written into halves of one [2, B, H, N] buffer (q and k of
    one shape [B, H, N, .]), which ``sorting.stacked_codes`` recognises: one sort then covers both."""
    pair = torch.empty(2, *q.shape[:3], dtype=code_dtype(projections.shape[1]), device=q.device)
    return tuple(lsh_codes(x, projections, launches, prepared, out=codes) for x, codes in zip((q, k), pair))


def lsh_codes(x, projections, launches: LaunchTable, prepared: DerivedTensors, out=None):
    """Gray-code ranks of x's sign patterns in one fused launch (projections fp32-accurate, sign
    bits, Gray rank): fp16/bf16 rows through split matrix-unit products (``"lsh_split"``), fp32 rows
    through multiply-and-reduce passes (``"lsh_reduce"``).  ``prepared`` keeps the prepared
    projections per projections tensor (q and k share them); ``out``: [B, H, N] codes to write."""
    batch, heads, n, dim = x.shape
    num_projs = projections.shape[1]
    d_pad, r_pad = padded_dim(dim), padded_dim(num_projs)
    split_launch = launch_for(launches, "lsh_split", dim)
    split = x.dtype in (torch.float16, torch.bfloat16) and split_launch.terms > 0
    launch = split_launch if split else launch_for(launches, "lsh_reduce", dim)
    terms = launch.terms if split else 0
    # q and k share their projections: prepared once per call (and again if changed in place)
    prepared_projections = prepared.get(projections, (x.dtype if split else torch.float32, terms),
                                        lambda: split_projections(projections, x.dtype, terms, d_pad, r_pad))
    codes = torch.empty(batch, heads, n, dtype=code_dtype(num_projs), device=x.device) if out is None else out
    direct(lsh_codes_kernel)[(cdiv(n, launch.block), batch * heads)](
        x, prepared_projections, codes, n, heads, *x.stride(), codes.stride(0), codes.stride(1),
        HEAD_DIM=dim, D_PAD=d_pad, NUM_PROJS=num_projs, R_PAD=r_pad, BLOCK=launch.block,
        SPLIT=terms, num_warps=launch.warps,
    )
    return codes
