"""The fixed case the kernel experiments time: one N=131072 non-causal call (B=1, H=32, D=64, bf16)."""

import torch

from hyperattn.algorithm import draw_projections, plan_attention
from hyperattn.api import make_rng
from hyperattn.config import HyperAttentionConfig
from hyperattn_triton import backend

N, HEADS, DIM, SCALE = 131072, 32, 64, 0.125


def noncausal_plan():
    """(impl, q, k, v, dout, structure): standard-normal bf16 inputs (torch seed 0) on the GPU and
    the sparse structure of their plan (NumPy seed 0), the call's one piece."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, HEADS, N, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    impl = backend.TritonBackend()
    rng = make_rng(0)
    plan = plan_attention(impl, q, k, causal=False, scale=SCALE, config=HyperAttentionConfig(),
                          projections=draw_projections(rng, DIM, 7), rng=rng)
    (piece,) = list(plan.pieces)
    return impl, q, k, v, dout, piece.structure
