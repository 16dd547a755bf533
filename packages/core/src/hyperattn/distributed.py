"""HyperAttention of a sequence sharded over a ``torch.distributed`` process group.

The all-to-all scheme of DeepSpeed-Ulysses: each rank holds its contiguous shard of the sequence,
q [B, H, n_r, D], k and v [B, Hk, n_r, D] (rank order is sequence order; shards may differ in
length).  One all-to-all turns sequence shards into head shards: rank r then holds H / P query
heads of the whole sequence and runs the single-device algorithm on them, drawing the samples the
whole call draws for those heads (``hyperattn.algorithm.GlobalHeads``), and one more all-to-all
turns its output back into a sequence shard.  So with one seed the result is the single-device
call's, forward and gradients (the backward's exchanges are the forward's, reversed).

Heads: H must be divisible by the group size P.  With fewer KV heads than ranks (or Hk not
divisible by P) each KV head is repeated r = P / gcd(Hk, P) times before the exchange, so every
rank receives whole KV heads: r times the KV traffic and memory of an even split (documented
cost); H must then be divisible by Hk * r.

Only ``torch.distributed`` collectives: ``all_to_all_single`` (NCCL on GPUs, gloo on CPUs) and,
for the shard lengths and a missing seed, ``all_gather`` / ``broadcast`` of a few integers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import pipeline
from .algorithm import GlobalHeads
from .config import make_config
from .validate import check_seed

__all__ = ["attention"]


def attention(q, k, v, *, group=None, causal: bool = False, scale: float | None = None, backend: str = "auto",
              block_size: int = 256, sample_size: int = 256, lsh_num_projs: int = 7, min_seq_len: int = 4096,
              exact_crossover: bool = True, sink_keys: int = 0, band_keys: int = 0, sampling: str = "uniform", seed=None,
              return_lse: bool = False):
    """HyperAttention of this rank's sequence shard: q [B, H, n_r, D], k [B, Hk, m_r, D],
    v [B, Hk, m_r, Dv] -> out [B, H, n_r, Dv] (and lse [B, H, n_r] with ``return_lse``).

    The parameters are :func:`hyperattn.attention`'s, and mean what they mean for the whole
    sequence (``causal`` aligns the mask bottom-right over the whole of it).  ``group``: the process
    group (default: the world).  ``seed``: every rank must pass the same int; None draws one on the
    group's first rank and broadcasts it.
    """
    if pipeline.compiling(q):
        raise NotImplementedError("hyperattn.distributed.attention does not run under torch.compile yet: "
                                  "call it outside the compiled region")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("hyperattn.distributed.attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name} must be a 4-d torch tensor [B, H, N, D], got "
                            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    heads, kv_heads = q.shape[1], k.shape[1]
    repeat = repeat_factor(heads, kv_heads, world)
    config = make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys,
                         band_keys, sampling)
    seed = _common_seed(seed, q.device, group)
    q_lens, k_lens = _shard_lengths(q.shape[2], k.shape[2], q.device, group)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got {k.shape[2]} and {v.shape[2]}")
    if repeat > 1:
        k, v = (x.repeat_interleave(repeat, dim=1) for x in (k, v))
    local_kv = kv_heads * repeat // world
    global_heads = GlobalHeads(kv_heads, tuple(j // repeat for j in range(rank * local_kv, (rank + 1) * local_kv)))
    qh = sequence_to_heads(q, q_lens, group)
    kh, vh = (sequence_to_heads(x, k_lens, group) for x in (k, v))
    result = pipeline.run(qh, kh, vh, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                          return_lse=return_lse, global_heads=global_heads)
    if not return_lse:
        return heads_to_sequence(result, q_lens, group)
    out, lse = result
    return heads_to_sequence(out, q_lens, group), heads_to_sequence(lse.unsqueeze(-1), q_lens, group).squeeze(-1)


def repeat_factor(heads: int, kv_heads: int, world: int) -> int:
    """How many times each KV head is repeated so that ``world`` ranks receive whole KV heads (1:
    none), or a ValueError naming the head counts and the group size."""
    if heads % world:
        raise ValueError(f"the query heads H={heads} must be divisible by the process group's size P={world} "
                         "(each rank computes H / P heads of the whole sequence)")
    repeat = world // math.gcd(kv_heads, world)
    if heads % (kv_heads * repeat):
        raise ValueError(f"the KV heads Hk={kv_heads} repeated {repeat} times (for P={world} ranks) must divide "
                         f"the query heads H={heads}")
    return repeat


def _common_seed(seed, device, group) -> int:
    """The seed every rank uses: ``seed`` as given (an int, the same on every rank), or one drawn on
    the group's first rank and broadcast."""
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            raise TypeError("hyperattn.distributed.attention takes an int seed (or None), not a tensor")
        check_seed(seed)
        return int(seed)
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    drawn = drawn.to(_collective_device(device, group))
    dist.broadcast(drawn, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(drawn.item())


def _shard_lengths(n_q: int, n_k: int, device, group) -> tuple[list[int], list[int]]:
    """Every rank's (query rows, keys), in rank order (one all_gather of two ints)."""
    mine = torch.tensor([n_q, n_k], dtype=torch.int64, device=_collective_device(device, group))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    lengths = [tuple(int(x) for x in t.tolist()) for t in every]
    if any(n_q < 1 or n_k < 1 for n_q, n_k in lengths):
        raise ValueError(f"every rank needs at least one query row and key; the shards' (rows, keys) are {lengths}")
    return [a for a, _ in lengths], [b for _, b in lengths]


def _collective_device(device, group) -> torch.device:
    """Where a small tensor for a collective lives: the inputs' GPU for NCCL, else the CPU."""
    return torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat tensor with split sizes; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], receive: list[int], group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty(sum(receive))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.receive,
                               group=ctx.group)
        return back, None, None, None


def sequence_to_heads(x, lengths: list[int], group):
    """[B, H, n_r, ...] sequence shards -> [B, H / P, sum(lengths), ...]: this rank's heads of the
    whole sequence (``lengths``: every rank's shard length, in rank order)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, heads, _, *rest = x.shape
    local = heads // world
    per_position = batch * local * math.prod(rest)
    chunks = x.reshape(batch, world, local, lengths[rank], *rest).transpose(0, 1)  # [P, B, H/P, n_r, ...]
    send = [per_position * lengths[rank]] * world
    receive = [per_position * n for n in lengths]
    flat = _AllToAll.apply(chunks.reshape(-1), send, receive, group)
    pieces = [p.reshape(batch, local, n, *rest) for p, n in zip(flat.split(receive), lengths)]
    return torch.cat(pieces, dim=2)


def heads_to_sequence(x, lengths: list[int], group):
    """[B, H / P, sum(lengths), ...] -> [B, H, lengths[rank], ...]: the inverse of ``sequence_to_heads``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, local, _, *rest = x.shape
    per_position = batch * local * math.prod(rest)
    send = [per_position * n for n in lengths]
    receive = [per_position * lengths[rank]] * world
    flat = torch.cat([p.reshape(-1) for p in x.split(lengths, dim=2)])
    chunks = _AllToAll.apply(flat, send, receive, group).reshape(world, batch, local, lengths[rank], *rest)
    return chunks.transpose(0, 1).reshape(batch, world * local, lengths[rank], *rest)
