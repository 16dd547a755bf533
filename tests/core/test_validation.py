"""Bad input gets a ValueError or TypeError naming the argument, the expected and the actual value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from helpers import make_inputs


def _qkv(**kwargs):
    return make_inputs((1, 2, 16, 8), dtype=np.float32, **kwargs)


def test_wrong_rank_names_the_argument_and_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k must have 4 dimensions \[B, Hk, Nk, D\], got shape \(2, 16, 8\)"):
        hyperattn.attention(q, k[0], v)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v: (q[:, :, :, :4], k, v), r"q and k must have the same head dim D, got q \(1, 2, 16, 4\)"),
        (lambda q, k, v: (q, k, v[:, :, :8]), r"k and v must have the same length Nk"),
        (lambda q, k, v: (q, k, np.concatenate([v, v], axis=1)), r"k and v must have the same number of heads Hk"),
        (lambda q, k, v: (np.concatenate([q, q]), k, v), r"one batch size B"),
        (lambda q, k, v: (np.concatenate([q, q[:, :1]], axis=1), k, v), r"multiple of the KV heads Hk \(GQA\), got Hq=3, Hk=2"),
        (lambda q, k, v: (q[:, :, :0], k, v), r"q must not be empty"),
    ],
)
def test_mismatched_shapes(mutate, message):
    with pytest.raises(ValueError, match=message):
        hyperattn.attention(*mutate(*_qkv()))


def test_causal_needs_nq_at_most_nk():
    q, k, v = make_inputs((1, 1, 20, 8), n_k=10)
    with pytest.raises(ValueError, match=r"causal=True needs Nq <= Nk .* got Nq=20, Nk=10"):
        hyperattn.attention(q, k, v, causal=True)


def test_mixed_dtypes_integer_dtypes_and_array_types():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"one dtype, got \{'q': 'float32', 'k': 'float64', 'v': 'float32'\}"):
        hyperattn.attention(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match=r"q must have a floating dtype .* got int64"):
        hyperattn.attention(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match=r"one type, got \{'q': 'numpy', 'k': 'torch', 'v': 'numpy'\}"):
        hyperattn.attention(q, torch.from_numpy(k), v)
    with pytest.raises(TypeError, match=r"v must be a numpy.ndarray, torch.Tensor or cupy.ndarray, got list"):
        hyperattn.attention(q, k, v.tolist())


def test_mixed_devices():
    q, k, v = (torch.from_numpy(x) for x in _qkv())
    with pytest.raises(ValueError, match=r"one device, got \{'q': 'cpu', 'k': 'meta', 'v': 'cpu'\}"):
        hyperattn.attention(q, k.to("meta"), v)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(block_size=0), ValueError, r"block_size must be an int >= 1, got 0"),
        (dict(block_size=2.5), TypeError, r"block_size must be an int, got float 2.5"),
        (dict(block_size=True), TypeError, r"block_size must be an int, got bool"),
        (dict(sample_size=-1), ValueError, r"sample_size must be an int >= 0, got -1"),
        (dict(lsh_num_projs=0), ValueError, r"lsh_num_projs must be an int in \[1, 32\], got 0"),
        (dict(lsh_num_projs=33), ValueError, r"lsh_num_projs must be an int in \[1, 32\], got 33"),
        (dict(min_seq_len=0), ValueError, r"min_seq_len must be an int >= 1, got 0"),
        (dict(scale=0.0), ValueError, r"scale must be None or a finite number > 0, got 0.0"),
        (dict(scale=float("nan")), ValueError, r"scale must be None or a finite number > 0, got nan"),
        (dict(seed=-3), ValueError, r"seed must be None or an int in \[0, 2\*\*63\), got -3"),
        (dict(seed=1.5), ValueError, r"seed must be None or an int in \[0, 2\*\*63\), got 1.5"),
        (dict(seed=2**63), ValueError, r"seed must be None or an int in \[0, 2\*\*63\), got 9223372036854775808"),
        (dict(seed=torch.tensor([3])), ValueError, r"a seed tensor must be a 0-d int64 tensor, got shape \(1,\)"),
        (dict(seed=torch.tensor(3.0)), ValueError, r"a seed tensor must be a 0-d int64 tensor, got shape \(\) and dtype torch.float32"),
        (dict(causal="yes"), TypeError, r"causal must be a bool, got str 'yes'"),
        (dict(return_lse=1), TypeError, r"return_lse must be a bool, got int 1"),
        (dict(backend="cuda-magic"), ValueError, r"backend must be one of \('auto', 'triton', 'cupy', 'reference'.*got 'cuda-magic'"),
    ],
)
def test_bad_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        hyperattn.attention(*_qkv(), **kwargs)


def test_missing_backend_says_how_to_install_it(monkeypatch):
    """A first-party backend whose package is missing (here: its module made unimportable, the
    registry asked afresh, not through its cache)."""
    import sys

    from hyperattn import dispatch
    from hyperattn.registry import backend_status

    monkeypatch.setitem(sys.modules, "hyperattn_cupy", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(dispatch, "backend_status", lambda name: backend_status.__wrapped__(name))
    with pytest.raises(ValueError, match=r"backend 'cupy' cannot run .*not installed.*pip install hyperattn-cupy"):
        hyperattn.attention(*_qkv(), backend="cupy")


def test_explicit_backend_that_cannot_run_the_inputs_never_falls_back():
    q, k, v = (torch.from_numpy(x).to("meta") for x in _qkv())
    with pytest.raises(ValueError, match=r"backend 'reference' cannot run these inputs .*inputs on meta are not supported \(devices: \('cpu',\)\)"):
        hyperattn.attention(q, k, v, backend="reference")


def test_auto_lists_every_backend_with_its_reason():
    q, k, v = (torch.from_numpy(x).to("meta") for x in _qkv())
    with pytest.raises(ValueError, match=r"no backend can run these inputs") as error:
        hyperattn.attention(q, k, v)
    for name in ("reference", "triton", "cupy"):
        assert f"  {name}: " in str(error.value)


def test_module_checks_input_dim():
    q, k, v = (torch.from_numpy(x) for x in _qkv())
    with pytest.raises(ValueError, match=r"head dim D must equal the module's input_dim=64, got 8"):
        hyperattn.HyperAttention(input_dim=64)(q, k, v)
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got -2"):
        hyperattn.HyperAttention(input_dim=8, block_size=-2)


def test_torch_fast_path_agrees_with_the_full_checks():
    """Plain torch tensors take a short validation path: the same Problem as the full checks when
    valid, and no verdict (the full checks then raise) otherwise."""
    from hyperattn.validate import _valid_torch_problem, _validate_fully

    def qkv(q_shape, k_shape, v_shape, dtype=torch.float32, grad=False):
        return [torch.zeros(s, dtype=dtype).requires_grad_(grad) for s in (q_shape, k_shape, v_shape)]

    valid = [
        (qkv((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 8)), False),
        (qkv((2, 2, 5, 4), (2, 2, 9, 4), (2, 2, 9, 4), torch.bfloat16, grad=True), True),
        ([x.transpose(1, 2) for x in qkv((1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4))], False),
    ]
    for arrays, causal in valid:
        assert _valid_torch_problem(*arrays, causal) == _validate_fully(*arrays, causal=causal)
    with torch.no_grad():
        arrays = qkv((1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), grad=True)
        assert _valid_torch_problem(*arrays, False) == _validate_fully(*arrays, causal=False)
        assert not _valid_torch_problem(*arrays, False).requires_grad
    invalid = [
        (qkv((1, 1, 9, 4), (1, 1, 8, 4), (1, 1, 8, 4)), True),  # causal with Nq > Nk
        (qkv((1, 3, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), False),  # heads
        (qkv((1, 1, 8, 4), (1, 1, 8, 5), (1, 1, 8, 4)), False),  # head dims
        (qkv((1, 1, 0, 4), (1, 1, 8, 4), (1, 1, 8, 4)), False),  # empty
        (qkv((1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4)), False),  # three dims
        (qkv((1, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4), torch.int32), False),
        (qkv((1, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4)), 1),  # causal not a bool
        ([torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4, dtype=torch.float64), torch.zeros(1, 1, 8, 4)], False),
        ([torch.nn.Parameter(torch.zeros(1, 1, 8, 4)), torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)], False),
    ]
    for arrays, causal in invalid:
        assert _valid_torch_problem(*arrays, causal) is None


def test_device_seed_and_projections_are_checked():
    """A seed tensor on another device than the inputs, given projections of the wrong shape, and
    a device seed without projections on a backend that reads seeds on its device: clear errors."""
    q, k, v = (torch.from_numpy(x) for x in make_inputs((1, 2, 64, 16), seed=0))
    with pytest.raises(ValueError, match=r"projections must be a float array of shape \(D, lsh_num_projs\) = "
                                         r"\(16, 7\), got shape \(16, 5\)"):
        hyperattn.attention(q, k, v, backend="reference", projections=torch.zeros(16, 5, dtype=torch.float64))
    # a CPU seed tensor is read as its value: the same call as the int seed
    torch.testing.assert_close(
        hyperattn.attention(q, k, v, backend="reference", seed=torch.tensor(5), min_seq_len=16, block_size=8,
                            sample_size=8, exact_crossover=False),
        hyperattn.attention(q, k, v, backend="reference", seed=5, min_seq_len=16, block_size=8, sample_size=8,
                            exact_crossover=False), rtol=0, atol=0)
