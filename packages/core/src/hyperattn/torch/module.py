"""``HyperAttention``: the authors' module signature, on the one pipeline."""

from __future__ import annotations

import torch

from .. import pipeline
from ..algorithm import draw_projections
from ..config import make_config
from ..validate import make_rng
from .graphs import CallGraphs


class HyperAttention(torch.nn.Module):
    """Drop-in for the authors' module: same constructor and forward signature (plus this
    library's options after it: ``sink_keys``, ``band_keys``, ``sampling``, ``estimator``,
    ``exact_crossover``, see :func:`hyperattn.attention`; ``estimator="paper"`` is the authors'
    estimator).

    The LSH projections are drawn once (reproducibly with ``seed``) and kept as the buffer
    ``lsh_projections`` [input_dim, lsh_num_projs]; samples are drawn fresh on every call, from the
    call's seed: ``seed`` (or a random base) mixed with the count of calls so far (the int64
    buffer ``calls``, which moves with the module).  So two modules made with one seed draw the
    same sequence, eager or compiled (the count is a tensor: ``torch.compile`` neither bakes it in
    nor recompiles for it).  On a GPU the seed stays there (the kernels read it: no
    synchronisation), so a CUDA graph that captured calls draws new samples on every replay, as
    the count advances inside the graph.

    ``cuda_graphs=True`` (CUDA inputs, eager mode): the module captures each call signature
    (shapes, strides, dtypes, flags, whether gradients are recorded) in a CUDA graph on its first
    call and replays it on the next ones, which removes almost all host time per call (see
    ``hyperattn.torch.graphs``; at most ``max_graphs`` signatures are kept, each with its own
    memory).  Replay number i computes what eager call number i computes.  A forward that records
    gradients must get its backward before the same signature's next forward.  Under
    ``torch.compile`` use ``mode="reduce-overhead"`` instead (it raises here).
    ``exact_crossover`` (None: on for eager calls, off with ``cuda_graphs``): the backends'
    crossovers are measured for eager calls, whose host time a replay does not pay; replayed, the
    approximation beat SDPA from ``min_seq_len`` on (docs/performance.md).
    """

    def __init__(
        self,
        input_dim: int = 64,
        lsh_num_projs: int = 7,
        block_size: int = 256,
        sample_size: int = 256,
        min_seq_len: int = 4096,
        seed: int | None = None,
        backend: str = "auto",
        sink_keys: int = 0,
        band_keys: int = 0,
        sampling: str = "stratified",
        estimator: str | None = None,
        exact_crossover: bool | None = None,
        cuda_graphs: bool = False,
        max_graphs: int = 8,
    ):
        super().__init__()
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        if exact_crossover is None:  # the backends' crossovers are eager-call points: a replay wins far below them
            exact_crossover = not cuda_graphs
        self.config = make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys=sink_keys,
                                  band_keys=band_keys, sampling=sampling, estimator=estimator)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an int >= 1 (the head dim D), got {input_dim!r}")
        self.input_dim = input_dim
        self.backend = backend
        rng = make_rng(seed)
        projections = draw_projections(rng, input_dim, lsh_num_projs)
        self.register_buffer("lsh_projections", torch.from_numpy(projections))
        base = int(rng.integers(2**62))  # from the projections' generator: one seed decides both
        # not in the state dict: a checkpoint holds the projections, not a position in the draws
        self.register_buffer("base_seed", torch.tensor(base, dtype=torch.int64), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=False)
        self.graphs = CallGraphs(max_graphs) if cuda_graphs else None

    @property
    def cuda_graphs(self) -> bool:
        """Whether calls are replayed from per-signature CUDA graphs (``self.graphs``)."""
        return self.graphs is not None

    # the original module's attribute names
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def min_seq_len(self) -> int:
        return self.config.min_seq_len

    @property
    def lsh_num_projs(self) -> int:
        return self.config.lsh_num_projs

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"input_dim={self.input_dim}, lsh_num_projs={c.lsh_num_projs}, block_size={c.block_size}, "
            f"sample_size={c.sample_size}, min_seq_len={c.min_seq_len}, backend={self.backend!r}"
            + (f", cuda_graphs=True, max_graphs={self.graphs.max_graphs}" if self.cuda_graphs else "")
        )

    def forward(self, query, key, value, scale=None, causal=False, return_lse=False):
        """query [B, Hq, Nq, D], key [B, Hk, Nk, D], value [B, Hk, Nk, Dv] -> out (, lse)."""
        if self.cuda_graphs:
            return self._replayed(query, key, value, scale, causal, return_lse)
        return self._call(query, key, value, scale, causal, return_lse)

    def _call(self, query, key, value, scale, causal, return_lse):
        seed = call_seed(self.base_seed, self.calls)
        self.calls += 1
        return pipeline.run(query, key, value, causal=causal, scale=scale, backend=self.backend, config=self.config,
                            seed=seed, return_lse=return_lse, projections=self.lsh_projections,
                            head_dim=self.input_dim)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): new buffers, so no graph of the old ones
        if self.cuda_graphs:
            self.graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def _replayed(self, query, key, value, scale, causal, return_lse):
        """The call from its signature's CUDA graph (captured now if it is the first)."""
        if pipeline.compiling(query):
            raise RuntimeError("HyperAttention(cuda_graphs=True) cannot be traced by torch.compile: use "
                               "cuda_graphs=False and torch.compile(mode='reduce-overhead'), which captures graphs itself")
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
                raise ValueError(f"HyperAttention(cuda_graphs=True): {name} must be a CUDA tensor, got "
                                 f"{x.device if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.calls.device != query.device:  # a count on another device would not advance in the graph
            raise ValueError(f"HyperAttention(cuda_graphs=True): the module's buffers must be on the inputs' device "
                             f"{query.device} (call module.to({str(query.device)!r})), got {self.calls.device}")

        def run(q, k, v):
            result = self._call(q, k, v, scale, causal, return_lse)
            return result if return_lse else (result,)

        def snapshot():
            start = self.calls.clone()
            return lambda: self.calls.copy_(start)

        # the graph reads the module's buffers where they were at capture: their addresses are part of the signature
        flags = (scale, causal, return_lse, self.config, self.backend, self.input_dim, self.calls.data_ptr(),
                 self.base_seed.data_ptr(), self.lsh_projections.data_ptr())
        outputs = self.graphs(run, (query, key, value), flags, snapshot)
        return outputs if return_lse else outputs[0]


#: An odd 63-bit multiplier (Knuth's MMIX LCG): consecutive calls get well-spread seeds.
_SEED_STEP = 6364136223846793005


def call_seed(base: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
    """The seed of call number ``calls`` of a module whose base seed is ``base`` (int64 tensors)."""
    return (base + calls * _SEED_STEP) & (2**63 - 1)
