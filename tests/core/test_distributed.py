"""``hyperattn.distributed``: a sequence sharded over a gloo process group of 2-4 CPU processes
gives, with one seed, the single-process call's output, log-sum-exp and gradients (causal and
not, B > 1, GQA with fewer KV heads than ranks and ranks holding repeated KV heads, uneven
shards, ranks whose losses use different outputs), bad head counts get clear errors, and a bad
input on one rank raises the same error on every rank (none is left waiting in a collective)."""

from __future__ import annotations

import datetime
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import hyperattn
from helpers import make_inputs

PARAMS = dict(block_size=16, sample_size=8, lsh_num_projs=3, min_seq_len=32, exact_crossover=False, seed=11,
              backend="reference")
#: A collective that waits longer than this fails (so a test that would hang fails instead).
TIMEOUT = datetime.timedelta(seconds=30)
#: (batch, query heads, KV heads, causal, extra parameters, which ranks' losses use out / lse:
#: "all", or "split": the first rank's uses only out, the others' only lse)
CASES = [
    (1, 4, 4, False, {}, "all"),
    (1, 4, 2, True, {"band_keys": 8, "sink_keys": 4}, "all"),
    (1, 4, 1, True, {}, "all"),
    (2, 4, 2, False, {}, "split"),  # B > 1; rank 0 leaves lse out of its loss, the others out
    # 3 KV heads repeated over the ranks: each rank's KV heads (GlobalHeads.kv_index) repeat,
    # e.g. (0, 0, 1) and (1, 2, 2) for P=2, (0, 0, 0), (0, 1, 1), ... for P=4: not a range
    (1, 12, 3, True, {}, "all"),
    # importance sampling: each head's draws follow its own keys' norms, counted as the whole call's heads
    (1, 12, 3, True, {"sampling": "key_norm"}, "all"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(batch, heads, kv_heads, n, seed):
    arrays = make_inputs((batch, heads, n, 8), kv_heads=kv_heads, n_k=n, v_dim=6, seed=seed)
    return [torch.from_numpy(x).requires_grad_() for x in arrays]


def _weights(batch, heads, n, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, heads, n, 6)))


def _case_weights(i, lengths, rank=None):
    """Case i's weights of out and lse in the loss: the whole sequence's (rank None), where the
    "split" cases zero what each rank leaves out, or one rank's shard."""
    batch, heads, _, _, _, uses = CASES[i]
    n = sum(lengths)
    weights, lse_weights = _weights(batch, heads, n, i), _weights(batch, heads, n, i + 50)[..., 0]
    if uses == "split":
        weights[:, :, lengths[0]:] = 0
        lse_weights[:, :, :lengths[0]] = 0
    if rank is None:
        return weights, lse_weights
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    return weights[:, :, start:stop], lse_weights[:, :, start:stop]


def _call(call, q, k, v, causal, extra, weights, lse_weights, use_out=True, use_lse=True):
    out, lse = call(q, k, v, causal=causal, return_lse=True, **PARAMS, **extra)
    loss = (out * weights).sum() if use_out else 0
    if use_lse:  # a rank may leave an output out of its loss altogether (no zero weights)
        loss = loss + (lse * lse_weights).sum()
    loss.backward()
    return [t.detach().numpy() for t in (out, lse, q.grad, k.grad, v.grad)]


def _init(rank, world, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)


def _rank(rank, world, port, lengths, folder):
    import torch.distributed as dist

    import hyperattn.distributed

    _init(rank, world, port)
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    results = []
    for i, (batch, heads, kv_heads, causal, extra, uses) in enumerate(CASES):
        q, k, v = (x.detach()[:, :, start:stop].clone().requires_grad_()
                   for x in _inputs(batch, heads, kv_heads, sum(lengths), i))
        split = uses == "split"
        results.append(_call(hyperattn.distributed.attention, q, k, v, causal, extra,
                             *_case_weights(i, lengths, rank), use_out=not split or rank == 0,
                             use_lse=not split or rank > 0))
    errors = []
    for heads, kv_heads in ((3, 3), (4, 3)):  # H not divisible by P; Hk repeated does not divide H
        q = torch.zeros(1, heads, lengths[rank], 8)
        kv = torch.zeros(1, kv_heads, lengths[rank], 8)
        try:
            hyperattn.distributed.attention(q, kv, kv, **PARAMS)
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    dist.destroy_process_group()
    with open(os.path.join(folder, f"{rank}.pkl"), "wb") as f:
        pickle.dump((results, errors), f)


@pytest.mark.parametrize("lengths", [(40, 40), (70, 80, 75, 75)], ids=["P2", "P4-uneven"])
def test_sharded_calls_equal_the_single_process_call(lengths, tmp_path):
    world = len(lengths)
    mp.start_processes(_rank, args=(world, _free_port(), lengths, str(tmp_path)), nprocs=world, start_method="spawn")
    shards = [pickle.load(open(tmp_path / f"{r}.pkl", "rb")) for r in range(world)]
    n = sum(lengths)
    for i, (batch, heads, kv_heads, causal, extra, _) in enumerate(CASES):
        want = _call(hyperattn.attention, *_inputs(batch, heads, kv_heads, n, i), causal, extra,
                     *_case_weights(i, lengths))
        for j, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            got = np.concatenate([shards[r][0][i][j] for r in range(world)], axis=2)
            np.testing.assert_allclose(got, want[j], rtol=1e-10, atol=1e-12, err_msg=f"case {i}: {name}")
    for errors in (shards[r][1] for r in range(world)):
        assert errors[0] is not None and f"H=3 must be divisible by the process group's size P={world}" in errors[0]
        if world == 4:  # 3 KV heads over 4 ranks: repeated 4 times, 12 does not divide 4
            assert errors[1] is not None and "Hk=3 repeated 4 times" in errors[1]


#: Calls with a bad input on one rank: (name, the rank, what it changes there, the error's type,
#: words the message must hold).  n = 40 rows and keys per rank, D = 8, Dv = 6, seed 11.
ONE_BAD_RANK = [
    ("head dim", 1, dict(dim=4), "ValueError",
     ["head dim D (q.shape[3]) must be the same on every rank", "rank 0 has 8, rank 1 has 4"]),
    ("k's head dim", 1, dict(k_dim=4), "ValueError", ["on rank 1: k's head dim must be q's, got 4 and 8"]),
    ("k and v lengths", 1, dict(v_len=39), "ValueError",
     ["on rank 1: k and v must have the same number of keys, got 40 and 39"]),
    ("seed", 1, dict(seed=12), "ValueError", ["seed must be the same int on every rank", "rank 0 has 11, rank 1 has 12"]),
    ("seed None", 0, dict(seed=None), "ValueError", ["seed (an int, or None on every rank)",
                                                     "rank 0 has None, rank 1 has an int"]),
    ("invalid seed", 0, dict(seed=-1), "ValueError", ["on rank 0: seed must be None or an int in [0, 2**63), got -1"]),
    ("v not a tensor", 1, dict(v="array"), "TypeError", ["on rank 1: v must be a 4-d torch tensor"]),
    ("dtype", 1, dict(dtype=torch.float32), "ValueError",
     ["q.dtype must be the same", "rank 0 has torch.float64, rank 1 has torch.float32"]),
    ("causal", 1, dict(causal=True), "ValueError", ["causal must be the same", "rank 0 has False, rank 1 has True"]),
    ("requires_grad", 0, dict(grad=True), "ValueError",
     ["require grad", "rank 0 has (q, k, v) = (True, False, False), rank 1 has (q, k, v) = (False, False, False)"]),
    ("block_size", 1, dict(block_size=0), "ValueError", ["on rank 1: ", "block_size"]),
    ("kv heads", 1, dict(kv_heads=1), "ValueError", ["the KV heads Hk (k.shape[1])", "rank 0 has 2, rank 1 has 1"]),
]


def _bad_call(change):
    import hyperattn.distributed

    dtype = change.get("dtype", torch.float64)
    dim = change.get("dim", 8)
    q = torch.ones(1, 4, 40, dim, dtype=dtype).requires_grad_(change.get("grad", False))
    k = torch.ones(1, change.get("kv_heads", 2), 40, change.get("k_dim", dim), dtype=dtype)
    v = torch.ones(1, k.shape[1], change.get("v_len", 40), 6, dtype=dtype) if "v" not in change else change["v"]
    params = {**PARAMS, "seed": change.get("seed", PARAMS["seed"]), "block_size": change.get("block_size", 16)}
    return hyperattn.distributed.attention(q, k, v, causal=change.get("causal", False), **params)


def _bad_rank(rank, world, port, folder):
    import torch.distributed as dist

    _init(rank, world, port)
    raised = []
    for _, bad_rank, change, _, _ in ONE_BAD_RANK:
        try:
            _bad_call(change if rank == bad_rank else {})
            raised.append(None)
        except Exception as error:  # noqa: BLE001 - every type is recorded
            raised.append((type(error).__name__, str(error)))
    out = _bad_call({})  # the group is still in step: a good call after them all works
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(folder, f"{rank}.pkl"), "wb") as f:
        pickle.dump((raised, out.shape), f)


def test_a_bad_input_on_one_rank_raises_the_same_error_on_every_rank(tmp_path):
    world = 2
    mp.start_processes(_bad_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [pickle.load(open(tmp_path / f"{r}.pkl", "rb")) for r in range(world)]
    for i, (name, _, _, kind, words) in enumerate(ONE_BAD_RANK):
        errors = [raised[i] for raised, _ in ranks]
        assert errors[0] is not None and all(e == errors[0] for e in errors), f"{name}: {errors}"
        assert errors[0][0] == kind, f"{name}: {errors[0]}"
        for word in words:
            assert word in errors[0][1], f"{name}: {errors[0][1]!r} lacks {word!r}"
    assert all(shape == (1, 4, 40, 6) for _, shape in ranks)


def test_without_a_process_group_the_error_says_so():
    import hyperattn.distributed

    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        hyperattn.distributed.attention(q, q, q)


def test_autocast_casts_the_shards_like_the_single_process_call():
    """Under torch.autocast float32 q, k beside a bf16 v give the call on bf16 inputs (a group of
    one process)."""
    import torch.distributed as dist

    import hyperattn.distributed

    q, k, v = (torch.from_numpy(x).float() for x in make_inputs((1, 2, 80, 8), seed=3))
    v16 = v.bfloat16()
    _init(0, 1, _free_port())
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hyperattn.distributed.attention(q, k, v16, causal=True, **PARAMS)
    finally:
        dist.destroy_process_group()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, hyperattn.attention(q.bfloat16(), k.bfloat16(), v16, causal=True, **PARAMS),
                               rtol=0, atol=0)


@pytest.mark.parametrize("sampling", ["stratified", "key_norm"])
def test_global_heads_take_the_larger_calls_samples(sampling):
    """The samples of heads [1, 3) of a 4-KV-head call, drawn alone, are the 4-head call's, and so are
    those of heads given out of order and repeated (a ``kv_index`` that is not a range); with
    ``key_norm`` their per-draw weights too."""
    from hyperattn import testing
    from hyperattn.algorithm import CallSpec, GlobalHeads, SparsePiece
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    reference = backend_status("reference").backend
    q, k, _ = make_inputs((1, 4, 200, 8), kv_heads=4, n_k=200, v_dim=8, seed=1)
    config = HyperAttentionConfig(16, 8, 3, 32, exact_crossover=False, sampling=sampling)
    whole = testing.seeded_plan(reference, q, k, causal=True, scale=0.3, config=config, seed=5)
    for index in ([1, 2], [3, 1, 1, 0]):
        part = CallSpec(True, 0.3, config, 5, None, GlobalHeads(4, tuple(index))).plan(reference, q[:, index],
                                                                                        k[:, index])
        sparse = [(a.structure, b.structure) for a, b in zip(whole.pieces, part.pieces) if isinstance(a, SparsePiece)]
        assert sparse
        for a, b in sparse:
            np.testing.assert_array_equal(a.samples[:, index], b.samples)
            np.testing.assert_array_equal(a.k_order[:, index], b.k_order)
            if sampling == "key_norm":
                np.testing.assert_array_equal(a.sample_log_weights[:, index], b.sample_log_weights)


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "scripts" / "gpu_distributed.py"
    spec = importlib.util.spec_from_file_location("gpu_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_ranks_draw_only_their_shards_of_one_sequence():
    """scripts/gpu_distributed.py: each rank's shard (drawn alone, block by block) is the whole
    sequence's slice, for any rank count and a length that is not a multiple of its block."""
    script = _script()
    n = 3 * script.CHUNK + 300
    whole = script._shard_inputs(n, 1, 0, 2, 1, 4, torch.float64, torch.device("cpu"), False)
    for world in (2, 3, 4):
        shard = n // world
        for rank in range(world):
            part = script._shard_inputs(n, world, rank, 2, 1, 4, torch.float64, torch.device("cpu"), False)
            for got, want in zip(part, whole):
                assert torch.equal(got, want[:, :, rank * shard:(rank + 1) * shard])


def _script_rank(rank, world, port, argv, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        _script().main(argv)
        message = None
    except SystemExit as exit_:
        message = str(exit_)
    with open(os.path.join(folder, f"{rank}.pkl"), "wb") as f:
        pickle.dump(message, f)


def test_the_scripts_check_length_must_divide_over_the_ranks(tmp_path):
    argv = ["--cpu", "--seq_lens", "64", "--heads", "2", "--check", "65"]
    mp.start_processes(_script_rank, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        assert pickle.load(open(tmp_path / f"{r}.pkl", "rb")) == "--check: 65 is not divisible by the 2 ranks " \
                                                                "(each holds N / P rows)"
