"""The GPU backends on a GPU (``pytest -m gpu``, skipped elsewhere), each test run on every one:
fp16/bf16 against the float64 reference on the same plan with the FlashAttention tolerance rule
(awkward shapes, GQA, Nq != Nk, D up to 256), N = 131072, causal leak and NaN poison, and
uninitialised-memory poisoning of the whole call.  Backend-specific GPU tests live in
``tests/triton`` and ``tests/cupy``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import hyperattn  # noqa: E402
from helpers import error_or_absolute, make_inputs, poison_allocations, run_both  # noqa: E402
from hyperattn import testing  # noqa: E402
from hyperattn.algorithm import ExactPiece  # noqa: E402
from hyperattn.config import HyperAttentionConfig  # noqa: E402
from hyperattn.registry import backend_status  # noqa: E402

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ("triton", "cupy")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    """The name of each GPU backend in turn, skipped where it cannot run (with its reason)."""
    status = backend_status(request.param)
    if not status.runs_here:
        pytest.skip(f"{request.param} backend: {status.reason or status.backend.unavailable_reason()}")
    return request.param


def _bf16_rule_error(q, k, v, plan, reference_out):
    """Error of plain PyTorch in q's dtype on the same dense weights (the FlashAttention rule's yardstick)."""
    weights = torch.from_numpy(testing.plan_weights(plan, q.shape[0], q.shape[1], q.shape[2], k.shape[2])).to(q.device)
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kk.transpose(-1, -2)) * plan.scale
    scores = torch.where(weights > 0, scores.float() + weights.log(), -torch.inf).to(q.dtype)
    plain = torch.softmax(scores, dim=-1) @ vv
    return testing.relative_error(plain, reference_out)


GPU_CASES = [
    (1, 4, 2, 4097, 4097, 64, 64, True, dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=1024)),
    (2, 2, 1, 1000, 2500, 128, 64, True, dict(block_size=128, sample_size=64, lsh_num_projs=5, min_seq_len=200)),
    (1, 2, 2, 3000, 777, 40, 40, False, dict(block_size=100, sample_size=50, lsh_num_projs=4, min_seq_len=300)),
    (1, 8, 1, 2048, 2048, 256, 256, False, dict(block_size=256, sample_size=128, lsh_num_projs=7, min_seq_len=512)),
    # no GQA, D == Dv: on Triton the exact pieces go through PyTorch's fused kernels (leaves, a whole call)
    (1, 4, 4, 2048, 2048, 64, 64, True, dict(block_size=128, sample_size=64, lsh_num_projs=5, min_seq_len=256)),
    (2, 2, 2, 1000, 1000, 128, 128, False, dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=4096)),
    # attention sinks: exact pieces of the first keys (a whole-rows rectangle, and rows below the first leaf)
    (1, 4, 2, 4096, 4096, 64, 64, True, dict(block_size=256, sample_size=128, lsh_num_projs=7, min_seq_len=512,
                                              sink_keys=64)),
    (1, 4, 4, 3000, 3000, 64, 64, False, dict(block_size=256, sample_size=128, lsh_num_projs=7, min_seq_len=512,
                                               sink_keys=64)),
    # a band of previous keys (each sparse rectangle's first rows exact), with sinks, Nq < Nk; then
    # stratified samples
    (1, 4, 2, 3500, 4100, 64, 64, True, dict(block_size=128, sample_size=128, lsh_num_projs=7, min_seq_len=512,
                                             sink_keys=16, band_keys=192)),
    (1, 4, 2, 3000, 3000, 64, 64, False, dict(block_size=128, sample_size=128, lsh_num_projs=7, min_seq_len=512,
                                              sampling="stratified")),
    # importance sampling by key norm (per-draw weights), causal with a band and non-causal, GQA
    (1, 4, 2, 4096, 4096, 64, 64, True, dict(block_size=256, sample_size=64, lsh_num_projs=7, min_seq_len=512,
                                             band_keys=64, sampling="key_norm")),
    (2, 4, 1, 3000, 2900, 128, 64, False, dict(block_size=128, sample_size=96, lsh_num_projs=6, min_seq_len=512,
                                               sampling="key_norm")),
]


def _case_id(case) -> str:
    return str(case[:8]) + (f"-{case[8]['sampling']}" if "sampling" in case[8] else "")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_same_plan_within_flash_attention_tolerance(gpu_backend, case, dtype):
    batch, q_heads, kv_heads, n_q, n_k, dim, v_dim, causal, params = case
    samplings = backend_status(gpu_backend).backend.capabilities.samplings
    if params.get("sampling", "stratified") not in samplings:
        pytest.skip(f"{gpu_backend} draws only {samplings}")
    q, k, v = (torch.from_numpy(x).to("cuda", dtype) for x in
               make_inputs((batch, q_heads, n_q, dim), kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=dim))
    results, plan = run_both(q, k, v, causal=causal, params=params, other=gpu_backend)
    yardstick = _bf16_rule_error(q, k, v, plan, results["reference"][0])
    out_error = testing.relative_error(results[gpu_backend][0], results["reference"][0])
    assert out_error <= 2 * yardstick + 1e-4, (out_error, yardstick)
    assert testing.relative_error(results[gpu_backend][1], results["reference"][1]) < 1e-3
    bound = {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), results[gpu_backend][2:], results["reference"][2:]):
        assert error_or_absolute(got, want) < bound, name


@pytest.mark.parametrize("causal", [False, True])
def test_gpu_131072_tokens(gpu_backend, causal):
    q, k, v = (torch.randn(1, 2, 131072, 64, generator=torch.Generator().manual_seed(i)).to("cuda", torch.bfloat16)
               for i in range(3))
    results, _ = run_both(q, k, v, causal=causal, params={}, backward=not causal, other=gpu_backend)
    assert testing.relative_error(results[gpu_backend][0], results["reference"][0]) < 2e-2
    assert testing.relative_error(results[gpu_backend][1], results["reference"][1]) < 1e-3
    for got, want in zip(results[gpu_backend][2:], results["reference"][2:]):
        assert error_or_absolute(got, want) < 5e-2


@pytest.mark.parametrize("causal, n_k, chunked", [(False, 40000, False), (True, 16384, True), (True, 17000, False)])
def test_gpu_overwriting_pieces_never_read_uninitialised_memory(gpu_backend, causal, n_k, chunked, monkeypatch,
                                                               backend_options):
    """The whole call, forward and backward, with every buffer the core allocates uninitialised
    filled with NaN: the same finite results as with ordinary allocations (``chunked``: the
    poisoned run's backward goes one head at a time)."""
    q = torch.randn(1, 2, 16384, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, n_k, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)

    def run():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = hyperattn.attention(*inputs, causal=causal, backend=gpu_backend, seed=3)
        out.backward(dout)
        return [out, *(x.grad for x in inputs)]

    backend_options(gpu_backend, exact_below=(0, 0))
    plain = run()
    poison_allocations(monkeypatch)
    if chunked:
        backend_options(gpu_backend, backward_chunk_bytes=1)
    poisoned = run()
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, poisoned):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)  # sample atomics add in any order


@pytest.mark.parametrize("sampling", ["stratified", "key_norm"])
def test_gpu_causal_leak_and_nan_poison(gpu_backend, sampling, backend_options):
    """Changing keys after row 700 changes no output before it (``key_norm``: nor the norm-weighted
    draws of earlier rectangles); every piece writes every row it owns over a NaN-poisoned
    accumulator and none other."""
    if sampling not in backend_status(gpu_backend).backend.capabilities.samplings:
        pytest.skip(f"{gpu_backend} does not draw {sampling!r}")
    backend_options(gpu_backend, exact_below=(0, 0))
    params = dict(block_size=64, sample_size=32, lsh_num_projs=5, min_seq_len=128, sampling=sampling)
    q, k, v = (torch.randn(1, 4, 1500, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = hyperattn.attention(q, k[:, :2], v[:, :2], causal=True, seed=1, backend=gpu_backend, **params)
    k2, v2 = k[:, :2].clone(), v[:, :2].clone()
    k2[:, :, 700:] = torch.randn_like(k2[:, :, 700:]) * 10
    v2[:, :, 700:] = torch.randn_like(v2[:, :, 700:]) * 10
    out2 = hyperattn.attention(q, k2, v2, causal=True, seed=1, backend=gpu_backend, **params)
    assert torch.equal(out[:, :, :700], out2[:, :, :700])
    assert not torch.allclose(out[:, :, 700:], out2[:, :, 700:])
    backend = backend_status(gpu_backend).backend
    qn, kn, vn = (backend.to_native(x) for x in (q, k[:, :2].contiguous(), v[:, :2].contiguous()))
    plan = testing.seeded_plan(backend, qn, kn, causal=True, scale=0.125, config=HyperAttentionConfig(**params), seed=0)
    for piece in plan.pieces:
        acc = torch.full(q.shape, torch.nan, device="cuda")
        lse = torch.full(q.shape[:3], -torch.inf, device="cuda")
        acc_n, lse_n = backend.to_native(acc), backend.to_native(lse)  # views of acc and lse
        if isinstance(piece, ExactPiece):
            segments = piece.segments
            backend.exact_forward(qn, kn, vn, segments, piece.causal, 0.125, acc_n, lse_n)
        else:
            segments = piece.structure.segments
            backend.sparse_forward(qn, kn, vn, piece.structure, 0.125, acc_n, lse_n)
        torch.cuda.synchronize()
        inside = torch.zeros(q.shape[2], dtype=torch.bool)
        for start, end in zip(segments.q_start, segments.q_end):
            inside[start:end] = True
        assert torch.isfinite(acc[:, :, inside]).all() and torch.isfinite(lse[:, :, inside]).all()
        assert torch.isnan(acc[:, :, ~inside]).all() and torch.isinf(lse[:, :, ~inside]).all()
