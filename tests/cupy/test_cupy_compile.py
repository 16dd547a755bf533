"""Every CUDA C++ source of the CuPy backend compiles with nvcc for sm_80 and sm_90 without a GPU
(its ``HYPERATTN_COMPILE_CHECK`` instantiations: the tuned launches), and ptxas spills no register
in them, with two exceptions: the D = 256 launches, and on sm_90 the forward's 128 x 32 tiles, which
are held to 168 registers (three blocks per SM, the launch measured fastest on an H200) and may
spill a few bytes there (``SMALL_SPILL`` at most)."""

from __future__ import annotations

import os

import pytest

compiler = pytest.importorskip("hyperattn_cupy.compiler")

NVCC = compiler.nvcc_path()
if NVCC is None and os.environ.get("CI"):
    raise RuntimeError("CI needs nvcc (CUDA 13) to check the CuPy backend's kernels; none on PATH or in /usr/local/cuda")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")


#: Bytes of spill stores or loads the sm_90 forward's 128 x 32 tiles may have at 168 registers.
SMALL_SPILL = 64


def allowed_spill(entry, arch: str) -> bool:
    """The exceptions of the module docstring (template arguments appear mangled: Li256E is the int 256)."""
    if "Li256E" in entry.function:
        return True
    held_forward = "attention_fwd" in entry.function and "Li128ELi32ELi4E" in entry.function
    return arch == "90" and held_forward and max(entry.spill_stores, entry.spill_loads) <= SMALL_SPILL


def test_the_backend_has_its_kernel_sources():
    assert {"attention_fwd.cu", "attention_bwd.cu", "lsh.cu", "sort.cu", "utility.cu"} <= set(compiler.sources())


@pytest.mark.parametrize("arch", compiler.CHECKED_ARCHS)
@pytest.mark.parametrize("source", compiler.sources())
def test_source_compiles_without_spills(source, arch):
    entries = compiler.nvcc_check(source, arch)
    assert entries, f"{source}: no kernel instantiated under HYPERATTN_COMPILE_CHECK"
    spilling = [e for e in entries if (e.spill_stores or e.spill_loads) and not allowed_spill(e, str(arch))]
    assert not spilling, f"{source} sm_{arch}: spills in {spilling}"


def test_ptxas_reports_are_parsed():
    report = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Used 12 registers"""
    assert compiler.parse_ptxas(report) == [compiler.PtxasEntry("_Z3fooPf", 40, 4, 4),
                                            compiler.PtxasEntry("_Z3barPf", 12, 0, 0)]


def test_the_key_norm_draws_use_the_specifications_floor():
    """utility.cu's KEY_NORM_PREFIX_FLOOR is ``hyperattn.sampling.PREFIX_FLOOR`` (a C++ constant
    written out, so it must not drift from the specification)."""
    import re

    from hyperattn import sampling

    source = (compiler.KERNEL_DIR / "utility.cu").read_text()
    value = re.search(r"constexpr double KEY_NORM_PREFIX_FLOOR = ([0-9.e+-]+);", source).group(1)
    assert float(value) == sampling.PREFIX_FLOOR
