"""Constants and jit helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl

#: log2(e) and ln(2): the kernels' softmax runs in base 2 (``exp2``/``log2``), so scores are scaled
#: by ``scale * LOG2E`` and a base-2 log-sum-exp times ``LN2`` is the natural one.  ``tl.constexpr``
#: so that jit functions may read them; ``LOG2E.value`` is the plain float for host code.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def program_heads(num_heads, group):
    """(b, h, hk) of this program: axis 1 runs over batch x heads (query heads, or KV heads if group == 1)."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    return b, h, h // group


@triton.jit
def load_rows(base, idx, s_n, offs_c, s_c, mask, n_cols):
    """Load rows ``idx`` [R] x columns ``offs_c`` as [R, C] (zero outside mask and n_cols)."""
    return tl.load(base + idx[:, None] * s_n + offs_c[None, :] * s_c,
                   mask=mask[:, None] & (offs_c[None, :] < n_cols), other=0.0)


@triton.jit
def load_rows_transposed(base, idx, s_n, offs_c, s_c, mask, n_cols):
    """Load rows ``idx`` [R] x columns ``offs_c`` transposed, as [C, R]."""
    return tl.load(base + idx[None, :] * s_n + offs_c[:, None] * s_c,
                   mask=mask[None, :] & (offs_c[:, None] < n_cols), other=0.0)
