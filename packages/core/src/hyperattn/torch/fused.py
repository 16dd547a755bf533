"""Exact attention through PyTorch's fused kernels (cuDNN, FlashAttention), for GPU backends.

Public for backend authors, like :mod:`hyperattn.kernel_utils`: the Triton and CuPy backends both
send exact pieces here when their inputs are torch CUDA tensors.

* :func:`whole_exact_call` / :func:`sdpa_in_order`: a whole exact call through SDPA, the given
  kernels first.
* :func:`fused_exact_forward` / :func:`fused_exact_backward`: exact pieces whose segments fold
  into the batch axes (see :func:`fold`) through the fused kernels that return the log-sum-exp
  (first of ``kernels`` that accepts the inputs), merged into the running output or added into the
  gradients.  They return False where the backend's own kernels must run.

Arguments are torch tensors [B, H, N, D] (lse [B, H, N] float32); a backend whose arrays are not
torch passes torch views of them (DLPack), and a ``cast_into`` that writes through torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.attention

from ..kernel_utils import merge_partial
from ..protocol import Segments, StridedTiling
from .kernel_names import FUSED_KERNELS, SDPA_KERNELS  # noqa: F401  (re-exported)

#: The widest head the fused kernels take.
MAX_FUSED_HEAD_DIM = 256
#: The fused kernels' inputs' alignment, in bytes (cuDNN's SDPA reads a tensor at an address off
#: it from the address rounded down: it is given aligned copies).
FUSED_ALIGNMENT = 16

#: ``cast_into(dst, src, add)``: ``dst[...] = src`` (``add``: ``dst += src``) for [B, H, N, D] views.
CastInto = Callable[[torch.Tensor, torch.Tensor, bool], None]


def torch_cast_into(dst, src, add: bool) -> None:
    """:data:`CastInto` through PyTorch's own copy and add."""
    if add:
        dst += src
    else:
        dst.copy_(src)


def aligned(*tensors) -> tuple:
    """``tensors``, each off ``FUSED_ALIGNMENT`` replaced by a copy (new allocations are aligned)."""
    return tuple(x if x.data_ptr() % FUSED_ALIGNMENT == 0 else x.clone() for x in tensors)


def sdpa_backends(names) -> list:
    """``torch.nn.attention.SDPBackend`` members for names of ``SDPA_KERNELS``."""
    backend = torch.nn.attention.SDPBackend
    members = {"cudnn": backend.CUDNN_ATTENTION, "flash": backend.FLASH_ATTENTION,
               "efficient": backend.EFFICIENT_ATTENTION, "math": backend.MATH}
    return [members[name] for name in names]


def sdpa_in_order(q, k, v, causal: bool, scale: float, order):
    """SDPA with ``order``'s kernels (names of SDPA_KERNELS; by default cuDNN first, unlike PyTorch's
    default order) tried first, then the rest in PyTorch's order.  Only the priority changes, for
    this call: the kernels a user disabled stay disabled.  Two C calls instead of
    ``sdpa_kernel(..., set_priority=True)``, whose Python overhead short host-bound calls feel."""
    q, k, v = aligned(q, k, v)
    previous = torch._C._get_sdp_priority_order()
    first = [int(backend) for backend in sdpa_backends(order)]
    torch._C._set_sdp_priority_order(first + [backend for backend in previous if backend not in first])
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    finally:
        torch._C._set_sdp_priority_order(previous)


def whole_exact_call(q, k, v, causal: bool, scale: float, order):
    """A whole exact call of torch CUDA tensors through :func:`sdpa_in_order` (SDPA's own backward),
    or None where SDPA's conventions differ (GQA; causal with Nq != Nk: SDPA aligns the mask
    top-left) or a deterministic backward is asked for (SDPA's backwards are not deterministic)."""
    if not q.is_cuda or q.shape[1] != k.shape[1] or (causal and q.shape[2] != k.shape[2]):
        return None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and torch.are_deterministic_algorithms_enabled():
        return None
    return sdpa_in_order(q, k, v, causal, scale, order)


def first_fused(kernels, cudnn, flash):
    """``cudnn()`` or ``flash()``, whichever comes first in ``kernels`` (names of FUSED_KERNELS) and
    accepts the inputs (cuDNN raises RuntimeError on shapes or layouts it does not take, and may be
    disabled)."""
    for name in kernels:
        if name == "cudnn" and torch.backends.cuda.cudnn_sdp_enabled():
            try:
                return cudnn()
            except RuntimeError:
                continue
        if name == "flash":
            return flash()
    raise RuntimeError(f"no fused attention kernel among {list(kernels)}")


def fused_attention_forward(q, k, v, causal: bool, scale: float, kernels):
    """(out, lse) of exact attention through the first of ``kernels`` that accepts the inputs."""
    q, k, v = aligned(q, k, v)
    return first_fused(
        kernels,
        lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2],
        lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2])


def fused_attention_backward(q, k, v, out, dout, lse, causal: bool, scale: float, kernels):
    """(dq, dk, dv) of exact attention through the first of ``kernels`` that accepts the inputs,
    given out and lse (which may be the final ones of a larger call)."""
    q, k, v, out, dout, lse = aligned(q, k, v, out, dout, lse)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout is off: never read
    n_q, n_k = q.shape[2], k.shape[2]
    return first_fused(
        kernels,
        lambda: torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, n_q, n_k, 0.0, causal, scale=scale),
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, n_q, n_k, 0.0, causal, seed, seed, scale=scale))


def fold(segments: Segments, causal: bool, q, k, v, query_side=(), key_side=()):
    """Views of the exact segments as one batched attention, or None when they do not fold.

    They fold when the segments are one rectangle over all rows, or equal causal squares tiling
    the rows (the recursion's leaves), or equal non-causal rectangles at constant strides (a
    level's band rows: ``Segments.strided_tiling``), with fp16/bf16 CUDA tensors, D == Dv <= 256
    and as many KV heads as query heads: then (heads, segments) merge into one or two batch axes
    without copies.  Returns ``(q, k, v, *query_side, *key_side)`` as [B, H * S, n, .] views
    (strided: [B * H, S, n, .]; ``query_side`` arrays have q's rows, ``key_side`` arrays k's keys),
    or None.
    """
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if q.shape[3] != v.shape[3] or q.shape[3] > MAX_FUSED_HEAD_DIM or q.shape[1] != k.shape[1]:
        return None
    tiling = segments.equal_tiling(q.shape[2], causal)
    if tiling is not None:
        return fold_views(tiling, q, k, v, query_side, key_side)
    strided = None if causal else segments.strided_tiling
    return None if strided is None else strided_views(strided, q, k, v, query_side, key_side)


def fold_views(tiling, q, k, v, query_side=(), key_side=()):
    """``(q, k, v, *query_side, *key_side)`` folded by ``tiling`` (see ``fold``), or None unless
    every one is a view: outputs are written through them, and inputs are not to be copied."""
    sources = (q, *query_side, k, v, *key_side)
    rows = [tiling.fold_rows(x) for x in (q, *query_side)]
    keys = [tiling.fold_keys(x) for x in (k, v, *key_side)]
    if any(f.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for f, x in zip(rows + keys, sources)):
        return None  # strides that do not fold
    return (rows[0], keys[0], keys[1], *rows[1:], *keys[2:])


def strided_views(tiling: StridedTiling, q, k, v, query_side=(), key_side=()):
    """``(q, k, v, *query_side, *key_side)`` of a strided tiling as [B * H, count, n, .] views (the
    i-th rectangle's rows or keys at index i of axis 1), or None where B and H do not merge."""
    rows = [_strided_view(x, tiling.q_start, tiling.q_step, tiling.count, tiling.rows) for x in (q, *query_side)]
    keys = [_strided_view(x, tiling.k_start, tiling.k_step, tiling.count, tiling.keys) for x in (k, v, *key_side)]
    if any(x is None for x in rows + keys):
        return None
    return (rows[0], keys[0], keys[1], *rows[1:], *keys[2:])


def _strided_view(x, start: int, step: int, count: int, n: int):
    """Positions ``start + i * step + [0, n)`` (i < count) of x [B, H, N, ...] as a
    [B * H, count, n, ...] view, or None where B and H do not merge into one axis."""
    batch, heads = x.shape[:2]
    if batch > 1 and heads > 1 and x.stride(0) != heads * x.stride(1):
        return None
    outer = x.stride(1) if heads > 1 else x.stride(0)
    seq = x.stride(2)
    return x.as_strided((batch * heads, count, n, *x.shape[3:]), (outer, step * seq, seq, *x.stride()[3:]),
                        x.storage_offset() + start * seq)


def adopt_storage(whole, view, result) -> bool:
    """Point ``whole`` at ``result``'s memory instead of copying ``result`` into ``view`` (a view of
    all of ``whole``) when both lay the same elements out alike: a causal call's leaves are its
    first piece, and their output is already the running output (no copy of the whole output)."""
    same_layout = (
        result.dtype == whole.dtype and result.shape == view.shape and result.stride() == view.stride()
        and result.storage_offset() == 0 and view.storage_offset() == 0 and whole.is_contiguous()
        and result.untyped_storage().nbytes() >= whole.untyped_storage().nbytes()
    )
    if same_layout:
        whole.set_(result.untyped_storage(), 0, whole.shape, whole.stride())
    return same_layout


def fused_exact_forward(q, k, v, segments: Segments, causal: bool, scale: float, out, lse, overwrite: bool,
                        kernels, cast_into: CastInto = torch_cast_into, adopt: bool = True) -> bool:
    """Exact pieces through PyTorch's fused attention (which returns the log-sum-exp), merged into
    ``(out, lse)`` (copied when ``overwrite``: no earlier piece wrote).  ``adopt``: ``out`` may be
    pointed at the fused kernel's output instead of receiving a copy (only where ``out`` is the
    caller's own tensor, not a view of another library's array).  Returns False when the segments
    do not fold (see ``fold``); the backend's kernel runs instead."""
    folded = fold(segments, causal, q, k, v, query_side=(out, lse))
    if folded is None:
        return False
    qf, kf, vf, out_view, lse_view = folded
    o, row_lse = fused_attention_forward(qf, kf, vf, causal, scale, kernels)
    row_lse = row_lse.reshape(lse_view.shape)
    if overwrite:  # the usual case (exact pieces run first): no merge, no fp32 temporaries
        if not (adopt and adopt_storage(out, out_view, o)):
            cast_into(out_view, o, False)
        lse_view.copy_(row_lse)
    else:
        merge_partial(out_view, lse_view, o, row_lse)
    return True


def batch_chunks(outer: int, inner: int, per_chunk: int) -> list[tuple[slice, slice]]:
    """Index pairs covering an [outer, inner] batch once, in order, each at most ``per_chunk``
    entries: whole rows of the outer axis where one fits (a folded [B, H * S] batch, or a strided
    fold's [B * H, S]), else pieces of one row."""
    if per_chunk >= outer * inner:
        return [(slice(None), slice(None))]
    if per_chunk >= inner:
        step = per_chunk // inner
        return [(slice(i, i + step), slice(None)) for i in range(0, outer, step)]
    return [(slice(i, i + 1), slice(j, j + per_chunk)) for i in range(outer) for j in range(0, inner, per_chunk)]


def fused_exact_backward(q, k, v, out, lse, dout, segments: Segments, causal: bool, scale: float, dq, dk, dv,
                         overwrite: bool, kernels, chunk_bytes: int, cast_into: CastInto = torch_cast_into) -> bool:
    """This piece's gradients through PyTorch's fused backward (cuDNN's, else FlashAttention-2's),
    added to ``dq, dk, dv`` (copied into them when ``overwrite``).

    Given the *final* ``out`` and ``lse`` it computes ``P = exp(S - lse)`` and
    ``delta = rowsum(dout * out)``: exactly this piece's share of the whole call's gradient (the
    usual trick of ring attention), so only without a log-sum-exp gradient.  The fused calls run
    in chunks of (batch, head, segment) entries producing at most ``chunk_bytes`` of gradients
    each (:func:`batch_chunks`).
    Returns False when the segments do not fold.
    """
    if out is None:
        return False
    folded = fold(segments, causal, q, k, v, query_side=(out, dout, lse, dq), key_side=(dk, dv))
    if folded is None:
        return False
    qf, kf, vf, out_f, dout_f, lse_f, dq_f, dk_f, dv_f = folded
    # in the kernel's dtype (a no-op, without an operation, where they have it already)
    out_f, dout_f = (x if x.dtype == q.dtype else x.to(q.dtype) for x in (out_f, dout_f))
    # in chunks of (batch, head, segment) entries: the fused kernel's own gradients (and workspace) for the
    # whole call would sit next to our fp32 accumulators, at the backward's memory peak
    inputs, accumulators = (qf, kf, vf, out_f, dout_f, lse_f), (dq_f, dk_f, dv_f)
    per_pair = (qf.shape[2] * qf.shape[3] + 2 * kf.shape[2] * kf.shape[3]) * qf.element_size()
    chunks = batch_chunks(qf.shape[0], qf.shape[1], max(1, chunk_bytes // max(per_pair, 1)))
    for chunk in chunks:
        if len(chunks) > 1:  # slice views only when there is more than one chunk (each costs host time)
            inputs = tuple(x[chunk] for x in (qf, kf, vf, out_f, dout_f, lse_f))
            accumulators = tuple(x[chunk] for x in (dq_f, dk_f, dv_f))
        *tensors, lse_part = inputs
        grads = fused_attention_backward(*tensors, lse_part.contiguous(), causal, scale, kernels)
        for acc, grad in zip(accumulators, grads):
            cast_into(acc, grad, not overwrite)
        del grads
    return True
