"""What a backend must provide, and the record of what it can run.

The core decides *what* is computed (random draws, rectangles, block size, samples); a backend
computes attention over a given structure.  Every kernel *accumulates*: forward kernels merge
their partial softmax into a running ``(out, lse)`` by log-sum-exp, backward kernels add into
``dq, dk, dv``.  So the pieces of one call (exact leaves, sparse rectangles) can run in any order.

Conventions, for every kernel:
  q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] in the backend's native array type and
  compute dtype; query head h reads KV head ``h // (Hq // Hk)`` (GQA, never expanded).
  out [B, Hq, Nq, Dv] and lse [B, Hq, Nq] are the accumulators (float32, float64 for float64
  inputs); an untouched row has ``lse = -inf`` and its out is never read, only written.  (A plan
  of one piece gets an uninitialised out in q's dtype: each row is written once, never merged.)
  lse is the natural log of the (weighted) softmax normaliser of the *scaled* scores.

A backend subclasses :class:`Backend`, declares what it can run in a :class:`Capabilities` record
(dispatch turns every mismatch into a reason) and its tunable settings in a :class:`BackendOptions`
subclass, which ``hyperattn.configure`` replaces.  Besides this module a backend may import
``hyperattn.kernel_utils`` (helpers for kernel authors), nothing else of the core.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import sampling

Array = Any  # the backend's native array (numpy.ndarray, torch.Tensor, cupy.ndarray)


@dataclass(frozen=True)
class Segments:
    """Rectangles computed by one kernel call, host int64 arrays of shape [S].

    Rows ``[q_start[s], q_end[s])`` attend to keys ``[k_start[s], k_end[s])``.  Query ranges of
    one call are disjoint, and so are key ranges, so a kernel may write both without races.
    For a causal rectangle the mask is aligned bottom-right: local row r sees local keys
    ``j <= r + (n_k - n_q)`` (FlashAttention >= 2.1 convention).
    """

    q_start: np.ndarray
    q_end: np.ndarray
    k_start: np.ndarray
    k_end: np.ndarray

    @classmethod
    def from_ranges(cls, ranges) -> Segments:
        """From an iterable of ``(q_start, q_end, k_start, k_end)`` tuples."""
        table = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 4)
        return cls(*(np.ascontiguousarray(table[:, i]) for i in range(4)))

    @functools.cached_property
    def key(self) -> tuple[bytes, ...]:
        """The bounds' bytes, hashable: what tables built from these segments depend on.  Computed
        once (a plan's segments are made once per shape and reused by every call, read only)."""
        return tuple(a.tobytes() for a in (self.q_start, self.q_end, self.k_start, self.k_end))

    @functools.cached_property
    def max_k_len(self) -> int:
        """The longest key range (0 without segments), computed once."""
        return int(self.k_len.max()) if len(self) else 0

    @property
    def table(self) -> np.ndarray:
        """[S, 4] int64: q_start, q_end, k_start, k_end."""
        return np.stack([self.q_start, self.q_end, self.k_start, self.k_end], axis=1)

    @property
    def q_len(self) -> np.ndarray:
        return self.q_end - self.q_start

    @property
    def k_len(self) -> np.ndarray:
        return self.k_end - self.k_start

    def __len__(self) -> int:
        return len(self.q_start)

    def equal_tiling(self, n_q: int, causal: bool) -> Tiling | None:
        """The :class:`Tiling` when these segments are one batch of L equal attentions: L equal
        squares tiling all rows [0, n_q) with their keys shifted alike (the causal leaves), or one
        non-causal rectangle over all rows (any key range).  Else None.

        Such segments fold into the head axis: q [B, H, n_q, D] as [B, H * L, rows, D] and
        k[:, :, k_start:k_end] as [B, H * L, keys, D], so one fused attention call runs them all.
        Computed once per (n_q, causal): every call of a layer asks again, forward and backward.
        """
        known = self._equal_tilings
        if (n_q, causal) not in known:
            known[(n_q, causal)] = self._equal_tiling(n_q, causal)
        return known[(n_q, causal)]

    @functools.cached_property
    def _equal_tilings(self) -> dict:
        return {}

    def _equal_tiling(self, n_q: int, causal: bool) -> Tiling | None:
        table = self.table
        n = int(table[0, 1] - table[0, 0])
        starts = np.arange(len(table)) * n
        squares = (
            len(table) * n == n_q
            and (table[:, 0] == starts).all()
            and (table[:, 1] - table[:, 0] == n).all()
            and (table[:, 3] - table[:, 2] == n).all()
            and (table[:, 2] - table[:, 0] == table[0, 2]).all()
        )
        one_rectangle = len(table) == 1 and not causal and table[0, 0] == 0 and table[0, 1] == n_q
        if not (squares or one_rectangle):
            return None
        k_start, k_end = int(table[0, 2]), int(table[-1, 3])
        return Tiling(len(table), n, (k_end - k_start) // len(table), k_start, k_end)

    @functools.cached_property
    def strided_tiling(self) -> StridedTiling | None:
        """The :class:`StridedTiling` when these segments are L >= 1 equal non-causal rectangles at
        constant strides (rows ``[q_start + i * q_step, + rows)``, keys ``[k_start + i * k_step,
        + keys)``: one causal level's band rows), not skinny (rows <= keys: the
        fused backwards parallelise over key blocks, and a few key blocks over many rows would
        leave the GPU idle).  Else None.  For the causal leaves see :meth:`equal_tiling`.  Computed
        once (a plan's segments are reused by every call)."""
        if not len(self):
            return None
        rows, keys = self.q_len, self.k_len
        q_steps, k_steps = np.diff(self.q_start), np.diff(self.k_start)
        n_rows, n_keys = int(rows[0]), int(keys[0])
        q_step = int(q_steps[0]) if len(q_steps) else n_rows
        k_step = int(k_steps[0]) if len(k_steps) else n_keys
        regular = (
            0 < n_rows <= n_keys
            and (rows == n_rows).all() and (keys == n_keys).all()
            and (q_steps == q_step).all() and (k_steps == k_step).all()
            and q_step >= n_rows and k_step >= n_keys  # in order, disjoint
        )
        if not regular:
            return None
        return StridedTiling(len(self), n_rows, n_keys, int(self.q_start[0]), q_step, int(self.k_start[0]), k_step)


class StridedTiling(NamedTuple):
    """See :attr:`Segments.strided_tiling`: ``count`` rectangles of ``rows`` x ``keys``, the i-th
    at rows ``q_start + i * q_step`` and keys ``k_start + i * k_step``."""

    count: int
    rows: int
    keys: int
    q_start: int
    q_step: int
    k_start: int
    k_step: int


class Tiling(NamedTuple):
    """See :meth:`Segments.equal_tiling`."""

    count: int
    rows: int
    keys: int
    k_start: int
    k_end: int

    def fold_rows(self, x):
        """x [B, H, n_q, .] as [B, H * count, rows, .] (a view where the layout allows)."""
        return x.reshape(x.shape[0], x.shape[1] * self.count, self.rows, *x.shape[3:])

    def fold_keys(self, x):
        """x[:, :, k_start:k_end] of x [B, H, Nk, .] as [B, H * count, keys, .]."""
        return x[:, :, self.k_start:self.k_end].reshape(x.shape[0], x.shape[1] * self.count, self.keys, x.shape[3])


def query_block_bounds(block: np.ndarray | int, block_size: int, n_q, n_k):
    """First sorted query rank of key block ``block`` (vectorised, exact integer arithmetic).

    Sorted queries are split in proportion to sorted keys: query rank t belongs to block
    ``(t * n_k // n_q) // block_size``, so with n_q == n_k the query and key blocks coincide and
    with n_q != n_k each block receives its share.  Block i holds query ranks
    ``[query_block_bounds(i), query_block_bounds(i + 1))``, clipped to ``n_q``.
    """
    start = -((-np.asarray(block, dtype=np.int64) * block_size * n_q) // n_k)  # ceil division
    return np.minimum(start, n_q)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: backends may cache per structure
class SparseStructure:
    """The sorted block diagonal plus sampled keys of one call (HyperAttention steps 1-3).

    q_order  native integer [B, Hq, Nq] (int64, or int32 where the backend's sort gives it):
             inside each segment's query range, the row indices of that range sorted by LSH
             bucket rank (absolute indices).
    k_order  native integer [B, Hk, Nk]: the same for keys.
    k_rank   native integer [B, Hk, Nk]: position of key j in its segment's sorted order
             (``k_order[k_start + k_rank[j]] == j``); key block of j is ``k_rank[j] // block_size``.
    samples  native int32 [B, Hk, S, m] (int64 from Nk = 2**31): absolute key indices drawn
             uniformly with replacement from each segment's key range, or None when m == 0.  A query attends to a sample
             unless the sample lies in the query's own key block; each draw has weight
             ``n_k / m``, i.e. ``log_sample_weight[s]`` is added to its score.
    sample_log_weights  native float32 [B, Hk, S, m] or None: per-draw log weights (importance
             sampling, ``sampling="key_norm"``), added to each draw's score instead of
             ``log_sample_weight[s]``.
    """

    segments: Segments
    block_size: int
    q_order: Array
    k_order: Array
    k_rank: Array
    samples: Array | None
    log_sample_weight: np.ndarray = field(repr=False)
    sample_log_weights: Array | None = field(default=None, repr=False)

    @property
    def sample_size(self) -> int:
        return 0 if self.samples is None else int(self.samples.shape[-1])

    def kv_heads(self, start: int, stop: int, group: int) -> SparseStructure:
        """The structure of KV heads [start, stop) and their query heads [start * group, stop * group)."""
        return dataclasses.replace(
            self, q_order=self.q_order[:, start * group:stop * group], k_order=self.k_order[:, start:stop],
            k_rank=self.k_rank[:, start:stop], samples=None if self.samples is None else self.samples[:, start:stop],
            sample_log_weights=None if self.sample_log_weights is None else self.sample_log_weights[:, start:stop])


@dataclass(frozen=True)
class Problem:
    """The validated description of one call's inputs (what dispatch decides on)."""

    array_type: str  # "numpy", "torch", "cupy"
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float16", "bfloat16", "float32", "float64"
    batch: int
    q_heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    v_head_dim: int
    requires_grad: bool
    #: how the call's residual samples are drawn (``HyperAttentionConfig.sampling``; exact calls:
    #: the default, which every backend draws)
    sampling: str = "stratified"

    @property
    def head_dims(self) -> tuple[int, int]:
        return (self.head_dim, self.v_head_dim)

    @property
    def device_type(self) -> str:
        """The device without its index: "cpu", "cuda"."""
        return self.device.split(":")[0]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run; dispatch (``hyperattn.dispatch``) turns a mismatch into a reason."""

    array_types: tuple[str, ...]  # e.g. ("numpy", "torch")
    devices: tuple[str, ...]  # device types, e.g. ("cpu",), ("cuda",)
    dtypes: tuple[str, ...]  # e.g. ("float16", "bfloat16", "float32", "float64")
    #: The widest head dim (of q/k and of v) the kernels take.
    max_head_dim: int = 1 << 16
    supports_backward: bool = True
    #: Larger runs first under backend="auto".
    priority: int = 0
    #: The dtype of the running output between a plan's pieces: "accumulator" (float32, float64
    #: for float64 inputs) or "input" (q's dtype: half the memory and traffic of a float32 buffer
    #: for fp16/bf16; each piece's kernel merges in float32 and rounds once when it stores).
    running_out_dtype: str = "accumulator"
    #: ``draw_samples`` reads a seed from device memory (a 0-d int64 array on the inputs' device).
    device_seed: bool = False
    #: The ``HyperAttentionConfig.sampling`` modes its kernels compute.  ``"key_norm"`` needs the
    #: sparse kernels to read ``SparseStructure.sample_log_weights`` (one log weight per draw), so
    #: a backend lists it only when they do.
    samplings: tuple[str, ...] = ("uniform", "stratified")
    #: The sparse kernels read ``SparseStructure.sample_log_weights`` (one log weight per sample
    #: slot), so ``"key_norm"`` may be listed in ``samplings``.
    per_draw_weights: bool = False

    def __post_init__(self) -> None:
        if self.running_out_dtype not in ("accumulator", "input"):
            raise ValueError(f"running_out_dtype must be 'accumulator' or 'input', got {self.running_out_dtype!r}")
        if "key_norm" in self.samplings and not self.per_draw_weights:
            raise ValueError("Capabilities: samplings lists 'key_norm', whose plans carry a weight per draw, so "
                             "per_draw_weights must be True (the sparse kernels must read them)")


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend has; a backend subclasses this for its own (launch tables, ...).

    Set with ``hyperattn.configure(name, **changes)``, which replaces the backend's ``options``
    (a new frozen record, never mutated in place): backends read them on every call.
    """

    #: (keys, rows): non-causal calls with fewer keys, and causal calls with fewer query rows,
    #: run exactly, because this backend's exact attention is faster there (``min_seq_len`` still
    #: applies above).  Honoured when the call's ``exact_crossover`` is True (the default).
    exact_below: tuple[int, int] = (0, 0)
    #: Bytes of accumulator-dtype gradients (dq, dk, dv) one backward pass holds at most: a larger
    #: call runs its backward in chunks of KV heads (with their query heads).
    backward_chunk_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        check_exact_below("exact_below", self.exact_below)
        if not (_is_count(self.backward_chunk_bytes) and self.backward_chunk_bytes >= 1):
            raise ValueError(f"backward_chunk_bytes must be an int >= 1, got {self.backward_chunk_bytes!r}")


    def exact_below_for(self, head_dim: int, backward: bool) -> tuple[int, int]:
        """The (keys, rows) crossover of a call with heads of ``head_dim`` (the wider of q's and
        v's), forward only or with a backward: ``exact_below`` here; a backend may keep a table."""
        return self.exact_below


def check_exact_below(name: str, below) -> None:
    """A crossover is a tuple (keys, rows) of two ints >= 0, or a ValueError naming ``name``."""
    if not (isinstance(below, tuple) and len(below) == 2 and all(_is_count(x) for x in below)):
        raise ValueError(f"{name} must be a tuple (keys, rows) of two ints >= 0, got {below!r}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class Backend(abc.ABC):
    """The kernels a backend provides.  See the module docstring for shapes and conventions.

    Every kernel takes ``overwrite``: this is the call's first piece, so the outputs hold nothing
    yet (they are uninitialised) on its rows and keys, and the kernel writes there instead of
    merging (forward) or adding (backward).
    """

    name: str
    capabilities: Capabilities
    #: Read on every call; replaced (never mutated) by ``hyperattn.configure``.
    options: BackendOptions

    @abc.abstractmethod
    def version(self) -> str:
        """The backend's version and those of the libraries it runs on."""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (no GPU, ...), or None if it can."""
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        """Why it cannot run ``problem`` beyond what :class:`Capabilities` says, or None."""
        return None

    # -- arrays ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def to_native(self, x) -> Array:
        """The input as this backend's native array in its compute dtype (may copy)."""

    @abc.abstractmethod
    def from_native(self, y: Array, like, dtype: str | None = None) -> Any:
        """``y`` as an array of ``like``'s type and device, in ``like``'s dtype or ``dtype``."""

    @abc.abstractmethod
    def from_host(self, values: np.ndarray, like: Array) -> Array:
        """Host NumPy ``values`` as a native array on ``like``'s device (projections, samples)."""

    # -- structure ------------------------------------------------------------------------------
    @abc.abstractmethod
    def lsh_codes(self, x: Array, projections: Array) -> Array:
        """Gray-code rank of the sign pattern of ``x @ projections``: integer [B, H, N] (int64, or
        int32 when the codes fit).

        projections [D, r].  Bit j of the code c is ``x · P_j > 0``; the result is the rank of c
        in the reflected Gray-code sequence, ``c ^ (c >> 1) ^ (c >> 2) ^ ...``.
        """

    @abc.abstractmethod
    def segment_sort(
        self, codes: Array, starts: np.ndarray, ends: np.ndarray, code_bits: int = 64
    ) -> tuple[Array, Array]:
        """Stable sort of each range ``[starts[s], ends[s])`` by code: (order, rank), integer [B, H, N]
        (int64, or int32 where positions fit).

        Every code is below ``2**code_bits`` (a backend may use narrower sort keys).
        Rows outside every range keep ``order[p] == p`` and ``rank[p] == 0``.
        """

    # -- attention ------------------------------------------------------------------------------
    @abc.abstractmethod
    def exact_forward(self, q, k, v, segments: Segments, causal: bool, scale: float, out, lse, *,
                      overwrite: bool = False) -> None:
        """Exact attention of each segment, merged into ``(out, lse)``."""

    @abc.abstractmethod
    def sparse_forward(self, q, k, v, structure: SparseStructure, scale: float, out, lse, *,
                       overwrite: bool = False) -> None:
        """Block diagonal plus weighted samples of each segment, merged into ``(out, lse)``."""

    @abc.abstractmethod
    def exact_backward(
        self, q, k, v, lse, dout, delta, segments: Segments, causal: bool, scale: float, dq, dk, dv, out=None, *,
        overwrite: bool = False,
    ) -> None:
        """Add this piece's gradients, using the *final* lse and ``delta = rowsum(dout * out) - dlse``.

        ``out`` (the final output) is given only when there is no lse gradient, so that
        ``delta == rowsum(dout * out)``: fused kernels that recompute delta from ``out`` may run then.
        With ``overwrite`` the backend writes every element of dq, dk, dv on the rows and keys of its
        segments (zero where it adds nothing); the core zeroes whatever the first piece does not reach.
        """

    @abc.abstractmethod
    def sparse_backward(
        self, q, k, v, lse, dout, delta, structure: SparseStructure, scale: float, dq, dk, dv, *,
        overwrite: bool = False,
    ) -> None:
        """Add this piece's gradients (duplicate samples accumulate), as ``exact_backward``."""

    # -- optional kernels, with their defaults ----------------------------------------------------
    def call_scope(self, like: Array):
        """A context the core runs a whole forward or backward in (its allocations, fills and every
        kernel): a backend that launches on a current device and stream of its own makes them the
        inputs' ones there (``like``: a native input).  This default does nothing."""
        return contextlib.nullcontext()

    def host_constant(self, values: np.ndarray, like: Array) -> Array:
        """``from_host`` for arrays that recur call after call (the projections of a seed): a
        backend may keep their device copies.  This default copies every time."""
        return self.from_host(values, like)

    def lsh_codes_pair(self, q: Array, k: Array, projections: Array) -> tuple[Array, Array]:
        """``(lsh_codes(q, projections), lsh_codes(k, projections))``: a backend may lay the two out
        together, so that ``sort_pair`` sorts both at once."""
        return self.lsh_codes(q, projections), self.lsh_codes(k, projections)

    def sort_pair(self, q_codes: Array, k_codes: Array, segments: Segments,
                  code_bits: int = 64) -> tuple[Array, Array, Array]:
        """``(q_order, k_order, k_rank)`` of a sparse piece (see :class:`SparseStructure`): the query
        codes sorted within each segment's query range, the key codes within its key range.  Only
        the entries inside those ranges are specified (a backend may sort both in one pass, the
        query ranges of the keys' codes too).  This default makes two ``segment_sort`` calls."""
        q_order, _ = self.segment_sort(q_codes, segments.q_start, segments.q_end, code_bits=code_bits)
        k_order, k_rank = self.segment_sort(k_codes, segments.k_start, segments.k_end, code_bits=code_bits)
        return q_order, k_order, k_rank

    def draw_samples(self, seed, stream: int, heads: tuple[int, int], segments: Segments, m: int, n_k: int,
                     like: Array, stratified: bool = False) -> Array:
        """[B, Hk, S, m] integer key samples of sparse piece ``stream``: ``hyperattn.sampling``'s
        function of ``seed`` (an int, or where the backend draws on its device an int64 0-d array
        there, read when the kernel runs), exactly; one per stratum with ``stratified``.  This
        default draws on the host."""
        if not isinstance(seed, int):
            raise TypeError(f"{self.name}: seed must be an int here (this backend draws samples on the host), "
                            f"got {type(seed).__name__}")
        drawn = sampling.sample_keys(seed, stream, heads, segments.k_start, segments.k_len, m, n_k, stratified)
        return self.from_host(drawn, like)

    def key_norm_weights(self, k: Array):
        """What ``draw_samples_by_key_norm`` reads of native keys k [B, Hk, Nk, D], made once per call
        (every sparse piece of it draws from the same keys): here float32 [B, Hk, Nk] NumPy
        ``hyperattn.sampling.key_norm_weights``; a device backend keeps its own form (prefix sums)."""
        return sampling.key_norm_weights(np.asarray(k))

    def draw_samples_by_key_norm(self, seed, stream: int, segments: Segments, m: int, key_weights, like: Array,
                                 head_ids: tuple[int, ...] | None = None, kv_total: int | None = None):
        """``(samples, log_weights)`` [B, Hk, S, m] of ``sampling="key_norm"``: native integer keys
        and float32 log weights, ``hyperattn.sampling.sample_keys_by_key_norm`` (up to the rounding
        of its prefix sums) of ``key_weights`` (from :meth:`key_norm_weights`), on ``like``'s device.
        ``head_ids``/``kv_total``: the heads are those of a larger call (see ``GlobalHeads``).
        This default draws on the host."""
        if not isinstance(seed, int):
            raise TypeError(f"{self.name}: seed must be an int here (this backend draws samples on the host), "
                            f"got {type(seed).__name__}")
        keys, log_w = sampling.sample_keys_by_key_norm(seed, stream, key_weights, segments.k_start, segments.k_len, m,
                                                       head_ids, kv_total)
        return self.from_host(keys, like), self.from_host(log_w, like)

    def fused_attention(self, q, k, v, *, causal: bool, scale: float):
        """A whole exact call through one fused, differentiable kernel (no log-sum-exp), on the
        *caller's* arrays (not native ones), or None where the backend offers none for them."""
        return None

    def row_dot(self, a: Array, b: Array) -> Array:
        """``sum(a * b, -1)`` in the accumulator dtype of two [B, H, N, Dv] arrays (the backward's
        delta).  This default runs one head at a time: no accumulator-dtype copy of a or b."""
        from array_api_compat import array_namespace

        xp = array_namespace(a)
        dtype = xp.float64 if a.dtype == xp.float64 else xp.float32
        return xp.stack([xp.sum(xp.astype(a[:, h], dtype) * xp.astype(b[:, h], dtype), axis=-1)
                         for h in range(a.shape[1])], axis=1)
