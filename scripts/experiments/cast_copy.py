"""The exact pieces' widening copies: PyTorch's ``copy_`` against ``cast_into`` (one Triton launch).

``PYTHONPATH=. python scripts/experiments/cast_copy.py`` on the GPU machine prints the time of one
bf16 -> fp32 copy of a folded [1, 170, 4096, 64] view (a fused backward chunk of the causal
leaves) both ways, then the N=131072 causal steps (B=1, H=32, D=64, bf16) with each.
"""

import gc

import torch
import triton

from benchmarks.harness import make_inputs, make_step, measure_step
from hyperattn_triton import backend


def copy_times():
    src = torch.randn(1, 170, 4096, 64, device="cuda").to(torch.bfloat16)
    dst = torch.empty(1, 170, 4096, 64, device="cuda")
    gigabytes = src.numel() * 6 / 1e9
    for label, copy in (("torch copy_", lambda: dst.copy_(src)), ("cast_into", lambda: backend.cast_into(dst, src)),
                        ("torch +=", lambda: dst.add_(src)),
                        ("cast_into add", lambda: backend.cast_into(dst, src, True))):
        ms = triton.testing.do_bench(copy, return_mode="median", warmup=10, rep=100)
        print(f"{label:14s}: {ms * 1e3:7.1f} us  {gigabytes / ms:5.2f} TB/s", flush=True)


copy_times()
fast, torch_cast = backend.cast_into, backend.torch_cast_into

for mode in ("fwd", "fwd+bwd"):
    for label, impl in (("torch copy_", torch_cast), ("cast_into", fast), ("torch copy_", torch_cast),
                        ("cast_into", fast)):
        backend.cast_into = impl
        gc.collect()
        q, k, v = make_inputs(1, 32, 32, 131072, 64, "bfloat16", "cuda", requires_grad=mode != "fwd")
        step = make_step("hyper", q, k, v, causal=True, mode=mode, backend="triton")
        ms = measure_step(step, "cuda", repeats=5) * 1e3
        print(f"causal {mode:8s} {label:12s}: {ms:7.2f} ms", flush=True)
        del q, k, v, step
backend.cast_into = fast
