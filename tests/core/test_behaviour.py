"""Determinism, causality, NaN handling, dtypes and array types of the public API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from helpers import make_inputs
from hyperattn import testing

SPARSE = dict(block_size=32, sample_size=24, lsh_num_projs=4, min_seq_len=64)


def test_seed_makes_calls_deterministic_and_none_draws_fresh():
    q, k, v = make_inputs((1, 2, 400, 16), seed=1)
    a = hyperattn.attention(q, k, v, seed=5, **SPARSE)
    b = hyperattn.attention(q, k, v, seed=5, **SPARSE)
    c = hyperattn.attention(q, k, v, seed=6, **SPARSE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    fresh = [hyperattn.attention(q, k, v, **SPARSE) for _ in range(2)]
    assert not np.array_equal(*fresh)


@pytest.mark.parametrize("n_q, n_k", [(700, 700), (500, 900)])
@pytest.mark.parametrize("position", [0, 333, 499])
def test_causal_leak(n_q, n_k, position):
    """Changing keys and values after position i leaves rows <= i unchanged (bottom-right aligned)."""
    q, k, v = make_inputs((1, 2, n_q, 16), kv_heads=1, n_k=n_k, seed=position)
    key_position = position + (n_k - n_q)  # row `position` sees keys <= key_position
    out = hyperattn.attention(q, k, v, causal=True, seed=3, **SPARSE)
    k2, v2 = k.copy(), v.copy()
    rng = np.random.default_rng(99)
    k2[:, :, key_position + 1 :] = rng.standard_normal(k2[:, :, key_position + 1 :].shape) * 10
    v2[:, :, key_position + 1 :] = rng.standard_normal(v2[:, :, key_position + 1 :].shape) * 10
    out2 = hyperattn.attention(q, k2, v2, causal=True, seed=3, **SPARSE)
    np.testing.assert_array_equal(out[:, :, : position + 1], out2[:, :, : position + 1])
    if position + 1 < n_q:
        assert not np.allclose(out[:, :, position + 1 :], out2[:, :, position + 1 :])


def test_nan_propagates_like_exact_attention():
    q, k, v = make_inputs((1, 1, 300, 16), seed=8)
    q[0, 0, 17] = np.nan
    out = hyperattn.attention(q, k, v, seed=0, **SPARSE)
    exact = hyperattn.exact_attention(q, k, v)
    assert np.isnan(out[0, 0, 17]).all() and np.isnan(exact[0, 0, 17]).all()
    others = np.delete(out[0, 0], 17, axis=0)
    assert np.isfinite(others).all()
    v[0, 0, 5] = np.nan  # every row that gives key 5 a weight turns NaN, the others stay finite
    out = hyperattn.attention(q, k, v, seed=0, **SPARSE)
    plan = testing.seeded_plan(
        hyperattn.registry.backend_status("reference").backend,
        q, k, causal=False, scale=16**-0.5, config=hyperattn.HyperAttentionConfig(**SPARSE), seed=0,
    )
    sees_key_5 = testing.plan_weights(plan, 1, 1, 300, 300)[0, 0, :, 5] > 0
    assert np.isnan(out[0, 0, sees_key_5]).all()
    assert np.isfinite(out[0, 0, ~sees_key_5 & (np.arange(300) != 17)]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_write_every_row_over_a_poisoned_output(causal, reference):
    """Rows inside the pieces are overwritten (lse = -inf means 'nothing yet'); rows outside are untouched."""
    from hyperattn.algorithm import ExactPiece, SparsePiece

    q, k, v = make_inputs((2, 4, 300, 16), kv_heads=2, seed=3)
    plan = testing.seeded_plan(
        reference, q, k, causal=causal, scale=0.25, config=hyperattn.HyperAttentionConfig(**SPARSE), seed=0
    )
    for piece in plan.pieces:
        out = np.full((2, 4, 300, 16), np.nan)
        lse = np.full((2, 4, 300), -np.inf)
        if isinstance(piece, ExactPiece):
            segments = piece.segments
            reference.exact_forward(q, k, v, segments, piece.causal, 0.25, out, lse)
        else:
            assert isinstance(piece, SparsePiece)
            segments = piece.structure.segments
            reference.sparse_forward(q, k, v, piece.structure, 0.25, out, lse)
        inside = np.zeros(300, dtype=bool)
        for start, end in zip(segments.q_start, segments.q_end):
            inside[start:end] = True
        assert np.isfinite(out[:, :, inside]).all() and np.isfinite(lse[:, :, inside]).all()
        assert np.isnan(out[:, :, ~inside]).all() and (lse[:, :, ~inside] == -np.inf).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_tensors_keep_type_device_and_dtype(dtype):
    q, k, v = (torch.from_numpy(x).to(dtype) for x in make_inputs((1, 4, 200, 16), kv_heads=2, v_dim=8, seed=2))
    out, lse = hyperattn.attention(q, k, v, causal=True, seed=1, return_lse=True, **SPARSE)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (1, 4, 200, 8)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (1, 4, 200)
    reference = hyperattn.attention(*(x.double() for x in (q, k, v)), causal=True, seed=1, **SPARSE)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    assert testing.relative_error(out, reference) < tolerance


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_arrays_keep_dtype(dtype):
    q, k, v = make_inputs((2, 2, 100, 16), dtype=dtype, seed=6)
    out, lse = hyperattn.attention(q, k, v, seed=0, return_lse=True, **SPARSE)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_inputs((1, 1, 100, 25), seed=0)
    np.testing.assert_allclose(
        hyperattn.attention(q, k, v, seed=0, **SPARSE), hyperattn.attention(q, k, v, scale=0.2, seed=0, **SPARSE)
    )


def test_module_projections_are_fixed_and_samples_fresh():
    torch.manual_seed(0)
    q, k, v = (torch.from_numpy(x) for x in make_inputs((1, 2, 300, 16), seed=4))
    layer = hyperattn.HyperAttention(input_dim=16, seed=3, **SPARSE)
    same_seed = hyperattn.HyperAttention(input_dim=16, seed=3, **SPARSE)
    torch.testing.assert_close(layer.lsh_projections, same_seed.lsh_projections, rtol=0, atol=0)
    first, second = layer(q, k, v), layer(q, k, v)
    assert not torch.equal(first, second)  # fresh samples per call
    torch.testing.assert_close(first, same_seed(q, k, v), rtol=0, atol=0)  # reproducible sequence
    no_samples = hyperattn.HyperAttention(input_dim=16, seed=3, **{**SPARSE, "sample_size": 0})
    torch.testing.assert_close(no_samples(q, k, v), no_samples(q, k, v), rtol=0, atol=0)
    out, lse = layer(q, k, v, scale=0.3, causal=True, return_lse=True)
    assert out.shape == (1, 2, 300, 16) and lse.shape == (1, 2, 300)
    assert "block_size=32" in repr(layer) and layer.block_size == 32 and layer.min_seq_len == 64


def test_available_backends_and_info_command(capsys):
    from hyperattn.__main__ import main

    rows = {row.name: row for row in hyperattn.available_backends()}
    assert rows["reference"].available and rows["reference"].reason == ""
    for name in ("triton", "cupy"):
        assert name in rows and "pip install" in rows[name].install_hint
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "hyperattn" in printed
    assert rows["reference"].runs_here
    assert "works: hyperattn.integrations.transformers.register()" in printed  # transformers is installed


def test_info_says_a_gpu_backend_cannot_run_without_a_gpu():
    """Outside the test suite's Triton interpreter, `python -m hyperattn info` on a machine without a
    GPU lists the Triton backend as installed but unable to run here, with the reason."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["COLUMNS"] = "250"  # one table row per line
    result = subprocess.run([sys.executable, "-m", "hyperattn", "info"], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    triton_row = next(line for line in result.stdout.splitlines() if "triton" in line and "pip install" in line)
    assert "│ yes" in triton_row and "│ no" in triton_row and "no CUDA GPU" in triton_row, result.stdout


@pytest.fixture
def reference_with(monkeypatch, backend_options):
    """Set the reference backend's crossover (an option) and its optional fused hook for one test."""
    from hyperattn.registry import backend_status

    backend = backend_status("reference").backend

    def patch(exact_below=(0, 0), fused=None):
        backend_options("reference", exact_below=exact_below)
        if fused is not None:
            monkeypatch.setattr(backend, "fused_attention", fused)
        return backend

    return patch


@pytest.mark.parametrize("causal", [False, True])
def test_calls_below_the_backend_crossover_are_exact(causal, reference_with):
    q, k, v = make_inputs((1, 2, 200, 16), dtype=np.float64, seed=2)  # causal: split at 64 rows
    exact = hyperattn.exact_attention(q, k, v, causal=causal)
    assert testing.relative_error(hyperattn.attention(q, k, v, causal=causal, seed=1, **SPARSE), exact) > 1e-6
    reference_with(exact_below=(256, 256))
    out, lse = hyperattn.attention(q, k, v, causal=causal, seed=1, return_lse=True, **SPARSE)
    exact_out, exact_lse = hyperattn.exact_attention(q, k, v, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, exact_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, exact_lse, rtol=1e-12, atol=1e-13)
    reference_with(exact_below=(128, 128))  # above the crossover: approximated again
    assert testing.relative_error(hyperattn.attention(q, k, v, causal=causal, seed=1, **SPARSE), exact) > 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_crossover_is_an_option_taking_effect_after_use_and_a_per_call_switch(causal, backend_options):
    """``configure`` changes the crossover of a backend that has already run; ``exact_crossover=False``
    asks for the approximation whatever the crossover says."""
    q, k, v = make_inputs((1, 2, 200, 16), dtype=np.float64, seed=2)
    exact = hyperattn.exact_attention(q, k, v, causal=causal)
    approx = hyperattn.attention(q, k, v, causal=causal, seed=1, **SPARSE)  # the backend has run
    assert testing.relative_error(approx, exact) > 1e-6
    assert hyperattn.configure("reference").exact_below == (0, 0)
    backend_options("reference", exact_below=(256, 256))
    assert hyperattn.configure("reference").exact_below == (256, 256)
    np.testing.assert_allclose(hyperattn.attention(q, k, v, causal=causal, seed=1, **SPARSE), exact, rtol=1e-12)
    off = hyperattn.attention(q, k, v, causal=causal, seed=1, exact_crossover=False, **SPARSE)
    np.testing.assert_array_equal(off, approx)  # the same approximation as before the change
    hyperattn.configure("reference", reset=True)
    np.testing.assert_array_equal(hyperattn.attention(q, k, v, causal=causal, seed=1, **SPARSE), approx)


def test_configure_names_what_is_wrong(backend_options):
    with pytest.raises(TypeError, match=r"backend 'reference' has no option\(s\) \['exact_bellow'\]; its options are"):
        hyperattn.configure("reference", exact_bellow=(0, 0))
    with pytest.raises(ValueError, match=r"exact_below must be a tuple \(keys, rows\) of two ints >= 0, got \(1,\)"):
        hyperattn.configure("reference", exact_below=(1,))
    with pytest.raises(TypeError, match=r"use_torch_exact must be a bool, got str 'false'"):
        hyperattn.configure("reference", use_torch_exact="false")
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'nope'"):
        hyperattn.configure("nope")
    with pytest.raises(TypeError, match=r"exact_crossover must be a bool, got str 'no'"):
        hyperattn.attention(*make_inputs((1, 1, 8, 4)), exact_crossover="no")


def test_fused_attention_hook_runs_whole_exact_calls_only(reference_with):
    calls = []

    def fused(q, k, v, *, causal, scale):
        calls.append((q.shape, causal, scale))
        return "fused"

    reference_with(fused=fused)
    short = make_inputs((1, 2, 40, 16), seed=3)
    assert hyperattn.attention(*short, causal=True, **SPARSE) == "fused"
    assert hyperattn.exact_attention(*short) == "fused"
    assert calls == [((1, 2, 40, 16), True, 0.25), ((1, 2, 40, 16), False, 0.25)]
    out, lse = hyperattn.attention(*short, return_lse=True, **SPARSE)  # the hook has no lse: the plan runs
    assert isinstance(out, np.ndarray) and lse.shape == (1, 2, 40)
    long = make_inputs((1, 2, 400, 16), seed=3)
    assert isinstance(hyperattn.attention(*long, **SPARSE), np.ndarray)  # sparse: the plan runs
    assert len(calls) == 2
    module = hyperattn.HyperAttention(16, block_size=32, sample_size=24, lsh_num_projs=4, min_seq_len=64)
    assert module(*(torch.from_numpy(x) for x in short), causal=True) == "fused"
    assert isinstance(module(*(torch.from_numpy(x) for x in long)), torch.Tensor)
    assert len(calls) == 3


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 127, 128, 129, 1000])
@pytest.mark.parametrize("min_seq_len", [1, 2, 64])
def test_is_exact_call_agrees_with_the_causal_split(n, min_seq_len):
    from hyperattn.algorithm import causal_split, is_exact_call
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    config = HyperAttentionConfig(32, 8, 4, min_seq_len)
    _, levels = causal_split(n, min_seq_len)
    assert is_exact_call(n, n, True, config, backend_status("reference").backend) == (not levels)


def test_merge_partial_is_the_same_for_numpy_and_torch():
    """One log-sum-exp merge serves both backends' fused exact paths: untouched rows (lse = -inf,
    garbage out) take the partial, others the weighted mean; NumPy and torch agree."""
    import torch

    from hyperattn.kernel_utils import merge_partial

    rng = np.random.default_rng(0)
    out = rng.standard_normal((2, 5, 3))
    lse = rng.standard_normal((2, 5))
    lse[:, ::2] = -np.inf
    out[:, ::2] = np.nan  # never read
    o, row_lse = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5))
    total = np.logaddexp(lse, row_lse)
    with np.errstate(invalid="ignore"):
        expected = np.where(np.isneginf(lse)[..., None], o,
                            out * np.exp(lse - total)[..., None] + o * np.exp(row_lse - total)[..., None])
    as_torch = [torch.from_numpy(x.copy()) for x in (out, lse)]
    merge_partial(out, lse, o, row_lse)
    merge_partial(*as_torch, torch.from_numpy(o).float(), torch.from_numpy(row_lse))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(lse, total, rtol=1e-12)
    np.testing.assert_allclose(as_torch[0].numpy(), expected, rtol=1e-6)


def test_module_reads_its_projections_and_seed_buffers_as_they_are_now():
    """The plan takes the module's projections buffer itself (an in-place change counts at the next
    call) and its seed from the ``calls`` buffer: two modules of one seed agree call by call,
    and rewinding ``calls`` repeats a call's draws."""
    q, k, v = (torch.from_numpy(x) for x in make_inputs((1, 2, 300, 16), seed=4))
    a, b = (hyperattn.HyperAttention(input_dim=16, seed=3, **SPARSE) for _ in range(2))
    assert "calls" not in a.state_dict() and "lsh_projections" in a.state_dict()
    first = a(q, k, v, causal=True)
    torch.testing.assert_close(b(q, k, v, causal=True), first, rtol=0, atol=0)
    with torch.no_grad():
        b.lsh_projections.neg_()
    a.calls.fill_(0)
    b.calls.fill_(0)
    assert (b(q, k, v, causal=True) - first).abs().max() > 1e-3  # other hyperplanes, other sort
    torch.testing.assert_close(a(q, k, v, causal=True), first, rtol=0, atol=0)  # the same draws again


@pytest.mark.parametrize("approximate", [False, True])
def test_autocast_casts_inputs_like_sdpa(approximate):
    """Under torch.autocast, float32 q and k beside a bf16 v (a model's RoPE in float32) are cast
    to the autocast dtype, as SDPA does, with and without gradients; outside it the mix is an error."""
    params = dict(SPARSE, seed=2) if approximate else dict(min_seq_len=1 << 20)
    q, k, v = (torch.from_numpy(x) for x in make_inputs((1, 2, 300, 16), seed=4, dtype=np.float32))
    v16 = v.to(torch.bfloat16)
    expected = hyperattn.attention(q.bfloat16(), k.bfloat16(), v16, causal=True, **params)
    qg = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hyperattn.attention(qg, k, v16, causal=True, **params)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    assert qg.grad.dtype == torch.float32 and torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="one dtype"):
        hyperattn.attention(q, k, v16, causal=True, **params)
