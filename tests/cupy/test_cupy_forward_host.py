"""The CuPy backend's forward launch, host side only (no GPU): the kernel's name expression, shared
memory and launch checks, and the arguments ``attention_forward.forward`` packs, run on NumPy
arrays (same shape / strides / dtype attributes as cupy's) against a fake compiled kernel."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

pytest.importorskip("cupy")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hyperattn_cupy import attention_forward as fwd  # noqa: E402
from hyperattn_cupy import compiler  # noqa: E402
from hyperattn_cupy.indices import IndexArrays  # noqa: E402
from hyperattn_cupy.launches import DEFAULT_LAUNCHES, HEAD_DIM_TIERS, Launch, launch_for  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


class FakeKernel:
    def __init__(self, name):
        self.name = name
        self.launches = []

    def launch(self, grid, block, args, shared_mem=0):
        self.launches.append((grid, block, args, shared_mem))


@pytest.fixture
def fake_kernels(monkeypatch):
    made = {}

    def kernel(source, name):
        assert source == "attention_fwd.cu"
        return made.setdefault(name, FakeKernel(name))

    monkeypatch.setattr(compiler, "kernel", kernel)
    return made


def test_name_expression_spells_the_template():
    name = fwd.name_expression(BF16, BF16, 64, 64, Launch(64, 64, 4), True, False, True, False)
    assert name == ("hyperattn::attention_fwd<__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 64, 64, 4, "
                    "true, false, true, false, false>")
    name = fwd.name_expression(np.float16, np.float32, 72, 40, Launch(64, 32, 4), False, True, False, True)
    assert name == ("hyperattn::attention_fwd<__half, float, 72, 128, 40, 64, 64, 32, 4, false, true, false, true, "
                    "false>")
    name = fwd.name_expression(BF16, BF16, 64, 64, Launch(64, 64, 4), True, False, True, False, True)
    assert name.endswith("4, true, false, true, false, true>")  # per-draw weights
    assert fwd.name_expression(np.float32, np.float32, 16, 16, Launch(64, 64, 4), False, False, False, False) \
        .startswith("hyperattn::attention_fwd<float, float, 16, 16, 16, 16,")


def test_unsupported_dtypes_are_refused():
    with pytest.raises(TypeError):
        fwd.cuda_type(np.int32)
    with pytest.raises(TypeError):  # out is the inputs' dtype or float32
        fwd.name_expression(np.float16, BF16, 64, 64, Launch(64, 64, 4), False, False, False, False)


def test_shared_bytes_mirror_the_kernel_layout():
    # bf16, D = Dv = 128, 64 x 64: Q, K, V of 64 rows of 136 elements; row indices; 2 x 64 key indices and biases
    assert fwd.shared_bytes(BF16, 128, 128, Launch(64, 64, 4)) == 3 * 64 * 136 * 2 + 64 * 4 + 2 * 64 * 4 * 2
    # fp32 adds P [64][65]; rows are padded by 4 floats
    assert fwd.shared_bytes(np.float32, 64, 64, Launch(64, 64, 4)) == \
        3 * 64 * 68 * 4 + 64 * 65 * 4 + 64 * 4 + 2 * 64 * 4 * 2


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@pytest.mark.parametrize("dim", HEAD_DIM_TIERS)
def test_the_default_forward_launches_fit_the_kernel(dtype, dim):
    launch = launch_for(DEFAULT_LAUNCHES, "forward", dim)
    fwd.check_launch(dtype, dim, dim, launch)
    assert fwd.shared_bytes(dtype, dim, dim, launch) <= 163 << 10  # an A100's opt-in limit


def test_launches_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="16 \\* warps"):
        fwd.check_launch(BF16, 256, 256, Launch(32, 32, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        fwd.check_launch(np.float16, 64, 64, Launch(64, 40, 4))
    with pytest.raises(ValueError, match="fp32"):
        fwd.check_launch(np.float32, 64, 64, Launch(48, 64, 4))


def _instantiations():
    text = (compiler.KERNEL_DIR / "attention_fwd.cu").read_text()
    block = text[text.index("#ifdef HYPERATTN_COMPILE_CHECK"):]
    # HYPERATTN_FWD(...) leaves DRAW_WEIGHTS false; HYPERATTN_FWD_W(...) names it
    return {tuple(a.strip() for a in m.group(2).split(",")) + (() if m.group(1) else ("false",))
            for m in re.finditer(r"^HYPERATTN_FWD(_W)?\(([^)]*)\)", block, re.MULTILINE)}


def _template_args(name):
    return tuple(a.strip() for a in name[name.index("<") + 1:-1].split(","))


@pytest.mark.parametrize("dim", HEAD_DIM_TIERS)
def test_the_compile_check_covers_the_table_launches(dim):
    """The nvcc check (spills) sees the launches the backend runs: the sparse merge at every tier,
    the exact causal first piece at D <= 128."""
    launch = launch_for(DEFAULT_LAUNCHES, "forward", dim)
    wanted = [(True, False, True, False)] + ([(False, True, False, True)] if dim <= 128 else [])
    wanted += [(True, False, True, False, True)] if dim <= 64 else []  # key_norm's per-draw weights
    for flags in wanted:
        assert _template_args(fwd.name_expression(BF16, BF16, dim, dim, launch, *flags)) in _instantiations()


@pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not found")
def test_shared_bytes_agree_with_the_kernel(tmp_path):
    """static_asserts, compiled by nvcc, that SmemLayout<...>::BYTES is what the host asks for."""
    cases = [(np.float16, "__half", 128, 128, Launch(64, 64, 4)), (BF16, "__nv_bfloat16", 72, 40, Launch(64, 32, 4)),
             (np.float32, "float", 256, 256, Launch(64, 32, 4)), (np.float32, "float", 16, 8, Launch(32, 32, 4))]
    lines = [f'#include "{compiler.KERNEL_DIR / "attention_fwd.cu"}"']
    for dtype, ctype, d, dv, la in cases:
        layout = (f"hyperattn::fwd_detail::SmemLayout<{ctype}, {la.block_m}, {la.block_n}, "
                  f"{fwd.padded_dim(d)}, {fwd.padded_dim(dv)}, {'true' if ctype == 'float' else 'false'}>")
        lines.append(f"static_assert({layout}::BYTES == {fwd.shared_bytes(dtype, d, dv, la)}, \"{layout}\");")
    source = tmp_path / "layout.cu"
    source.write_text("\n".join(lines) + "\n")
    done = subprocess.run([compiler.nvcc_path(), *compiler.CXX_OPTIONS, "-arch=sm_90", "-cubin", "-o",
                           str(tmp_path / "layout.cubin"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _problem(dtype=np.float16, batch=2, heads=4, kv_heads=2, n_q=10, n_k=12, d=64, dv=32, out_dtype=None):
    rng = np.random.default_rng(0)
    # q and out through transposes, so that their strides are not the contiguous ones
    q = rng.standard_normal((batch, n_q, heads, d)).astype(dtype).transpose(0, 2, 1, 3)
    k = rng.standard_normal((batch, kv_heads, n_k, d)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, n_k, dv)).astype(dtype)
    out = np.zeros((batch, n_q, heads, dv), dtype=out_dtype or dtype).transpose(0, 2, 1, 3)
    lse = np.full((batch, heads, n_q), -np.inf, dtype=np.float32)
    return q, k, v, out, lse


def _index_arrays(batch=2, heads=4, kv_heads=2, n_q=10, n_k=12, segments=3, m=0):
    dummy, zero = np.zeros(1, np.int32), np.zeros(1, np.float32)
    if m == 0:
        return IndexArrays(dummy, dummy, dummy, dummy, zero, 0)
    q_order = np.tile(np.arange(n_q, dtype=np.int32), (batch, heads, 1))
    k_order = np.tile(np.arange(n_k, dtype=np.int32), (batch, kv_heads, 1))
    samples = np.zeros((batch, kv_heads, segments, m), np.int32)
    return IndexArrays(q_order, k_order, samples, samples.copy(), np.zeros(segments, np.float32), m)


def test_forward_packs_the_exact_launch(fake_kernels):
    q, k, v, out, lse = _problem()
    tiles = np.zeros((5, 7), np.int64)
    launch = Launch(64, 64, 4)
    fwd.forward(q, k, v, tiles, _index_arrays(), False, 0.125, out, lse, True, True, launch)
    (name, kernel), = fake_kernels.items()
    assert name == ("hyperattn::attention_fwd<__half, __half, 64, 64, 32, 32, 64, 64, 4, false, true, false, true, "
                    "false>")
    (grid, block, args, shared), = kernel.launches
    assert grid == (5, 8, 1) and block == (128, 1, 1)
    assert shared == fwd.shared_bytes(np.float16, 64, 32, launch)
    assert len(args) == 12 + 26 + 4
    assert args[0] is q and args[3] is out and args[4] is lse and args[5] is tiles
    strides = args[12:38]
    assert all(type(s) is np.int64 for s in strides)
    assert [int(s) for s in strides[:4]] == [10 * 4 * 64, 64, 4 * 64, 1]  # q [B, N, H, D] transposed
    assert [int(s) for s in strides[4:8]] == [2 * 12 * 64, 12 * 64, 64, 1]
    assert [int(s) for s in strides[12:16]] == [10 * 4 * 32, 32, 4 * 32, 1]  # out
    assert [int(s) for s in strides[16:19]] == [40, 10, 1]  # lse
    assert [int(s) for s in strides[19:]] == [0] * 7  # orders and samples are not read
    tail = args[38:]
    assert [type(x) for x in tail] == [np.int32, np.int32, np.float32, np.int32]
    assert (int(tail[0]), int(tail[1]), int(tail[3])) == (4, 2, 0)
    assert tail[2] == np.float32(0.125 * fwd.LOG2E)


def test_forward_packs_the_sparse_launch(fake_kernels):
    q, k, v, out, lse = _problem(dtype=BF16, out_dtype=np.float32)
    ix = _index_arrays(m=5)
    fwd.forward(q, k, v, np.zeros((3, 7), np.int32), ix, True, 0.5, out, lse, False, False, Launch(64, 64, 4))
    (name, kernel), = fake_kernels.items()
    assert _template_args(name)[:2] == ("__nv_bfloat16", "float") and _template_args(name)[-5:] == (
        "true", "false", "true", "false", "false")
    (_, _, args, _), = kernel.launches
    assert args[5].dtype == np.int64 and args[5].flags.c_contiguous  # int32 tiles made int64
    assert args[6] is ix.q_order and args[8] is ix.samples and args[9] is ix.sample_blocks and args[10] is ix.log_w
    assert [int(s) for s in args[31:38]] == [40, 10, 24, 12, 30, 15, 5]  # orders (b, h), samples (b, h, s)
    assert int(args[41]) == 5


def test_forward_packs_per_draw_weights(fake_kernels):
    """key_norm: the DRAW_WEIGHTS kernel, the per-draw log weights after LogW; weights of another layout
    than the samples' are refused (the kernel indexes them with the samples' strides)."""
    q, k, v, out, lse = _problem()
    ix = _index_arrays(m=5)
    ix.draw_log_w, ix.draw_weights = np.full(ix.samples.shape, -1.5, np.float32), True
    fwd.forward(q, k, v, np.zeros((3, 7), np.int64), ix, True, 0.5, out, lse, False, False, Launch(64, 64, 4))
    (name, kernel), = fake_kernels.items()
    assert _template_args(name)[-5:] == ("true", "false", "true", "false", "true")
    (_, _, args, _), = kernel.launches
    assert args[10] is ix.log_w and args[11] is ix.draw_log_w
    ix.draw_log_w = np.asfortranarray(ix.draw_log_w)
    with pytest.raises(ValueError, match="draw_log_w must be float32 with the samples' shape"):
        fwd.forward(q, k, v, np.zeros((3, 7), np.int64), ix, True, 0.5, out, lse, False, False, Launch(64, 64, 4))


def test_forward_copies_orders_whose_positions_are_strided(fake_kernels):
    q, k, v, out, lse = _problem()
    ix = _index_arrays(m=5)
    ix.q_order = np.tile(np.arange(20, dtype=np.int32), (2, 4, 1))[:, :, ::2]
    fwd.forward(q, k, v, np.zeros((1, 7), np.int64), ix, True, 1.0, out, lse, False, False, Launch(64, 64, 4))
    (_, _, args, _), = next(iter(fake_kernels.values())).launches
    assert args[6].strides[-1] == 4 and (args[6] == ix.q_order).all()
    assert [int(s) for s in args[31:33]] == [40, 10]


def test_forward_without_tiles_launches_nothing(fake_kernels):
    q, k, v, out, lse = _problem()
    fwd.forward(q, k, v, np.zeros((0, 7), np.int64), _index_arrays(), False, 1.0, out, lse, False, True,
                Launch(64, 64, 4))
    assert not fake_kernels


def test_forward_refuses_mismatched_arrays(fake_kernels):
    q, k, v, out, lse = _problem()
    with pytest.raises(ValueError):
        fwd.forward(q, k, v[:, :, :-1], np.zeros((1, 7), np.int64), _index_arrays(), False, 1.0, out, lse, False,
                    True, Launch(64, 64, 4))
    with pytest.raises(TypeError):
        fwd.forward(q, k, v, np.zeros((1, 7), np.int64), _index_arrays(), False, 1.0, out, lse.astype(np.float64),
                    False, True, Launch(64, 64, 4))
