"""``HyperAttention``: the authors' module signature, on the one pipeline."""

from __future__ import annotations

import torch

from .. import pipeline
from ..algorithm import draw_projections
from ..config import HyperAttentionConfig
from ..validate import make_rng


class HyperAttention(torch.nn.Module):
    """Drop-in for the authors' module: same constructor and forward signature.

    The LSH projections are drawn once (reproducibly with ``seed``) and kept as the buffer
    ``lsh_projections`` [input_dim, lsh_num_projs]; samples are drawn fresh on every call, from the
    call's seed: ``seed`` (or a random base) mixed with the count of calls so far (the CPU
    tensor ``calls``).  So two modules made with one seed draw the same sequence, eager or compiled
    (the count is a tensor: ``torch.compile`` neither bakes it in nor recompiles for it).
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
    ):
        super().__init__()
        self.config = HyperAttentionConfig(block_size, sample_size, lsh_num_projs, min_seq_len)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an int >= 1 (the head dim D), got {input_dim!r}")
        self.input_dim = input_dim
        self.backend = backend
        rng = make_rng(seed)
        projections = draw_projections(rng, input_dim, lsh_num_projs)
        self.register_buffer("lsh_projections", torch.from_numpy(projections))
        base = int(rng.integers(2**62))  # from the projections' generator: one seed decides both
        # plain CPU tensors, not buffers: ``module.to("cuda")`` must not move them (reading a GPU
        # count back would synchronise every call)
        self.base_seed = torch.tensor(base, dtype=torch.int64)
        self.calls = torch.zeros((), dtype=torch.int64)
        self._host_projections = (None, None, None)  # (buffer, its version, float64 CPU copy)

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
        )

    def forward(self, query, key, value, scale=None, causal=False, return_lse=False):
        """query [B, Hq, Nq, D], key [B, Hk, Nk, D], value [B, Hk, Nk, Dv] -> out (, lse)."""
        seed = call_seed(self.base_seed, self.calls)
        self.calls += 1
        projections = self.lsh_projections
        if not pipeline.compiling():  # under compile the operator takes the buffer as an input
            seed = int(seed)
            projections = self.host_projections()
        return pipeline.run(query, key, value, causal=causal, scale=scale, backend=self.backend, config=self.config,
                            seed=seed, return_lse=return_lse, projections=projections, head_dim=self.input_dim)

    def host_projections(self) -> torch.Tensor:
        """The projections as a float64 CPU tensor, copied from the buffer once per buffer and
        version (after ``module.to("cuda")`` or an in-place change): a copy from the GPU on every
        call would synchronise with it."""
        buffer, version, copy = self._host_projections
        current = self.lsh_projections
        if buffer is not current or version != current._version:
            copy = current.detach().to("cpu", torch.float64, copy=True)
            self._host_projections = (current, current._version, copy)
        return copy


#: An odd 63-bit multiplier (Knuth's MMIX LCG): consecutive calls get well-spread seeds.
_SEED_STEP = 6364136223846793005


def call_seed(base: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
    """The seed of call number ``calls`` of a module whose base seed is ``base`` (int64 tensors)."""
    return (base + calls * _SEED_STEP) & (2**63 - 1)
