"""The CuPy backend's structure kernels, what a CPU can check: NumPy mirrors of the kernels'
arithmetic (the sample draws against ``hyperattn.sampling`` bit for bit, the counting sort's
three kernels against the reference's sort, the hashing's butterfly and ballot against plain
sign bits), the sort's host tables, and the arguments every host launch passes (name expression,
grid, block, shared memory, each scalar's C type against the kernel's signature in its ``.cu``),
through a fake kernel and NumPy arrays standing in for cupy ones."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("cupy")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hyperattn_cupy import compiler, lsh, sorting, utility  # noqa: E402
from hyperattn_cupy.launches import DEFAULT_LAUNCHES, RowLaunch  # noqa: E402

from hyperattn import sampling  # noqa: E402

U64 = np.uint64


# -- draw_samples ----------------------------------------------------------------------------------
def mirror_draw(seed: int, stream: int, batch: int, kv_heads: int, k_start, k_len, m: int, n_k: int,
                stratified: bool = False):
    """The draw kernel's operations in uint64, element by flat index i, as ``utility.cu`` does them
    (then, ``stratified``, the backend's ``stratify`` on NumPy arrays)."""
    k_start, k_len = np.asarray(k_start, np.int64), np.asarray(k_len, np.int64)
    per_head = len(k_start) * m
    i = np.arange(batch * kv_heads * per_head, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = U64(seed) + U64(stream) * U64(sampling.STREAM)
        z = key + (i + U64(1)) * U64(sampling.GOLDEN)
        z = (z ^ (z >> U64(30))) * U64(sampling.MIX1)
        z = (z ^ (z >> U64(27))) * U64(sampling.MIX2)
        z = z ^ (z >> U64(31))
    bits = z >> U64(32)
    segment = (i.astype(np.int64) % per_head) // m
    drawn = ((bits * k_len[segment].astype(np.uint64)) >> U64(32)).astype(np.int64) + k_start[segment]
    drawn = drawn.astype(utility.sample_dtype(n_k)).reshape(batch, kv_heads, len(k_start), m)
    return utility.stratify(np, drawn, k_start, k_len, m) if stratified else drawn


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("seed, stream", [(0, 0), (1, 3), (12345, 2), (2**63 - 1, 1), (2**62 + 7, 11)])
def test_the_draw_arithmetic_is_the_specification(seed, stream, stratified):
    k_start = np.array([0, 7, 1000, 5, 2**31 - 10])
    k_len = np.array([7, 993, 3099, 0, 3])
    for n_k in (4099, 2**31 + 5):
        want = sampling.sample_keys(seed, stream, (2, 3), k_start, k_len, 70, n_k, stratified)
        got = mirror_draw(seed, stream, 2, 3, k_start, k_len, 70, n_k, stratified)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("stratified", [False, True])
def test_the_widest_span_is_drawn_like_the_specification(stratified):
    k_start, k_len = np.array([3]), np.array([sampling.MAX_SPAN])
    want = sampling.sample_keys(99, 4, (1, 2), k_start, k_len, 50, 2**33, stratified)
    np.testing.assert_array_equal(mirror_draw(99, 4, 1, 2, k_start, k_len, 50, 2**33, stratified), want)


def test_the_kernel_constants_are_the_specification():
    source = (compiler.KERNEL_DIR / "utility.cu").read_text()
    for name, value in [("SPLITMIX_GOLDEN", sampling.GOLDEN), ("SPLITMIX_MIX1", sampling.MIX1),
                        ("SPLITMIX_MIX2", sampling.MIX2), ("SAMPLE_STREAM", sampling.STREAM)]:
        found = re.search(rf"{name} = (0x[0-9A-Fa-f]+)ull;", source)
        assert found and int(found.group(1), 16) == value, name


# -- the counting sort -----------------------------------------------------------------------------
def mirror_counting_sort(codes: np.ndarray, starts, ends, code_bits: int, chunk: int, threads: int):
    """``sort.cu``'s three kernels in NumPy over the host tables (warps of 32 lanes, rounds of
    ``threads`` positions), for codes [rows, N]; unset hist/first entries are -1 and must not be read."""
    rows, n = codes.shape
    chunks, parts = sorting.chunk_tables(starts, ends, n, chunk)
    nb = sorting.num_buckets(code_bits)
    hist = np.full((rows, len(chunks), nb), -1, np.int64)
    first = np.full_like(hist, -1)
    for r in range(rows):
        for t, (p0, p1, _, gap) in enumerate(chunks):
            if not gap:
                hist[r, t] = np.bincount(codes[r, p0:p1], minlength=nb)
        for t0, t1, start, u0, u1 in parts:
            counts = hist[r, t0:t1]
            assert (counts >= 0).all()
            total, before = counts.sum(0), hist[r, t0:u0].sum(0)
            carry = start + np.cumsum(total) - total + before
            for t in range(u0, u1):
                first[r, t] = carry
                carry = carry + hist[r, t]
    order = np.full((rows, n), -1, np.int64)
    rank = np.full((rows, n), -1, np.int64)
    lanes = np.arange(32)
    for r in range(rows):
        for t, (p0, p1, piece_start, gap) in enumerate(chunks):
            if gap:
                order[r, p0:p1] = np.arange(p0, p1)
                rank[r, p0:p1] = 0
                continue
            base = first[r, t].copy()
            assert (base >= 0).all()
            for round_start in range(p0, p1, threads):
                p = round_start + np.arange(threads)
                valid = p < p1
                code = np.where(valid, codes[r, np.minimum(p, n - 1)], nb)
                warp_first = np.zeros((threads // 32, nb), np.int64)
                in_warp = np.zeros(threads, np.int64)
                for w in range(threads // 32):  # __match_any_sync: lanes of equal codes
                    c = code[32 * w:32 * w + 32]
                    in_warp[32 * w:32 * w + 32] = [(c[:lane] == c[lane]).sum() for lane in lanes]
                    warp_first[w] = np.bincount(c[c < nb], minlength=nb)
                for c in range(nb):  # the exclusive scan over warps, from base
                    counts = warp_first[:, c].copy()
                    warp_first[:, c] = base[c] + np.cumsum(counts) - counts
                    base[c] += counts.sum()
                dest = warp_first[np.arange(threads) // 32, np.minimum(code, nb - 1)] + in_warp
                order[r, dest[valid]] = p[valid]
                rank[r, p[valid]] = dest[valid] - piece_start
    return order, rank


SEGMENTATIONS = [
    ([0], [300]),  # one whole range
    ([5, 100, 101, 250], [90, 101, 200, 300]),  # gaps, a one-row segment, touching segments
    ([0, 64, 128, 192], [64, 128, 192, 256]),  # aligned (a causal level) and a trailing gap
    ([], []),  # nothing to sort
    ([40, 40, 260], [40, 180, 261]),  # an empty segment
]


@pytest.mark.parametrize("starts, ends", SEGMENTATIONS)
@pytest.mark.parametrize("code_bits", [1, 3, 7, 8])
def test_the_counting_sort_is_the_reference_sort(starts, ends, code_bits):
    from hyperattn_reference.backend import ReferenceBackend

    starts, ends = np.array(starts, np.int64), np.array(ends, np.int64)
    rng = np.random.default_rng(code_bits)
    codes = rng.integers(0, 1 << code_bits, size=(3, 300))
    want_order, want_rank = ReferenceBackend().segment_sort(codes, starts, ends)
    for chunk, threads in [(64, 32), (100, 64), (1024, 256)]:
        order, rank = mirror_counting_sort(codes, starts, ends, code_bits, chunk, threads)
        np.testing.assert_array_equal(order, want_order)
        np.testing.assert_array_equal(rank, want_rank)


def test_the_sort_tables_cover_every_position_in_order():
    chunks, parts = sorting.chunk_tables(np.array([5, 100]), np.array([90, 300]), 310, 32, part=2)
    assert chunks[0].tolist() == [0, 5, 0, 1] and chunks[-1].tolist() == [300, 310, 300, 1]
    np.testing.assert_array_equal(chunks[1:, 0], chunks[:-1, 1])  # contiguous
    assert (chunks[:, 1] - chunks[:, 0] <= 32).all()
    # segment [5, 90): chunks 1..3, gap [90, 100): chunk 4, [100, 300): chunks 5..11; parts of 2 chunks at most
    assert parts.tolist()[:3] == [[1, 4, 5, 1, 3], [1, 4, 5, 3, 4], [5, 12, 100, 5, 7]]
    assert not chunks.flags.writeable and not parts.flags.writeable
    assert sorting.chunk_tables(np.array([5, 100]), np.array([90, 300]), 310, 32, part=2)[0] is chunks  # kept


def test_overlapping_or_wide_codes_decline_the_counting_sort():
    codes = np.zeros((1, 2, 64), np.int32)  # only its shape is read before the sort declines
    kwargs = dict(launches=DEFAULT_LAUNCHES, stage=lambda table: pytest.fail("nothing to stage"))
    assert sorting.segment_sort(codes, np.array([0]), np.array([64]), 9, **kwargs) is None
    assert sorting.segment_sort(codes, np.array([0, 10]), np.array([20, 30]), 7, **kwargs) is None
    assert sorting.segment_sort(codes, np.array([0]), np.array([65]), 7, **kwargs) is None


# -- the hashing -----------------------------------------------------------------------------------
def mirror_lsh_warp(x_rows: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """``lsh.cu``'s warp for 4 rows [4, D]: 8 lanes a row, lane l holding d = VEC l + 8 VEC i + v
    (VEC = 4, 2 for D_PAD = 16), 8 projections per butterfly (lane l ends with projection j0 + l),
    ballot bytes per row; Gray rank."""
    dim, num_projs = projections.shape
    d_pad = max(16, 1 << (dim - 1).bit_length())
    per_lane = d_pad // 8
    vec = min(4, per_lane)
    r8 = -(-num_projs // 8) * 8
    shared = np.zeros((r8, d_pad), np.float32)
    shared[:num_projs, :dim] = projections.T
    lane_dims = [[vec * (lane % 8) + 8 * vec * i + v for i in range(per_lane // vec) for v in range(vec)]
                 for lane in range(32)]
    assert sorted(sum(lane_dims[:8], [])) == list(range(d_pad))  # a row's lanes hold each d once
    xs = np.array([[x_rows[lane // 8, d] if d < dim else 0 for d in dims] for lane, dims in enumerate(lane_dims)],
                  np.float32)
    codes = np.zeros(4, np.uint64)
    for j0 in range(0, r8, 8):
        acc = np.zeros((32, 8), np.float32)
        for lane in range(32):
            for value, d in zip(xs[lane], lane_dims[lane]):
                acc[lane] += value * shared[j0:j0 + 8, d]
        for s in (4, 2, 1):  # the butterfly
            new = acc.copy()
            for lane in range(32):
                upper = bool(lane % 8 & s)
                partner = lane ^ s  # sends what it does not keep: its lower half if it is upper
                partner_upper = not upper
                for i in range(s):
                    received = acc[partner, i] if partner_upper else acc[partner, i + s]
                    keep = acc[lane, i + s] if upper else acc[lane, i]
                    new[lane, i] = keep + received
            acc = new
        ballot = sum(1 << lane for lane in range(32) if acc[lane, 0] > 0)
        for row in range(4):
            codes[row] |= U64((ballot >> (8 * row)) & 0xFF) << U64(j0)
    for shift in (1, 2, 4, 8, 16, 32):
        codes ^= codes >> U64(shift)
    return codes.astype(np.int64)


@pytest.mark.parametrize("dim, num_projs", [(16, 7), (40, 9), (64, 8), (24, 33), (200, 7)])
def test_the_hashing_warp_is_the_gray_rank_of_the_signs(dim, num_projs):
    from hyperattn_reference.backend import ReferenceBackend

    rng = np.random.default_rng(dim)
    # small integers: every product and sum is exact in fp32, in any order
    x = rng.integers(-4, 5, size=(4, dim)).astype(np.float32)
    projections = rng.integers(-3, 4, size=(dim, num_projs)).astype(np.float32)
    want = ReferenceBackend().lsh_codes(x.astype(np.float64), projections.astype(np.float64))
    np.testing.assert_array_equal(lsh.numpy_lsh_codes(x, projections), want)
    np.testing.assert_array_equal(mirror_lsh_warp(x, projections), want)


# -- the launches' arguments -----------------------------------------------------------------------
C_SCALARS = {"int": np.int32, "long long": np.int64, "unsigned long long": np.uint64}


def kernel_parameters(source: str, name: str) -> list[str]:
    """The C types of ``name``'s parameters in ``kernels/<source>``: "pointer" or a scalar type."""
    text = (compiler.KERNEL_DIR / source).read_text()
    found = re.search(rf"__global__ void {name}\((.*?)\)\s*\{{", text, re.S)
    assert found, name
    types = []
    for parameter in found.group(1).split(","):
        words = parameter.replace("__restrict__", "").replace("const", "").split()
        types.append("pointer" if "*" in parameter else " ".join(words[:-1]))
    return types


class FakeKernel:
    calls: list = []

    def __init__(self, source, name):
        self.source, self.name = source, name

    def launch(self, grid, block, args, shared_mem=0):
        FakeKernel.calls.append((self.source, self.name, grid, block, args, shared_mem))


@pytest.fixture
def launches(monkeypatch):
    FakeKernel.calls = []
    monkeypatch.setattr(compiler, "kernel", FakeKernel)
    return FakeKernel.calls


def check_arguments(call):
    """Every argument has the C type of its parameter: arrays for pointers, exact NumPy scalars."""
    source, name, _, _, args, _ = call
    kernel = name.split("::")[1].split("<")[0]
    types = kernel_parameters(source, kernel)
    assert len(args) == len(types), (name, types)
    for arg, c_type in zip(args, types):
        if c_type == "pointer":
            assert isinstance(arg, np.ndarray), (name, c_type, arg)
        else:
            assert type(arg) is C_SCALARS[c_type], (name, c_type, type(arg))


def test_lsh_launch(launches):
    x = np.zeros((2, 3, 4, 50), dtype=ml_dtypes.bfloat16)[..., :40]  # strided rows
    proj = np.zeros((40, 9), np.float32)
    codes = np.zeros((2, 3, 300), np.int32)[..., :4]
    lsh.launch_lsh_codes(x, proj, codes, RowLaunch(block=128, threads=128))
    (call,) = launches
    check_arguments(call)
    _, name, grid, block, args, shared = call
    assert name == "hyperattn::lsh_codes<__nv_bfloat16, int, 64>"
    assert grid == (6,) and block == (128,) and shared == 16 * 64 * 4
    assert args[3:] == (4, 3, 1, 128, 3 * 4 * 50, 4 * 50, 50, 1, 900, 300, 40, 9)
    assert lsh.name_expression(np.float32, 40, 256) == "hyperattn::lsh_codes<float, long long, 256>"


def test_row_dot_and_cast_launches(launches):
    a = np.zeros((2, 3, 100, 64), np.float16)
    utility.launch_row_dot(a, a, np.zeros((2, 3, 100), np.float32), RowLaunch(block=64, threads=256))
    dst = np.zeros((2, 3, 100, 64), ml_dtypes.bfloat16)
    utility.launch_cast_rows(dst, np.zeros((2, 3, 100, 64), np.float32), True, RowLaunch(block=64, threads=256))
    for call in launches:
        check_arguments(call)
    (_, dot, grid, block, args, _), (_, cast, cast_grid, _, _, _) = launches
    assert dot == "hyperattn::row_dot<__half, 8>" and grid == (12,) and block == (256,)
    assert args[3:7] == (100, 3, 2, 64) and args[-1] == 64
    assert cast == "hyperattn::cast_rows<float, __nv_bfloat16, true>" and cast_grid == (12,)


def test_draw_and_sample_block_launches(launches):
    out = np.zeros((2, 3, 4, 70), np.int32)
    k_start, k_len = np.zeros(4, np.int64), np.ones(4, np.int64)
    utility.launch_draw_samples(out, k_start, k_len, 2**63 - 1, False, 5, 70, RowLaunch(block=1024, threads=256))
    device_seed = np.zeros((), np.int64)
    utility.launch_draw_samples(out.astype(np.int64), k_start, k_len, device_seed, True, 5, 70,
                                RowLaunch(block=1024, threads=256))
    utility.launch_sample_blocks(out, np.zeros((2, 3, 1000), np.int32)[:, :, ::2], out, 64,
                                 RowLaunch(block=1024, threads=256))
    for call in launches:
        check_arguments(call)
    (_, draw, grid, _, args, _), (_, wide, _, _, in_memory, _), (_, blocks, _, _, sample_args, _) = launches
    assert draw == "hyperattn::draw_samples<int>" and grid == (2,)
    assert args[3] == 2**63 - 1 and args[5] == 0 and args[6] == 5 and args[7:] == (1680, 280, 70, 1024)
    assert wide == "hyperattn::draw_samples<long long>" and in_memory[4] is device_seed and in_memory[5] == 1
    assert blocks == "hyperattn::sample_blocks<int, int>"
    assert sample_args[3:] == (1680, 280, 3, 3000, 1000, 2, 64, 1024)


def test_counting_sort_launches(launches):
    codes = np.zeros((6, 4000), np.int64)
    chunks, parts = sorting.chunk_tables(np.array([100]), np.array([3000]), 4000, 1024)
    hist = np.zeros((6, len(chunks), 128), np.int32)
    order = np.zeros((6, 4000), np.int32)
    sorting.launch_counting_sort(codes, chunks, len(chunks), parts, len(parts), hist, hist, order, order, 128,
                                 RowLaunch(block=1024, threads=256))
    for call in launches:
        check_arguments(call)
    names = [call[1] for call in launches]
    assert names == ["hyperattn::chunk_histogram<long long>", "hyperattn::bucket_starts",
                     "hyperattn::chunk_scatter<long long>"]
    (_, _, g1, b1, a1, s1), (_, _, g2, b2, _, s2), (_, _, g3, b3, a3, s3) = launches
    assert g1 == g3 == (6 * len(chunks),) and b1 == b3 == (256,) and g2 == (6 * len(parts),) and b2 == (128,)
    assert (s1, s2, s3) == (128 * 4, 128 * 4, 9 * 128 * 4)
    assert a1[3:5] == (4000, 1) and a3[-2:] == (4000, 128)


def test_row_launch_checks_the_threads():
    assert utility.row_launch(DEFAULT_LAUNCHES, "sort") == DEFAULT_LAUNCHES["sort"].d64
    assert utility.row_launch(RowLaunch(block=8, threads=64), "lsh") == RowLaunch(block=8, threads=64)
    with pytest.raises(ValueError):
        utility.row_launch(RowLaunch(block=8, threads=48), "lsh")
    assert utility.c_type(ml_dtypes.bfloat16) == "__nv_bfloat16" and utility.int_type(np.int64) == "long long"
