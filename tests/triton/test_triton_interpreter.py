"""The Triton backend against the reference, on the same plan (same permutations and samples).

Without a GPU the kernels run in Triton's interpreter on small CPU shapes (fp32/fp16: the
interpreter's bf16 dot is broken); on a GPU machine these tests run on the GPU.  Options are set
through ``hyperattn.configure`` (the ``backend_options`` fixture undoes it) or by constructing a
backend with its own ``TritonOptions``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import hyperattn
from helpers import SMALL, error_or_absolute, make_inputs, poison_allocations, run_both
from hyperattn import testing
from hyperattn.algorithm import ExactPiece, SparsePiece, run_forward
from hyperattn.config import HyperAttentionConfig
from hyperattn.registry import backend_status

TRITON = backend_status("triton")
pytestmark = pytest.mark.skipif(not TRITON.available, reason=f"triton backend: {TRITON.reason}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# (B, Hq, Hk, Nq, Nk, D, Dv, causal)
INTERPRETER_CASES = [
    (1, 2, 1, 70, 70, 16, 8, False),
    (1, 2, 1, 100, 130, 16, 16, True),
    (2, 2, 2, 33, 33, 40, 24, True),
    (1, 1, 1, 1, 1, 8, 8, True),
    (1, 2, 2, 50, 17, 24, 32, False),
]


def inputs(case, dtype, seed):
    batch, q_heads, kv_heads, n_q, n_k, dim, v_dim, causal = case
    q, k, v = (torch.from_numpy(x).to(DEVICE, dtype) for x in
               make_inputs((batch, q_heads, n_q, dim), kv_heads=kv_heads, n_k=n_k, v_dim=v_dim, seed=seed))
    return q, k, v, causal


def default_launches():
    from hyperattn_triton.options import TritonOptions

    return TritonOptions().launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_same_plan_matches_reference(case, dtype):
    q, k, v, causal = inputs(case, dtype, seed=case[3])
    results, _ = run_both(q, k, v, causal=causal, params=SMALL)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert np.isfinite(got).all(), name
        assert error_or_absolute(got, want) < tolerance, name


@pytest.mark.parametrize("row_chunk", [2048, 8])
@pytest.mark.parametrize("case", [INTERPRETER_CASES[0], INTERPRETER_CASES[1], (1, 2, 1, 100, 100, 16, 8, True)])
def test_same_plan_with_sink_and_band_keys_matches_reference(case, row_chunk, backend_options, monkeypatch):
    """The sinks' exact pieces (all rows x the first keys; rows below the first leaf x the sink keys
    of the causal square), a causal call's band pieces (each rectangle's last keys), and the
    sparse pieces cut around them, with stratified samples, on Triton as on the reference.
    ``row_chunk`` 8: those pieces' dK/dV in chunks of 8 rows added atomically (the non-causal sinks
    are the call's first piece: their keys are zeroed first)."""
    from hyperattn.algorithm import ExactPiece
    from hyperattn_triton import attention

    backend_options("triton", exact_key_row_chunk=row_chunk)
    launched = []
    original = attention.backward

    def spy(*args, **kwargs):
        launched.extend(tiles.atomic for tiles in args[7])
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "backward", spy)
    q, k, v, causal = inputs(case, torch.float32, seed=7)
    results, plan = run_both(q, k, v, causal=causal, params={**SMALL, "sink_keys": 6, "band_keys": 5 * causal,
                                                                 "sampling": "stratified"})
    assert sum(isinstance(piece, ExactPiece) for piece in plan.pieces) >= 2 - (not causal)
    assert any(launched) == (row_chunk == 8)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert np.isfinite(got).all(), name
        assert error_or_absolute(got, want) < 1e-5, name


def test_causal_forward_keeps_its_running_output_in_the_input_dtype():
    """A causal plan's pieces merge into an fp16 running output (Capabilities.running_out_dtype is
    "input": fp32 arithmetic, one rounding per piece) and still match the reference's fp32 one."""
    from helpers import plan_on

    q, k, v = (torch.from_numpy(x).to(DEVICE, torch.float16) for x in
               make_inputs((1, 2, 100, 16), kv_heads=1, n_k=130, v_dim=16, seed=5))
    reference = backend_status("reference").backend
    plan = testing.seeded_plan(reference, q, k, causal=True, scale=0.25, config=HyperAttentionConfig(**SMALL), seed=0)
    assert len(plan.pieces) > 2 and TRITON.backend.capabilities.running_out_dtype == "input"
    out, lse = run_forward(TRITON.backend, plan_on(plan, TRITON.backend, q), *(TRITON.backend.to_native(x) for x in (q, k, v)))
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    want_out, want_lse = run_forward(reference, plan, *(reference.to_native(x) for x in (q, k, v)))
    assert error_or_absolute(testing.to_numpy64(out), testing.to_numpy64(want_out)) < 3e-3
    assert error_or_absolute(testing.to_numpy64(lse), testing.to_numpy64(want_lse)) < 1e-3


@pytest.mark.parametrize("case", [INTERPRETER_CASES[1], INTERPRETER_CASES[4], (1, 2, 1, 24, 1000, 16, 8, False)])
def test_overwriting_pieces_write_everything_they_own(case, monkeypatch):
    """Forward and backward allocate out, dq, dk, dv uninitialised and let the first piece write its
    rows and keys: NaN-poisoned allocations must not reach any result (causal prefix keys, key
    blocks without queries, Nq > Nk), on both backends."""
    poison_allocations(monkeypatch)
    q, k, v, causal = inputs(case, torch.float32, seed=5)
    results, plan = run_both(q, k, v, causal=causal, params=SMALL)
    assert any(isinstance(piece, SparsePiece) for piece in plan.pieces)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert np.isfinite(want).all() and np.isfinite(got).all(), name
        assert error_or_absolute(got, want) < 1e-5, name


def test_int64_offsets_give_the_same_result(monkeypatch):
    """The int64 offsets taken when one head's offsets may pass 2**31 compute the same."""
    from hyperattn_triton import attention

    assert not attention.needs_int64_offsets(torch.empty(1, 2, 8, 4).transpose(1, 2))
    assert attention.needs_int64_offsets(torch.empty_strided((1, 1, 2**20, 64), (0, 0, 2**12, 1), device="meta"))
    q, k, v, causal = inputs(INTERPRETER_CASES[1], torch.float32, seed=3)
    narrow, _ = run_both(q, k, v, causal=causal, params=SMALL)
    monkeypatch.setattr(attention, "needs_int64_offsets", lambda *tensors: True)
    wide, _ = run_both(q, k, v, causal=causal, params=SMALL)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), wide["triton"], narrow["triton"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_device_tables_are_built_once_per_distinct_arguments():
    from hyperattn import tiles
    from hyperattn.protocol import Segments
    from hyperattn_triton.backend import TritonBackend
    from hyperattn_triton.options import TritonOptions

    built = []

    def build(segments, causal, block):
        built.append(block)
        return tiles.exact_tiles(segments, causal, block)

    backend = TritonBackend(TritonOptions(device_tables_capacity=2))
    like = torch.empty(0, device=DEVICE)
    first = backend.device_tables.get(build, like, Segments.from_ranges([(0, 40, 0, 40)]), True, 16)
    again = backend.device_tables.get(build, like, Segments.from_ranges([(0, 40, 0, 40)]), True, 16)  # equal, not the same
    other = backend.device_tables.get(build, like, Segments.from_ranges([(0, 40, 0, 40)]), True, 32)
    assert again is first and other is not first and built == [16, 32]
    np.testing.assert_array_equal(first.cpu().numpy(), tiles.exact_tiles(Segments.from_ranges([(0, 40, 0, 40)]), True, 16))
    backend.device_tables.get(build, like, Segments.from_ranges([(0, 40, 0, 40)]), True, 64)
    assert len(backend.device_tables) == 2  # the options' capacity: the least recently used left


@pytest.mark.parametrize("causal", [False, True])
def test_forward_whole_steps_then_a_partial_step(causal, backend_options):
    """Blocks of 40 keys in steps of 16: two unmasked whole steps, then a masked step of 8 keys
    (and the segment's last, shorter block), in fp32 and fp16."""
    backend_options("triton", launches=default_launches().changed("forward", 64, block_n=16))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        q, k, v = (torch.from_numpy(x).to(DEVICE, dtype) for x in make_inputs((1, 2, 150, 16), n_k=150, seed=3))
        results, _ = run_both(q, k, v, causal=causal, params=dict(SMALL, block_size=40, sample_size=24),
                              backward=False)
        for name, got, want in zip(("out", "lse"), results["triton"], results["reference"]):
            assert np.isfinite(got).all() and error_or_absolute(got, want) < tolerance, (dtype, name)


@pytest.mark.parametrize("case", [INTERPRETER_CASES[0], INTERPRETER_CASES[1]])
def test_same_plan_matches_reference_with_small_tiles(case, backend_options):
    """Many tiles per block, key tiles shorter than blocks, several row chunks adding into the samples."""
    launches = default_launches()
    for kernel in ("forward", "dq", "dkdv"):
        launches = launches.changed(kernel, 64, block_m=16, block_n=16)
    backend_options("triton", launches=launches, sample_row_chunk=24)
    q, k, v, causal = inputs(case, torch.float32, seed=1)
    results, _ = run_both(q, k, v, causal=causal, params=dict(SMALL, block_size=32, sample_size=40))
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert error_or_absolute(got, want) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: the interpreter's tl.dot is wrong
def test_lsh_codes_match_reference(dtype):
    """fp32 inputs go through multiply-and-reduce passes, fp16/bf16 ones through split matrix-unit
    products: both match the reference's codes of the same (rounded) inputs up to rare sign flips."""
    reference, triton_backend = backend_status("reference").backend, TRITON.backend
    x = torch.randn(2, 3, 300, 24).to(dtype)
    projections = np.random.default_rng(0).standard_normal((24, 5))
    expected = reference.lsh_codes(x.float().numpy(), projections.astype(np.float32))
    got = triton_backend.lsh_codes(x.to(DEVICE), torch.from_numpy(projections).to(DEVICE, torch.float32))
    assert (got.cpu().numpy() == expected).mean() > 0.999  # fp32 sums in another order: rare sign flips


def test_lsh_codes_follow_projections_changed_in_place():
    """Prepared projections are cached per tensor (q and k share them), but not past an in-place change."""
    x = torch.randn(1, 2, 64, 16, device=DEVICE, dtype=torch.float16)
    projections = torch.randn(16, 4, device=DEVICE)
    before = TRITON.backend.lsh_codes(x, projections)
    projections.neg_()
    after = TRITON.backend.lsh_codes(x, projections)
    assert torch.equal(after, TRITON.backend.lsh_codes(x, projections.clone())) and not torch.equal(before, after)


def test_split_projections_sum_to_fp32():
    """The LSH kernel's projections for fp16/bf16 rows: terms in that dtype summing to the fp32
    projections (zero-padded), and for fp32 rows the padded fp32 projections."""
    from hyperattn_triton.lsh import split_projections

    p = torch.randn(40, 7, dtype=torch.float64, device=DEVICE)
    want = torch.zeros(64, 16, dtype=torch.float64)
    want[:40, :7] = p.cpu().float().double()
    for dtype in (torch.bfloat16, torch.float16):
        parts = split_projections(p, dtype, 3, 64, 16)
        assert parts.shape == (3, 64, 16) and parts.dtype == dtype
        err = (parts.cpu().to(torch.float64).sum(0) - want).abs().max().item()
        assert err <= 2e-7 * want.abs().max().item(), (dtype, err)
    one = split_projections(p, torch.bfloat16, 1, 64, 16)
    assert (one.cpu().double()[0] - want).abs().max() > 1e-4  # one term is not enough
    padded = split_projections(p, torch.bfloat16, 0, 64, 16)
    assert padded.dtype == torch.float32 and torch.equal(padded.cpu().double(), want)


def test_segment_sort_matches_reference():
    reference, triton_backend = backend_status("reference").backend, TRITON.backend
    x = torch.randn(2, 3, 300, 24)
    projections = np.random.default_rng(0).standard_normal((24, 5))
    expected = reference.lsh_codes(x.numpy(), projections.astype(np.float32))
    starts, ends = np.array([10, 200]), np.array([150, 300])
    codes = torch.from_numpy(expected)
    order, rank = triton_backend.segment_sort(codes.to(DEVICE), starts, ends)
    expected_order, expected_rank = reference.segment_sort(expected, starts, ends)
    np.testing.assert_array_equal(order.cpu().numpy(), expected_order)
    np.testing.assert_array_equal(rank.cpu().numpy(), expected_rank)
    order, rank = triton_backend.segment_sort(codes.to(DEVICE), starts, ends, code_bits=5)  # int32 sort keys
    np.testing.assert_array_equal(order.cpu().numpy(), expected_order)
    np.testing.assert_array_equal(rank.cpu().numpy(), expected_rank)


def sort_backend(**options):
    """A Triton backend of its own with these sort options."""
    from hyperattn_triton.backend import TritonBackend
    from hyperattn_triton.options import TritonOptions

    return TritonBackend(TritonOptions(**options))


def counting_sort(backend, codes, starts, ends, bits):
    from hyperattn_triton import sorting

    return sorting.counting_segment_sort(codes, starts, ends, bits, options=backend.options,
                                         tables=backend.device_tables, presorted=backend.presorted_codes)


@pytest.mark.parametrize("chunk", [16, 64] if INTERPRETED else [16, 1024])
def test_counting_sort_matches_the_reference_sort(chunk):
    """Random segments (gaps, empty and one-position ones, chunks across segment ends), code widths
    1..8 bits and int32/int64 codes: the same stable order and rank as the reference."""
    # segments of several prefix-sum steps and of several parts
    backend = sort_backend(sort_chunk=chunk, sort_interpreter_chunk=chunk, sort_starts_chunks=2, sort_starts_part=3)
    reference = backend_status("reference").backend
    rng = np.random.default_rng(chunk)
    for trial in range(4):
        n, bits = int(rng.integers(1, 90)), int(rng.integers(1, 9))
        codes = rng.integers(0, 1 << bits, size=(2, 2, n))
        cuts = np.sort(rng.choice(n + 1, size=min(n + 1, 2 * int(rng.integers(0, 4))), replace=False))
        starts, ends = cuts[0::2], cuts[1::2]
        dtype = torch.int32 if trial % 2 else torch.int64
        order, rank = counting_sort(backend, torch.from_numpy(codes).to(DEVICE, dtype), starts, ends, bits)
        expected_order, expected_rank = reference.segment_sort(codes, starts, ends)
        assert order.dtype == rank.dtype == torch.int32
        np.testing.assert_array_equal(order.cpu().numpy(), expected_order, err_msg=f"{n=} {bits=} {starts=} {ends=}")
        np.testing.assert_array_equal(rank.cpu().numpy(), expected_rank, err_msg=f"{n=} {bits=} {starts=} {ends=}")


@pytest.mark.parametrize("chunk", [16] if INTERPRETED else [16, 256])
def test_causal_levels_sort_presorted_chunks_like_the_reference(chunk):
    """The causal recursion's levels (segments cut at multiples of the chunk, with gaps) sort one
    codes tensor several times from its presorted chunks: each level matches the reference, and a
    level cut off the chunk grid takes the general path."""
    from hyperattn_triton import sorting

    backend = sort_backend(sort_chunk=chunk, sort_interpreter_chunk=chunk)
    reference = backend_status("reference").backend
    n, bits = 8 * chunk + 5, 3
    codes = np.random.default_rng(chunk).integers(0, 1 << bits, size=(2, 3, n))
    device_codes = torch.from_numpy(codes).to(DEVICE, torch.int32)
    levels = [([4 * chunk], [n]), ([2 * chunk, 6 * chunk], [4 * chunk, n]), ([0, 4 * chunk], [2 * chunk, 6 * chunk]),
              ([chunk, 3 * chunk + 1], [2 * chunk, 4 * chunk])]
    for starts, ends in levels:
        starts, ends = np.array(starts), np.array(ends)
        assert sorting.aligned(starts, ends, n, chunk) == (starts[-1] % chunk == 0)
        order, rank = counting_sort(backend, device_codes, starts, ends, bits)
        expected_order, expected_rank = reference.segment_sort(codes, starts, ends)
        np.testing.assert_array_equal(order.cpu().numpy(), expected_order, err_msg=f"{starts=} {ends=}")
        np.testing.assert_array_equal(rank.cpu().numpy(), expected_rank, err_msg=f"{starts=} {ends=}")
    assert device_codes in backend.presorted_codes
    device_codes[..., :chunk] = torch.from_numpy(codes[..., :chunk][..., ::-1].copy())  # in place: presorted again
    codes[..., :chunk] = codes[..., :chunk][..., ::-1].copy()
    starts, ends = np.array([0, 4 * chunk]), np.array([2 * chunk, 6 * chunk])
    order, _ = counting_sort(backend, device_codes, starts, ends, bits)
    np.testing.assert_array_equal(order.cpu().numpy(), reference.segment_sort(codes, starts, ends)[0])
    assert not sorting.aligned(np.array([0]), np.array([n]), n, chunk)  # the one whole range: no presort


@pytest.mark.parametrize("chunk", [16] if INTERPRETED else [16, 256])
def test_sort_pair_sorts_stacked_codes_in_one_sort_like_two(chunk, monkeypatch):
    """``lsh_codes_pair`` stacks q's and k's codes; ``sort_pair`` sorts them in one counting sort for a
    causal level (disjoint query and key ranges) and a non-causal piece (the same ranges), and in two
    where the ranges overlap: inside every range, the reference's two sorts."""
    from hyperattn.protocol import Segments
    from hyperattn_triton import sorting

    backend = sort_backend(sort_chunk=chunk, sort_interpreter_chunk=chunk)
    reference = backend_status("reference").backend
    n, bits, c = 8 * chunk + 5, 3, chunk
    rng = np.random.default_rng(chunk)
    q, k = (torch.from_numpy(rng.standard_normal((2, 3, n, 16))).float().to(DEVICE) for _ in range(2))
    projections = torch.from_numpy(rng.standard_normal((16, bits))).float().to(DEVICE)
    q_codes, k_codes = backend.lsh_codes_pair(q, k, projections)
    assert sorting.stacked_codes(q_codes, k_codes) is not None
    np.testing.assert_array_equal(q_codes.cpu().numpy(), backend.lsh_codes(q, projections).cpu().numpy())
    host_q, host_k = q_codes.cpu().numpy(), k_codes.cpu().numpy()
    sorts = []
    counting = sorting.counting_segment_sort
    monkeypatch.setattr(sorting, "counting_segment_sort", lambda *a, **kw: sorts.append(1) or counting(*a, **kw))
    pieces = {"level 1": ([(4 * c, n, 0, 4 * c)], 1), "level 2": ([(2 * c, 4 * c, 0, 2 * c), (6 * c, n, 4 * c, 6 * c)], 1),
              "non-causal": ([(0, n, 0, n)], 1),
              "overlapping": ([(0, n, 0, 3 * c)], 3)}  # the joint sort declines, then two sorts
    for name, (ranges, expected_sorts) in pieces.items():
        sorts.clear()
        segments = Segments.from_ranges(ranges)
        q_order, k_order, k_rank = (x.cpu().numpy() for x in backend.sort_pair(q_codes, k_codes, segments, bits))
        assert len(sorts) == expected_sorts, name
        want_q = reference.segment_sort(host_q, segments.q_start, segments.q_end)[0]
        want_k, want_rank = reference.segment_sort(host_k, segments.k_start, segments.k_end)
        for qs, qe, ks, ke in ranges:
            np.testing.assert_array_equal(q_order[..., qs:qe], want_q[..., qs:qe], err_msg=name)
            np.testing.assert_array_equal(k_order[..., ks:ke], want_k[..., ks:ke], err_msg=name)
            np.testing.assert_array_equal(k_rank[..., ks:ke], want_rank[..., ks:ke], err_msg=name)


def test_a_training_step_leaves_no_tensor_in_reference_cycles():
    """After forward and backward every tensor of the call is freed by reference counting: one in
    a cycle (once the returned lse, kept on the autograd context, held its own graph node and so
    the whole plan) waits for Python's gc."""
    import gc

    q, k, v = (torch.randn(1, 2, 256, 16, device=DEVICE, dtype=torch.float32, requires_grad=True) for _ in range(3))
    params = dict(block_size=32, sample_size=32, min_seq_len=64, lsh_num_projs=3)
    gc.collect()
    # objects alive before the call are not the call's (earlier tests' compiled graphs can free
    # theirs to the gc during it)
    before = {id(x) for x in gc.get_objects()}
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        out, lse = hyperattn.attention(q, k, v, causal=True, backend="triton", seed=0, return_lse=True, **params)
        (out.sum() + lse.sum()).backward()
        del out, lse
        gc.collect()
        cycled = [x for x in gc.garbage if isinstance(x, torch.Tensor) and id(x) not in before]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert q.grad is not None and cycled == []


def test_counting_sort_declines_what_it_cannot_sort():
    codes = torch.zeros(1, 1, 10, dtype=torch.int64, device=DEVICE)
    backend = TRITON.backend
    assert counting_sort(backend, codes, np.array([0]), np.array([10]), bits=9) is None  # too wide
    assert counting_sort(backend, codes, np.array([0, 4]), np.array([6, 10]), bits=3) is None  # overlap
    order, _ = backend.segment_sort(codes, np.array([0]), np.array([10]), code_bits=12)  # torch sort then
    np.testing.assert_array_equal(order.cpu().numpy()[0, 0], np.arange(10))


def test_row_dot_is_the_fp32_row_sum_of_products():
    a = torch.randn(2, 3, 70, 24, device=DEVICE, dtype=torch.float16)
    b = torch.randn(2, 3, 70, 24, device=DEVICE, dtype=torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    got = TRITON.backend.row_dot(a, b)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 70)
    torch.testing.assert_close(got, (a.double() * b.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_into_widens_rows_of_strided_views(dtype, add):
    """The exact pieces' half-precision results go into fp32 accumulators through cast_into: a
    copy (or an add) through both views' strides, padded head dim included."""
    from hyperattn_triton import exact
    from hyperattn_triton.kernels.utility import cast_rows_kernel

    src = torch.randn(2, 5, 3, 40, device=DEVICE).to(dtype).transpose(1, 2)  # [2, 3, 5, 40], strided
    dst = torch.randn(2, 3, 5, 48, device=DEVICE)[..., :40]  # fp32, rows padded to 48
    want = dst + src.float() if add else src.float()
    if DEVICE == "cpu":  # cast_into copies with torch there: run the kernel itself (interpreter)
        cast_rows_kernel[(2, 6)](src, dst, 5, 3, *src.stride(), *dst.stride(), DIM=40, D_PAD=64, BLOCK=4, ADD=add)
    else:
        exact.cast_into(dst, src, add, TRITON.backend.options)
    torch.testing.assert_close(dst, want, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_give_the_same_result_as_contiguous_ones(causal):
    """[B, N, H, D] tensors transposed to [B, H, N, D] (as attention layers make them), and a
    sliced head dim, are read through their strides: same output and gradients as contiguous
    copies, no copy needed."""
    base = [torch.randn(1, 90, 2, 20, device=DEVICE) for _ in range(3)]
    strided = [x.transpose(1, 2)[..., :16].requires_grad_() for x in base]
    contiguous = [x.detach().contiguous().requires_grad_() for x in strided]
    assert not strided[0].is_contiguous()
    results = []
    for q, k, v in (strided, contiguous):
        out, lse = hyperattn.attention(q, k, v, causal=causal, seed=7, backend="triton", return_lse=True, **SMALL)
        (out.square().sum() + lse.sum()).backward()
        results.append([out, lse, q.grad, k.grad, v.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_api_end_to_end_with_a_seed(backend_options):
    backend_options("triton", exact_below=(0, 0))  # the reference's crossover: the same plan on a GPU too
    q, k, v = (torch.from_numpy(x).to(DEVICE).requires_grad_() for x in make_inputs((1, 2, 90, 16), kv_heads=1, seed=3, dtype=np.float32))
    out = hyperattn.attention(q, k, v, causal=True, seed=4, backend="triton", **SMALL)
    assert out.device.type == DEVICE and out.dtype == torch.float32
    expected = hyperattn.attention(*(x.detach().cpu() for x in (q, k, v)), causal=True, seed=4, backend="reference", **SMALL)
    assert testing.relative_error(out, expected) < 1e-3  # same seed; rare LSH sign flips allowed
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_explicit_triton_refuses_what_it_cannot_run():
    q, k, v = (torch.from_numpy(x) for x in make_inputs((1, 1, 8, 8), dtype=np.float64))
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run .*dtype float64 is not supported"):
        hyperattn.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run .*arrays of type numpy are not supported"):
        hyperattn.attention(q.numpy().astype(np.float32), k.numpy().astype(np.float32), v.numpy().astype(np.float32), backend="triton")


def test_configured_crossover_takes_effect_after_the_backend_ran(backend_options):
    """``hyperattn.configure("triton", exact_below=...)`` on a backend that has already run: the
    next call's plan and kernels follow it (exact below the crossover, approximate again without)."""
    backend = TRITON.backend
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch.float32) for x in make_inputs((1, 2, 64, 16), seed=2))
    config = HyperAttentionConfig(**SMALL)
    calls = {"exact_forward": 0, "sparse_forward": 0}

    def counted(name):
        real = getattr(backend, name)

        def count(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return count

    def run():
        for name in calls:
            calls[name] = 0
        with pytest.MonkeyPatch.context() as patch:
            for name in calls:
                patch.setattr(backend, name, counted(name))
            out = hyperattn.attention(q, k, v, backend="triton", seed=0, **SMALL)
        plan = testing.seeded_plan(backend, q, k, causal=False, scale=0.25, config=config, seed=0)
        return out, dict(calls), list(plan.pieces)

    backend_options("triton", exact_below=(0, 0))
    approximate, before, pieces = run()
    assert before["sparse_forward"] == 1 and any(isinstance(p, SparsePiece) for p in pieces)
    backend_options("triton", exact_below=(1 << 20, 1 << 20))
    exact, after, pieces = run()
    assert after["sparse_forward"] == 0 and all(isinstance(p, ExactPiece) for p in pieces)
    if INTERPRETED:  # no SDPA shortcut under the interpreter: the plan's one exact piece
        assert after["exact_forward"] == 1
    want = hyperattn.exact_attention(q, k, v)
    assert testing.relative_error(exact, want) < 1e-5 < testing.relative_error(approximate, want)
    backend_options("triton", exact_below=(0, 0))
    assert run()[1]["sparse_forward"] == 1


def test_options_are_validated_and_name_the_field():
    from hyperattn_triton.options import TritonOptions

    for changes, field in ((dict(sort_chunk=48), "sort_chunk"), (dict(sdpa_order=("cudnn", "fast")), "sdpa_order"),
                           (dict(fused_kernels=()), "fused_kernels"), (dict(sample_row_chunk=0), "sample_row_chunk"),
                           (dict(exact_key_row_chunk=0), "exact_key_row_chunk"),
                           (dict(launches={}), "launches")):
        with pytest.raises((ValueError, TypeError), match=rf"TritonOptions\.{field}: expected .*, got"):
            TritonOptions(**changes)
    with pytest.raises(TypeError, match=r"has no option\(s\) \['sort_chunks'\]"):
        hyperattn.configure("triton", sort_chunks=16)


def test_launch_table_keeps_every_tuned_launch():
    """The default table as it was tuned (no retuning hides in a refactoring), and how it is read."""
    from hyperattn_triton.launches import Launch, RowLaunch, launch_for

    table = default_launches()
    assert launch_for(table, "forward", 64, 64) == Launch(128, 32, 5, 4, maxnreg=168)
    assert launch_for(table, "dq", 16, 64) == Launch(128, 64, 3, 4)
    assert launch_for(table, "dkdv", 64, 8) == Launch(32, 128, 3, 4)
    assert [launch_for(table, kernel, 128, 100) for kernel in ("forward", "dq", "dkdv")] == [
        Launch(128, 32, 3, 4), Launch(64, 64, 3, 4), Launch(64, 128, 2, 8)]
    assert {launch_for(table, kernel, 65, 256) for kernel in ("forward", "dq", "dkdv")} == {Launch(32, 32, 1, 4)}
    assert launch_for(table, "lsh_split", 64) == RowLaunch(128, 2, terms=3)
    assert launch_for(table, "lsh_reduce", 64) == RowLaunch(128, 2)
    assert launch_for(table, "row_dot", 64) == launch_for(table, "cast_rows", 64) == RowLaunch(64, 4)
    assert launch_for(table, "sample_blocks", 64) == RowLaunch(1024, 4)
    with pytest.raises(ValueError, match="no launch for head dim 300"):
        launch_for(table, "forward", 300, 8)
    changed = table.changed("dkdv", 64, block_m=16)
    assert launch_for(changed, "dkdv", 64) == Launch(16, 128, 3, 4) and launch_for(table, "dkdv", 64).block_m == 32
    assert launch_for(changed, "dkdv", 128) == launch_for(table, "dkdv", 128)


@pytest.mark.parametrize("case", [INTERPRETER_CASES[1], (1, 4, 2, 70, 70, 16, 8, False)])
def test_backward_in_chunks_of_heads_matches_one_pass(case, backend_options):
    """The head-chunked backward (sliced inputs and structures, strided kernels) equals one pass."""
    q, k, v, causal = inputs(case, torch.float32, seed=6)
    whole, _ = run_both(q, k, v, causal=causal, params=SMALL)
    for name in ("reference", "triton"):
        backend_options(name, backward_chunk_bytes=1)
    chunked, _ = run_both(q, k, v, causal=causal, params=SMALL)
    for backend in ("reference", "triton"):
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), chunked[backend], whole[backend]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{backend} {name}")


def test_pinned_ring_never_hands_out_bytes_of_a_copy_in_flight():
    """The ring's bookkeeping with copies that never finish on their own (a GPU far behind the
    host): every area it hands out is free of unfinished copies, over many laps."""
    from hyperattn_triton.staging import PinnedRing

    class Event:  # a copy in flight until someone waits for it
        def __init__(self):
            self.done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    ring = PinnedRing()
    ring.SIZE, ring.ALIGN = 4096, 64
    rng = np.random.default_rng(0)
    for _ in range(2000):
        start, end = ring._reserve(int(rng.integers(0, 900)))
        assert 0 <= start <= end <= ring.SIZE
        busy = [(s, e) for s, e, event in ring.pending if not event.done and s < end and start < e]
        assert not busy, (start, end, busy)
        event = Event()
        event.done = rng.random() < 0.3  # some copies finish early
        ring.pending.append((start, end, event))
    assert len(ring.pending) < 200  # the queue is trimmed as areas are reused


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("case", [INTERPRETER_CASES[0], INTERPRETER_CASES[1], (1, 4, 2, 70, 70, 16, 8, False)])
def test_deterministic_mode_stores_slot_gradients_then_adds_them_in_order(case, deterministic, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the sample slots' dK/dV are stored one row per
    slot (no atomics) and added by index_put_: the same gradients as the reference."""
    from hyperattn_triton import attention

    added = []
    real = attention.add_slots
    monkeypatch.setattr(attention, "add_slots", lambda *args: added.append(1) or real(*args))
    q, k, v, causal = inputs(case, torch.float32, seed=7)
    results, _ = run_both(q, k, v, causal=causal, params=SMALL)
    assert added  # the slot path ran
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert np.isfinite(got).all(), name
        assert error_or_absolute(got, want) < 1e-5, name
    again, _ = run_both(q, k, v, causal=causal, params=SMALL)
    for got, want in zip(again["triton"], results["triton"]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("seed_in_memory", [False, True])
def test_drawn_samples_equal_the_specification(seed_in_memory, stratified):
    """The draw kernel (interpreted) against ``hyperattn.sampling``, bit for bit: an int seed as a
    launch argument and a seed read from memory, several streams, uneven segments, uniform and
    stratified draws."""
    from hyperattn.protocol import Segments
    from hyperattn.sampling import sample_keys

    segments = Segments.from_ranges([(0, 10, 0, 7), (10, 20, 7, 1000), (20, 30, 1000, 4099)])
    like = torch.empty(1, 1, 1, 32)
    for seed, stream in [(0, 0), (12345, 2), (2**63 - 1, 1)]:
        given = torch.tensor(seed) if seed_in_memory else seed
        got = TRITON.backend.draw_samples(given, stream, (2, 3), segments, 70, 4099, like, stratified).numpy()
        want = sample_keys(seed, stream, (2, 3), segments.k_start, segments.k_len, 70, 4099, stratified)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed_in_memory", [False, True])
def test_key_norm_draws_equal_the_specification(seed_in_memory):
    """The key-norm draw kernel against ``hyperattn.sampling.sample_keys_by_key_norm``: the same keys
    and log weights (to float32 rounding) for heavy keys, a segment of zero keys, segments swamped
    by a heavy key before them, several streams, and the heads of a larger call (``head_ids``)."""
    from hyperattn.protocol import Segments
    from hyperattn.sampling import key_norm_weights, sample_keys_by_key_norm

    segments = Segments.from_ranges([(0, 10, 0, 7), (10, 20, 7, 1000), (20, 30, 1000, 4099)])
    k = torch.randn(2, 3, 4099, 16, generator=torch.Generator().manual_seed(0))
    k[:, :, 5] *= 5
    k[0, 0, 7:1000] = 0
    k[1, 1, 3] *= 1e4  # swamps the next segments' prefix sums: they draw uniformly
    weights = key_norm_weights(k.numpy())
    k = k.to(DEVICE)
    key_weights = TRITON.backend.key_norm_weights(k)
    for seed, stream, heads in [(0, 0, None), (12345, 2, (4, 0, 2)), (2**63 - 1, 1, None)]:
        given = torch.tensor(seed, device=DEVICE) if seed_in_memory else seed
        got, got_w = TRITON.backend.draw_samples_by_key_norm(given, stream, segments, 70, key_weights, k, heads,
                                                             None if heads is None else 5)
        got, got_w = got.cpu(), got_w.cpu()
        want, want_w = sample_keys_by_key_norm(seed, stream, weights, segments.k_start, segments.k_len, 70, heads,
                                               None if heads is None else 5)
        assert got.dtype == torch.int32 and got_w.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_allclose(got_w.numpy(), want_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [INTERPRETER_CASES[0], INTERPRETER_CASES[1], (2, 4, 2, 100, 100, 16, 8, True)])
def test_same_plan_with_key_norm_samples_matches_reference(case):
    """Per-draw log weights (``sampling="key_norm"``) in the forward, dQ and dK/dV kernels."""
    q, k, v, causal = inputs(case, torch.float32, seed=5)
    k[:, :, ::9] *= 3
    results, plan = run_both(q, k, v, causal=causal, params={**SMALL, "sampling": "key_norm"})
    draw_weights = [p.structure.sample_log_weights for p in plan.pieces if isinstance(p, SparsePiece)]
    assert draw_weights and np.ptp(np.concatenate([np.ravel(w) for w in draw_weights])) > 0.1
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert np.isfinite(got).all(), name
        assert error_or_absolute(got, want) < 1e-5, name


def test_a_key_norm_call_drawn_on_the_device_equals_the_reference_call():
    """The whole call, its draws made by the Triton kernel: what the reference computes from the
    same seed (forward and gradients)."""
    q, k, v, causal = inputs((1, 2, 1, 100, 130, 16, 16, True), torch.float32, seed=2)
    k[:, :, ::7] *= 3
    params = dict(SMALL, sampling="key_norm", exact_crossover=False, band_keys=4)
    got, want = [], []
    for backend, results in (("triton", got), ("reference", want)):  # the reference on the host
        inputs_ = [(x if backend == "triton" else x.cpu()).detach().clone().requires_grad_() for x in (q, k, v)]
        out = hyperattn.attention(*inputs_, causal=causal, seed=11, backend=backend, **params)
        out.backward(torch.ones_like(out))
        results.extend(testing.to_numpy64(x) for x in (out, *(x.grad for x in inputs_)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert error_or_absolute(a, b) < 1e-5, name


def test_planned_path_reads_no_tensor_on_the_host(monkeypatch):
    """A causal call with gradients (exact leaves, sparse levels, samples, backward) reads no tensor's
    value on the host: on a GPU each such read is a synchronisation, and it would break a CUDA graph.
    (``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__`` and ``numpy`` are made to
    raise after the warm-up call has filled the backend's caches.)"""
    q, k, v = (torch.from_numpy(x).float().requires_grad_() for x in make_inputs((1, 2, 600, 32), seed=1))
    params = dict(backend="triton", causal=True, seed=3, min_seq_len=128, block_size=32, sample_size=32,
                  exact_crossover=False)
    hyperattn.attention(q, k, v, **params).sum().backward()

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a tensor on the host")
        return read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    out = hyperattn.attention(q, k, v, **params)
    out.backward(torch.ones_like(out))
    monkeypatch.undo()
    assert torch.isfinite(q.grad).all()


def test_a_warm_call_makes_few_torch_operations():
    """Each torch operation costs host time on every call (~13 µs each on the H200 machine's CPU,
    docs/performance.md): a warm causal forward (2 sparse levels, exact leaves) makes only the
    allocations its kernels write into, and no no-op conversions, views or dummies."""
    from torch.overrides import TorchFunctionMode

    free = {"__get__", "stride", "dim", "numel", "__len__", "is_contiguous", "size", "data_ptr",
            "untyped_storage", "storage_offset", "new_empty", "element_size"}  # reads, and the interpreter's own copies

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name not in free:
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.from_numpy(x).float() for x in make_inputs((1, 2, 600, 32), seed=1))
    params = dict(backend="triton", causal=True, seed=3, min_seq_len=128, block_size=32, sample_size=32,
                  exact_crossover=False)
    hyperattn.attention(q, k, v, **params)
    with Count() as count:
        hyperattn.attention(q, k, v, **params)
    levels = 2
    # out and lse; the codes of q and k in one buffer, and its two halves; per level one sort of
    # both (its 3 outputs; q's and k's orders apart, k's ranks), the samples and their key blocks
    expected = {"empty": 1 + 1 + levels * 3 + levels * 2, "unbind": 1 + levels, "__getitem__": levels,
                "full": 1, "empty_like": levels}
    assert {name: count.names.count(name) for name in set(count.names)} == expected, count.names
