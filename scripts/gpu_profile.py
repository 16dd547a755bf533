"""Where the time goes in one HyperAttention step (bf16, B=1, H=32, D=64) on the Triton backend.

    python scripts/gpu_profile.py [--n 131072] [--backend cupy]  # GPU: torch profiler tables, fwd and fwd+bwd
    python scripts/gpu_profile.py host [--causal]         # host: cProfile of the Python side of forward calls
    python scripts/gpu_profile.py launch                  # host: microseconds per Triton launch and torch op
    python scripts/gpu_profile.py split --n 32768         # host: ms per call with and without the launches
    python scripts/gpu_profile.py ops --n 32768           # host: the torch operators one call dispatches
    python scripts/gpu_profile.py band --n 32768          # GPU: kernel times of causal calls with a band
    python scripts/gpu_profile.py graphed --n 8192        # host: the parts of a HyperAttention(cuda_graphs=True)
                                                          # call, and graph launch cost per node
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

import hyperattn
from hyperattn_triton.launcher import direct


def inputs(n: int, heads: int, dim: int, requires_grad: bool):
    return [torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
            for _ in range(3)]


def gpu_tables(n: int, heads: int, dim: int, rows: int, backend: str = "triton") -> None:
    """Wall time and the profiler's kernel table per (causal, fwd / fwd+bwd)."""
    q, k, v = inputs(n, heads, dim, requires_grad=True)
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            def step(causal=causal, mode=mode):
                out = hyperattn.attention(q, k, v, causal=causal, seed=0, backend=backend)
                if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))
            ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
            with ctx:
                step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / 3
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
            print(f"=== causal={causal} {mode}: wall {wall * 1e3:.1f} ms")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


#: (name, parameters): the band settings that ``band`` compares with the default
BAND_SETTINGS = (("default", {}),
                 ("band 64 + s64", dict(band_keys=64, sample_size=64)),
                 ("band 256 + s64", dict(band_keys=256, sample_size=64)),
                 ("band 512 + s64, leaves of 2048", dict(band_keys=512, sample_size=64, min_seq_len=2048)))


def band_tables(n: int, heads: int, dim: int, rows: int) -> None:
    """GPU time per kernel of causal calls (fwd, fwd+bwd; mean of 5 after 3 warm-up calls) with
    each of ``BAND_SETTINGS`` (a band: each rectangle's first rows exact, in pieces of their own)."""
    q, k, v = inputs(n, heads, dim, requires_grad=True)
    for name, params in BAND_SETTINGS:
        for backward in (False, True):
            def step(backward=backward, params=params):
                with torch.set_grad_enabled(backward):
                    out = hyperattn.attention(q, k, v, causal=True, seed=0, backend="triton",
                                              exact_crossover=False, **params)
                    if backward:
                        out.backward(torch.ones_like(out))
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in events) / 5 / 1e3
            print(f"\n== {name}, {'fwd+bwd' if backward else 'fwd'}: {total:.3f} ms of kernels per call")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
                print(f"  {e.self_device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:3d}  {e.key[:90]}")
            q.grad = k.grad = v.grad = None


def call_of(q, k, v, causal: bool, backward: bool):
    """One forward (under ``no_grad``) or forward+backward call, its seed fixed, the crossover off
    (the approximation at every length: what is profiled)."""
    def call():
        with torch.set_grad_enabled(backward):
            out = hyperattn.attention(q, k, v, causal=causal, seed=1, backend="triton", exact_crossover=False)
            if backward:
                out.backward(torch.ones_like(out))
    return call


def host_profile(n: int, heads: int, dim: int, causal: bool, rows: int, backward: bool = False) -> None:
    """cProfile of five calls after three warm-up calls: where the GPU waits for the CPU."""
    call = call_of(*inputs(n, heads, dim, requires_grad=backward), causal, backward)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats("hyperattn", rows)


@triton.jit
def _touch_kernel(a, b, c, d, e, f, n, stride0, stride1, stride2, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """A kernel with the argument count of an attention launch that does almost nothing."""
    if tl.program_id(0) == 0:
        tl.store(a + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + SCALE, mask=tl.arange(0, BLOCK) < n)


def launch_costs(calls: int = 2000) -> None:
    """Host microseconds per call of: a Triton launch through ``kernel[grid](...)``, the same compiled
    kernel through ``CompiledKernel.run`` (Triton's binder and cache lookup skipped), through
    ``hyperattn_triton.launcher.direct``, ``torch.empty`` and small torch ops. The GPU is kept ahead
    of the host (no waits)."""
    buf = [torch.zeros(1024, device="cuda") for _ in range(6)]

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()
        return host * 1e6

    def triton_launch():
        _touch_kernel[(4, 32)](*buf, 1000, 64, 128, 1, SCALE=1.0, BLOCK=1024)

    compiled = _touch_kernel[(4, 32)](*buf, 1000, 64, 128, 1, SCALE=1.0, BLOCK=1024)
    stream = torch.cuda.current_stream().cuda_stream

    def compiled_run():  # the floor: the launcher alone, every parameter (constexprs too) in order
        compiled.run(4, 32, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *buf, 1000, 64, 128, 1, 1.0, 1024)

    wide = direct(_touch_kernel)

    def direct_launch():
        wide[(4, 32)](*buf, 1000, 64, 128, 1, SCALE=1.0, BLOCK=1024)

    rows = {"triton kernel[grid](...)": triton_launch, "CompiledKernel.run": compiled_run,
            "launcher.direct(kernel)[grid](...)": direct_launch,
            "torch.empty((32, 4096), int32)": lambda: torch.empty((32, 4096), dtype=torch.int32, device="cuda"),
            "tensor.view + slice": lambda: buf[0].view(32, 32)[1:, :16],
            "torch.zeros_like": lambda: torch.zeros_like(buf[0]),
            "torch.cuda.current_stream()": torch.cuda.current_stream}
    for name, fn in rows.items():
        try:
            print(f"{name:<34} {per_call(fn):7.2f} us", flush=True)
        except Exception as error:  # the direct launch's signature changes between Triton versions
            print(f"{name:<34} failed: {type(error).__name__}: {error}", flush=True)


def host_split(n: int, heads: int, dim: int) -> None:
    """Host ms per forward call (seed fixed, crossover off, back to back) with the Triton launches made, and with
    them skipped (``DirectLaunch.launch`` stubbed): what the launches cost against the rest (Python,
    torch operations, cuDNN calls). The stubbed calls' outputs are garbage: only their time counts."""
    from hyperattn_triton import launcher

    q, k, v = inputs(n, heads, dim, requires_grad=False)
    real = launcher.DirectLaunch.launch

    def per_call(causal: bool, calls: int = 30) -> float:
        with torch.no_grad():
            for _ in range(3):
                hyperattn.attention(q, k, v, causal=causal, seed=1, backend="triton", exact_crossover=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                hyperattn.attention(q, k, v, causal=causal, seed=1, backend="triton", exact_crossover=False)
            host = (time.perf_counter() - start) / calls
            torch.cuda.synchronize()
        return host * 1e3

    for causal in (False, True):
        with_launches = per_call(causal)
        launcher.DirectLaunch.launch = lambda self, grid, args, meta: None
        try:
            without = per_call(causal)
        finally:
            launcher.DirectLaunch.launch = real
        print(f"causal={causal!s:5} N={n}: host {with_launches:.3f} ms/call, launches skipped {without:.3f} ms/call",
              flush=True)


def dispatched_ops(n: int, heads: int, dim: int) -> None:
    """The torch operators (``aten``) one warm call dispatches, by name and count, per (causal, mode):
    each costs microseconds of host time on a CUDA tensor, whatever its size."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    for causal in (False, True):
        for backward in (False, True):
            call = call_of(*inputs(n, heads, dim, requires_grad=backward), causal, backward)
            for _ in range(2):
                call()
            with Count() as counted:
                call()
            torch.cuda.synchronize()
            mode = "fwd+bwd" if backward else "fwd"
            print(f"=== causal={causal} {mode} N={n}: {sum(counted.ops.values())} operators", flush=True)
            for name, count in counted.ops.most_common():
                print(f"  {count:4d} {name}")


def _host_us(fn, calls: int = 15) -> float:
    """Median host microseconds until ``fn()`` returns, the GPU idle before each call."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def _graph_nodes(graph) -> int:
    """GPU operations (kernels, copies, sets) one replay of ``graph`` runs, as the profiler sees them."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _graphed_parts(n: int, heads: int, dim: int, causal: bool, backward: bool) -> None:
    """Print the host microseconds of each part of one graphed module's call (see ``graphed_host``)."""
    from hyperattn.torch.graphs import call_signature

    q, k, v = inputs(n, heads, dim, requires_grad=backward)
    module = hyperattn.HyperAttention(dim, backend="triton", cuda_graphs=True).cuda()

    def step():
        out = module(q, k, v, causal=causal)
        if backward:
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None

    with torch.set_grad_enabled(backward):
        for _ in range(3):
            step()
        captured = next(iter(module.graphs._captured.values()))
        parts = {"step": step,
                 "signature": lambda: call_signature((q, k, v), (None, causal, False, module.config)),
                 "input copies": lambda: _no_grad_copies(captured.static_inputs, (q, k, v)),
                 "forward replay": captured.forward_graph.replay,
                 "output clones": lambda: [o.clone() for o in captured.static_outputs],
                 "forward (module call)": lambda: module(q, k, v, causal=causal)}
        nodes = f"forward graph {_graph_nodes(captured.forward_graph)} GPU ops"
        if backward:
            out = module(q, k, v, causal=causal)
            grad = torch.ones_like(out)
            parts["torch.ones_like"] = lambda: torch.ones_like(out)
            parts["backward replay"] = captured.backward_graph.replay
            parts["replay_backward (copy, replay, clones)"] = lambda: captured.replay_backward(captured.generation, (grad,))
            nodes += f", backward graph {_graph_nodes(captured.backward_graph)}"
        print(f"=== causal={causal} {'fwd+bwd' if backward else 'fwd'} N={n}: {nodes}", flush=True)
        for name, fn in parts.items():
            print(f"  {name:<44} {_host_us(fn):8.1f} us", flush=True)
        if not backward:
            return
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # host: ops, CUDA runtime calls
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
        module_us = _backward_us(lambda: module(q, k, v, causal=causal), (q, k, v), grad)
        print(f"  {'out.backward(grad) (engine, replay_backward)':<44} {module_us:8.1f} us", flush=True)
        # the yardstick: the same engine round trip around one cuDNN / flash SDPA backward launch
        sdpa_us = _backward_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               (q, k, v), grad)
        print(f"  {'SDPA out.backward(grad), same inputs':<44} {sdpa_us:8.1f} us", flush=True)


def _backward_us(forward, leaves, grad) -> float:
    """Median host microseconds of ``out.backward(grad)``, ``out`` a fresh ``forward()`` (untimed) each time."""
    times = []
    for _ in range(15):
        out = forward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out.backward(grad)
        times.append(time.perf_counter() - start)
        for x in leaves:
            x.grad = None
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def _no_grad_copies(statics, tensors) -> None:
    with torch.no_grad():  # as in the graphed call's autograd Function
        for static, x in zip(statics, tensors):
            static.copy_(x)


def graphed_host(n: int, heads: int, dim: int) -> None:
    """Host microseconds of each part of a ``HyperAttention(cuda_graphs=True)`` call (forward, and
    forward+backward as a training step makes it), per causal mode, the GPU idle before each part;
    then the host cost of replaying graphs of K trivial kernels (what a graph's node count costs)."""
    for causal in (False, True):
        for backward in (False, True):
            _graphed_parts(n, heads, dim, causal, backward)
    x = torch.zeros(256, device="cuda")
    for kernels in (1, 16, 64, 256, 1024):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(kernels):
                x.add_(1.0)
        graph.replay()
        print(f"graph of {kernels:5d} kernels: replay {_host_us(graph.replay):8.1f} us host", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Profile one HyperAttention step on a GPU backend: GPU "
                                                 "kernel tables, or the host's Python time.")
    parser.add_argument("what", nargs="?", choices=("gpu", "host", "launch", "split", "ops", "band", "graphed"), default="gpu")
    parser.add_argument("--n", type=int, default=131072, help="sequence length")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true", help="host: profile causal calls")
    parser.add_argument("--backward", action="store_true", help="host: profile forward+backward calls")
    parser.add_argument("--rows", type=int, default=None, help="rows of each table")
    parser.add_argument("--backend", default="triton", help="gpu: the backend profiled (triton, cupy)")
    args = parser.parse_args(argv)
    if args.what == "gpu":
        gpu_tables(args.n, args.heads, args.dim, args.rows or 12, args.backend)
    elif args.what == "launch":
        launch_costs()
    elif args.what == "split":
        host_split(args.n, args.heads, args.dim)
    elif args.what == "ops":
        dispatched_ops(args.n, args.heads, args.dim)
    elif args.what == "graphed":
        graphed_host(args.n, args.heads, args.dim)
    elif args.what == "band":
        band_tables(args.n, args.heads, args.dim, args.rows or 9)
    else:
        host_profile(args.n, args.heads, args.dim, args.causal, args.rows or 22, args.backward)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
