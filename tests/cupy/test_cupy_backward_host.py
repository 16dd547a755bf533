"""The CuPy attention backward's host side, without a GPU: kernel names, launch checks, argument packing
(NumPy arrays stand in for cupy ones and a recorder for the compiled kernel), and, where nvcc is found,
that the packed arguments and the shared-memory sizes match the kernels' parameters and layouts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cupy")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hyperattn_cupy import attention_backward as ab  # noqa: E402
from hyperattn_cupy import compiler  # noqa: E402
from hyperattn_cupy.indices import IndexArrays  # noqa: E402
from hyperattn_cupy.launches import DEFAULT_LAUNCHES, HEAD_DIM_TIERS, Launch  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
L64 = Launch(64, 64, 4)


def test_name_expressions_spell_the_templates():
    assert ab.dq_name(BF16, BF16, 128, 128, L64, True, False, True, True) == (
        "hyperattn::attention_bwd_dq<__nv_bfloat16, __nv_bfloat16, 128, 128, 64, 64, 4, true, false, true, true, "
        "false>")
    assert ab.dkdv_name(np.float16, np.float32, 64, 32, Launch(32, 64, 4), False, True, False, False) == (
        "hyperattn::attention_bwd_dkdv<__half, float, 64, 32, 32, 64, 4, false, true, false, false, false>")
    assert ab.dkdv_name(BF16, BF16, 64, 64, L64, True, False, True, False, True).endswith("true, false, true>")
    assert ab.c_type(np.float32) == "float"
    with pytest.raises(TypeError, match="float64"):
        ab.c_type(np.float64)


def test_the_default_launches_fit_the_kernels():
    for d in HEAD_DIM_TIERS:
        for kind in ("dq", "dkdv"):
            launch = DEFAULT_LAUNCHES[kind].for_dim(d)
            for dtype in (BF16, np.float16, np.float32):
                ab.check_launch(kind, dtype, launch)


def test_launches_the_kernels_cannot_take_are_refused():
    with pytest.raises(ValueError, match="block_m a multiple of 16 \\* warps"):
        ab.check_launch("dq", BF16, Launch(32, 32, 4))
    with pytest.raises(ValueError, match="block_n a multiple of 16 \\* warps"):
        ab.check_launch("dkdv", np.float16, Launch(64, 32, 4))
    ab.check_launch("dq", np.float32, Launch(32, 32, 4))  # fp32: a 16-column thread grid
    with pytest.raises(ValueError, match="block_n <= 32 \\* warps \\(one thread per key"):
        ab.check_launch("dq", BF16, Launch(16, 64, 1))
    with pytest.raises(ValueError, match="block_m <= 32 \\* warps \\(one thread per row"):
        ab.check_launch("dkdv", BF16, Launch(128, 32, 2))


# -- one backward with NumPy stand-ins --------------------------------------------------------------------
B, HQ, HK, NQ, NK, D, S, M = 2, 4, 2, 40, 48, 64, 3, 8


class Recorder:
    """Stands for compiler.kernel: records every launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, source, name):
        recorder = self

        class _Kernel:
            def launch(self, grid, block, args, shared_mem=0):
                recorder.launches.append((source, name, grid, block, args, shared_mem))

        return _Kernel()


def _inputs(dtype=BF16, dout_dtype=None, draw_weights=False):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, HQ, NQ, D)).astype(dtype)
    k = rng.standard_normal((B, HK, NK, D)).astype(dtype)
    v = rng.standard_normal((B, HK, NK, D)).astype(dtype)
    dout = rng.standard_normal((B, HQ, NQ, D)).astype(dout_dtype or dtype)
    lse = np.zeros((B, HQ, NQ), np.float32)
    delta = np.zeros((B, HQ, NQ), np.float32)
    grads = (np.zeros(q.shape, np.float32), np.zeros(k.shape, np.float32), np.zeros(v.shape, np.float32))
    ix = IndexArrays(
        q_order=np.zeros((B, HQ, NQ), np.int32), k_order=np.zeros((B, HK, NK), np.int32),
        samples=np.zeros((B, HK, S, M), np.int32), sample_blocks=np.zeros((B, HK, S, M), np.int32),
        log_w=np.zeros(S, np.float32), sample_size=M,
        draw_log_w=np.zeros((B, HK, S, M), np.float32) if draw_weights else None, draw_weights=draw_weights)
    return q, k, v, lse, dout, delta, grads, ix


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(compiler, "kernel", rec)
    monkeypatch.setattr(compiler, "max_shared_bytes", lambda: 227 << 10)
    return rec


def _run(recorder, dtype=BF16, dout_dtype=None, overwrite=True, delta_transposed=False, draw_weights=False):
    q, k, v, lse, dout, delta, (dq, dk, dv), ix = _inputs(dtype, dout_dtype, draw_weights)
    if delta_transposed:  # other strides than lse's
        delta = np.ascontiguousarray(delta.transpose(0, 2, 1)).transpose(0, 2, 1)
    q_tiles = np.zeros((5, 7), np.int64)
    key_tiles = np.zeros((6, 7), np.int64)
    slot_tiles = np.zeros((3, 7), np.int64)
    calls = []

    def query_blocks():
        calls.append(1)
        return np.zeros(NQ, np.int32)

    ab.backward(q, k, v, lse, dout, delta, q_tiles, [(key_tiles, False), (slot_tiles, True)], ix, True, query_blocks,
                0.125, dq, dk, dv, False, overwrite, L64, L64)
    return recorder.launches, calls


def _kinds(args):
    """The PTX parameter kind of each packed argument: pointers and int64 are .u64."""
    kinds = []
    for a in args:
        if isinstance(a, np.ndarray):
            kinds.append("u64")
        elif isinstance(a, np.int64):
            kinds.append("u64")
        elif isinstance(a, np.int32):
            kinds.append("u32")
        elif isinstance(a, np.float32):
            kinds.append("f32")
        else:
            raise AssertionError(f"argument {a!r} of type {type(a)} is no NumPy scalar of a C type")
    return kinds


def test_backward_launches_dq_then_each_key_table(recorder):
    launches, calls = _run(recorder)
    assert [n.split("<")[0] for _, n, *_ in launches] == [
        "hyperattn::attention_bwd_dq", "hyperattn::attention_bwd_dkdv", "hyperattn::attention_bwd_dkdv"]
    assert all(source == "attention_bwd.cu" for source, *_ in launches)
    (_, dq_name, dq_grid, dq_block, dq_args, dq_shared), (_, key_name, key_grid, _, key_args, _), \
        (_, slot_name, slot_grid, _, slot_args, _) = launches
    # overwrite: dQ and the keys write, the sample slots add (never causal)
    assert dq_name.endswith("64, 64, 64, 64, 4, true, false, true, true, false>")
    assert key_name.endswith("64, 64, 64, 64, 4, true, false, false, true, false>")
    assert slot_name.endswith("64, 64, 64, 64, 4, true, false, true, false, false>")
    assert dq_grid == (5, B * HQ, 1) and key_grid == (6, B * HK, 1) and slot_grid == (3, B * HK, 1)
    assert dq_block == (128, 1, 1)
    assert dq_shared == ab.dq_shared_bytes(BF16, 64, 64, L64)
    assert calls == [1]  # query blocks: for the sample slots only
    assert len(dq_args) == 14 + 30 + 7 and len(key_args) == 16 + 34 + 6
    assert _kinds(dq_args)[:14] == _kinds(key_args)[:14] == ["u64"] * 14  # NumPy scalars of C types
    # trailing scalars: num_heads, group, scale, scale_log2, num_samples, head_dim, v_dim
    assert [type(x) for x in dq_args[-7:]] == [np.int32, np.int32, np.float32, np.float32, np.int32, np.int32,
                                              np.int32]
    assert dq_args[-7:-4] == (HQ, HQ // HK, np.float32(0.125)) and dq_args[-3:] == (M, D, D)
    assert np.isclose(dq_args[-4], 0.125 * ab.LOG2E)
    assert key_args[-6:-4] == (HK, HQ // HK) and key_args[-2:] == (D, D)
    # q strides first, then k's: elements, int64
    assert dq_args[14:18] == (NQ * D * HQ, NQ * D, D, 1) and dq_args[18:22] == (NK * D * HK, NK * D, D, 1)
    assert all(type(x) is np.int64 for x in dq_args[14:44])
    # the slots' table reads QBlock (argument 11); the keys' table gets a placeholder
    assert slot_args[11].shape == (NQ,)


def test_without_overwrite_everything_adds(recorder):
    launches, _ = _run(recorder, overwrite=False)
    assert all(name.endswith("false, false>") for _, name, *_ in launches)


def test_per_draw_weights_take_the_draw_weights_kernels(recorder):
    """key_norm: dQ and the sample slots' dK/dV read the per-draw log weights (argument 13 / 15, after
    LogW); the block keys' dK/dV does not; dQ's shared memory holds their tables too."""
    launches, _ = _run(recorder, draw_weights=True)
    (_, dq_name, _, _, dq_args, dq_shared), (_, key_name, *_), (_, slot_name, _, _, slot_args, _) = launches
    assert dq_name.endswith("true, false, true, true, true>") and slot_name.endswith("true, false, true, false, true>")
    assert key_name.endswith("true, false, false, true, false>")
    assert dq_shared == ab.dq_shared_bytes(BF16, 64, 64, L64, True) == ab.dq_shared_bytes(BF16, 64, 64, L64) + 3 * 64 * 4
    assert dq_args[13].shape == slot_args[15].shape == (B, HK, S, M)


def test_fp32_dout_and_fp32_inputs_name_their_types(recorder):
    launches, _ = _run(recorder, dout_dtype=np.float32)
    assert launches[0][1].startswith("hyperattn::attention_bwd_dq<__nv_bfloat16, float, ")
    recorder.launches.clear()
    launches, _ = _run(recorder, dtype=np.float32)
    assert launches[0][1].startswith("hyperattn::attention_bwd_dq<float, float, ")
    assert launches[0][5] == ab.dq_shared_bytes(np.float32, 64, 64, L64)


def test_delta_with_other_strides_than_lse_is_made_contiguous(recorder):
    launches, _ = _run(recorder, delta_transposed=True)
    lse, delta = launches[0][4][4], launches[0][4][5]
    assert lse.flags.c_contiguous and delta.flags.c_contiguous


def test_wrong_dtypes_are_refused(recorder):
    q, k, v, lse, dout, delta, (dq, dk, dv), ix = _inputs()
    with pytest.raises(TypeError, match="dk must be float32"):
        ab.backward(q, k, v, lse, dout, delta, np.zeros((1, 7), np.int64), [], ix, True, None, 1.0, dq,
                    dk.astype(np.float16), dv, False, False, L64, L64)
    with pytest.raises(TypeError, match="dout is float16"):
        ab.backward(q, k, v, lse, dout.astype(np.float16), delta, np.zeros((1, 7), np.int64), [], ix, True, None,
                    1.0, dq, dk, dv, False, False, L64, L64)


def test_too_much_shared_memory_is_refused(recorder, monkeypatch):
    monkeypatch.setattr(compiler, "max_shared_bytes", lambda: 16 << 10)  # D = 64 bf16 takes 36 KiB
    with pytest.raises(ValueError, match="shared memory"):
        _run(recorder)


def test_deterministic_mode_is_not_implemented():
    q, k, v, lse, dout, delta, (dq, dk, dv), ix = _inputs()
    with pytest.raises(NotImplementedError, match="deterministic=True"):
        ab.backward(q, k, v, lse, dout, delta, np.zeros((0, 7), np.int64), [], ix, True, None, 1.0, dq, dk, dv,
                    False, False, L64, L64, deterministic=True)


# -- against the kernel source (nvcc, no GPU) -------------------------------------------------------------
NVCC = compiler.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")


def _nvcc(tmp_path: Path, code: str, *flags: str) -> Path:
    src = tmp_path / "check.cu"
    src.write_text(f'#include "attention_bwd.cu"\n{code}\n')
    out = tmp_path / "check.out"
    done = subprocess.run([NVCC, *compiler.CXX_OPTIONS, "-arch=sm_80", *flags, "-o", str(out), str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@needs_nvcc
def test_shared_bytes_match_the_kernel_layouts(tmp_path):
    cases = [(BF16, 64, 64, Launch(64, 64, 4), False), (np.float16, 128, 64, Launch(64, 32, 4), False),
             (np.float32, 64, 128, Launch(32, 64, 4), False), (BF16, 256, 256, Launch(32, 32, 2), False),
             (BF16, 64, 64, Launch(64, 64, 4), True), (np.float32, 64, 64, Launch(32, 64, 4), True)]
    lines = []
    for dtype, d, dv, launch, draws in cases:
        args = f"{ab.c_type(dtype)}, {d}, {dv}, {launch.block_m}, {launch.block_n}"
        lines.append(f'printf("%d %d\\n", hyperattn::bwd::DqSmem<{args}, {str(draws).lower()}>::BYTES, '
                     f'hyperattn::bwd::DkdvSmem<{args}>::BYTES);')
    exe = _nvcc(tmp_path, "#include <cstdio>\nint main() {\n" + "\n".join(lines) + "\n}")
    printed = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    for (dtype, d, dv, launch, draws), line in zip(cases, printed):
        assert line.split() == [str(ab.dq_shared_bytes(dtype, d, dv, launch, draws)),
                                str(ab.dkdv_shared_bytes(dtype, d, dv, launch))]


def _entry_params(ptx: str) -> list[str]:
    match = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S)
    assert match, "no kernel entry in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", match.group(1))


@needs_nvcc
def test_packed_arguments_match_the_kernel_parameters(tmp_path, recorder):
    checked = []
    for draw_weights in (False, True):  # (key_norm: the DRAW_WEIGHTS kernels)
        recorder.launches.clear()
        launches, _ = _run(recorder, draw_weights=draw_weights)
        checked += launches[:1] + launches[2:]  # dQ; dK/dV of the slots
    for _, name, _, _, args, _ in checked:
        ptx = _nvcc(tmp_path, f"const void* const check = reinterpret_cast<const void*>(&{name});", "-ptx")
        assert _entry_params(ptx.read_text()) == _kinds(args), name
