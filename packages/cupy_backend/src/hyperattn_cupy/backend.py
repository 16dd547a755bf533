"""The CuPy backend: HyperAttention's kernels in CUDA C++ (``kernels/*.cu``), compiled at run time
by ``cupy.RawModule`` (``compiler.py``), on cupy arrays and torch CUDA tensors (no copies: DLPack).

Hashing (``lsh.py``), the segment sort (``sorting.py``) and the small kernels (``utility.py``) are
one or a few launches each; every attention piece is one forward launch (``attention_forward.py``)
or a dQ and a dK/dV launch (``attention_backward.py``) over a tile table from ``hyperattn.tiles``,
copied to the GPU once per shape (``staging.py``).  Inputs are read through their strides.
With torch inputs, exact pieces that fold and whole exact calls go through PyTorch's fused kernels
instead (``fused.py``).  Launches come from ``options.launches`` (``launches.py``).
"""

from __future__ import annotations

import numpy as np

from hyperattn.protocol import Backend, Capabilities, Problem, Segments, SparseStructure
from hyperattn.tiles import exact_key_tiles, exact_tiles, sample_key_tiles, sparse_key_tiles, sparse_tiles

from . import arrays, fused
from .indices import StructureIndices
from .launches import HEAD_DIM_TIERS, MAX_GRID_Y, launch_for
from .options import CupyOptions
from .staging import DeviceTables

#: The longest sequence the kernels index (int32 positions, orders and samples).
MAX_POSITIONS = 2**31 - 1


class CupyBackend(Backend):
    """HyperAttention's kernels in CUDA C++ through CuPy.  ``options`` (a :class:`CupyOptions`) is
    read on every call; the device tables and structure indices belong to the instance."""

    name = "cupy"
    capabilities = Capabilities(
        array_types=("cupy", "torch"),
        devices=("cuda",),
        dtypes=("float16", "bfloat16", "float32"),
        max_head_dim=HEAD_DIM_TIERS[-1],
        priority=5,
        running_out_dtype="input",
        device_seed=True,
        samplings=("uniform", "stratified", "key_norm"),  # key_norm: the kernels' DRAW_WEIGHTS variants
        per_draw_weights=True,
    )

    def __init__(self, options: CupyOptions | None = None):
        self.options = CupyOptions() if options is None else options
        self.device_tables = DeviceTables(lambda: self.options.device_tables_capacity)
        self.structure_indices = StructureIndices(self.device_tables, lambda: self.options.launches)
        self.streams = arrays.StreamBridge()

    def version(self) -> str:
        from . import __version__

        try:
            import cupy

            return f"{__version__} (cupy {cupy.__version__})"
        except ImportError:
            return f"{__version__} (cupy not installed)"

    def unavailable_reason(self) -> str | None:
        try:
            import cupy
        except ImportError as error:
            return f"cupy is not installed ({error}): pip install 'hyperattn-cupy[cuda13]' (or [cuda12])"
        try:
            import ml_dtypes  # noqa: F401  (CuPy's bfloat16)
        except ImportError:
            return "ml_dtypes is not installed (CuPy's bfloat16 dtype): pip install ml_dtypes"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # no driver, or a driver older than CuPy's CUDA runtime
            return f"no CUDA GPU is available to cupy ({type(error).__name__}: {error})"
        return None if count > 0 else "no CUDA GPU is available to cupy (0 devices)"

    def unsupported_reason(self, problem: Problem) -> str | None:
        if max(problem.n_q, problem.n_k) > MAX_POSITIONS:
            return (f"sequences of more than {MAX_POSITIONS} positions (got Nq={problem.n_q}, Nk={problem.n_k}): "
                    "this backend indexes positions in int32")
        if problem.batch * max(problem.q_heads, problem.kv_heads) > MAX_GRID_Y:
            return f"batch x heads = {problem.batch * problem.q_heads} exceeds the launch grid's {MAX_GRID_Y}"
        if problem.requires_grad and _deterministic_requested():
            return ("torch.use_deterministic_algorithms(True) is on and this backend's backward adds the "
                    "sample slots' gradients with atomics: use backend='triton' or 'reference'")
        return _capture_refusal()

    # -- arrays ---------------------------------------------------------------------------------
    def to_native(self, x):
        self.streams.record(x)
        return arrays.torch_to_cupy(x) if arrays.is_torch(x) else x

    def from_native(self, y, like, dtype: str | None = None):
        if arrays.is_torch(like):
            import torch

            return arrays.cupy_to_torch(y, like.dtype if dtype is None else getattr(torch, dtype))
        target = like.dtype if dtype is None else arrays.cupy_dtype(dtype)
        return y if y.dtype == target else y.astype(target)

    def fused_attention(self, q, k, v, *, causal: bool, scale: float):
        """A whole exact call given torch CUDA tensors through PyTorch SDPA (``options.sdpa_order``
        first, with SDPA's own backward), as on the Triton backend; None for cupy arrays, and where
        SDPA's conventions differ (GQA, causal with Nq != Nk) or a deterministic backward is asked for."""
        return fused.whole_call(q, k, v, causal, scale, self.options)

    def call_scope(self, like):
        """The inputs' device and the caller's stream (see ``arrays.on_device_of``) for a whole call:
        the core's allocations and fills too, not only this backend's kernels.  Raises RuntimeError
        inside a CUDA graph capture (see ``_capture_refusal``), also for a call dispatched before it."""
        refusal = _capture_refusal()
        if refusal is not None:
            raise RuntimeError(f"the cupy backend cannot run this call: {refusal}")
        return arrays.on_device_of(like, self.streams)

    def from_host(self, values: np.ndarray, like):
        import cupy

        with arrays.on_device_of(like, self.streams):
            return cupy.asarray(np.ascontiguousarray(values))

    def host_constant(self, values: np.ndarray, like):
        """One device copy per distinct ``values`` (the projections of a seed are copied once)."""
        with arrays.on_device_of(like, self.streams):
            return self.device_tables.get(_as_is, like, np.ascontiguousarray(values))

    # -- structure ------------------------------------------------------------------------------
    def lsh_codes(self, x, projections):
        from . import lsh

        with arrays.on_device_of(x, self.streams):
            return lsh.lsh_codes(x, projections, self.options.launches)

    def segment_sort(self, codes, starts: np.ndarray, ends: np.ndarray, code_bits: int = 64):
        from . import sorting

        def stage(table):
            return self.device_tables.get(_as_is, codes, table)

        with arrays.on_device_of(codes, self.streams):
            counted = sorting.segment_sort(codes, starts, ends, code_bits, launches=self.options.launches, stage=stage)
            return counted if counted is not None else sorting.fallback_sort(codes, starts, ends, code_bits)

    def draw_samples(self, seed, stream: int, heads: tuple[int, int], segments: Segments, m: int, n_k: int, like,
                     stratified: bool = False):
        """One launch on the device (``kernels/utility.cu``), equal to ``hyperattn.sampling``'s draws:
        an int seed is a launch argument, a device seed (0-d int64) is read when the kernel runs."""
        from . import utility

        seed = _native_seed(seed)
        with arrays.on_device_of(like, self.streams):
            k_start, k_len = self.device_tables.get(_sample_bounds, like, segments)
            return utility.draw_samples(seed, stream, heads[0], heads[1], k_start, k_len, m, n_k,
                                        self.options.launches, stratified)

    def key_norm_weights(self, k):
        """(float32 [B, Hk, Nk] ``||k||**4``, their float64 inclusive prefix sums) on the device,
        made once per call (``utility.key_norm_weights``)."""
        from . import utility

        with arrays.on_device_of(k, self.streams):
            return utility.key_norm_weights(k, self.options.launches)

    def draw_samples_by_key_norm(self, seed, stream: int, segments: Segments, m: int, key_weights, like,
                                 head_ids=None, kv_total=None):
        """One launch on the device (``kernels/utility.cu``): a binary search of each norm draw's
        target in the prefix sums; the seed as in :meth:`draw_samples`."""
        from . import utility

        seed = _native_seed(seed)
        kv_heads = key_weights[0].shape[1]
        ids = tuple(range(kv_heads)) if head_ids is None else tuple(head_ids)
        with arrays.on_device_of(like, self.streams):
            k_start, k_len = self.device_tables.get(_sample_bounds, like, segments)
            ids_device = self.device_tables.get(_head_ids, like, ids)
            return utility.draw_samples_by_key_norm(seed, stream, key_weights, k_start, k_len, segments.max_k_len, m,
                                                    ids_device, kv_heads if kv_total is None else kv_total,
                                                    self.options.launches)

    def row_dot(self, a, b):
        from . import utility

        with arrays.on_device_of(a, self.streams):
            return utility.row_dot(a, b, self.options.launches)

    # -- attention pieces -----------------------------------------------------------------------
    # every piece on the inputs' device and the caller's stream: its tables' copies, the index
    # arrays' kernel and the attention kernels, in that order
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse, *, overwrite=False):
        launch = launch_for(self.options.launches, "forward", q.shape[3], v.shape[3])
        with arrays.on_device_of(q, self.streams):
            if fused.exact_forward(q, k, v, segments, bool(causal), scale, out, lse, overwrite, self.streams,
                                   self.options):
                return
            tiles = self.device_tables.get(exact_tiles, q, segments, bool(causal), launch.block_m)
            self._forward(q, k, v, tiles, None, scale, out, lse, bool(causal), overwrite, launch)

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse, *, overwrite=False):
        launch = launch_for(self.options.launches, "forward", q.shape[3], v.shape[3])
        with arrays.on_device_of(q, self.streams):
            tiles = self.device_tables.get(sparse_tiles, q, structure, launch.block_m)
            self._forward(q, k, v, tiles, structure, scale, out, lse, False, overwrite, launch)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv, out=None, *,
                       overwrite=False):
        causal = bool(causal)
        dq_launch, dkdv_launch = self._backward_launches(q, v)
        with arrays.on_device_of(q, self.streams):
            if fused.exact_backward(q, k, v, out, lse, dout, segments, causal, scale, dq, dk, dv, overwrite,
                                    self.streams, self.options):
                return
            q_tiles = self.device_tables.get(exact_tiles, q, segments, causal, dq_launch.block_m)
            k_tiles = self.device_tables.get(exact_key_tiles, q, segments, causal, dkdv_launch.block_n, overwrite)
            self._backward(q, k, v, lse, dout, delta, q_tiles, [(k_tiles, False)], None, scale, dq, dk, dv, causal,
                           overwrite, dq_launch, dkdv_launch)

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv, *,
                        overwrite=False):
        dq_launch, dkdv_launch = self._backward_launches(q, v)
        block_n = dkdv_launch.block_n
        with arrays.on_device_of(q, self.streams):
            q_tiles = self.device_tables.get(sparse_tiles, q, structure, dq_launch.block_m)
            # overwrite: blocks without queries too, so that every key of the segments is written
            k_tiles = [(self.device_tables.get(sparse_key_tiles, q, structure, block_n, overwrite), False)]
            if structure.sample_size > 0:
                slot_tiles = self.device_tables.get(sample_key_tiles, q, structure, block_n,
                                                    self.options.sample_row_chunk)
                k_tiles.append((slot_tiles, True))
            self._backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, False,
                           overwrite, dq_launch, dkdv_launch)

    def _backward_launches(self, q, v):
        launches = self.options.launches
        return (launch_for(launches, "dq", q.shape[3], v.shape[3]), launch_for(launches, "dkdv", q.shape[3], v.shape[3]))

    def _forward(self, q, k, v, tiles, structure, scale, out, lse, causal, overwrite, launch):
        from . import attention_forward

        if len(tiles) == 0:
            return
        ix = self.structure_indices.get(q, structure)
        attention_forward.forward(q, k, v, tiles, ix, structure is not None, scale, out, lse, causal, overwrite,
                                  launch)

    def _backward(self, q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, causal, overwrite,
                  dq_launch, dkdv_launch):
        from . import attention_backward

        ix = self.structure_indices.get(q, structure)
        attention_backward.backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, ix, structure is not None,
                                    lambda: self.structure_indices.query_blocks(q, structure), scale, dq, dk, dv,
                                    causal, overwrite, dq_launch, dkdv_launch)


def _native_seed(seed):
    """An int seed as it is; a device seed (a 0-d int64 torch tensor on the inputs' device) as the
    cupy array over its memory, which the draw kernels read when they run."""
    return arrays.torch_to_cupy(seed) if arrays.is_torch(seed) else seed


def _capture_refusal() -> str | None:
    """Why a call cannot run now, if a CUDA graph capture records the current stream: the call's
    arrays come from CuPy's memory pool, which the graph does not own, so a replay could write
    memory that CuPy has handed out again since."""
    capture = arrays.capture_in_progress()
    if capture is None:
        return None
    return (f"a CUDA graph is being captured ({capture}) and this backend's arrays come from CuPy's memory "
            "pool, which the graph does not own (a replay could write memory CuPy has handed out since): "
            "capture with backend='triton'")


def _deterministic_requested() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and torch.are_deterministic_algorithms_enabled()


def _as_is(values: np.ndarray) -> np.ndarray:
    return values


def _head_ids(head_ids: tuple[int, ...]) -> np.ndarray:
    """int64 [Hk]: each KV head's index in the call whose draws it takes (the key-norm draw kernel's)."""
    return np.asarray(head_ids, dtype=np.int64)


def _sample_bounds(segments: Segments) -> tuple[np.ndarray, np.ndarray]:
    """int64 (k_start, k_len) [S] of the segments: the draw kernel's tables."""
    return segments.k_start.astype(np.int64), segments.k_len.astype(np.int64)


__all__ = ["CupyBackend", "CupyOptions"]
