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


def _probabilities(q, k, mask, scale, causal):
    dtype = _compute_dtype(q)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), _expand_kv(k, q.shape[1]).to(dtype)) * scale
    scores = scores + _bias(mask, dtype)
    if causal:
        scores = scores.masked_fill(~causal_pattern(q.shape[2], k.shape[2], q.device), -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # fully masked rows: zeros
    return torch.exp(scores - safe[..., None]), lse


def masked_exact_forward(q, k, v, mask, scale: float, causal: bool):
    """Exact attention under ``mask`` (and causality): (out [B, Hq, Nq, Dv] in q's dtype, lse fp32,
    fp64 for fp64 inputs).

    Dense [B, Hq, Nq, Nk] scores in fp32 (fp64) and K/V expanded for GQA (a copy): a fallback, not
    a path to be fast on."""
    p, lse = _probabilities(q, k, mask, scale, causal)
    out = torch.einsum("bhij,bhjd->bhid", p, _expand_kv(v, q.shape[1]).to(p.dtype))
    return out.to(q.dtype), lse


def masked_exact_backward(dout, dlse, q, k, v, mask, scale: float, causal: bool):
    """(dq, dk, dv) of :func:`masked_exact_forward` (dlse: the gradient of its lse, or None)."""
    p, _ = _probabilities(q, k, mask, scale, causal)
    kf, vf = _expand_kv(k, q.shape[1]).to(p.dtype), _expand_kv(v, q.shape[1]).to(p.dtype)
    dout = dout.to(p.dtype)
    dp = torch.einsum("bhid,bhjd->bhij", dout, vf)
    delta = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if dlse is not None:
        ds = ds + p * dlse.to(p.dtype)[..., None]
    dq = torch.einsum("bhij,bhjd->bhid", ds, kf) * scale
    dk = torch.einsum("bhij,bhid->bhjd", ds, q.to(p.dtype)) * scale
    dv = torch.einsum("bhij,bhid->bhjd", p, dout)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the expanded heads' gradients add up on their KV head
        dk = dk.reshape(k.shape[0], k.shape[1], group, *dk.shape[2:]).sum(2)
        dv = dv.reshape(v.shape[0], v.shape[1], group, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
