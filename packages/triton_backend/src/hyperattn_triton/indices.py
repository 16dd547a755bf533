"""A sparse structure's index tensors as the attention kernels read them (int32, with strides),
made once per structure: its forward and backward share them."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from hyperattn.protocol import SparseStructure
from hyperattn.tiles import log_sample_weights, query_blocks

from .kernels.utility import sample_blocks_kernel
from .launcher import direct
from .launches import LaunchTable, launch_for
from .staging import DeviceTables, graph_pool_on


@dataclass
class IndexTensors:
    """The kernels' index arguments: LSH orders, samples and their key blocks, log sample weights
    (per segment, or with ``draw_weights`` per draw, laid out as the samples: importance sampling)
    (one-element dummies for exact pieces, which read none of them)."""

    q_order: torch.Tensor
    k_order: torch.Tensor
    samples: torch.Tensor
    sample_blocks: torch.Tensor
    log_w: torch.Tensor
    order_strides: tuple
    sample_strides: tuple
    sample_size: int
    draw_weights: bool = False
    #: int32 [Nq]: the key block of each sorted query position (made when the dK/dV kernel of the
    #: sample slots first needs it)
    q_blocks: torch.Tensor | None = None


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in int32: itself when it is (no torch operation)."""
    return x if x.dtype == torch.int32 else x.to(torch.int32)


class StructureIndices:
    """IndexTensors per structure, kept while the structure lives."""

    def __init__(self, tables: DeviceTables):
        self._tables = tables
        self._cache = weakref.WeakKeyDictionary()  # SparseStructure -> IndexTensors
        self._dummies = {}  # device -> (int32 [1], float32 [1]) zeros: arguments the kernels do not read

    def get(self, q, structure: SparseStructure | None, launches: LaunchTable) -> IndexTensors:
        if structure is None:
            return self._make(q, None, launches)
        cached = self._cache.get(structure)
        if cached is None:
            cached = self._cache[structure] = self._make(q, structure, launches)
        return cached

    def query_blocks(self, q, structure: SparseStructure, launches: LaunchTable):
        """int32 [Nq] on the device: see ``tiles.query_blocks`` (kept with the structure's indices)."""
        indices = self.get(q, structure, launches)
        if indices.q_blocks is None:
            indices.q_blocks = self._tables.get(query_blocks, q, structure, q.shape[2])
        return indices.q_blocks

    def _new_dummies(self, q):
        """One-element int32 and float32 tensors on q's device, kept per device unless made while a
        CUDA graph is captured (see ``staging``: what a capture makes must not outlive it)."""
        made = (torch.zeros(1, dtype=torch.int32, device=q.device), torch.zeros(1, dtype=torch.float32, device=q.device))
        if not graph_pool_on(q):
            self._dummies[q.device] = made
        return made

    def _make(self, q, structure, launches: LaunchTable) -> IndexTensors:
        device = q.device
        # made once per device (each torch operation costs host time on every call)
        dummy, zero_weight = self._dummies.get(device) or self._new_dummies(q)
        if structure is None:
            return IndexTensors(dummy, dummy, dummy, dummy, zero_weight, (0, 0, 0, 0), (0, 0, 0), 0)
        q_order, k_order = (as_int32(x) for x in (structure.q_order, structure.k_order))
        samples = sample_blocks = dummy
        sample_strides = (0, 0, 0)
        if structure.samples is not None:
            samples = as_int32(structure.samples)
            if not samples.is_contiguous():  # the kernels read both with its strides
                samples = samples.contiguous()
            batch, kv_heads, segments, m = samples.shape
            sample_blocks = torch.empty(samples.shape, dtype=torch.int32, device=device)
            launch = launch_for(launches, "sample_blocks", q.shape[3])
            direct(sample_blocks_kernel)[(batch * kv_heads,)](
                samples, structure.k_rank, sample_blocks, segments * m, kv_heads, *samples.stride()[:2],
                *structure.k_rank.stride(), structure.block_size, BLOCK=launch.block, num_warps=launch.warps)
            sample_strides = samples.stride()[:3]
        draw_weights = structure.sample_log_weights is not None
        if draw_weights:  # the kernels index them with the samples' (contiguous) strides
            log_w = structure.sample_log_weights.contiguous()
        else:
            log_w = self._tables.get(log_sample_weights, q, structure)
        return IndexTensors(q_order, k_order, samples, sample_blocks, log_w,
                            (*q_order.stride()[:2], *k_order.stride()[:2]), sample_strides, structure.sample_size,
                            draw_weights)
