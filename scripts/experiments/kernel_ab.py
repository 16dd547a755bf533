"""Times of the sparse kernels and of whole calls at N=131072 (B=1, H=32, D=64, bf16), for A/B runs
of two versions of the Triton backend in one session: run it once per version, each in its own
process, with PYTHONPATH putting the baseline's ``hyperattn_triton`` first for the A run:

    PYTHONPATH=.ab/packages/triton_backend/src:benchmarks python3 scripts/experiments/kernel_ab.py A
    PYTHONPATH=benchmarks python3 scripts/experiments/kernel_ab.py B

(``.ab`` from ``git archive <commit> packages/triton_backend | tar -x -C .ab``).  Prints the
sparse forward and backward of one non-causal plan (do_bench medians) and the four whole steps
(the benchmark harness's measure_step, HyperAttention only); with ``--profile`` the kernel tables
of the non-causal forward and the causal forward and forward+backward.
"""

import sys

import torch
import triton
from noncausal_plan import DIM, HEADS, SCALE, N, noncausal_plan

import hyperattn_triton
from harness import make_inputs, make_step, measure_step


def time_kernels(label: str):
    impl, q, k, v, dout, st = noncausal_plan()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")

    def forward():
        impl.sparse_forward(q, k, v, st, SCALE, out, lse, fresh=True)

    forward()
    delta = impl.row_dot(dout, out)
    grads = tuple(torch.empty(x.shape, device="cuda") for x in (q, k, v))

    def backward():
        impl.sparse_backward(q, k, v, lse, dout, delta, st, SCALE, *grads, fresh=True)

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median", warmup=5, rep=100) * 1e3

    print(f"[{label}] sparse forward  {bench(forward):8.1f} us", flush=True)
    print(f"[{label}] sparse backward {bench(backward):8.1f} us", flush=True)


def time_steps(label: str):
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            q, k, v = make_inputs(1, HEADS, HEADS, N, DIM, "bfloat16", "cuda", requires_grad=mode != "fwd")
            step = make_step("hyper", q, k, v, causal=causal, mode=mode, backend="triton")
            ms = measure_step(step, "cuda", repeats=15) * 1e3
            print(f"[{label}] {mode:7} causal={causal!s:5} {ms:8.2f} ms", flush=True)
            del q, k, v, step


def profile_step(label: str, causal: bool, mode: str = "fwd"):
    """Kernel table and host time of one whole step."""
    import time

    from torch.profiler import ProfilerActivity, profile

    q, k, v = make_inputs(1, HEADS, HEADS, N, DIM, "bfloat16", "cuda", requires_grad=mode != "fwd")
    step = make_step("hyper", q, k, v, causal=causal, mode=mode, backend="triton")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(10):
        step()
    host = (time.perf_counter() - begin) / 10
    torch.cuda.synchronize()
    wall = (time.perf_counter() - begin) / 10
    print(f"[{label}] {mode} causal={causal} host {host * 1e3:.2f} ms/call, wall {wall * 1e3:.2f} ms/call", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    for line in prof.key_averages().table(sort_by="cuda_time_total", row_limit=16).splitlines():
        print(f"[{label}] {line[:60]}{line[-60:]}")
    del q, k, v, step
    torch.cuda.empty_cache()


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "?"
    print(f"[{which}] {hyperattn_triton.__file__}", flush=True)
    if "--profile" in sys.argv:
        profile_step(which, causal=False)
        profile_step(which, causal=True)
        profile_step(which, causal=True, mode="fwd+bwd")
    else:
        time_kernels(which)
        torch.cuda.empty_cache()
        time_steps(which)
