"""Context parallelism measured: ``hyperattn.distributed.attention`` over the ranks of torchrun.

Run with one process per GPU (NCCL), or on CPUs with gloo for a smoke test:

    torchrun --nproc_per_node 8 scripts/gpu_distributed.py --seq_lens 1048576 4194304 --json out.json
    torchrun --nproc_per_node 2 scripts/gpu_distributed.py --cpu --seq_lens 512 --heads 4 --check 256

Each rank holds its sequence shard of q, k, v [B, H, N/P, D].  Printed per N and mode (forward,
forward+backward, causal unless ``--no_causal``):

* ``step``: median ms of one distributed step (CUDA events on the GPU, wall clock on the CPU),
  the slowest rank's (a step ends when the last rank's does);
* ``exchange``: median ms of the step's all-to-alls alone (q, k, v to head shards and the output
  back; for forward+backward also their reverse), same sizes, no attention: the communication;
* ``peak GiB``: the largest rank's peak allocated GPU memory during the step.

``--check N``: before timing, the sharded forward and gradients at length N against a
single-device call of the whole sequence with the same seed on the first rank (max relative
errors printed; they are exact in float64 and within rounding in bf16).  ``--single``: also time
the whole sequence on one device (the first rank), for the scaling efficiency t_1 / (P * t_P).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import hyperattn
import hyperattn.distributed as hd


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--seq_lens", type=int, nargs="+", default=[1048576, 4194304], help="whole-sequence lengths")
    add("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    add("--heads", type=int, default=32)
    add("--kv_heads", type=int, default=None, help="default: --heads")
    add("--dim", type=int, default=64)
    add("--no_causal", action="store_true")
    add("--min_seq_len", type=int, default=4096)
    add("--block_size", type=int, default=256)
    add("--sample_size", type=int, default=256)
    add("--repeats", type=int, default=5)
    add("--cpu", action="store_true", help="gloo on CPUs, reference backend, float64 (a smoke test)")
    add("--check", type=int, default=0, help="compare with the single-device call at this length first")
    add("--single", action="store_true", help="also time the whole sequence on the first rank alone")
    add("--json", default=None, help="write the rows here (first rank)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = _init(args.cpu)
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.float64 if args.cpu else torch.bfloat16
    backend = "reference" if args.cpu else "auto"
    params = dict(causal=not args.no_causal, backend=backend, seed=0, exact_crossover=False,
                  min_seq_len=args.min_seq_len, block_size=args.block_size, sample_size=args.sample_size)
    kv_heads = args.kv_heads or args.heads
    for n in args.seq_lens:
        if n % world:
            _fail(f"--seq_lens: {n} is not divisible by the {world} ranks")
    if args.check:
        if args.check % world:
            _fail(f"--check: {args.check} is not divisible by the {world} ranks (each holds N / P rows)")
        _check(args.check, args, kv_heads, dtype, device, params)
    rows = []
    for n in args.seq_lens:
        for mode in args.modes:
            row = dict(seq_len=n, mode=mode, ranks=world, heads=args.heads, kv_heads=kv_heads, dim=args.dim,
                       causal=params["causal"], device=_device_name(device))
            row.update(_measure(n, mode, args, kv_heads, dtype, device, params))
            dist.barrier()
            if rank == 0:
                print(json.dumps(row), flush=True)
            rows.append(row)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(what="scripts/gpu_distributed.py", ranks=world, rows=rows), f, indent=1)
    dist.destroy_process_group()
    return 0


def _fail(message: str):
    """Leave the group (every rank fails alike: the arguments are the same) and exit with ``message``."""
    dist.destroy_process_group()
    raise SystemExit(message)


def _measure(n, mode, args, kv_heads, dtype, device, params) -> dict:
    """The step, exchange and peak-memory figures of one length and mode (and the lone device's)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    row = _sharded_figures(n, mode, args, kv_heads, dtype, device, params)  # its shards are freed on return
    if args.single and rank == 0:
        whole = _shard_inputs(n, 1, 0, args.heads, kv_heads, args.dim, dtype, device, mode != "fwd")
        row["single_ms"] = _time(lambda: _step(hyperattn.attention, *whole, mode, params), args.repeats, device,
                                 collective=False)
        row["efficiency"] = row["single_ms"] / (world * row["step_ms"])
    return row


def _sharded_figures(n, mode, args, kv_heads, dtype, device, params) -> dict:
    q, k, v = _shard_inputs(n, dist.get_world_size(), dist.get_rank(), args.heads, kv_heads, args.dim, dtype, device,
                            mode != "fwd")

    def step():
        return _step(hd.attention, q, k, v, mode, params)

    return dict(step_ms=_time(step, args.repeats, device),
                exchange_ms=_time(lambda: _exchange(q, k, v, mode), args.repeats, device),
                peak_gib=_peak_gib(step, device))


def _init(cpu: bool) -> torch.device:
    if cpu:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return torch.device("cuda", local)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


#: Positions per independently seeded block of the inputs: a rank draws only the blocks of its shard.
CHUNK = 1024


def _shard_inputs(n, world, rank, heads, kv_heads, dim, dtype, device, grad):
    """This rank's shard of the whole sequence's Gaussian q, k, v (the same on every rank count).

    Position block c of tensor t is drawn on ``device`` from a generator seeded by (t, c), so a rank
    draws only the blocks its shard covers (never the whole sequence) and ``world=1`` rebuilds the
    whole sequence that the shards of any rank count cut."""
    shard = n // world
    start, stop = rank * shard, (rank + 1) * shard
    generator = torch.Generator(device=device)
    out = []
    for t, h in enumerate((heads, kv_heads, kv_heads)):
        x = torch.empty((1, h, shard, dim), dtype=dtype, device=device)
        for c in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            generator.manual_seed(t * 2**40 + c)
            block = torch.randn((1, h, CHUNK, dim), generator=generator, dtype=torch.float32, device=device)
            lo, hi = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
            x[:, :, lo - start:hi - start] = block[:, :, lo - c * CHUNK:hi - c * CHUNK]
        out.append(x.requires_grad_(grad))
    return out


def _step(call, q, k, v, mode, params):
    out = call(q, k, v, **params)
    if mode == "fwd+bwd":
        q.grad = k.grad = v.grad = None
        out.backward(torch.ones_like(out))
    return out


def _exchange(q, k, v, mode):
    """The step's all-to-alls alone (q, k, v out; the output back; reversed for the backward)."""
    world = dist.get_world_size()
    lengths = [q.shape[2]] * world
    repeat = hd.repeat_factor(q.shape[1], k.shape[1], world)
    k, v = (x.repeat_interleave(repeat, dim=1) if repeat > 1 else x for x in (k, v))
    moved = hd.sequences_to_heads([x.detach() for x in (q, k, v)], [lengths] * 3, None)
    back = hd.heads_to_sequence(moved[0], lengths, None)
    if mode == "fwd+bwd":  # the backward moves dout in and dq, dk, dv back
        hd.sequence_to_heads(back, lengths, None)
        hd.heads_to_sequences(moved, [lengths] * 3, None)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, repeats, device, collective=True) -> float:
    """Median ms of ``step`` over ``repeats`` runs after one warm-up; the slowest rank's."""
    step()
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        if collective:
            dist.barrier()
        begin = time.perf_counter()
        step()
        _synchronize(device)
        samples.append((time.perf_counter() - begin) * 1e3)
    median = torch.tensor([statistics.median(samples)], dtype=torch.float64,
                          device=device if dist.get_backend() == "nccl" else "cpu")
    if collective:
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def _peak_gib(step, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _synchronize(device)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def _check(n, args, kv_heads, dtype, device, params) -> None:
    """Sharded forward and gradients at length ``n`` against the first rank's single-device call."""
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = _shard_inputs(n, world, rank, args.heads, kv_heads, args.dim, dtype, device, True)
    out = _step(hd.attention, q, k, v, "fwd+bwd", params)
    shards = [out.detach(), q.grad, k.grad, v.grad]
    gathered = []
    for x in shards:
        every = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(every, x.contiguous())
        gathered.append(torch.cat(every, dim=2))
    if rank == 0:
        whole = _shard_inputs(n, 1, 0, args.heads, kv_heads, args.dim, dtype, device, True)
        want = _step(hyperattn.attention, *whole, "fwd+bwd", params)
        wants = [want.detach(), *(x.grad for x in whole)]
        errors = {name: float((got.double() - w.double()).norm() / w.double().norm())
                  for name, got, w in zip(("out", "dq", "dk", "dv"), gathered, wants)}
        print(json.dumps(dict(check=n, ranks=world, relative_errors=errors)), flush=True)
    dist.barrier()


if __name__ == "__main__":
    raise SystemExit(main())
