"""One attention layer, timed: HyperAttention against PyTorch SDPA measured in the same run.

The counterpart of the original ``benchmark_single_attention_layer.py`` (same options) plus the
backend, shapes, dtype and the method's parameters.  Prints a table, writes JSON and draws the
speed-up plot.  Examples:

    python benchmarks/single_layer.py --seq_lens 4096 32768 --heads 8 --dtype float32   # CPU
    python benchmarks/single_layer.py --mode fwd+bwd --dtype bfloat16 --heads 32        # GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness import (
    DTYPES,
    attention_flops,
    io_bytes,
    make_inputs,
    make_step,
    measure_ceilings,
    measure_graph_replay,
    measure_single_call,
    measure_step,
    measure_steps_interleaved,
    pairs_of_method,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn_method", default="hyper", choices=["hyper"], help="the method timed against SDPA")
    parser.add_argument("--mode", default="fwd", choices=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--no_causal", action="store_true", help="non-causal attention (default: causal)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--sample_size", type=int, default=256)
    parser.add_argument("--lsh_num_projs", type=int, default=7)
    parser.add_argument("--min_seq_len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point (default: 10 GPU, 3 CPU)")
    parser.add_argument("--latency", action="store_true",
                        help="also time a single call from an idle device and, on a GPU, replays of the step "
                             "captured in a CUDA graph (host time out of the picture)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    parser.add_argument("--tag", default=None, help="file name stem (default: single_layer_<device>_<mode>)")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(args) -> dict:
    mode = args.mode
    on_gpu = args.device.startswith("cuda")
    causal = not args.no_causal
    kv_heads = args.kv_heads or args.heads
    repeats = args.repeats or (10 if on_gpu else 3)
    params = dict(
        block_size=args.block_size, sample_size=args.sample_size, lsh_num_projs=args.lsh_num_projs,
        min_seq_len=args.min_seq_len,
    )
    peak_flops, bandwidth = measure_ceilings(args.device, args.dtype if on_gpu else "float32")
    rows = []
    for n in args.seq_lens:
        row = {"seq_len": n}
        steps = {}  # on the GPU both methods' inputs stay alive for the interleaved timing below
        seconds, work = {}, {}  # per method: seconds per step, (FLOPs, floor seconds)
        for method in ("sdpa", "hyper"):
            if on_gpu:
                # free what earlier steps left in reference cycles (autograd graphs, closures): it
                # would count in this method's peak (docs/performance.md, "Timing method")
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            # what is still allocated (a library's caches, SDPA's inputs) is not this method's peak
            baseline = torch.cuda.memory_allocated() if on_gpu else 0
            q, k, v = make_inputs(
                args.batch, args.heads, kv_heads, n, args.dim, args.dtype, args.device, requires_grad=mode != "fwd"
            )
            step = make_step(method, q, k, v, causal=causal, mode=mode, backend=args.backend, params=params)
            if on_gpu:  # two steps: compiled kernels, and the peak of a step in the steady state
                for _ in range(2):
                    step()
                torch.cuda.synchronize()
            else:
                seconds[method] = measure_step(step, args.device, repeats=repeats)
            pairs = pairs_of_method(method, q, k, causal=causal, params=params, backend=args.backend)
            flops = attention_flops(pairs, args.batch, args.heads, args.dim, mode)
            work[method] = flops, max(flops / peak_flops, io_bytes(q, k, v, mode) / bandwidth)
            row[method] = {
                "peak_mem_gib": (torch.cuda.max_memory_allocated() - baseline) / 2**30 if on_gpu else None,
                "baseline_mem_gib": baseline / 2**30,
            }
            if args.latency:
                row[method]["single_ms"] = measure_single_call(step, args.device, repeats=repeats) * 1e3
                if on_gpu:
                    graph_seconds, why = measure_graph_replay(step, repeats=repeats)
                    row[method]["graph_ms"] = None if graph_seconds is None else graph_seconds * 1e3
                    row[method]["graph_error"] = why
            steps[method] = step
            del q, k, v, step
        if on_gpu:  # samples of the two methods in turn: both see the same drift of the machine
            seconds.update(measure_steps_interleaved(steps, repeats=repeats))
        del steps
        for method in ("sdpa", "hyper"):
            (flops, floor), taken = work[method], seconds[method]
            row[method] = {"ms": taken * 1e3, "tflops": flops / taken / 1e12, "floor_ms": floor * 1e3,
                           "fraction_of_floor": floor / taken, **row[method]}
        row["speedup"] = row["sdpa"]["ms"] / row["hyper"]["ms"]
        if args.latency:
            row["single_speedup"] = row["sdpa"]["single_ms"] / row["hyper"]["single_ms"]
            graphs = row["sdpa"].get("graph_ms"), row["hyper"].get("graph_ms")
            row["graph_speedup"] = graphs[0] / graphs[1] if None not in graphs else None
        rows.append(row)
        print_row(row)
    return {
        "card": device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "command": "python benchmarks/single_layer.py " + " ".join(_argv_of(args)),
        "config": {**vars(args), "out": str(args.out), "mode": mode, "causal": causal, "kv_heads": kv_heads},
        "ceilings": {"matmul_tflops": peak_flops / 1e12, "copy_gbs": bandwidth / 1e9},
        "torch": torch.__version__,
        "rows": rows,
    }


def _argv_of(args) -> list[str]:
    import sys

    return sys.argv[1:]


def _git_commit() -> str:
    if os.environ.get("HYPERATTN_COMMIT"):  # machines that receive the tree without .git
        return os.environ["HYPERATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_row(row) -> None:
    hyper, exact = row["hyper"], row["sdpa"]
    print(
        f"N={row['seq_len']:>7}  sdpa {exact['ms']:10.2f} ms  hyper {hyper['ms']:10.2f} ms  "
        f"speed-up {row['speedup']:7.2f}x  hyper {hyper['tflops']:.2f} TFLOP/s, {hyper['fraction_of_floor']:.1%} of floor",
        flush=True,
    )


def report(result: dict, out: Path, tag: str) -> None:
    table = Table(title=f"{result['card']} — {result['config']['mode']}, causal={result['config']['causal']}, "
                  f"{result['config']['dtype']}, B={result['config']['batch']}, H={result['config']['heads']}, "
                  f"D={result['config']['dim']} ({result['date']}, {result['commit']})")
    latency = "single_speedup" in result["rows"][0]
    columns = ["N", "SDPA ms", "hyper ms", "speed-up", "hyper TFLOP/s", "hyper % of floor", "SDPA GiB", "hyper GiB"]
    if latency:  # a lone call's latency, and replays of a captured CUDA graph
        columns += ["SDPA single ms", "hyper single ms", "single speed-up", "SDPA graph ms", "hyper graph ms",
                    "graph speed-up"]
    for column in columns:
        table.add_column(column, justify="right")
    two = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for row in result["rows"]:
        h, s = row["hyper"], row["sdpa"]
        cells = [str(row["seq_len"]), f"{s['ms']:.2f}", f"{h['ms']:.2f}", f"{row['speedup']:.2f}×",
                 f"{h['tflops']:.2f}", f"{h['fraction_of_floor']:.1%}", two(s["peak_mem_gib"]), two(h["peak_mem_gib"])]
        if latency:
            graph_speedup = row["graph_speedup"]
            cells += [two(s["single_ms"]), two(h["single_ms"]), f"{row['single_speedup']:.2f}×",
                      two(s.get("graph_ms")), two(h.get("graph_ms")),
                      "-" if graph_speedup is None else f"{graph_speedup:.2f}×"]
        table.add_row(*cells)
    Console(width=220 if latency else 160).print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{tag}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["seq_len"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [row["speedup"] for row in result["rows"]], marker="o", label="HyperAttention / SDPA")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("speed-up over SDPA")
    config = result["config"]
    ax.set_title(f"{config['mode']}, {'causal' if config['causal'] else 'non-causal'}, {result['card']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(paths: list[Path]) -> None:
    """Redraw the PNG beside each result JSON (the GPU machine returns only a few files)."""
    for path in paths:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--replot"]:
        replot([Path(p) for p in argv[1:]])
        return
    args = parse_args(argv)
    device = "gpu" if args.device.startswith("cuda") else "cpu"
    tag = args.tag or f"single_layer_{device}_{args.mode.replace('+', '_')}_{'noncausal' if args.no_causal else 'causal'}"
    report(run(args), args.out, tag)


if __name__ == "__main__":
    main()
