"""The CuPy backend on a GPU (``pytest -m gpu``, skipped elsewhere), what is its own: its kernels
compile under NVRTC, the structure kernels against their definitions (hashing against float64
signs, the counting sort against the reference's sort, device draws bit-equal to
``hyperattn.sampling``, key-norm draws, row dot), cupy arrays in and out, torch tensors through
DLPack with gradients, and the same answer as the Triton backend on one seed.  The cross-validation every GPU
backend passes is ``tests/test_gpu_backends.py``."""

from __future__ import annotations

import numpy as np
import pytest

from hyperattn.registry import backend_status

CUPY = backend_status("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUPY.runs_here,
                                 reason=f"cupy backend: {CUPY.reason or (CUPY.backend and CUPY.backend.unavailable_reason())}")]


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def test_every_source_compiles_under_nvrtc(cp):
    """One instantiation of each source's first kernel through ``cupy.RawModule`` (the run-time path)."""
    from hyperattn_cupy import compiler

    for source in compiler.sources():
        code = (compiler.KERNEL_DIR / source).read_text()
        module = cp.RawModule(code=code, options=compiler.CXX_OPTIONS + compiler.cuda_include_dirs())
        module.compile()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lsh_codes_agree_with_float64(cp, dtype):
    from hyperattn_cupy.arrays import cupy_dtype

    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((1, 4, 20001, 64))
    projections = rng.standard_normal((64, 7))
    bits = ((x64 @ projections > 0).astype(np.int64) << np.arange(7)).sum(-1)
    want = bits.copy()
    for shift in range(1, 7):
        want ^= bits >> shift
    x = cp.asarray(x64).astype(cupy_dtype(dtype))
    got = cp.asnumpy(CUPY.backend.lsh_codes(x, cp.asarray(projections, dtype=cp.float32)))
    assert got.shape == want.shape
    # rows within rounding of a hyperplane may flip in fp16/bf16 inputs' own rounding
    assert (got == want).mean() > (0.9999 if dtype == "float32" else 0.995)


@pytest.mark.parametrize("bits", [3, 7, 8, 12])
def test_segment_sort_matches_the_reference(cp, bits):
    reference = backend_status("reference").backend
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(2, 3, 40000))
    level = np.arange(4) * 10000
    for starts, ends in ((np.array([0]), np.array([40000])), (level + 5000, level + 10000), (np.array([17]), np.array([39001]))):
        order, rank = CUPY.backend.segment_sort(cp.asarray(codes, dtype=cp.int32), starts, ends, code_bits=bits)
        want_order, want_rank = reference.segment_sort(codes, starts, ends)
        np.testing.assert_array_equal(cp.asnumpy(order), want_order)
        np.testing.assert_array_equal(cp.asnumpy(rank), want_rank)


@pytest.mark.parametrize("stratified", [False, True])
def test_drawn_samples_equal_the_specification(cp, stratified):
    from hyperattn.protocol import Segments
    from hyperattn.sampling import sample_keys

    segments = Segments.from_ranges([(0, 10, 0, 7), (10, 20, 7, 1000), (20, 30, 1000, 4099)])
    like = cp.empty((1, 1, 1, 32), dtype=cp.float16)
    for seed, stream in [(0, 0), (12345, 2), (2**63 - 1, 1)]:
        got = cp.asnumpy(CUPY.backend.draw_samples(seed, stream, (2, 3), segments, 70, 4099, like, stratified))
        want = sample_keys(seed, stream, (2, 3), segments.k_start, segments.k_len, 70, 4099, stratified)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed_in_memory", [False, True])
def test_key_norm_draws_equal_the_specification(cp, seed_in_memory):
    """The key-norm draw kernel against ``hyperattn.sampling.sample_keys_by_key_norm``: the same keys
    and log weights (to float32 rounding) for heavy keys, a segment of zero keys, segments swamped
    by a heavy key before them, several streams, and the heads of a larger call (``head_ids``)."""
    from hyperattn.protocol import Segments
    from hyperattn.sampling import key_norm_weights, sample_keys_by_key_norm

    segments = Segments.from_ranges([(0, 10, 0, 7), (10, 20, 7, 1000), (20, 30, 1000, 4099)])
    k = np.random.default_rng(0).standard_normal((2, 3, 4099, 16)).astype(np.float32)
    k[:, :, 5] *= 5
    k[0, 0, 7:1000] = 0
    k[1, 1, 3] *= 1e4  # swamps the next segments' prefix sums: they draw uniformly
    weights = key_norm_weights(k)
    k_device = cp.asarray(k)
    key_weights = CUPY.backend.key_norm_weights(k_device)
    for seed, stream, heads in [(0, 0, None), (12345, 2, (4, 0, 2)), (2**63 - 1, 1, None)]:
        given = cp.asarray(seed, dtype=cp.int64) if seed_in_memory else seed
        got, got_w = CUPY.backend.draw_samples_by_key_norm(given, stream, segments, 70, key_weights, k_device, heads,
                                                           None if heads is None else 5)
        want, want_w = sample_keys_by_key_norm(seed, stream, weights, segments.k_start, segments.k_len, 70, heads,
                                               None if heads is None else 5)
        assert got.dtype == cp.int32 and got_w.dtype == cp.float32
        np.testing.assert_array_equal(cp.asnumpy(got), want)
        np.testing.assert_allclose(cp.asnumpy(got_w), want_w, rtol=1e-6, atol=1e-6)


def test_row_dot_is_the_fp32_row_sum(cp):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((1, 4, 5000, 64)) for _ in range(2))
    got = cp.asnumpy(CUPY.backend.row_dot(cp.asarray(a, cp.float16), cp.asarray(b, cp.float16)))
    want = (a.astype(np.float16).astype(np.float64) * b.astype(np.float16).astype(np.float64)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_cupy_arrays_in_and_out(cp, causal):
    import hyperattn

    rng = np.random.default_rng(2)
    q, k, v = (cp.asarray(rng.standard_normal((1, 2, 3000, 64)), dtype=cp.float16) for _ in range(3))
    out = hyperattn.attention(q, k, v, causal=causal, seed=1, backend="cupy", min_seq_len=512, exact_crossover=False)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16 and out.shape == q.shape
    want = hyperattn.attention(*(cp.asnumpy(x).astype(np.float64) for x in (q, k, v)), causal=causal, seed=1,
                               backend="reference", min_seq_len=512)
    from hyperattn import testing

    assert testing.relative_error(cp.asnumpy(out), want) < 5e-3


@pytest.mark.parametrize("causal", [False, True])
def test_torch_tensors_with_gradients_match_triton_on_one_seed(causal):
    torch = pytest.importorskip("torch")
    import hyperattn
    from hyperattn import testing

    if not backend_status("triton").runs_here:
        pytest.skip("no Triton backend to compare with")
    base = [torch.randn(1, 4, 5000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn_like(base[0])
    results = {}
    for name in ("cupy", "triton"):
        inputs = [x.clone().requires_grad_() for x in base]
        out = hyperattn.attention(*inputs, causal=causal, seed=7, backend=name, min_seq_len=1024,
                                  exact_crossover=False)
        out.backward(grad)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
        results[name] = [out, *(x.grad for x in inputs)]
    for label, a, b in zip(("out", "dq", "dk", "dv"), results["cupy"], results["triton"]):
        assert testing.relative_error(a, b) < 2e-2, label


def test_compiled_call_on_cupy_matches_eager():
    torch = pytest.importorskip("torch")
    import hyperattn

    q, k, v = (torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def call(q, k, v):
        return hyperattn.attention(q, k, v, causal=True, seed=3, backend="cupy", min_seq_len=1024,
                                   exact_crossover=False)

    compiled = torch.compile(call, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), call(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_inputs_match_the_reference_tightly(causal):
    """fp32 runs exact fp32 arithmetic (no tensor cores): the same plan as the float64 reference to
    fp32 rounding, gradients included."""
    torch = pytest.importorskip("torch")
    from helpers import error_or_absolute, make_inputs, run_both

    q, k, v = (torch.from_numpy(x).to("cuda", torch.float32) for x in
               make_inputs((1, 4, 2500, 64), kv_heads=2, n_k=2500, v_dim=64, seed=3))
    params = dict(block_size=128, sample_size=64, lsh_num_projs=5, min_seq_len=300)
    results, _ = run_both(q, k, v, causal=causal, params=params, other="cupy")
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["cupy"], results["reference"]):
        assert error_or_absolute(got, want) < 1e-4, name


def test_the_module_on_cupy_matches_the_module_on_triton(backend_options):
    """``HyperAttention(..., backend="cupy")``: its device seed and call count draw what Triton's do
    (Triton's exact crossover off, so that both approximate)."""
    torch = pytest.importorskip("torch")
    import hyperattn
    from hyperattn import testing

    if not backend_status("triton").runs_here:
        pytest.skip("no Triton backend to compare with")
    backend_options("triton", exact_below=(0, 0))
    base = [torch.randn(1, 4, 6000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    results = {}
    for name in ("cupy", "triton"):
        layer = hyperattn.HyperAttention(64, seed=11, backend=name, min_seq_len=1024).cuda()
        inputs = [x.clone().requires_grad_() for x in base]
        outs = [layer(*inputs, causal=True) for _ in range(2)]  # the second call draws anew
        outs[1].sum().backward()
        results[name] = [*outs, *(x.grad for x in inputs)]
    assert not torch.equal(results["cupy"][0], results["cupy"][1])
    for label, a, b in zip(("first", "second", "dq", "dk", "dv"), results["cupy"], results["triton"]):
        assert testing.relative_error(a, b) < 2e-2, label


@pytest.mark.parametrize("causal", [False, True])
def test_a_side_stream_call_is_ordered_with_the_callers_work(causal):
    """Torch inputs on a side stream whose earlier work is still running (a long sleep kernel): the
    whole call, forward and backward, runs on that stream, so it sees finished inputs and gives the
    default stream's answer (nothing of it runs on CuPy's own stream)."""
    torch = pytest.importorskip("torch")
    import hyperattn

    base = [torch.randn(1, 4, 5000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn_like(base[0])
    params = dict(causal=causal, seed=5, backend="cupy", min_seq_len=1024, exact_crossover=False)

    def step(inputs):
        out = hyperattn.attention(*inputs, **params)
        out.backward(grad)
        return [out, *(x.grad for x in inputs)]

    want = step([x.clone().requires_grad_() for x in base])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the inputs are written only after this
        late = [torch.zeros_like(x) for x in base]
        for dst, src in zip(late, base):
            dst.copy_(src)
        got = step([x.requires_grad_() for x in late])
    side.synchronize()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # sample atomics add in any order


@pytest.mark.parametrize("overwrite", [True, False])
def test_exact_leaves_through_the_fused_kernels_match_the_cupy_kernels(cp, overwrite, monkeypatch):
    """Causal leaves given as torch tensors go through PyTorch's fused kernels (forward and
    backward, on torch views of the arrays); given as cupy arrays, through the CuPy kernels: the
    same output, lse and gradients, written (``overwrite``) or merged and added."""
    import torch
    from hyperattn_cupy import arrays

    from hyperattn import testing
    from hyperattn.protocol import Segments
    from hyperattn.torch import fused

    backend = CUPY.backend
    calls = []
    real_forward, real_backward = fused.fused_attention_forward, fused.fused_attention_backward
    monkeypatch.setattr(fused, "fused_attention_forward", lambda *a: calls.append("fwd") or real_forward(*a))
    monkeypatch.setattr(fused, "fused_attention_backward", lambda *a: calls.append("bwd") or real_backward(*a))
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, 1024, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
                     for _ in range(4))
    leaves = Segments.from_ranges([(s, s + 256, s, s + 256) for s in range(0, 1024, 256)])
    results = {}
    for source in ("torch", "cupy"):
        cq, ck, cv, cdout = (arrays.torch_to_cupy(x) for x in (q, k, v, dout))
        backend.streams.record(q if source == "torch" else cq)
        out = cp.zeros(cq.shape, dtype=cq.dtype)
        lse = cp.full(cq.shape[:3], -cp.inf, dtype=cp.float32)
        backend.exact_forward(cq, ck, cv, leaves, True, 0.125, out, lse, overwrite=True)
        if not overwrite:  # merged with itself: the same out, lse + log 2
            backend.exact_forward(cq, ck, cv, leaves, True, 0.125, out, lse, overwrite=False)
        delta = backend.row_dot(cdout, out)
        grads = [cp.full(x.shape, 0.0 if not overwrite else cp.nan, dtype=cp.float32) for x in (cq, ck, cv)]
        backend.exact_backward(cq, ck, cv, lse, cdout, delta, leaves, True, 0.125, *grads, out=out,
                               overwrite=overwrite)
        results[source] = [cp.asnumpy(x.astype(cp.float32)) for x in (out, lse, *grads)]
        cp.cuda.Device().synchronize()
    assert calls == ["fwd"] * (1 if overwrite else 2) + ["bwd"]  # the torch call only
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["torch"], results["cupy"]):
        assert np.isfinite(got).all(), name
        if name == "lse":
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
        else:
            assert testing.relative_error(got, want) < 1e-2, name


@pytest.mark.parametrize("causal", [False, True])
def test_short_calls_with_torch_tensors_are_sdpa(causal, monkeypatch):
    """Below min_seq_len the whole call is exact: with torch tensors it is SDPA's (output and
    gradients), through ``fused_attention``; with cupy arrays the backend's own exact kernel."""
    import torch

    import hyperattn
    from hyperattn.torch import fused

    calls = []
    real = fused.sdpa_in_order
    monkeypatch.setattr(fused, "sdpa_in_order", lambda *a: calls.append(1) or real(*a))
    generator = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", generator=generator, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    out = hyperattn.attention(q, k, v, causal=causal, backend="cupy")
    out.float().square().sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]
    assert calls == [1]
    for x in (q, k, v):
        x.grad = None
    want_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    want_out.float().square().sum().backward()
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [want_out.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)


def test_a_call_inside_a_cuda_graph_capture_is_refused():
    """The backend's arrays come from CuPy's pool, which a torch graph does not own: a call under
    ``torch.cuda.graph`` raises with the reason instead of being recorded, and eager calls after it
    still run."""
    torch = pytest.importorskip("torch")
    import hyperattn

    q, k, v = (torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = hyperattn.attention(q, k, v, backend="cupy", seed=0, exact_crossover=False)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="a CUDA graph is being captured \\(torch\\)"):
        with torch.cuda.graph(graph):
            hyperattn.attention(q, k, v, backend="cupy", seed=0, exact_crossover=False)
    torch.testing.assert_close(hyperattn.attention(q, k, v, backend="cupy", seed=0, exact_crossover=False), want)
