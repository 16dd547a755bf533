"""Train a small Llama-style byte-level causal LM (transformers' LlamaForCausalLM: GQA, RoPE) on the
Python sources every machine has (see corpus.py), from a seed, and save it with save_pretrained,
so benchmarks/perplexity.py loads it like any model.  Nothing is downloaded.

    python benchmarks/lm/train.py --preset gpu-32k --out /tmp/lm32k          # 5 min on an H200, bf16
    python benchmarks/lm/train.py --preset cpu-tiny --out /tmp/lm-tiny       # seconds, for tests

The output folder holds the model (config.json, model.safetensors), ``heldout.txt`` (the held-out
files, concatenated: the benchmark's --data), ``train_log.json`` (options, corpus, loss every
--log_every steps, held-out bits per byte) and ``corpus_files.json`` (the files of each split).

Reproducible: one seed fixes the initial weights and every training window; on the CPU two runs
with one seed give identical models.  With --steps the schedule is a number of steps (--minutes,
if also given, only stops early); with --minutes alone it follows the clock, which no second run
repeats exactly.  On a GPU, --deterministic asks PyTorch for deterministic kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

PRESETS = {
    # 21.2M parameters, 32k context, 1400 steps of 2 x 32768 bytes: 300 s on one H200 in bf16 (306k bytes/s,
    # torch 2.11, transformers 5.17), 1.78 held-out bits/byte.  Other cards: --steps 0 --minutes 5 (by the clock)
    "gpu-32k": dict(seq_len=32768, batch=2, layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1280,
                    steps=1400, minutes=None, lr=2e-3, warmup=40, device="cuda", dtype="bfloat16", eval_every=200,
                    eval_windows=8, log_every=10, rope_theta=500000.0, train_mb=None, heldout_mb=None, roots=None),
    # seconds on a CPU: the pipeline in the test suite
    "cpu-tiny": dict(seq_len=128, batch=4, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, steps=20,
                     minutes=None, lr=3e-3, warmup=4, device="cpu", dtype="float32", eval_every=0, eval_windows=4,
                     log_every=5, rope_theta=10000.0, train_mb=1.0, heldout_mb=0.2, roots="stdlib"),
}
#: without --preset: the gpu-32k model and schedule, on the device found, bf16 on a GPU
DEFAULTS = dict(PRESETS["gpu-32k"], device=None, dtype=None)
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, required=True, help="folder for the model, heldout.txt and train_log.json")
    add("--preset", choices=sorted(PRESETS), default=None, help="defaults for every option below")
    add("--seq_len", type=int)
    add("--steps", type=int, help="optimizer steps (the schedule's length; 0: none, follow --minutes)")
    add("--minutes", type=float, help="wall-clock budget of the training loop (the schedule's length without --steps)")
    add("--batch", type=int, help="sequences per step")
    add("--layers", type=int)
    add("--hidden", type=int)
    add("--heads", type=int)
    add("--kv_heads", type=int)
    add("--intermediate", type=int, help="MLP width")
    add("--rope_theta", type=float)
    add("--lr", type=float, help="peak learning rate (AdamW)")
    add("--warmup", type=int, help="linear warm-up steps")
    add("--weight_decay", type=float, default=0.1)
    add("--grad_clip", type=float, default=1.0)
    add("--seed", type=int, default=0)
    add("--device", help="default: cuda if available, else cpu")
    add("--dtype", choices=DTYPES, help="autocast dtype (weights stay float32)")
    add("--attn", choices=["sdpa", "hyper"], default="sdpa", help="attention while training (hyper: default parameters)")
    add("--eval_every", type=int, help="held-out evaluation every N steps (0: only at the end)")
    add("--eval_windows", type=int, help="held-out windows of --seq_len per evaluation")
    add("--log_every", type=int)
    add("--heldout_fraction", type=float, default=0.02, help="of the files, chosen by a hash of the path")
    add("--train_mb", type=float, help="cap on the training text (MB; default: all of it)")
    add("--heldout_mb", type=float, help="cap on the held-out text (MB)")
    add("--roots", help="comma list of 'stdlib', 'site' (default: both)")
    add("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset] if args.preset else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.steps == 0:
        args.steps = None
    if args.steps is None and args.minutes is None:
        parser.error("give --steps or --minutes")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv_heads")
    return args


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=corpus.VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )


def lr_at(args, progress: float, step: int) -> float:
    """Linear warm-up over --warmup steps, then cosine from --lr to --lr / 10 over the schedule."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def windows(data: np.ndarray, seq_len: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` windows of ``seq_len`` bytes at random offsets: [count, seq_len] int64."""
    if len(data) <= seq_len:
        raise ValueError(f"the text ({len(data)} bytes) is not longer than --seq_len={seq_len}")
    offsets = rng.integers(0, len(data) - seq_len, size=count)
    return np.stack([data[o:o + seq_len] for o in offsets]).astype(np.int64)


def evaluate(model, batches, device, autocast) -> float:
    """Mean held-out NLL (nats per byte) over the windows."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad(), autocast():
        for window in batches:
            ids = torch.from_numpy(window[None]).to(device)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    model.train()
    return total / len(batches)


def train(args) -> dict:
    import contextlib

    import torch
    from transformers import LlamaForCausalLM

    started = time.time()
    roots = None if args.roots is None else [r.strip() for r in args.roots.split(",")]
    mb = lambda value: None if value is None else int(value * 1e6)
    text = corpus.build(heldout_fraction=args.heldout_fraction, max_train_bytes=mb(args.train_mb),
                        max_heldout_bytes=mb(args.heldout_mb), selected_roots=roots)
    train_data = np.frombuffer(text.train.data, dtype=np.uint8)
    heldout_data = np.frombuffer(text.heldout.data, dtype=np.uint8)
    corpus_seconds = time.time() - started

    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = model_config(args)
    attn = "sdpa"
    if args.attn == "hyper":
        from hyperattn.integrations import transformers as hyper_transformers

        hyper_transformers.register()
        attn = hyper_transformers.NAME
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    run_model = torch.compile(model) if args.compile else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    dtype = getattr(torch, args.dtype)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    data_rng = np.random.default_rng(args.seed)
    eval_batches = list(windows(heldout_data, args.seq_len, args.eval_windows, np.random.default_rng(args.seed + 1)))

    log = {"what": "benchmarks/lm/train.py", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "versions": _versions(), "parameters": params, "corpus": text.summary(),
           "corpus_seconds": round(corpus_seconds, 2), "steps": [], "evals": []}
    total = args.steps
    budget = None if args.minutes is None else args.minutes * 60.0
    progress_bar = _progress(args, total)
    step = 0
    tokens = 0
    loop_start = time.time()
    stop_reason = "steps"
    with progress_bar as bar:
        task = bar.add_task("training", total=total if total else budget)
        while True:
            elapsed = time.time() - loop_start
            if total is not None and step >= total:
                break
            if budget is not None and elapsed >= budget:
                stop_reason = "minutes"
                break
            progress = step / total if total else elapsed / budget
            lr = lr_at(args, progress, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = torch.from_numpy(windows(train_data, args.seq_len, args.batch, data_rng)).to(device, non_blocking=True)
            with autocast():
                loss = run_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += ids.numel()
            if step % args.log_every == 0 or step == 1 or step == total:
                value = float(loss.detach())
                log["steps"].append({"step": step, "loss": round(value, 5), "bits_per_byte": round(value / math.log(2), 5),
                                     "lr": lr, "grad_norm": round(float(grad_norm), 4), "tokens": tokens,
                                     "seconds": round(time.time() - loop_start, 2)})
                bar.update(task, description=f"training: loss {value / math.log(2):.3f} bits/byte")
            if args.eval_every and step % args.eval_every == 0:
                nll = evaluate(model, eval_batches, device, autocast)
                log["evals"].append({"step": step, "heldout_nll": nll, "heldout_bits_per_byte": nll / math.log(2),
                                     "seconds": round(time.time() - loop_start, 2)})
            bar.update(task, completed=step if total else min(budget, time.time() - loop_start))
    train_seconds = time.time() - loop_start
    nll = evaluate(model, eval_batches, device, autocast)
    log["evals"].append({"step": step, "heldout_nll": nll, "heldout_bits_per_byte": nll / math.log(2),
                         "seconds": round(time.time() - loop_start, 2)})
    log["final"] = {"steps": step, "stopped_by": stop_reason, "tokens": tokens, "train_seconds": round(train_seconds, 2),
                    "tokens_per_second": round(tokens / max(train_seconds, 1e-9)),
                    "heldout_bits_per_byte": round(nll / math.log(2), 4),
                    "train_bits_per_byte": log["steps"][-1]["bits_per_byte"] if log["steps"] else None}
    save(args.out, model, text, log)
    return log


def save(out: Path, model, text, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "sdpa"  # the saved model loads with the default attention
    model.save_pretrained(out)
    (out / "heldout.txt").write_bytes(text.heldout.data)
    (out / "corpus_files.json").write_text(json.dumps({"train": text.train.files, "heldout": text.heldout.files}))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def _versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _progress(args, total):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    if total:
        columns.insert(2, MofNCompleteColumn())
    return Progress(*columns, disable=args.quiet)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = train(args)
    final = log["final"]
    print(f"{final['steps']} steps, {final['tokens']} tokens in {final['train_seconds']} s "
          f"({final['tokens_per_second']} tokens/s), {log['parameters'] / 1e6:.1f}M parameters; held-out "
          f"{final['heldout_bits_per_byte']} bits/byte -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
