"""``hyperattn.distributed``: a sequence sharded over a gloo process group of 2-4 CPU processes
gives, with one seed, the single-process call's output, log-sum-exp and gradients (causal and
not, GQA with fewer KV heads than ranks, uneven shards), and bad head counts get clear errors."""

from __future__ import annotations

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
#: (query heads, KV heads, shard lengths per world size, causal, extra parameters)
CASES = [
    (4, 4, False, {}),
    (4, 2, True, {"band_keys": 8, "sink_keys": 4}),
    (4, 1, True, {}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(heads, kv_heads, n, seed):
    arrays = make_inputs((1, heads, n, 8), kv_heads=kv_heads, n_k=n, v_dim=6, seed=seed)
    return [torch.from_numpy(x).requires_grad_() for x in arrays]


def _weights(heads, n, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, heads, n, 6)))


def _call(call, q, k, v, causal, extra, weights, lse_weights):
    out, lse = call(q, k, v, causal=causal, return_lse=True, **PARAMS, **extra)
    ((out * weights).sum() + (lse * lse_weights).sum()).backward()
    return [t.detach().numpy() for t in (out, lse, q.grad, k.grad, v.grad)]


def _rank(rank, world, port, lengths, folder):
    import torch.distributed as dist

    import hyperattn.distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    results = []
    for i, (heads, kv_heads, causal, extra) in enumerate(CASES):
        q, k, v = (x.detach()[:, :, start:stop].clone().requires_grad_() for x in _inputs(heads, kv_heads,
                                                                                           sum(lengths), i))
        weights, lse_weights = _weights(heads, sum(lengths), i), _weights(heads, sum(lengths), i + 50)[..., 0]
        results.append(_call(hyperattn.distributed.attention, q, k, v, causal, extra,
                             weights[:, :, start:stop], lse_weights[:, :, start:stop]))
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
    for i, (heads, kv_heads, causal, extra) in enumerate(CASES):
        weights, lse_weights = _weights(heads, n, i), _weights(heads, n, i + 50)[..., 0]
        want = _call(hyperattn.attention, *_inputs(heads, kv_heads, n, i), causal, extra, weights, lse_weights)
        for j, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            got = np.concatenate([shards[r][0][i][j] for r in range(world)], axis=2)
            np.testing.assert_allclose(got, want[j], rtol=1e-10, atol=1e-12, err_msg=f"case {i}: {name}")
    for errors in (shards[r][1] for r in range(world)):
        assert errors[0] is not None and f"H=3 must be divisible by the process group's size P={world}" in errors[0]
        if world == 4:  # 3 KV heads over 4 ranks: repeated 4 times, 12 does not divide 4
            assert errors[1] is not None and "Hk=3 repeated 4 times" in errors[1]


def test_without_a_process_group_the_error_says_so():
    import hyperattn.distributed

    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        hyperattn.distributed.attention(q, q, q)


def test_global_heads_take_the_larger_calls_samples():
    """The samples of heads [1, 3) of a 4-KV-head call, drawn alone, are the 4-head call's."""
    from hyperattn import testing
    from hyperattn.algorithm import CallSpec, GlobalHeads, SparsePiece
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    reference = backend_status("reference").backend
    q, k, _ = make_inputs((1, 4, 200, 8), kv_heads=4, n_k=200, v_dim=8, seed=1)
    config = HyperAttentionConfig(16, 8, 3, 32, exact_crossover=False)
    whole = testing.seeded_plan(reference, q, k, causal=True, scale=0.3, config=config, seed=5)
    part = CallSpec(True, 0.3, config, 5, None, GlobalHeads(4, (1, 2))).plan(reference, q[:, 1:3], k[:, 1:3])
    sparse = [(a.structure, b.structure) for a, b in zip(whole.pieces, part.pieces) if isinstance(a, SparsePiece)]
    assert sparse
    for a, b in sparse:
        np.testing.assert_array_equal(a.samples[:, 1:3], b.samples)
        np.testing.assert_array_equal(a.k_order[:, 1:3], b.k_order)
