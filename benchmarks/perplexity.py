"""Perplexity of a causal LM with HyperAttention in some of its layers, against exact attention.

The counterpart of the original ``benchmark_patch_llm.py``, on a local model (any causal LM that
transformers loads; nothing is downloaded) and local text.  Yardsticks in the same run, so a reader
sees how much long context the model uses: exact attention over the full context (SDPA), and exact
attention over a local window only (each query sees its last W keys, itself included: --windows).
An approximation that loses more than a local window loses is no good.

    python benchmarks/lm/train.py --preset gpu-32k --out /tmp/lm32k
    python benchmarks/perplexity.py --model /tmp/lm32k --seq_len 32768 --layers last:2 last:4 all \\
        --settings "" "block_size=128,sample_size=128" "block_size=512,sample_size=512"

Perplexity is ``exp(mean NLL in nats)``.  The original script printed ``2 ** (mean NLL in nats)``,
which is not perplexity: it is reported too, as ``original_2pow``, to compare with the paper.
``--data``: a text file, a folder (its files concatenated in path order), or JSONL with a
``context`` field per line (LongBench); default: the model folder's heldout.txt (written by
benchmarks/lm/train.py).  A model with a 256-token vocabulary and no tokenizer files is byte-level
(bytes are the tokens); any other uses its folder's tokenizer.

The figures are the approximation's own: where the backend's exact crossover would compute a call
exactly (Triton at D = 64, forward: causal calls below 24576 rows), the quality figures run with
``exact_crossover=False``; the time with the crossover on is reported beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download, whatever the folder says
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "merges.txt")
BYTE_SEPARATOR = b"\x00"  # between files, as benchmarks/lm/corpus.py joins them
HYPER_SETTING_KEYS = {"block_size": int, "sample_size": int, "lsh_num_projs": int, "min_seq_len": int,
                      "sink_keys": int, "band_keys": int, "sampling": str,
                      "backend": str}
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", type=Path, required=True, help="a local model folder")
    add("--data", type=Path, default=None, help="text file, folder or JSONL (default: MODEL/heldout.txt)")
    add("--seq_len", type=int, default=32768)
    add("--attn_method", choices=["hyper", "sdpa"], default="hyper",
        help="hyper: the yardsticks and HyperAttention; sdpa: the yardsticks only")
    add("--layers", nargs="+", default=["all"],
        help="layers running HyperAttention, as configure(): all, last:N, first:N, odd, even, 0,3,5 (several: one row each)")
    add("--block_size", type=int, default=256)
    add("--sample_size", type=int, default=256)
    add("--lsh_num_projs", type=int, default=7)
    add("--min_seq_len", type=int, default=4096)
    add("--sink_keys", type=int, default=0, help="first keys attended exactly (0: the paper's estimator)")
    add("--band_keys", type=int, default=0, help="previous keys of each row attended exactly (0: the paper's estimator)")
    add("--sampling", choices=["uniform", "stratified", "key_norm"], default="stratified",
        help="how the residual's keys are drawn (uniform: the paper's; key_norm: importance sampling by ||k||^4)")
    add("--backend", default="auto")
    add("--settings", nargs="+", default=[""],
        help="parameter sets, each 'name=value,...' over the flags above ('' = the flags): one row per layers x setting")
    add("--windows", type=int, nargs="*", default=[512, 4096], help="local-window yardsticks (keys per query)")
    add("--num_samples", type=int, default=16)
    add("--seed", type=int, default=0, help="chooses the samples and seeds HyperAttention (layer i: seed + i)")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--dtype", choices=DTYPE_NAMES, default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    add("--max_data_mb", type=float, default=64.0, help="read at most this much text")
    add("--out", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    add("--tag", default=None, help="file name stem (default: perplexity_<model>_<seq_len>)")
    add("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.data is None:
        args.data = args.model / "heldout.txt"
    args.hyper_settings = [parse_setting(text, args) for text in args.settings]
    return args


def parse_setting(text: str, args) -> dict:
    """'block_size=512,sample_size=512' over the flags' values -> the method's parameters."""
    params = {name: getattr(args, name) for name in HYPER_SETTING_KEYS}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in HYPER_SETTING_KEYS or not value:
            raise SystemExit(f"--settings: {item!r}: expected name=value with name in {sorted(HYPER_SETTING_KEYS)}")
        params[name] = HYPER_SETTING_KEYS[name](value)
    return params


# --- data ----------------------------------------------------------------------------------


def is_byte_level(model_dir: Path, config) -> bool:
    return getattr(config, "vocab_size", None) == 256 and not any((model_dir / f).exists() for f in TOKENIZER_FILES)


def read_documents(path: Path, max_bytes: int) -> tuple[list[bytes], bool]:
    """(documents, is_records): the ``context`` of each JSONL line (records), or the text of a
    file or of a folder's files in path order (one stream)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))
    elif path.is_file():
        files = [path]
    else:
        raise SystemExit(f"--data {path}: no such file or folder")
    if len(files) == 1 and files[0].suffix in (".jsonl", ".json"):
        documents, used = [], 0
        with files[0].open("rb") as handle:
            for line in handle:
                if line.strip() and used < max_bytes:
                    context = json.loads(line).get("context")
                    if isinstance(context, str) and context:
                        documents.append(context.encode("utf-8"))
                        used += len(documents[-1])
        return documents, True
    chunks, used = [], 0
    for file in files:
        if used >= max_bytes:
            break
        data = file.read_bytes()[: max_bytes - used]
        chunks.append(data if data.endswith(BYTE_SEPARATOR) else data + BYTE_SEPARATOR)
        used += len(chunks[-1])
    return [b"".join(chunks)], False


def make_samples(documents: list[bytes], is_records: bool, encode, seq_len: int, num_samples: int, seed: int):
    """``num_samples`` token windows of ``seq_len``: non-overlapping windows of the stream at
    seeded random places, or the first seq_len tokens of records at least that long."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if is_records:
        long_enough = [ids[:seq_len] for ids in map(encode, documents) if len(ids) >= seq_len]
        if not long_enough:
            raise SystemExit(f"no record of --data has {seq_len} tokens")
        chosen = sorted(rng.choice(len(long_enough), size=min(num_samples, len(long_enough)), replace=False))
        return [np.asarray(long_enough[i], dtype=np.int64) for i in chosen]
    ids = np.asarray(encode(documents[0]), dtype=np.int64)
    count = len(ids) // seq_len
    if count == 0:
        raise SystemExit(f"--data has {len(ids)} tokens, fewer than --seq_len={seq_len}")
    chosen = sorted(rng.choice(count, size=min(num_samples, count), replace=False))
    return [ids[i * seq_len:(i + 1) * seq_len] for i in chosen]


def encoder(model_dir: Path, byte_level: bool):
    import numpy as np

    if byte_level:
        return lambda data: np.frombuffer(data, dtype=np.uint8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return lambda data: tokenizer(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]


# --- exact attention over a local window ---------------------------------------------------


def local_window_attention(query, key, value, window: int, scale: float | None, chunk: int | None = None):
    """Exact causal attention (bottom-right) where each query sees only its last ``window`` keys,
    itself included; q [B, H, Nq, D], k/v [B, Hk, Nk, D] -> [B, H, Nq, Dv].  By query chunks, each
    against the keys it can see, so memory grows as N * window, not N**2."""
    import torch
    import torch.nn.functional as F

    n_q, n_k = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    chunk = chunk or max(window, 1024)
    offset = n_k - n_q
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    for start in range(0, n_q, chunk):
        end = min(n_q, start + chunk)
        k_start, k_end = max(0, start + offset - window + 1), end + offset
        q_pos = torch.arange(start, end, device=query.device)[:, None] + offset
        k_pos = torch.arange(k_start, k_end, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        k_part, v_part = key[:, :, k_start:k_end], value[:, :, k_start:k_end]
        if groups > 1:
            k_part, v_part = k_part.repeat_interleave(groups, 1), v_part.repeat_interleave(groups, 1)
        out[:, :, start:end] = F.scaled_dot_product_attention(query[:, :, start:end], k_part, v_part, attn_mask=mask,
                                                              scale=scale)
    return out


def register_window(window: int) -> str:
    """Register ``window<W>`` with transformers (attention and SDPA's mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def window_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("the local-window yardstick runs unpadded causal batches only")
        out = local_window_attention(query, key, value, window, scaling)
        return out.transpose(1, 2).contiguous(), None

    name = f"window{window}"
    AttentionInterface.register(name, window_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def hyper_label(spec: str, setting: dict) -> str:
    """'hyper last:4 b256 s256 r7 m4096 k0 w0 stratified': layers, block, sample, LSH projections,
    min_seq_len, sinks, band, sampling."""
    short = {"block_size": "b", "sample_size": "s", "lsh_num_projs": "r", "min_seq_len": "m", "sink_keys": "k",
             "band_keys": "w"}
    return " ".join([f"hyper {spec}"] + [f"{short[k]}{setting[k]}" for k in short] + [setting["sampling"]])


# --- the runs --------------------------------------------------------------------------------


def crossover_rows(args, model) -> int | None:
    """Causal calls with fewer rows than this run exactly on the backend with exact_crossover=True
    (None: no crossover there)."""
    import torch

    import hyperattn

    try:
        from hyperattn.dispatch import resolve_backend
        from hyperattn.validate import validate_inputs

        dtype = next(model.parameters()).dtype
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = torch.zeros(1, 1, 8, head_dim, dtype=dtype, device=args.device)
        name = args.backend if args.backend != "auto" else resolve_backend("auto", validate_inputs(
            probe, probe, probe, causal=True)).name
        rows = hyperattn.configure(name).exact_below_for(head_dim, backward=False)[1]  # evaluation: forward only
    except Exception:  # an unknown backend fails later, in the run itself, with its own message
        return None
    return rows or None


class Runner:
    """Evaluates one attention configuration of the model over the samples."""

    def __init__(self, args, model, samples, progress, task):
        import torch

        self.args, self.model, self.samples = args, model, samples
        self.progress, self.task = progress, task
        self.on_gpu = args.device.startswith("cuda")
        self.torch = torch

    def sync(self):
        if self.on_gpu:
            self.torch.cuda.synchronize()

    def forward(self, ids):
        return float(self.model(input_ids=ids, labels=ids, use_cache=False).loss)

    def run(self, label: str) -> dict:
        """Per-sample NLL and seconds (after one untimed warm-up forward), peak memory, and which
        attention paths the forward took."""
        from hyperattn.integrations import transformers as hyper_transformers

        torch = self.torch
        if self.on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if self.on_gpu else 0
        tensors = [torch.from_numpy(s)[None].to(self.args.device) for s in self.samples]
        self.progress.update(self.task, description=label)
        with torch.no_grad():
            with hyper_transformers.record_calls() as calls:
                self.forward(tensors[0])
            self.sync()
            nlls, seconds = [], []
            for ids in tensors:
                begin = time.perf_counter()
                nlls.append(self.forward(ids))
                self.sync()
                seconds.append(time.perf_counter() - begin)
                self.progress.advance(self.task)
        paths = {}
        for call in calls:
            key = call.path if call.path == "hyper" else f"sdpa ({call.reason})"
            paths[key] = paths.get(key, 0) + 1
        nll = statistics.fmean(nlls)
        return {
            "nll": nll, "perplexity": math.exp(nll), "original_2pow": 2.0 ** nll, "bits_per_token": nll / math.log(2),
            "nll_per_sample": nlls, "seconds_per_sample": statistics.median(seconds), "seconds_all": seconds,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if self.on_gpu else None,
            "attention_calls_per_forward": paths,
        }


def run(args) -> dict:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoModelForCausalLM

    from hyperattn.integrations import transformers as hyper_transformers

    console = Console(width=160)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    byte_level = is_byte_level(args.model, config)
    documents, is_records = read_documents(args.data, int(args.max_data_mb * 1e6))
    samples = make_samples(documents, is_records, encoder(args.model, byte_level), args.seq_len, args.num_samples,
                           args.seed)
    if len(samples) < args.num_samples:
        console.print(f"[yellow]--data holds {len(samples)} samples of {args.seq_len} tokens, not {args.num_samples}")
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).to(args.device).eval()
    num_layers = len(hyper_transformers.attention_modules(model))
    windows = sorted({w for w in args.windows if w < args.seq_len})
    cross_rows = crossover_rows(args, model)
    crossover_applies = cross_rows is not None and args.seq_len < cross_rows
    hyper_runs = [] if args.attn_method == "sdpa" else [(spec, setting) for spec in args.layers
                                                         for setting in args.hyper_settings]
    forwards = (1 + len(windows) + len(hyper_runs) * (2 if crossover_applies else 1)) * (len(samples) + 1)
    rows = []
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.quiet) as progress:
        task = progress.add_task("", total=forwards)
        runner = Runner(args, model, samples, progress, task)
        model.set_attn_implementation("sdpa")
        rows.append({"method": "sdpa", "label": "exact (SDPA), full context", **runner.run("exact (SDPA)")})
        for window in windows:
            model.set_attn_implementation(register_window(window))
            rows.append({"method": "window", "window": window, "label": f"exact, last {window} keys",
                         **runner.run(f"exact, last {window} keys")})
        for spec, setting in hyper_runs:
            patched = hyper_transformers.configure(model, layers=spec, seed=args.seed, exact_crossover=False, **setting)
            label = hyper_label(spec, setting)
            row = {"method": "hyper", "label": label, "layers": spec, "patched_layers": patched, "params": setting,
                   "exact_crossover": False, **runner.run(label)}
            if crossover_applies:
                hyper_transformers.configure(model, layers=spec, seed=args.seed, exact_crossover=True, **setting)
                on = runner.run(label + " (crossover on)")
                row["crossover_on"] = {k: on[k] for k in ("nll", "perplexity", "seconds_per_sample", "peak_mem_gib",
                                                           "attention_calls_per_forward")}
            rows.append(row)
    model.set_attn_implementation("sdpa")
    exact_seconds = rows[0]["seconds_per_sample"]
    for row in rows:
        row["speedup_over_sdpa"] = exact_seconds / row["seconds_per_sample"]
        if "crossover_on" in row:
            row["crossover_on"]["speedup_over_sdpa"] = exact_seconds / row["crossover_on"]["seconds_per_sample"]
    return {
        "what": "benchmarks/perplexity.py",
        "card": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else _cpu_name(),
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "command": "python benchmarks/perplexity.py " + " ".join(sys.argv[1:]),
        "versions": _versions(),
        "model": str(args.model), "model_type": getattr(config, "model_type", None), "num_layers": num_layers,
        "parameters": sum(p.numel() for p in model.parameters()), "byte_level": byte_level,
        "data": str(args.data), "seq_len": args.seq_len, "num_samples": len(samples), "seed": args.seed,
        "dtype": args.dtype, "device": args.device,
        "crossover": {
            "exact_below_rows": cross_rows, "applies": crossover_applies,
            "note": (f"the backend computes causal calls below {cross_rows} rows exactly with exact_crossover=True: "
                     "the quality figures use exact_crossover=False; 'crossover_on' has the default's figures")
            if crossover_applies else "the backend's exact crossover does not apply at this length",
        },
        "rows": rows,
    }


def report(result: dict, out: Path, tag: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)
    table = Table(title=f"{result['model']} ({result['parameters'] / 1e6:.1f}M, {result['num_layers']} layers) at "
                  f"{result['seq_len']} tokens, {result['num_samples']} samples, {result['dtype']}, {result['card']}")
    for column in ("configuration", "perplexity", "bits/token", "original 2**NLL", "s/sample", "speed-up",
                   "peak GiB", "crossover on: s/sample"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in result["rows"]:
        on = row.get("crossover_on")
        table.add_row(row["label"], f"{row['perplexity']:.4f}", f"{row['bits_per_token']:.4f}",
                      f"{row['original_2pow']:.4f}", f"{row['seconds_per_sample']:.4f}",
                      f"{row['speedup_over_sdpa']:.2f}x",
                      "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}",
                      "-" if on is None else f"{on['seconds_per_sample']:.4f} ({on['speedup_over_sdpa']:.2f}x)")
    console.print(table)
    console.print(f"perplexity = exp(mean NLL in nats); 'original 2**NLL' = 2 ** (mean NLL in nats), the figure "
                  f"benchmark_patch_llm.py printed.  {result['crossover']['note']}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{tag}.png")
    console.print(f"-> {out / tag}.json, .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [row["label"] for row in rows]
    colours = ["black" if row["method"] == "sdpa" else "grey" if row["method"] == "window" else "tab:blue" for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    positions = range(len(rows))
    left.barh(positions, [row["perplexity"] for row in rows], color=colours)
    for row in rows:
        if row["method"] != "hyper":
            left.axvline(row["perplexity"], color="black" if row["method"] == "sdpa" else "grey", linewidth=0.8,
                         linestyle="-" if row["method"] == "sdpa" else "--")
    lowest, highest = min(row["perplexity"] for row in rows), max(row["perplexity"] for row in rows)
    margin = 0.15 * (highest - lowest) + 1e-3 * highest  # the differences are the point: zoom in on them
    left.set_xlim(max(0.0, lowest - margin), highest + margin)
    left.set_xlabel("perplexity = exp(mean NLL)")
    left.set_yticks(list(positions), labels, fontsize=8)
    left.invert_yaxis()
    right.barh(positions, [row["seconds_per_sample"] * 1e3 for row in rows], color=colours)
    right.set_xlabel("ms per sequence")
    for axis in (left, right):
        axis.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{Path(result['model']).name}: {result['seq_len']} tokens, {result['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict:
    import torch
    import transformers

    import hyperattn

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hyperattn": hyperattn.__version__}


def _cpu_name() -> str:
    import torch

    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _git_commit() -> str:
    if os.environ.get("HYPERATTN_COMMIT"):  # machines that receive the tree without .git
        return os.environ["HYPERATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    tag = args.tag or f"perplexity_{args.model.resolve().name}_{args.seq_len}"
    report(result, args.out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
