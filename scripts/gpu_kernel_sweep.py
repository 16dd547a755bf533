"""Launch sweeps of the sparse kernels alone on one fixed plan (N=131072, H=32, D=64, bf16):

    python scripts/gpu_kernel_sweep.py fwd   # forward: block_m, fwd_block_n, warps, fwd_stages, fwd_maxnreg
    python scripts/gpu_kernel_sweep.py dq    # dQ: block_m (shared with the forward), block_n, warps, stages
    python scripts/gpu_kernel_sweep.py dkdv  # dK/dV: kv_block_n, kv_block_m, kv_warps, kv_stages
"""

import itertools
import math
import sys

import torch
import triton

from hyperattn.algorithm import SparsePiece, draw_projections, plan_attention
from hyperattn.api import make_rng
from hyperattn.config import HyperAttentionConfig
from hyperattn_triton import backend

what = sys.argv[1] if len(sys.argv) > 1 else "fwd"
n = 131072
impl = backend.TritonBackend()
q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
rng = make_rng(0)
plan = plan_attention(impl, q, k, causal=False, scale=0.125, config=HyperAttentionConfig(),
                      projections=draw_projections(rng, 64, 7), rng=rng)
(piece,) = list(plan.pieces)
assert isinstance(piece, SparsePiece)
st = piece.structure
out = torch.empty_like(q)
lse = torch.full(q.shape[:3], -math.inf, device="cuda")
impl.sparse_forward(q, k, v, st, 0.125, out, lse, fresh=True)
dout = torch.randn_like(q)
delta = impl.row_dot(dout, out)
grads = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]


def fwd():
    impl.sparse_forward(q, k, v, st, 0.125, out, lse, fresh=True)


def bwd():
    impl.sparse_backward(q, k, v, lse, dout, delta, st, 0.125, *grads)


if what == "fwd":
    keys = ("block_m", "fwd_block_n", "warps", "fwd_stages", "fwd_maxnreg")
    grid = itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (3, 5), (None, 168, 128))
elif what == "dq":
    keys = ("block_m", "block_n", "warps", "stages")
    grid = itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))
else:
    keys = ("kv_block_n", "kv_block_m", "kv_warps", "kv_stages")
    grid = itertools.product((64, 128, 256), (16, 32, 64), (4, 8), (2, 3))
fn = fwd if what == "fwd" else bwd
default = dict(backend.TUNING)
for values in grid:
    backend.TUNING.update(default)
    backend.TUNING.update(zip(keys, values))
    try:
        ms = triton.testing.do_bench(fn, return_mode="median", warmup=5, rep=30)
        print(" ".join(f"{key}={value!s:<4}" for key, value in zip(keys, values)), f"| {what} {ms * 1e3:8.1f} us",
              flush=True)
    except Exception as error:  # out of shared memory etc.
        print(" ".join(f"{key}={value!s:<4}" for key, value in zip(keys, values)), f"| {type(error).__name__}",
              flush=True)
