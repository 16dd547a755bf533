"""Register caps for the sparse kernels: fewer registers per thread, more programs per SM.

Compiled for sm_90 (``triton.compile``, no GPU needed) the forward, dQ and dK/dV kernels all take
255 registers per thread at 4 warps, so only two programs share an SM (8 warps): while one waits
on its gathers, only one other can compute, and each program's two loops are only 4 steps long
(their pipelines fill twice per tile).  ``Launch.maxnreg`` caps the registers (ptxas spills
beyond the cap) so that 3 (168 registers) or 4 (128) programs fit.

``python scripts/experiments/register_caps.py`` on the GPU machine times, on one N=131072 plan
(B=1, H=32, D=64, bf16):

* the sparse forward (non-causal, fresh, bf16 out) for tile shapes x stages x caps, each output
  checked against the production launch's;
* the sparse backward (dQ, block dK/dV, sample dK/dV) with the query-side launch varied, then the
  key-side one, gradients checked against the production launch's;
* with ``--narrow``, only the forward, for narrower key steps (32 and 16 keys) x stages x caps;
* whole calls through ``hyperattn.attention`` (causal and not, forward and forward+backward) with
  the production launches and the best caps found above.
"""

import statistics
import sys

import torch
import triton
from noncausal_plan import SCALE, noncausal_plan

import hyperattn
from hyperattn_triton import backend
from hyperattn_triton.backend import Launch

PRODUCTION_FORWARD = backend.forward_launch
PRODUCTION_DQ = backend.dq_launch
PRODUCTION_KEY = backend.key_launch


def bench_us(fn):
    return triton.testing.do_bench(fn, return_mode="median", warmup=5, rep=60) * 1e3


def use(query=None, key=None):
    """Make the backend launch with these shapes (None: production); ``query``: forward and dQ."""
    backend.forward_launch = PRODUCTION_FORWARD if query is None else (lambda d, dv: query)
    backend.dq_launch = PRODUCTION_DQ if query is None else (lambda d, dv: query)
    backend.key_launch = PRODUCTION_KEY if key is None else (lambda d, dv: key)


def max_err(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def call_ms(fn, repeats=10):
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


def main(quick: bool = False, narrow: bool = False):
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    impl, q, k, v, dout, st = noncausal_plan()

    def forward():
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device="cuda")
        impl.sparse_forward(q, k, v, st, SCALE, out, lse, fresh=True)
        return out, lse

    use()
    ref_out, ref_lse = forward()
    delta = impl.row_dot(dout, ref_out)

    def backward():
        grads = tuple(torch.empty(x.shape, device="cuda") for x in (q, k, v))
        impl.sparse_backward(q, k, v, ref_lse, dout, delta, st, SCALE, *grads, fresh=True)
        return grads

    ref_grads = backward()

    def sweep(variants, run, reference, side):
        """{launch: us} of ``run`` with each launch on ``side`` ("query": forward and dQ, or
        "key": dK/dV), its results checked against ``reference``; a launch that fails (shared
        memory) is reported, not fatal."""
        times = {}
        for launch in variants:
            use(**{side: launch})
            try:
                err = max_err(run(), reference)
                times[launch] = bench_us(run)
                print(f"{launch}: {times[launch]:8.1f} us  max err {err:.2e}", flush=True)
            except Exception as exc:
                print(f"{launch}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        use()
        return times

    print("\n-- sparse forward (non-causal, N=131072): block_m block_n warps stages maxnreg", flush=True)
    fwd_variants = [Launch(128, 64, 3, 4)]
    if narrow:  # second run: narrower key steps (more steps per loop) at every cap
        for caps in (None, 168, 128):
            fwd_variants += [Launch(128, block_n, stages, 4, caps) for block_n in (32, 16) for stages in (3, 4, 5)]
    else:
        for caps in (168, 128):
            fwd_variants += [Launch(128, 64, 3, 4, caps), Launch(128, 64, 2, 4, caps), Launch(128, 64, 4, 4, caps),
                             Launch(128, 32, 3, 4, caps), Launch(64, 64, 3, 4, caps), Launch(256, 64, 2, 8, caps),
                             Launch(256, 64, 3, 8, caps)]
        fwd_variants += [Launch(64, 64, 3, 4), Launch(128, 64, 4, 4), Launch(256, 64, 2, 8)]
    fwd_times = sweep(fwd_variants[:3] if quick else fwd_variants, forward, (ref_out, ref_lse), "query")
    if narrow:
        print(f"best forward {min(fwd_times, key=fwd_times.get)}")
        return

    print("\n-- sparse backward, query side (dQ) varied", flush=True)
    dq_variants = [Launch(128, 64, 3, 4), Launch(128, 64, 3, 4, 168), Launch(128, 64, 3, 4, 128),
                   Launch(128, 64, 2, 4, 168), Launch(64, 64, 3, 4, 128), Launch(64, 64, 3, 4),
                   Launch(128, 32, 3, 4, 168)]
    dq_times = sweep(dq_variants[:2] if quick else dq_variants, backward, ref_grads, "query")

    print("\n-- sparse backward, key side (dK/dV, block and sample slots) varied", flush=True)
    kv_variants = [Launch(32, 128, 3, 4), Launch(32, 128, 3, 4, 168), Launch(32, 128, 3, 4, 128),
                   Launch(16, 128, 3, 4, 168), Launch(16, 128, 3, 4, 128), Launch(32, 64, 3, 4, 128),
                   Launch(64, 128, 3, 8, 128), Launch(32, 128, 3, 8, 128), Launch(32, 128, 2, 4, 168)]
    kv_times = sweep(kv_variants[:2] if quick else kv_variants, backward, ref_grads, "key")

    best_q = min(fwd_times, key=fwd_times.get)
    best_dq = min(dq_times, key=dq_times.get)
    best_kv = min(kv_times, key=kv_times.get)
    print(f"\nbest forward {best_q}, best dQ {best_dq}, best dK/dV {best_kv}", flush=True)
    print("\n-- whole calls, hyperattn.attention (ms, median of 10)", flush=True)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    for causal in (False, True):
        combos = [("production", None, None), ("best fwd+kv", best_q, best_kv)]
        if best_dq != best_q:
            combos.append(("best dq+kv", best_dq, best_kv))
        for label, query, key in combos:
            use(query=query, key=key)
            fwd = call_ms(lambda c=causal: hyperattn.attention(q, k, v, causal=c, backend="triton"))

            def step(c=causal):
                out = hyperattn.attention(*leaves, causal=c, backend="triton")
                out.backward(dout)

            both = call_ms(step)
            print(f"causal={causal!s:5} {label:10}: fwd {fwd:7.2f} ms   fwd+bwd {both:7.2f} ms", flush=True)
    use()


if __name__ == "__main__":
    main(quick="--quick" in sys.argv, narrow="--narrow" in sys.argv)
