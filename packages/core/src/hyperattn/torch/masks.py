"""Attention masks inside the operators: is a mask one HyperAttention computes anyway, and exact
attention under any other mask (the operator's fallback, decided when it runs, so that
``torch.compile`` sees no data-dependent branch).

Masks are boolean (True: may attend) or additive float (0: attend, very negative: masked),
broadcastable to [B, Hq, Nq, Nk].
"""

from __future__ import annotations

import torch


def allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean 'may attend' of a boolean or additive float mask; None for an additive bias that is
    not a mask (values other than 0 and very negative)."""
    if mask.dtype == torch.bool:
        return mask
    attend = mask == 0
    if not bool((attend | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return None
    return attend


def causal_pattern(n_q: int, n_k: int, device) -> torch.Tensor:
    """[Nq, Nk] bool, bottom-right aligned: row i sees keys <= i + Nk - Nq."""
    rows = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] <= rows


def is_plain_mask(mask: torch.Tensor, n_q: int, n_k: int, causal: bool) -> bool:
    """Whether ``mask`` is exactly what HyperAttention computes without one: the bottom-right
    causal pattern (causal) or all-True (non-causal), for every batch row and head."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (n_q, n_k):
        return False
    attend = allowed(mask)
    if attend is None:
        return False
    if not causal:
        return bool(attend.all())
    return bool((attend == causal_pattern(n_q, n_k, mask.device)).all())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as an additive bias (-inf where masked)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
    return mask.to(dtype)


def _expand_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    return x.repeat_interleave(q_heads // x.shape[1], dim=1) if x.shape[1] != q_heads else x


#: Bytes of scores one chunk of query rows holds at most (the fallback's memory bound).
CHUNK_SCORE_BYTES = 256 << 20


def _row_chunks(q, n_k: int, chunk_bytes: int):
    """Slices of query rows whose [B, Hq, rows, Nk] scores fit in ``chunk_bytes``."""
    batch, heads, n_q = q.shape[:3]
    step = max(1, chunk_bytes // max(1, batch * heads * n_k * 8))
    return [slice(start, min(start + step, n_q)) for start in range(0, n_q, step)]


def _mask_rows(mask, rows: slice):
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def _probabilities(q, k, mask, scale, causal, rows: slice, n_q: int):
    """p [B, Hq, len(rows), Nk] (weights of the rows' softmax) and their lse."""
    dtype = _compute_dtype(q)
    scores = torch.einsum("bhid,bhjd->bhij", q[:, :, rows].to(dtype), _expand_kv(k, q.shape[1]).to(dtype)) * scale
    scores = scores + _bias(_mask_rows(mask, rows), dtype)
    if causal:
        scores = scores.masked_fill(~causal_pattern(n_q, k.shape[2], q.device)[rows], -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # fully masked rows: zeros
    return torch.exp(scores - safe[..., None]), lse


def masked_exact_forward(q, k, v, mask, scale: float, causal: bool, chunk_bytes: int = CHUNK_SCORE_BYTES):
    """Exact attention under ``mask`` (and causality): (out [B, Hq, Nq, Dv] in q's dtype, lse fp32,
    fp64 for fp64 inputs).

    Scores in fp32 (fp64), a chunk of query rows at a time, and K/V expanded for GQA (a copy): a
    fallback, not a path to be fast on."""
    n_q = q.shape[2]
    dtype = _compute_dtype(q)
    vf = _expand_kv(v, q.shape[1]).to(dtype)
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=dtype, device=q.device)
    for rows in _row_chunks(q, k.shape[2], chunk_bytes):
        p, lse[:, :, rows] = _probabilities(q, k, mask, scale, causal, rows, n_q)
        out[:, :, rows] = torch.einsum("bhij,bhjd->bhid", p, vf).to(q.dtype)
    return out, lse


def masked_exact_backward(dout, dlse, q, k, v, mask, scale: float, causal: bool,
                          chunk_bytes: int = CHUNK_SCORE_BYTES):
    """(dq, dk, dv) of :func:`masked_exact_forward` (dlse: the gradient of its lse, or None)."""
    n_q = q.shape[2]
    dtype = _compute_dtype(q)
    kf, vf = _expand_kv(k, q.shape[1]).to(dtype), _expand_kv(v, q.shape[1]).to(dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(kf.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(vf.shape, dtype=dtype, device=q.device)
    for rows in _row_chunks(q, k.shape[2], chunk_bytes):
        p, _ = _probabilities(q, k, mask, scale, causal, rows, n_q)
        d_out = dout[:, :, rows].to(dtype)
        dp = torch.einsum("bhid,bhjd->bhij", d_out, vf)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if dlse is not None:
            ds = ds + p * dlse[:, :, rows].to(dtype)[..., None]
        dq[:, :, rows] = (torch.einsum("bhij,bhjd->bhid", ds, kf) * scale).to(q.dtype)
        dk += torch.einsum("bhij,bhid->bhjd", ds, q[:, :, rows].to(dtype)) * scale
        dv += torch.einsum("bhij,bhid->bhjd", p, d_out)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the expanded heads' gradients add up on their KV head
        dk = dk.reshape(k.shape[0], k.shape[1], group, *dk.shape[2:]).sum(2)
        dv = dv.reshape(v.shape[0], v.shape[1], group, *dv.shape[2:]).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
