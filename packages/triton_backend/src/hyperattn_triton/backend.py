"""The Triton backend: torch CUDA tensors, fp16/bf16 (fp32 accumulation) and fp32.

Hashing is one fused kernel (``lsh.py``) and sorting a counting sort (``sorting.py``);
every attention piece is one launch of the kernels in ``kernels/attention.py`` (``attention.py``)
over a tile table (``tiles.py``) built on the host and copied to the GPU once per shape
(``staging.py``), or goes through PyTorch's fused exact kernels where they fit (``exact.py``).
Inputs are read through their strides, never copied.  Launch configurations come from
``options.launches`` (``launches.py``), everything else tunable from :class:`TritonOptions`.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (for CI).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import triton

from hyperattn import sampling
from hyperattn.protocol import Backend, Capabilities, Segments, SparseStructure
from hyperattn.tiles import exact_key_tiles, exact_tiles, sample_key_tiles, sparse_key_tiles, sparse_tiles
from hyperattn.torch import fused

from . import attention, exact, lsh, sorting
from .attention import KeyTiles
from .indices import StructureIndices
from .kernels.utility import draw_key_norm_samples_kernel, draw_samples_kernel, row_dot_kernel
from .launcher import direct
from .launches import HEAD_DIM_TIERS, cdiv, launch_for, padded_dim
from .options import TritonOptions, interpreting
from .staging import DerivedTensors, DeviceTables, PinnedRing, host_to_device


class TritonBackend(Backend):
    """HyperAttention's kernels in Triton.  ``options`` (a :class:`TritonOptions`) is read on every
    call; the caches (device tables, pinned staging ring, prepared projections, presorted codes,
    structure indices) belong to the instance."""

    name = "triton"
    capabilities = Capabilities(
        array_types=("torch",),
        devices=("cuda",),
        dtypes=("float16", "bfloat16", "float32"),
        max_head_dim=HEAD_DIM_TIERS[-1],
        priority=10,
        # the running output in fp16/bf16: half the reads and writes per causal recursion level of an
        # fp32 one, and no widening and narrowing copies of the whole output
        running_out_dtype="input",
        device_seed=True,
        samplings=("uniform", "stratified", "key_norm"),  # the kernels' DRAW_WEIGHTS variants
        per_draw_weights=True,
    )

    def __init__(self, options: TritonOptions | None = None):
        self.options = TritonOptions() if options is None else options
        self.pinned_ring = PinnedRing()
        #: host tables -> their device copies
        self.device_tables = DeviceTables(self.from_host, lambda: self.options.device_tables_capacity)
        #: projections -> {(dtype, terms): prepared for the hashing kernel}
        self.prepared_projections = DerivedTensors()
        #: codes -> {(chunk, buckets): their aligned chunks' counts and order}
        self.presorted_codes = DerivedTensors()
        #: SparseStructure -> its index tensors
        self.structure_indices = StructureIndices(self.device_tables)
        if interpreting():  # CPU tensors are accepted then, but "auto" must still prefer the reference
            self.capabilities = dataclasses.replace(self.capabilities, devices=("cuda", "cpu"), priority=-1)

    def version(self) -> str:
        from . import __version__

        return f"{__version__} (triton {triton.__version__}, torch {torch.__version__})"

    def unavailable_reason(self) -> str | None:
        if interpreting() or torch.cuda.is_available():
            return None
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"

    # -- arrays ---------------------------------------------------------------------------------
    def to_native(self, x):
        return x.detach() if x.requires_grad else x  # no alias to make (host time) when none is needed

    def from_native(self, y, like, dtype: str | None = None):
        target = like.dtype if dtype is None else getattr(torch, dtype)
        return y if y.dtype == target else y.to(target)

    def from_host(self, values: np.ndarray, like):
        """``values`` on ``like``'s device; on a GPU staged through the pinned ring (no blocking)."""
        return host_to_device(values, like, self.pinned_ring)

    # -- optional kernels -----------------------------------------------------------------------
    def host_constant(self, values: np.ndarray, like):
        """One device copy per distinct ``values`` (kept in the device tables): the projections of
        a seed are copied once, and a CUDA graph captured after the first call copies nothing."""
        return self.device_tables.get(_as_is, like, np.ascontiguousarray(values))

    def draw_samples(self, seed, stream: int, heads: tuple[int, int], segments: Segments, m: int, n_k: int, like,
                     stratified: bool = False):
        """One launch on the device (``kernels.utility.draw_samples_kernel``): an int seed is a
        launch argument, a device seed (0-d int64 on ``like``'s device) is read when it runs."""
        batch, kv_heads = heads
        count = len(segments)
        out = torch.empty(batch, kv_heads, count, m, dtype=torch.int32 if n_k < 2**31 else torch.int64,
                          device=like.device)
        k_start, k_len = self.device_tables.get(_sample_bounds, like, segments)
        in_memory = isinstance(seed, torch.Tensor)
        launch = launch_for(self.options.launches, "draw_samples", like.shape[3])
        per_head = count * m
        direct(draw_samples_kernel)[(cdiv(per_head, launch.block), batch * kv_heads)](
            out, k_start, k_len, 0 if in_memory else seed, seed if in_memory else k_start, stream, per_head, m,
            SEED_IN_MEMORY=in_memory, STRATIFIED=bool(stratified), BLOCK=launch.block, num_warps=launch.warps,
        )
        return out

    def key_norm_weights(self, k):
        """(float32 [B, Hk, Nk] ``||k||**4``, their float64 inclusive prefix sums): ``row_dot`` of k
        with itself squared, and one ``torch.cumsum``; made once per call."""
        squared = self.row_dot(k, k)
        weights = squared * squared
        return weights, torch.cumsum(weights, dim=-1, dtype=torch.float64)

    def draw_samples_by_key_norm(self, seed, stream: int, segments: Segments, m: int, key_weights, like,
                                 head_ids=None, kv_total=None):
        """One launch on the device (``draw_key_norm_samples_kernel``): a binary search of each norm
        draw's target in the prefix sums; the seed as in :meth:`draw_samples`."""
        weights, prefix = key_weights
        batch, kv_heads, n_k = weights.shape
        count = len(segments)
        out = torch.empty(batch, kv_heads, count, m, dtype=torch.int32 if n_k < 2**31 else torch.int64,
                          device=like.device)
        log_w = torch.empty(batch, kv_heads, count, m, dtype=torch.float32, device=like.device)
        k_start, k_len = self.device_tables.get(_sample_bounds, like, segments)
        ids = self.device_tables.get(_head_ids, like, tuple(range(kv_heads)) if head_ids is None else tuple(head_ids))
        in_memory = isinstance(seed, torch.Tensor)
        launch = launch_for(self.options.launches, "draw_samples", like.shape[3])
        per_head = count * m
        m_u, m_n = sampling.split_key_norm_draws(m)
        direct(draw_key_norm_samples_kernel)[(cdiv(per_head, launch.block), batch * kv_heads)](
            out, log_w, weights, prefix, k_start, k_len, ids, 0 if in_memory else seed,
            seed if in_memory else k_start, stream, per_head, m, m_u, m_n, kv_heads,
            kv_heads if kv_total is None else kv_total, n_k, segments.max_k_len.bit_length() + 1,
            SEED_IN_MEMORY=in_memory, BLOCK=launch.block, num_warps=launch.warps,
        )
        return out, log_w

    def fused_attention(self, q, k, v, *, causal: bool, scale: float):
        """A whole exact call through PyTorch SDPA (cuDNN or FlashAttention, with its own backward):
        as fast as SDPA itself wherever HyperAttention computes exactly.  None where SDPA's
        conventions differ (GQA, causal with Nq != Nk: SDPA aligns the mask top-left)."""
        if interpreting():
            return None
        return fused.whole_exact_call(q, k, v, causal, scale, self.options.sdpa_order)

    def row_dot(self, a, b):
        """float32 [B, H, N]: ``sum(a * b, -1)`` of two [B, H, N, D] tensors in one launch (the
        backward's delta), without fp32 copies of either."""
        batch, heads, n, dim = a.shape
        result = torch.empty(batch, heads, n, dtype=torch.float32, device=a.device)
        launch = launch_for(self.options.launches, "row_dot", dim)
        direct(row_dot_kernel)[(cdiv(n, launch.block), batch * heads)](
            a, b, result, n, heads, *a.stride(), *b.stride(), *result.stride(),
            DIM=dim, D_PAD=padded_dim(dim), BLOCK=launch.block, num_warps=launch.warps,
        )
        return result

    # -- structure ------------------------------------------------------------------------------
    def lsh_codes(self, x, projections):
        """One fused launch: x times the projections (fp32-accurate), sign bits, Gray rank."""
        return lsh.lsh_codes(x, projections, self.options.launches, self.prepared_projections)

    def lsh_codes_pair(self, q, k, projections):
        """Both codes in one buffer where q and k have one shape (``sort_pair`` then sorts them together)."""
        if q.shape[:3] != k.shape[:3]:
            return super().lsh_codes_pair(q, k, projections)
        return lsh.lsh_codes_pair(q, k, projections, self.options.launches, self.prepared_projections)

    def sort_pair(self, q_codes, k_codes, segments: Segments, code_bits: int = 64):
        """One counting sort of both codes where they share a buffer and their ranges allow (see
        sorting.py), else two sorts."""
        paired = sorting.sort_pair(q_codes, k_codes, segments, code_bits, options=self.options,
                                   tables=self.device_tables, presorted=self.presorted_codes)
        return paired if paired is not None else super().sort_pair(q_codes, k_codes, segments, code_bits)

    def segment_sort(self, codes, starts: np.ndarray, ends: np.ndarray, code_bits: int = 64):
        """int32 (order, rank): a counting sort for codes of up to ``sorting.MAX_BITS`` bits (see
        sorting.py), else one stable torch sort of ``(segment label, code)`` keys."""
        counted = sorting.counting_segment_sort(codes, starts, ends, code_bits, options=self.options,
                                                tables=self.device_tables, presorted=self.presorted_codes)
        if counted is not None:
            return counted
        bounds = self.from_host(np.stack([starts, ends]).astype(np.int64), codes) if len(starts) else None
        return sorting.torch_segment_sort(codes, starts, ends, code_bits, bounds)

    # -- attention pieces -----------------------------------------------------------------------
    def exact_forward(self, q, k, v, segments: Segments, causal, scale, out, lse, *, overwrite=False):
        options, causal = self.options, bool(causal)
        if exact.flash_exact_forward(q, k, v, segments, causal, scale, out, lse, overwrite, options):
            return
        launch = launch_for(options.launches, "forward", q.shape[3], v.shape[3])
        tiles = self.device_tables.get(exact_tiles, q, segments, causal, launch.block_m)
        self._forward(q, k, v, tiles, None, scale, out, lse, causal, overwrite, launch)

    def sparse_forward(self, q, k, v, structure: SparseStructure, scale, out, lse, *, overwrite=False):
        launch = launch_for(self.options.launches, "forward", q.shape[3], v.shape[3])
        tiles = self.device_tables.get(sparse_tiles, q, structure, launch.block_m)
        self._forward(q, k, v, tiles, structure, scale, out, lse, False, overwrite, launch)

    def exact_backward(self, q, k, v, lse, dout, delta, segments: Segments, causal, scale, dq, dk, dv, out=None, *,
                       overwrite=False):
        options, causal = self.options, bool(causal)
        # deterministic mode: this backend's kernels (each program owns its rows and keys), not
        # cuDNN's or FlashAttention's backward, whose results vary between runs
        deterministic = torch.are_deterministic_algorithms_enabled()
        if not deterministic and exact.flash_exact_backward(q, k, v, out, lse, dout, segments, causal, scale, dq, dk,
                                                            dv, overwrite, options):
            return
        dq_launch = launch_for(options.launches, "dq", q.shape[3], v.shape[3])
        dkdv_launch = launch_for(options.launches, "dkdv", q.shape[3], v.shape[3])
        q_tiles = self.device_tables.get(exact_tiles, q, segments, causal, dq_launch.block_m)
        row_chunk = self._key_row_chunk(segments, overwrite, deterministic)
        if row_chunk is not None and overwrite:  # partial sums are added: the first piece's keys start at zero
            for k0, k1 in zip(segments.k_start.tolist(), segments.k_end.tolist()):
                dk[:, :, k0:k1] = 0
                dv[:, :, k0:k1] = 0
        k_tiles = self.device_tables.get(exact_key_tiles, q, segments, causal, dkdv_launch.block_n, overwrite,
                                         row_chunk)
        self._backward(q, k, v, lse, dout, delta, q_tiles, [KeyTiles(k_tiles, atomic=row_chunk is not None)], None,
                       scale, dq, dk, dv, causal, overwrite, dq_launch, dkdv_launch)

    def _key_row_chunk(self, segments: Segments, overwrite: bool, deterministic: bool) -> int | None:
        """Rows per dK/dV program of a skinny exact piece, one whose segments have more rows than
        ``options.exact_key_row_chunk`` and at least 8 times as many rows as keys (a sink
        rectangle: a few key tiles, each looping over every row, would leave the GPU idle), or None:
        each key tile's program owns its keys (square leaves have key tiles enough).  Not in
        deterministic mode (atomics add in any order), nor for a first piece of many segments (its
        keys would need zeroing one by one)."""
        chunk = self.options.exact_key_row_chunk
        if deterministic or not len(segments):
            return None
        rows = segments.q_len
        if not ((rows > chunk) & (rows >= 8 * segments.k_len)).any():
            return None
        return None if overwrite and len(segments) > 8 else chunk

    def sparse_backward(self, q, k, v, lse, dout, delta, structure: SparseStructure, scale, dq, dk, dv, *,
                        overwrite=False):
        options = self.options
        dq_launch = launch_for(options.launches, "dq", q.shape[3], v.shape[3])
        dkdv_launch = launch_for(options.launches, "dkdv", q.shape[3], v.shape[3])
        q_tiles = self.device_tables.get(sparse_tiles, q, structure, dq_launch.block_m)
        block_n = dkdv_launch.block_n
        # overwrite: blocks without queries too, so that every key of the segments is written
        k_tiles = [KeyTiles(self.device_tables.get(sparse_key_tiles, q, structure, block_n, overwrite))]
        if structure.sample_size > 0:
            # deterministic mode: one chunk of rows per segment, so that each slot has one program
            row_chunk = q.shape[2] if torch.are_deterministic_algorithms_enabled() else options.sample_row_chunk
            slot_tiles = self.device_tables.get(sample_key_tiles, q, structure, block_n, row_chunk)
            k_tiles.append(KeyTiles(slot_tiles, samples=True))
        self._backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, False, overwrite,
                       dq_launch, dkdv_launch)

    def _forward(self, q, k, v, tiles, structure, scale, out, lse, causal, overwrite, launch):
        if tiles.shape[0] == 0:
            return
        ix = self.structure_indices.get(q, structure, self.options.launches)
        attention.forward(q, k, v, tiles, ix, structure is not None, scale, out, lse, causal, overwrite, launch)

    def _backward(self, q, k, v, lse, dout, delta, q_tiles, k_tiles, structure, scale, dq, dk, dv, causal, overwrite,
                  dq_launch, dkdv_launch):
        launches = self.options.launches
        ix = self.structure_indices.get(q, structure, launches)
        attention.backward(q, k, v, lse, dout, delta, q_tiles, k_tiles, ix, structure is not None,
                           lambda: self.structure_indices.query_blocks(q, structure, launches), scale, dq, dk, dv,
                           causal, overwrite, dq_launch, dkdv_launch,
                           deterministic=torch.are_deterministic_algorithms_enabled())


def _as_is(values: np.ndarray) -> np.ndarray:
    return values


def _head_ids(head_ids: tuple[int, ...]) -> np.ndarray:
    """int32 [Hk]: each KV head's index in the call whose draws it takes (the key-norm draw kernel's)."""
    return np.asarray(head_ids, dtype=np.int32)


def _sample_bounds(segments: Segments) -> tuple[np.ndarray, np.ndarray]:
    """int64 (k_start, k_len) [S] of the segments: the draw kernel's tables."""
    return segments.k_start.astype(np.int64), segments.k_len.astype(np.int64)
