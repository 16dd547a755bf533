"""Where HyperAttention starts to beat exact attention (SDPA, cuDNN) on this GPU.

Times both at bf16, B=1, H=32, D=64 with the crossover switched off, forward and forward+backward,
causal and not; prints speed-ups.  The smallest N from which every larger N wins sets
``hyperattn_triton.backend.EXACT_BELOW``.
"""

import sys

import torch
import torch.nn.functional as F
import triton

import hyperattn
from hyperattn_triton import backend

backend.EXACT_BELOW = (0, 0)
impl = hyperattn.registry.backend_status("triton").backend
impl.capabilities = impl.capabilities.__class__(**{**impl.capabilities.__dict__, "exact_below": (0, 0)})
sizes = [int(x) for x in sys.argv[1:]] or [4096, 8192, 12288, 16384, 24576, 32768, 49152]


def time_ms(fn, q, k, v, causal: bool, mode: str) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")
    return triton.testing.do_bench(lambda: fn(q, k, v, causal).sum().backward(), return_mode="median")


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def hyper(q, k, v, causal):
    return hyperattn.attention(q, k, v, causal=causal, backend="triton")


for causal in (False, True):
    for mode in ("fwd", "fwd+bwd"):
        row = []
        for n in sizes:
            q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
                       for _ in range(3))
            ratio = time_ms(sdpa, q, k, v, causal, mode) / time_ms(hyper, q, k, v, causal, mode)
            row.append(f"{n}: {ratio:5.2f}x")
        print(f"causal={causal!s:5} {mode:7} | " + "  ".join(row), flush=True)
