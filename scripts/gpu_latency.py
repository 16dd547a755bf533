"""Host time against GPU time per HyperAttention call on the Triton backend (bf16, B=1), crossover off.

For each causal mode, forward / forward+backward and N it prints, in milliseconds:

* ``host``: time until one call returns, the GPU idle before it (the Python and launch cost; a
  device-to-host synchronisation inside the call shows up here as GPU time);
* ``gpu``: the summed time of the call's GPU kernels (torch profiler);
* ``loop``: wall time per call in a loop of back-to-back calls (what a model sees);
* ``single``: one call and a synchronisation, the GPU idle before it;
* ``graph``: wall time per replay of the call captured in a CUDA graph, replays back to back;
* ``cached_host``, ``cached``: host time and back-to-back loop time per call of a
  ``HyperAttention(cuda_graphs=True)`` module (its per-signature graphs: input copies, replay,
  output clones), eager Python around it;
* ``sdpa``, ``sdpa_graph``: the loop and graph times of exact attention
  (``F.scaled_dot_product_attention``, cuDNN/flash).

    python scripts/gpu_latency.py [N ...] [--heads 32] [--dim 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hyperattn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import measure_graph_replay  # noqa: E402  (benchmarks/ is not a package)

SIZES = (4096, 8192, 16384, 32768, 65536)


def hyper(q, k, v, causal):
    return hyperattn.attention(q, k, v, causal=causal, backend="triton")


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def cached_module(dim: int):
    """A graphed module with the defaults of ``hyper`` (crossover off through the options)."""
    module = hyperattn.HyperAttention(dim, backend="triton", cuda_graphs=True).cuda()
    return lambda q, k, v, causal: module(q, k, v, causal=causal)


def step_of(fn, q, k, v, causal: bool, mode: str):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
    else:
        def step():
            fn(q, k, v, causal).backward(torch.ones_like(q))
            q.grad = k.grad = v.grad = None
    return step


def loop_ms(step, calls: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def host_and_single_ms(step, calls: int = 10) -> tuple[float, float]:
    host, single = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        host.append(returned - start)
        single.append(time.perf_counter() - start)
    return statistics.median(host) * 1e3, statistics.median(single) * 1e3


def graph_ms(step) -> float:
    """Median ms per replay of ``step`` captured in a CUDA graph (``benchmarks/harness.py``)."""
    seconds, why = measure_graph_replay(step, repeats=5)
    if seconds is None:
        raise RuntimeError(f"the step could not be captured in a CUDA graph: {why}")
    return seconds * 1e3


def gpu_ms(step) -> float:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def measure(n: int, heads: int, dim: int, causal: bool, mode: str) -> dict:
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd")
               for _ in range(3))
    row = {"n": n, "heads": heads, "dim": dim, "causal": causal, "mode": mode}
    step = step_of(hyper, q, k, v, causal, mode)
    for _ in range(3):
        step()
    row["host"], row["single"] = host_and_single_ms(step)
    row["gpu"] = gpu_ms(step)
    row["loop"] = min(loop_ms(step) for _ in range(3))
    row["graph"] = graph_ms(step)
    cached = step_of(cached_module(dim), q, k, v, causal, mode)
    for _ in range(3):
        cached()
    row["cached_host"], _ = host_and_single_ms(cached)
    row["cached"] = min(loop_ms(cached) for _ in range(3))
    exact = step_of(sdpa, q, k, v, causal, mode)
    for _ in range(3):
        exact()
    row["sdpa"] = min(loop_ms(exact) for _ in range(3))
    row["sdpa_graph"] = graph_ms(exact)
    row["speedup"] = row["sdpa"] / row["loop"]
    row["graph_speedup"] = row["sdpa_graph"] / row["graph"]
    row["cached_speedup"] = row["sdpa"] / row["cached"]  # against eager SDPA: what a user of each gets
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Host time against GPU time per Triton-backend call.")
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES), help="sequence lengths N")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    previous = hyperattn.configure("triton")
    hyperattn.configure("triton", exact_below=(0, 0))
    rows = []
    try:
        print(f"{'causal':6} {'mode':7} {'N':>7} {'host':>7} {'gpu':>7} {'loop':>7} {'single':>7} {'graph':>7} "
              f"{'sdpa':>7} {'sdpa_g':>7} {'speedup':>7} {'graph_x':>7} {'c_host':>7} {'cached':>7} {'cached_x':>8}",
              flush=True)
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                for n in args.sizes:
                    r = measure(n, args.heads, args.dim, causal, mode)
                    rows.append(r)
                    print(f"{causal!s:6} {mode:7} {n:7d} {r['host']:7.3f} {r['gpu']:7.3f} {r['loop']:7.3f} "
                          f"{r['single']:7.3f} {r['graph']:7.3f} {r['sdpa']:7.3f} {r['sdpa_graph']:7.3f} "
                          f"{r['speedup']:6.2f}x {r['graph_speedup']:6.2f}x {r['cached_host']:7.3f} {r['cached']:7.3f} "
                          f"{r['cached_speedup']:7.2f}x", flush=True)
    finally:
        hyperattn.configure("triton", exact_below=previous.exact_below)
    if args.json:
        import datetime
        import os

        with open(args.json, "w") as f:
            json.dump({"what": "scripts/gpu_latency.py", "card": torch.cuda.get_device_name(),
                       "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                       "commit": os.environ.get("HYPERATTN_COMMIT", "unknown"),
                       "torch": torch.__version__, "units": "ms per call", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
