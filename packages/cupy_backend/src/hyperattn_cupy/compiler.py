"""The CUDA C++ kernels (``kernels/*.cu``), compiled at run time by ``cupy.RawModule`` once per
device, source file and name expression, and kept; and the ahead-of-time check CI runs with nvcc.

A kernel is named by its source file and a *name expression*: an ``extern "C"`` name, or a
template instantiation such as ``"hyperattn::attention_fwd<__nv_bfloat16, 64, 64, 64>"`` (NVRTC
instantiates it and gives it back by that name).  ``kernel(source, name)`` returns a
:class:`Kernel` whose ``launch(grid, block, args, shared_mem)`` runs on CuPy's current stream.

Every ``.cu`` file ends with explicit instantiations of its tuned launches inside
``#ifdef HYPERATTN_COMPILE_CHECK``: :func:`nvcc_check` compiles them with nvcc for a GPU
architecture without a GPU and returns ptxas's register and spill report per kernel.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
#: Options of every compile: C++17, the kernels' folder for ``#include "common.cuh"``.
CXX_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")
#: The architectures CI compiles every source for.
CHECKED_ARCHS = ("80", "90")
#: Above 48 KiB a kernel's dynamic shared memory must be asked for (cudaFuncSetAttribute).
DEFAULT_SHARED_LIMIT = 48 << 10


def sources() -> list[str]:
    """The ``.cu`` files of the backend."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@dataclass
class Kernel:
    """A compiled kernel (a ``cupy.RawKernel``) and its launch."""

    function: object
    name: str
    _shared_limit: int = DEFAULT_SHARED_LIMIT

    def launch(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        """Launch on CuPy's current device and stream; ``args`` as the kernel takes them (cupy
        arrays for pointers, NumPy scalars of the parameters' exact types for values)."""
        if shared_mem > self._shared_limit:  # opt in to more than 48 KiB, once per size
            limit = max_shared_bytes()
            if shared_mem > limit:
                raise ValueError(f"kernel {self.name}: its launch needs {shared_mem} bytes of shared memory, the "
                                 f"device allows {limit} per block; choose a smaller launch (CupyOptions.launches)")
            self.function.max_dynamic_shared_size_bytes = shared_mem
            self._shared_limit = shared_mem
        self.function(grid, block, args, shared_mem=shared_mem)


def max_shared_bytes() -> int:
    """The current device's opt-in limit of dynamic shared memory per block."""
    import cupy

    return _max_shared_bytes(cupy.cuda.Device().id)


@functools.cache
def _max_shared_bytes(device: int) -> int:
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device)


@functools.cache
def cuda_include_dirs() -> tuple[str, ...]:
    """``-I`` of a folder with the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h,
    mma.h), for NVRTC where CuPy finds none of its own: the toolkit's, else one a Python package
    ships (the CUDA runtime wheels, Triton's copy); () if none is found."""
    import importlib.util
    import os

    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/include"))
    for package, sub in (("nvidia", "cu13/include"), ("nvidia", "cuda_runtime/include"),
                         ("triton", "backends/nvidia/include")):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(root) / sub)
    for folder in candidates:
        if (folder / "cuda_fp16.h").exists() and (folder / "mma.h").exists():
            return (f"-I{folder}",)
    return ()


@functools.cache
def _module(device: int, source: str, name: str, backend: str):
    import cupy

    code = (KERNEL_DIR / source).read_text()
    options = CXX_OPTIONS + (cuda_include_dirs() if backend == "nvrtc" else ())
    return cupy.RawModule(code=code, options=options, name_expressions=(name,), backend=backend)


def kernel(source: str, name: str, *, backend: str = "nvrtc") -> Kernel:
    """The kernel ``name`` of ``kernels/<source>`` for the current CUDA device, compiled on first use
    (``backend``: CuPy's compiler, "nvrtc" or "nvcc")."""
    import cupy

    return _kernel(cupy.cuda.Device().id, source, name, backend)


@functools.cache
def _kernel(device: int, source: str, name: str, backend: str) -> Kernel:
    return Kernel(_module(device, source, name, backend).get_function(name), name)


# -- ahead-of-time check (CI, no GPU) ------------------------------------------------------------
@dataclass(frozen=True)
class PtxasEntry:
    """ptxas's report of one kernel: registers per thread and spill bytes."""

    function: str
    registers: int
    spill_stores: int
    spill_loads: int


def nvcc_path() -> str | None:
    """The nvcc on PATH (or in /usr/local/cuda/bin), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.exists() else None


def nvcc_check(source: str, arch: str, nvcc: str | None = None) -> list[PtxasEntry]:
    """Compile ``kernels/<source>`` (with its ``HYPERATTN_COMPILE_CHECK`` instantiations) for
    ``sm_<arch>`` into a cubin; ptxas's report per kernel.  Raises RuntimeError with nvcc's output
    when the compile fails."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *CXX_OPTIONS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-DHYPERATTN_COMPILE_CHECK",
               "-o", str(Path(tmp) / "out.cubin"), str(KERNEL_DIR / source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for sm_{arch}:\n{done.stderr[-4000:]}")
    return parse_ptxas(done.stderr)


_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(report: str) -> list[PtxasEntry]:
    """ptxas ``-v`` output as one entry per compiled kernel."""
    entries, function, spills = [], None, (0, 0)
    for line in report.splitlines():
        if (m := _FUNCTION.search(line)) is not None:
            function, spills = m.group(1), (0, 0)
        elif (m := _SPILLS.search(line)) is not None:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := _REGISTERS.search(line)) is not None and function is not None:
            entries.append(PtxasEntry(function, int(m.group(1)), *spills))
            function = None
    return entries
