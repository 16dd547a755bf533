"""The GPU cost of estimator settings, measured in one run: which settings cost the same.

For each setting (as ``perplexity.py --settings``: ``name=value,...`` over the defaults; ``""`` is
the default), causal, at each length and mode: the GPU time of one call replayed from a CUDA graph
(no host time: what the kernels cost), the back-to-back time of eager calls, the attended (row,
key) pairs, and the ratio of each to the default setting's.  Settings within 10% of the default's
GPU time are "equal cost" in issue 18's sense.

    python benchmarks/estimator_cost.py --settings "" "band_keys=128,sample_size=128" --seq_lens 32768
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from perplexity import HYPER_SETTING_KEYS
from single_layer import _git_commit, device_name

from harness import make_inputs, make_step, measure_graph_replay, measure_steps_interleaved, pairs_of_method

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"block_size": 256, "sample_size": 256, "lsh_num_projs": 7, "min_seq_len": 4096}


def parse_setting(text: str) -> dict:
    """'band_keys=128,sample_size=128' -> the parameters that differ from the defaults."""
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in HYPER_SETTING_KEYS or name == "backend" or not value:
            raise SystemExit(f"--settings: {item!r}: expected name=value with name in {sorted(HYPER_SETTING_KEYS)}")
        params[name] = HYPER_SETTING_KEYS[name](value)
    return params


def measure(args) -> list[dict]:
    rows = []
    for n in args.seq_lens:
        for mode in args.modes:
            q, k, v = make_inputs(1, args.heads, args.kv_heads, n, args.dim, "bfloat16", "cuda",
                                  requires_grad=mode != "fwd")
            settings = {text: {**DEFAULTS, **parse_setting(text), "exact_crossover": False} for text in args.settings}
            steps = {text: make_step("hyper", q, k, v, causal=True, mode=mode, backend=args.backend, params=params)
                     for text, params in settings.items()}
            eager = measure_steps_interleaved(steps, repeats=args.repeats)
            for text, params in settings.items():
                graph, why = measure_graph_replay(steps[text], repeats=args.repeats)
                pairs = pairs_of_method("hyper", q, k, causal=True, params=params, backend=args.backend)
                rows.append(dict(setting=text or "default", params=params, seq_len=n, mode=mode,
                                 graph_ms=None if graph is None else graph * 1e3, graph_error=why,
                                 eager_ms=eager[text] * 1e3, pairs=pairs))
                print(f"N={n:7d} {mode:8s} {text or 'default':45s} graph {rows[-1]['graph_ms'] or float('nan'):8.3f} ms"
                      f"  eager {rows[-1]['eager_ms']:8.3f} ms  pairs {pairs / 1e6:9.1f} M", flush=True)
            del q, k, v, steps
            torch.cuda.empty_cache()
    for row in rows:  # ratios to the default setting of the same length and mode
        base = next(r for r in rows if r["seq_len"] == row["seq_len"] and r["mode"] == row["mode"]
                    and r["setting"] == (args.settings[0] or "default"))
        for key in ("graph_ms", "eager_ms", "pairs"):
            row[f"{key}_ratio"] = None if row[key] is None or base[key] is None else row[key] / base[key]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--settings", nargs="+", default=[""], help="the first is the yardstick of the ratios")
    add("--seq_lens", type=int, nargs="+", default=[32768, 131072])
    add("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    add("--heads", type=int, default=32)
    add("--kv_heads", type=int, default=32)
    add("--dim", type=int, default=64)
    add("--backend", default="triton")
    add("--backend_options", nargs="*", default=[], metavar="NAME=INT",
        help="integer options of the backend for every setting (hyperattn.configure), e.g. exact_key_row_chunk=4096")
    add("--repeats", type=int, default=5)
    add("--out", type=Path, default=RESULTS)
    add("--tag", default="estimator_cost")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("estimator_cost.py times GPU kernels: no CUDA device here")
    import sys

    import hyperattn

    backend_options = {}
    for item in args.backend_options:
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"--backend_options: {item!r}: expected NAME=INT")
        backend_options[name] = int(value)
    if backend_options:
        hyperattn.configure(args.backend, **backend_options)
    result = dict(what="benchmarks/estimator_cost.py", card=device_name("cuda"),
                  date=datetime.date.today().isoformat(), commit=_git_commit(),
                  command="python benchmarks/estimator_cost.py " + " ".join(repr(a) if " " in a or not a else a
                                                                           for a in sys.argv[1:]),
                  shape=dict(batch=1, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, dtype="bfloat16",
                             causal=True, backend=args.backend, backend_options=backend_options),
                  rows=measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
