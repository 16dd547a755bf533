"""The Triton backend on a GPU (``pytest -m gpu``, skipped elsewhere), what is its own: hashing at
full size, the fused exact path (cuDNN / FlashAttention), the staging ring, the counting sort at
full size, misaligned inputs, deterministic mode.  The cross-validation every GPU backend passes
(same plan against the reference, N = 131072, causal leak, NaN poison) is ``tests/test_gpu_backends.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperattn
from hyperattn import testing
from hyperattn.registry import backend_status

TRITON = backend_status("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON.available, reason=f"triton backend: {TRITON.reason}")]


@pytest.fixture
def always_approximate(backend_options):
    """The Triton backend without its exact-attention crossover (short calls approximate too)."""
    backend_options("triton", exact_below=(0, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lsh_codes_agree_with_float64_on_gpu(dtype):
    """Every hashing path at a real size (odd N, D=64, 7 projections) against float64 signs."""
    x = torch.randn(1, 4, 20001, 64, device="cuda").to(dtype)
    projections = torch.randn(64, 7, device="cuda", dtype=torch.float64)
    bits = ((x.double() @ projections > 0).long() << torch.arange(7, device="cuda")).sum(-1)
    want = bits
    for shift in range(1, 7):
        want = want ^ (bits >> shift)
    got = TRITON.backend.lsh_codes(x, projections.float())
    assert got.shape == want.shape
    assert (got.long() == want).double().mean().item() > 0.9999


def test_gpu_short_calls_run_exactly_through_sdpa():
    """Below the crossover a call is exact: SDPA's own output (and backward), or the exact plan with lse."""
    from hyperattn.torch.fused import sdpa_backends

    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        out = hyperattn.attention(q, k, v, causal=causal, backend="triton", min_seq_len=256)
        with torch.nn.attention.sdpa_kernel(sdpa_backends(TRITON.backend.options.sdpa_order), set_priority=True):
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(out, expected)  # the very same kernel
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
        out, lse = hyperattn.attention(q, k, v, causal=causal, backend="triton", min_seq_len=256, return_lse=True)
        assert testing.relative_error(out, expected) < 1e-2
        exact_out, exact_lse = hyperattn.exact_attention(q, k, v, causal=causal, return_lse=True)
        torch.testing.assert_close(lse, exact_lse)


def _four_causal_leaves(batch: int, device: str = "cuda"):
    """bf16 q, k, v [batch, 4, 1024, 64], four causal 256-row leaves, empty (out, lse) accumulators."""
    from hyperattn.protocol import Segments

    q, k, v = (torch.randn(batch, 4, 1024, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    leaves = Segments.from_ranges([(s, s + 256, s, s + 256) for s in range(0, 1024, 256)])
    out = torch.zeros(batch, 4, 1024, 64, device=device)
    lse = torch.full((batch, 4, 1024), -torch.inf, device=device)
    return q, k, v, leaves, out, lse


def test_gpu_flash_exact_path_merges_like_the_kernel():
    """Merging the same exact piece twice keeps out and adds log 2 to lse (overwrite and merge branches)."""
    from hyperattn.tiles import exact_tiles
    from hyperattn_triton.exact import flash_exact_forward
    from hyperattn_triton.launches import launch_for

    backend = TRITON.backend
    options = backend.options
    q, k, v, leaves, out, lse = _four_causal_leaves(batch=1)
    assert flash_exact_forward(q, k, v, leaves, True, 0.125, out, lse, False, options)
    kernel_out = torch.zeros_like(out)
    kernel_lse = torch.full_like(lse, -torch.inf)
    launch = launch_for(options.launches, "forward", 64, 64)
    tiles = backend.device_tables.get(exact_tiles, q, leaves, True, 128)
    backend._forward(q, k, v, tiles, None, 0.125, kernel_out, kernel_lse, True, True, launch)
    torch.testing.assert_close(out, kernel_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, kernel_lse, atol=1e-3, rtol=1e-4)
    first_out, first_lse = out.clone(), lse.clone()
    assert flash_exact_forward(q, k, v, leaves, True, 0.125, out, lse, False, options)
    torch.testing.assert_close(out, first_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, first_lse + np.log(2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", ["cudnn", "flash"])
@pytest.mark.parametrize("chunk_bytes", [1, 256 << 20])
def test_gpu_flash_exact_backward_matches_the_kernels(fused, chunk_bytes, backend_options):
    """Leaves' gradients through the fused backward (final out and lse; in one call, or one call per
    (batch, head, leaf) entry of batch 2, i.e. strided views) equal the Triton kernels'."""
    from hyperattn_triton.exact import flash_exact_backward, flash_exact_forward

    options = backend_options("triton", fused_kernels=(fused,), fused_backward_chunk_bytes=chunk_bytes)
    q, k, v, leaves, out, lse = _four_causal_leaves(batch=2)
    assert flash_exact_forward(q, k, v, leaves, True, 0.125, out, lse, False, options)
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16).float()
    delta = (dout * out).sum(-1)
    through_fused = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    assert flash_exact_backward(q, k, v, out, lse, dout, leaves, True, 0.125, *through_fused, False, options)
    kernel = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    TRITON.backend.exact_backward(q, k, v, lse, dout, delta, leaves, True, 0.125, *kernel)  # no out: kernels
    for name, got, want in zip(("dq", "dk", "dv"), through_fused, kernel):
        assert testing.relative_error(got, want) < 1e-2, name
    # GQA does not fold: the kernels run
    assert not flash_exact_backward(q, k[:, :2], v[:, :2], out, lse, dout, leaves, True, 0.125, *kernel, False, options)


@pytest.mark.parametrize("fused", ["cudnn", "flash"])
def test_gpu_band_levels_through_the_fused_kernels_match_the_kernels(fused, backend_options):
    """A level's band (equal rectangles at constant strides, 96 rows x 1024 keys every 2048) runs
    as one fused call, merged into an earlier piece's (out, lse), and its backward through the
    fused kernels: both equal the Triton kernels'."""
    from hyperattn.protocol import Segments
    from hyperattn.tiles import exact_tiles
    from hyperattn_triton.exact import flash_exact_backward, flash_exact_forward
    from hyperattn_triton.launches import launch_for

    backend = TRITON.backend
    options = backend_options("triton", fused_kernels=(fused,))
    band = Segments.from_ranges([(s + 1024, s + 1120, s, s + 1024) for s in range(0, 4096, 2048)])
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = torch.randn(2, 4, 4096, 64, device="cuda")  # an earlier piece's, merged into
    lse = torch.randn(2, 4, 4096, device="cuda")
    kernel_out, kernel_lse = out.clone(), lse.clone()
    assert flash_exact_forward(q, k, v, band, False, 0.125, out, lse, False, options)
    launch = launch_for(options.launches, "forward", 64, 64)
    tiles = backend.device_tables.get(exact_tiles, q, band, False, launch.block_m)
    backend._forward(q, k, v, tiles, None, 0.125, kernel_out, kernel_lse, False, False, launch)
    torch.testing.assert_close(lse, kernel_lse, atol=1e-3, rtol=1e-4)
    assert testing.relative_error(out, kernel_out) < 1e-2
    rows = torch.zeros(4096, dtype=torch.bool, device="cuda")
    rows[1024:1120] = rows[3072:3168] = True
    assert torch.equal(out[:, :, ~rows], kernel_out[:, :, ~rows])  # other rows untouched
    dout = torch.randn(out.shape, device="cuda")
    delta = (dout * out).sum(-1)
    through_fused = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    assert flash_exact_backward(q, k, v, out, lse, dout, band, False, 0.125, *through_fused, False, options)
    kernel = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    backend.exact_backward(q, k, v, lse, dout, delta, band, False, 0.125, *kernel)  # no out: kernels
    for name, got, want in zip(("dq", "dk", "dv"), through_fused, kernel):
        assert testing.relative_error(got, want) < 1e-2, name
        assert torch.isfinite(got).all(), name


def test_gpu_pinned_ring_copies_survive_wraparound():
    """Index tables staged through the pinned ring arrive intact even when the ring wraps."""
    from hyperattn_triton.staging import PinnedRing

    ring = PinnedRing(size=16384)
    arrays = [np.arange(i, i + 300, dtype=np.int64).reshape(60, 5) for i in range(50)]  # 2400 bytes each
    arrays.append(np.zeros((0, 7), dtype=np.int64))
    arrays.append(np.linspace(0, 1, 3000, dtype=np.float32))  # larger than SIZE / 4: pinned on its own
    torch.cuda._sleep(100_000_000)  # the GPU runs far behind: every copy is still in flight at the wrap
    copies = [ring.copy(a, torch.device("cuda")) for a in arrays]
    for a, c in zip(arrays, copies):
        assert c.shape == a.shape and c.device.type == "cuda"
        np.testing.assert_array_equal(c.cpu().numpy(), a)


@pytest.mark.parametrize("bits", [7, 8])
def test_gpu_counting_sort_at_131072_matches_torch_sort(bits):
    """Full-size chunks on the GPU: one segment, and a causal level's 16 segments with gaps."""
    codes = torch.randint(0, 1 << bits, (1, 32, 131072), device="cuda", dtype=torch.int32)
    level = np.arange(16) * 8192
    for starts, ends in ((np.array([0]), np.array([131072])), (level + 4096, level + 8192)):
        order, rank = TRITON.backend.segment_sort(codes, starts, ends, code_bits=bits)  # counting sort
        expected_order, expected_rank = TRITON.backend.segment_sort(codes, starts, ends, code_bits=12)  # torch sort
        assert torch.equal(order, expected_order) and torch.equal(rank, expected_rank)


def test_gpu_row_dot_and_one_piece_output_dtype():
    out = torch.randn(1, 4, 5000, 64, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(1, 4, 5000, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(TRITON.backend.row_dot(dout, out), (dout.double() * out.double()).sum(-1).float())
    q = torch.randn(1, 4, 20000, 64, device="cuda", dtype=torch.bfloat16)
    result, lse = hyperattn.attention(q, q, q, backend="triton", seed=0, return_lse=True)
    assert result.dtype == torch.bfloat16 and torch.isfinite(result).all() and torch.isfinite(lse).all()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_deterministic_backward_is_bitwise_reproducible(causal):
    """torch.use_deterministic_algorithms(True): two backward passes of one seeded call give
    bitwise equal dQ, dK, dV (no atomics for the sample slots, this backend's kernels for the exact
    pieces instead of cuDNN's backward); and they agree with the default mode's to rounding."""
    params = dict(min_seq_len=1024, exact_crossover=False, seed=3, backend="triton")
    generator = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(1, 8, 8192, 64, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(3)]
    grad_out = torch.randn(1, 8, 8192, 64, device="cuda", generator=generator, dtype=torch.bfloat16)

    def grads():
        q, k, v = (x.clone().requires_grad_() for x in base)
        hyperattn.attention(q, k, v, causal=causal, **params).backward(grad_out)
        return [x.grad for x in (q, k, v)]

    default = grads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, default):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("min_seq_len", [512, 4096], ids=["approximate", "exact"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_misaligned_inputs_give_the_aligned_answer(causal, min_seq_len, always_approximate):
    """Inputs one element past 16-byte alignment, with the same strides, after aligned calls: direct
    launches (``launcher.py``) key each compiled kernel on what Triton specialises on, so they get
    kernels of their own; the fused exact kernels get aligned copies (cuDNN's SDPA misreads them).
    The answer and gradients are the aligned call's."""
    seed, shape = 5, (1, 4, 3001, 64)
    aligned = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for _ in range(2):  # the second call's launches are direct
        hyperattn.attention(*aligned, causal=causal, seed=seed, backend="triton", min_seq_len=min_seq_len)
    odd = []
    for x in aligned:
        view = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)[1:].view(shape)
        odd.append(view.copy_(x).requires_grad_())
    assert all(x.data_ptr() % 16 for x in odd) and all(x.stride() == y.stride() for x, y in zip(odd, aligned))
    aligned = [x.clone().requires_grad_() for x in aligned]
    want = hyperattn.attention(*aligned, causal=causal, seed=seed, backend="triton", min_seq_len=min_seq_len)
    got = hyperattn.attention(*odd, causal=causal, seed=seed, backend="triton", min_seq_len=min_seq_len)
    assert testing.relative_error(got, want) < 1e-3
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for name, a, b in zip("qkv", odd, aligned):
        assert testing.relative_error(a.grad, b.grad) < 1e-2, name
