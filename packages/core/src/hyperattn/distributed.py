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

Only ``torch.distributed`` collectives: one ``all_gather`` of a few integers per call (every
rank's shapes, dtypes, seed, keyword arguments and local errors, so that a bad input on one rank
raises the same error on every rank instead of leaving the others waiting in a collective), then
``all_to_all_single`` (NCCL on GPUs, gloo on CPUs): q, k, v in, out and lse back, and the
reverse in the backward.
"""

from __future__ import annotations

import math
import numbers
import struct
import zlib

import torch
import torch.distributed as dist

from . import pipeline
from .algorithm import GlobalHeads
from .config import make_config
from .torch.autocast import autocast_inputs
from .validate import check_seed

__all__ = ["attention"]


def attention(q, k, v, *, group=None, causal: bool = False, scale: float | None = None, backend: str = "auto",
              block_size: int = 256, sample_size: int = 256, lsh_num_projs: int = 7, min_seq_len: int = 4096,
              exact_crossover: bool = True, sink_keys: int = 0, band_keys: int = 0, sampling: str = "stratified",
              estimator: str | None = None, seed=None, return_lse: bool = False):
    """HyperAttention of this rank's sequence shard: q [B, H, n_r, D], k [B, Hk, m_r, D],
    v [B, Hk, m_r, Dv] -> out [B, H, n_r, Dv] (and lse [B, H, n_r] with ``return_lse``).

    The parameters are :func:`hyperattn.attention`'s, and mean what they mean for the whole
    sequence (``causal`` aligns the mask bottom-right over the whole of it).  ``group``: the process
    group (default: the world).  ``seed``: every rank must pass the same int; None (on every rank)
    uses one drawn on the group's first rank.

    Every rank of the group must make the call, with the same B, H, Hk, D, Dv, dtypes, seed,
    keyword arguments and ``requires_grad`` of q, k, v; shard lengths may differ.  These are checked
    together in one collective, so a bad input on any rank raises the same ValueError or TypeError
    (naming the rank) on every rank, and the group stays usable.

    Backward: it exchanges gradients, so every rank must run a backward through this call's
    output, or none.  How each rank uses ``out`` and ``lse`` in its loss is free: the gradients of
    both travel in one exchange (zeros for an output a rank leaves unused), so a rank may use lse
    where another does not.
    """
    if pipeline.compiling(q):
        raise NotImplementedError("hyperattn.distributed.attention does not run under torch.compile yet: "
                                  "call it outside the compiled region")
    q, k, v = autocast_inputs(q, k, v)  # before the exchange: the shards cross the group in autocast's dtype
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("hyperattn.distributed.attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    settings = dict(causal=causal, scale=scale, backend=backend, block_size=block_size, sample_size=sample_size,
                    lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len, exact_crossover=exact_crossover,
                    sink_keys=sink_keys, band_keys=band_keys, sampling=sampling, return_lse=return_lse)
    config, error = None, None
    try:
        _check_local(q, k, v, seed, scale)
        config = make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys,
                             band_keys, sampling, estimator)
        # the ranks agree on the parameters in force, however named (an estimator or its fields)
        settings.update(sample_size=config.sample_size, sink_keys=config.sink_keys, band_keys=config.band_keys,
                        sampling=config.sampling)
    except (TypeError, ValueError) as e:
        error = e
    every = _gather_calls(_describe(q, k, v, seed, settings, error), _device_of(q, group), group)
    _raise_disagreement(every)
    seed, q_lens, k_lens = every[0]["seed"], [d["n_q"] for d in every], [d["n_k"] for d in every]
    heads, kv_heads = q.shape[1], k.shape[1]
    repeat = repeat_factor(heads, kv_heads, world)  # the same on every rank: H, Hk agree
    if repeat > 1:
        k, v = (x.repeat_interleave(repeat, dim=1) for x in (k, v))
    local_kv = kv_heads * repeat // world
    global_heads = GlobalHeads(kv_heads, tuple(j // repeat for j in range(rank * local_kv, (rank + 1) * local_kv)))
    qh, kh, vh = sequences_to_heads([q, k, v], [q_lens, k_lens, k_lens], group)
    result = pipeline.run(qh, kh, vh, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                          return_lse=return_lse, global_heads=global_heads)
    if not return_lse:
        return heads_to_sequence(result, q_lens, group)
    out, lse = result
    out, lse = heads_to_sequences([out, lse.unsqueeze(-1)], [q_lens, q_lens], group)
    return out, lse.squeeze(-1)


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


# -- the one check every rank makes together ----------------------------------------------------
#: The dtypes a call describes by their index here (0: another).
_DTYPES = tuple(getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint8", "bool") if hasattr(torch, name))
#: Bytes of a rank's local error message carried by the gather (longer ones are cut).
_MESSAGE_BYTES = 400
_ERRORS = (None, TypeError, ValueError)
def _show_dtype(code: int) -> str:
    """A dtype of ``_DTYPES`` from its code in a call's description (0: one not listed)."""
    return str(_DTYPES[code - 1]) if code else "another dtype"


#: The integer fields of a call's description, in order; after them the message's bytes.
_FIELDS = ("error", "B", "H", "Hk", "D", "Dv", "q_dtype", "k_dtype", "v_dtype", "grad", "seed_given", "seed",
           "n_q", "n_k", "causal", "return_lse", "scale", "backend", "block_size", "sample_size", "lsh_num_projs",
           "min_seq_len", "exact_crossover", "sink_keys", "band_keys", "sampling")
#: What must agree across ranks: (field, how an error names it, how it shows a value).
_AGREED = (
    ("B", "the batch size B (q.shape[0])", str),
    ("H", "the query heads H (q.shape[1])", str),
    ("Hk", "the KV heads Hk (k.shape[1])", str),
    ("D", "the head dim D (q.shape[3])", str),
    ("Dv", "the value dim Dv (v.shape[3])", str),
    ("q_dtype", "q.dtype", _show_dtype),
    ("k_dtype", "k.dtype", _show_dtype),
    ("v_dtype", "v.dtype", _show_dtype),
    ("grad", "whether q, k, v require grad (under grad mode)",
     lambda g: "(q, k, v) = " + str(tuple(bool(g >> i & 1) for i in range(3)))),
    ("seed_given", "seed (an int, or None on every rank)", lambda s: "an int" if s else "None"),
    ("causal", "causal", lambda x: str(bool(x))),
    ("return_lse", "return_lse", lambda x: str(bool(x))),
    ("scale", "scale", lambda x: "None" if x == _NONE_SCALE else repr(struct.unpack("<d", struct.pack("<q", x))[0])),
    ("backend", "backend", lambda x: f"one with CRC32 {x:#x}"),
    ("block_size", "block_size", str),
    ("sample_size", "sample_size", str),
    ("lsh_num_projs", "lsh_num_projs", str),
    ("min_seq_len", "min_seq_len", str),
    ("exact_crossover", "exact_crossover", lambda x: str(bool(x))),
    ("sink_keys", "sink_keys", str),
    ("band_keys", "band_keys", str),
    ("sampling", "sampling", lambda x: f"one with CRC32 {x:#x}"),
)
_NONE_SCALE = -(2**63)


def _check_local(q, k, v, seed, scale) -> None:
    """What one rank can check alone (before the gather), raised as TypeError or ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name} must be a 4-d torch tensor [B, H, N, D], got "
                            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k, v must have one batch size B, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of KV heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k's head dim must be q's, got {k.shape[3]} and {q.shape[3]}")
    if isinstance(seed, torch.Tensor):
        raise TypeError("hyperattn.distributed.attention takes an int seed (or None), not a tensor")
    check_seed(seed)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")


def _code(text) -> int:
    return zlib.crc32(str(text).encode())


def _describe(q, k, v, seed, settings, error) -> list[int]:
    """This rank's call as the integers of ``_FIELDS`` and its error message's bytes."""
    fields = dict.fromkeys(_FIELDS, 0)
    if error is not None:
        fields["error"] = _ERRORS.index(TypeError if isinstance(error, TypeError) else ValueError)
        message = str(error).encode()[:_MESSAGE_BYTES]
        return [fields[f] for f in _FIELDS] + list(message) + [0] * (_MESSAGE_BYTES - len(message))
    grad = torch.is_grad_enabled()
    drawn = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # used where rank 0 passes None
    fields.update(B=q.shape[0], H=q.shape[1], Hk=k.shape[1], D=q.shape[3], Dv=v.shape[3],
                  q_dtype=_dtype_code(q.dtype), k_dtype=_dtype_code(k.dtype), v_dtype=_dtype_code(v.dtype),
                  grad=sum(1 << i for i, x in enumerate((q, k, v)) if grad and x.requires_grad),
                  seed_given=int(seed is not None), seed=drawn if seed is None else int(seed),
                  n_q=q.shape[2], n_k=k.shape[2], causal=int(bool(settings["causal"])),
                  return_lse=int(bool(settings["return_lse"])),
                  scale=_NONE_SCALE if settings["scale"] is None else
                  struct.unpack("<q", struct.pack("<d", float(settings["scale"])))[0],
                  backend=_code(settings["backend"]), sampling=_code(settings["sampling"]),
                  exact_crossover=int(bool(settings["exact_crossover"])),
                  **{name: int(settings[name]) for name in ("block_size", "sample_size", "lsh_num_projs",
                                                            "min_seq_len", "sink_keys", "band_keys")})
    return [max(-(2**63), min(2**63 - 1, fields[f])) for f in _FIELDS] + [0] * _MESSAGE_BYTES  # int64 fits


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def _gather_calls(description: list[int], device, group) -> list[dict]:
    """Every rank's description (one all_gather), in rank order, as dicts with a ``message``."""
    mine = torch.tensor(description, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    calls = []
    for t in every:
        values = t.tolist()
        call = dict(zip(_FIELDS, values))
        call["message"] = bytes(b for b in values[len(_FIELDS):] if b).decode(errors="replace")
        calls.append(call)
    return calls


def _raise_disagreement(every: list[dict]) -> None:
    """The same error on every rank: the first rank's own error, else the first field where a rank
    differs from rank 0, else a shard without rows or keys."""
    for r, call in enumerate(every):
        if call["error"]:
            raise _ERRORS[call["error"]](f"hyperattn.distributed.attention on rank {r}: {call['message']}")
    first = every[0]
    for field, name, show in _AGREED:
        for r, call in enumerate(every):
            if call[field] != first[field]:
                raise ValueError(f"{name} must be the same on every rank of the group: rank 0 has "
                                 f"{show(first[field])}, rank {r} has {show(call[field])}")
        if field == "seed_given" and first["seed_given"]:
            for r, call in enumerate(every):
                if call["seed"] != first["seed"]:
                    raise ValueError(f"seed must be the same int on every rank of the group: rank 0 has "
                                     f"{first['seed']}, rank {r} has {call['seed']}")
    lengths = [(call["n_q"], call["n_k"]) for call in every]
    if any(n_q < 1 or n_k < 1 for n_q, n_k in lengths):
        raise ValueError(f"every rank needs at least one query row and key; the shards' (rows, keys) are {lengths}")


def _device_of(q, group) -> torch.device:
    """Where a small tensor for a collective lives: the inputs' GPU for NCCL, else the CPU."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(q, torch.Tensor) and q.device.type == "cuda":
        return q.device
    return torch.device("cuda", torch.cuda.current_device())


# -- the exchanges --------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of flat tensors, each with its split sizes; the backward is the reverse
    exchange of every input that needs a gradient, with zeros for an output left unused, so that
    every rank makes the same exchanges whatever its loss uses."""

    @staticmethod
    def forward(ctx, group, splits, *xs):
        ctx.group, ctx.splits = group, splits
        outs = []
        for x, (send, receive) in zip(xs, splits):
            out = x.new_empty(sum(receive))
            dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                                   group=group)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # grads of unused outputs are materialised as zeros (the default)
        backs = []
        for i, (grad, (send, receive)) in enumerate(zip(grads, ctx.splits)):
            if not ctx.needs_input_grad[2 + i]:  # the same on every rank: requires_grad is checked to agree
                backs.append(None)
                continue
            back = grad.new_empty(sum(send))
            dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=send, input_split_sizes=receive,
                                   group=ctx.group)
            backs.append(back)
        return (None, None, *backs)


def sequences_to_heads(xs, lengths: list[list[int]], group) -> list:
    """[B, H, n_r, ...] sequence shards -> [B, H / P, sum(lengths), ...] for each of ``xs`` in one
    exchange: this rank's heads of the whole sequence (``lengths[i]``: every rank's shard length
    of ``xs[i]``, in rank order)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flats, splits, shapes = [], [], []
    for x, lens in zip(xs, lengths):
        batch, heads, _, *rest = x.shape
        local = heads // world
        per_position = batch * local * math.prod(rest)
        chunks = x.reshape(batch, world, local, lens[rank], *rest).transpose(0, 1)  # [P, B, H/P, n_r, ...]
        flats.append(chunks.reshape(-1))
        splits.append(([per_position * lens[rank]] * world, [per_position * n for n in lens]))
        shapes.append((batch, local, rest))
    moved = _AllToAll.apply(group, tuple(splits), *flats)
    out = []
    for flat, lens, (_, receive), (batch, local, rest) in zip(moved, lengths, splits, shapes):
        pieces = [p.reshape(batch, local, n, *rest) for p, n in zip(flat.split(receive), lens)]
        out.append(torch.cat(pieces, dim=2))
    return out


def heads_to_sequences(xs, lengths: list[list[int]], group) -> list:
    """[B, H / P, sum(lengths), ...] -> [B, H, lengths[rank], ...] for each of ``xs`` in one
    exchange: the inverse of ``sequences_to_heads``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flats, splits, shapes = [], [], []
    for x, lens in zip(xs, lengths):
        batch, local, _, *rest = x.shape
        per_position = batch * local * math.prod(rest)
        flats.append(torch.cat([p.reshape(-1) for p in x.split(lens, dim=2)]))
        splits.append(([per_position * n for n in lens], [per_position * lens[rank]] * world))
        shapes.append((batch, local, rest))
    moved = _AllToAll.apply(group, tuple(splits), *flats)
    return [flat.reshape(world, batch, local, lens[rank], *rest).transpose(0, 1).reshape(
                batch, world * local, lens[rank], *rest)
            for flat, lens, (batch, local, rest) in zip(moved, lengths, shapes)]


def sequence_to_heads(x, lengths: list[int], group):
    """One tensor's ``sequences_to_heads``."""
    return sequences_to_heads([x], [lengths], group)[0]


def heads_to_sequence(x, lengths: list[int], group):
    """One tensor's ``heads_to_sequences``."""
    return heads_to_sequences([x], [lengths], group)[0]
