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
    ``lsh_projections`` [input_dim, lsh_num_projs]; samples are drawn fresh on every call, from a
    seed that the module's own generator (itself seeded by ``seed``) draws for the call.
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
        self._rng = make_rng(seed)
        projections = draw_projections(self._rng, input_dim, lsh_num_projs)
        self.register_buffer("lsh_projections", torch.from_numpy(projections))

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
        # one int per call from the module's generator decides the call's samples
        seed = int(self._rng.integers(2**63))
        return pipeline.run(query, key, value, causal=causal, scale=scale, backend=self.backend, config=self.config,
                            seed=seed, return_lse=return_lse, projections=self.lsh_projections,
                            head_dim=self.input_dim)
