"""hyperattn: HyperAttention (arXiv 2310.05869), near-linear long-context attention.

    out = hyperattn.attention(q, k, v, causal=True)          # q [B, Hq, Nq, D], k/v [B, Hk, Nk, D/Dv]
    out = hyperattn.exact_attention(q, k, v, causal=True)
    hyperattn.configure("triton", exact_below=(0, 0))        # backend options
    layer = hyperattn.HyperAttention(input_dim=64)          # torch.nn.Module
"""

from .api import attention, configure, exact_attention
from .config import HyperAttentionConfig
from .registry import available_backends

__version__ = "0.1.0"

__all__ = ["attention", "configure", "exact_attention", "HyperAttention", "HyperAttentionConfig",
           "available_backends"]


def __getattr__(name):
    # torch is imported only when the module is asked for
    if name == "HyperAttention":
        from .torch.module import HyperAttention

        return HyperAttention
    raise AttributeError(f"module 'hyperattn' has no attribute {name!r}")
