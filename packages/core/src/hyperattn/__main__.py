"""``python -m hyperattn info`` (backends and versions) and ``python -m hyperattn demo``."""

from __future__ import annotations

import argparse
import importlib.metadata
import time

from rich.console import Console
from rich.table import Table


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def info(console: Console) -> int:
    from . import __version__, available_backends

    versions = Table(title=f"hyperattn {__version__}", show_header=False)
    for name in ("numpy", "torch", "triton", "cupy-cuda13x", "numba", "array-api-compat", "transformers"):
        versions.add_row(name, _version(name))
    console.print(versions)
    integrations = Table(title="integrations", show_header=False)
    integrations.add_row("transformers", _transformers_status())
    console.print(integrations)
    backends = Table(title="backends (backend='auto' takes the first that can run the inputs here)")
    for column in ("name", "installed", "runs here", "version / reason", "install"):
        backends.add_column(column)
    for row in available_backends():
        cannot = row.backend.unavailable_reason() if row.available else None
        detail = row.reason if not row.available else row.version if cannot is None else f"{row.version}; {cannot}"
        backends.add_row(row.name, "yes" if row.available else "no", "yes" if row.runs_here else "no", detail,
                         row.install_hint)
    console.print(backends)
    return 0


def _transformers_status() -> str:
    try:
        from .integrations.transformers import unavailable_reason

        reason = unavailable_reason()
    except Exception as error:  # a broken install must not break `info`
        reason = f"{type(error).__name__}: {error}"
    if reason is None:
        return ("works: hyperattn.integrations.transformers.register(), then "
                "attn_implementation='hyper'")
    return f"unavailable: {reason}"


def demo(console: Console, args) -> int:
    """HyperAttention against exact attention on one synthetic long input, best backend."""
    import numpy as np
    from rich.progress import Progress

    import hyperattn
    from hyperattn.dispatch import resolve_backend
    from hyperattn.validate import validate_inputs

    q, k, v = clustered_inputs(args.heads, args.seq_len, args.dim)
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v = (torch.from_numpy(x).to(device) for x in (q, k, v))
    except ImportError:
        device = "cpu"
    backend = resolve_backend("auto", validate_inputs(q, k, v, causal=args.causal)).name
    console.print(
        f"[bold]hyperattn demo[/]: B=1, H={args.heads}, N={args.seq_len}, D={args.dim}, float32, "
        f"causal={args.causal}, backend={backend!r} on {device}"
    )
    timings = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("warm-up (JIT)", total=3)
        small = tuple(x[:, :, : min(args.seq_len, 8192)] for x in (q, k, v))
        hyperattn.attention(*small, causal=args.causal, seed=0)
        progress.update(task, advance=1, description="HyperAttention")
        start = time.perf_counter()
        approx = hyperattn.attention(q, k, v, causal=args.causal, seed=0)
        _synchronize(approx)
        timings["hyper"] = time.perf_counter() - start
        progress.update(task, advance=1, description="exact attention")
        start = time.perf_counter()
        exact = _exact(q, k, v, args.causal)
        _synchronize(exact)
        timings["exact"] = time.perf_counter() - start
        progress.update(task, advance=1)
    approx, exact, values = (_to_numpy(x) for x in (approx, exact, v))
    error_o = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    error_v = np.linalg.norm(approx - exact) / np.linalg.norm(values)
    table = Table(title="result")
    for column in ("", "time (s)", "speed-up", "‖O−O*‖/‖O*‖", "‖O−O*‖/‖V‖"):
        table.add_column(column)
    table.add_row("exact (PyTorch SDPA)" if hasattr(q, "is_cuda") else "exact attention", f"{timings['exact']:.3f}", "1.0×", "-", "-")
    table.add_row(
        "HyperAttention", f"{timings['hyper']:.3f}", f"{timings['exact'] / timings['hyper']:.1f}×",
        f"{error_o:.3f}", f"{error_v:.4f}",
    )
    console.print(table)
    console.print(
        "Input: queries and keys clustered around 64 centres per head, Gaussian values. "
        "‖O−O*‖/‖V‖ is the error relative to the values, the scale of what reaches the next layer."
    )
    return 0


def clustered_inputs(heads: int, n: int, dim: int, clusters: int = 64, seed: int = 0):
    """q, k, v [1, H, N, D] float32 whose queries and keys lie near a few shared centres.

    Like real attention (and unlike i.i.d. Gaussians, whose attention is nearly uniform) each
    query puts most of its weight on the keys of its own cluster.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((heads, clusters, dim)) * 0.5
    heads_index = np.arange(heads)[:, None]

    def points():
        members = centres[heads_index, rng.integers(0, clusters, (heads, n))]
        return (members + 0.3 * rng.standard_normal((heads, n, dim)))[None].astype(np.float32)

    return points(), points(), rng.standard_normal((1, heads, n, dim)).astype(np.float32)


def _exact(q, k, v, causal: bool):
    """PyTorch SDPA when the inputs are torch tensors (the baseline users know), else ours."""
    if hasattr(q, "is_cuda"):
        import torch.nn.functional as F

        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    import hyperattn

    return hyperattn.exact_attention(q, k, v, causal=causal)


def _synchronize(x) -> None:
    if hasattr(x, "is_cuda") and x.is_cuda:
        import torch

        torch.cuda.synchronize()


def _to_numpy(x):
    from .testing import to_numpy64

    return to_numpy64(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and backends, available or not and why")
    demo_parser = commands.add_parser("demo", help="HyperAttention vs exact attention on a long synthetic input")
    demo_parser.add_argument("--seq-len", type=int, default=32768)
    demo_parser.add_argument("--heads", type=int, default=4)
    demo_parser.add_argument("--dim", type=int, default=64)
    demo_parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    console = Console()
    return info(console) if args.command == "info" else demo(console, args)


if __name__ == "__main__":
    raise SystemExit(main())
