"""HyperAttention as a plan of pieces (``plan``), run forward (``forward``) and backward
(``backward``) on any backend through the kernel protocol.

Each piece's kernel merges its partial softmax into a running ``(out, lse)``; the gradient of
the whole is the sum of the pieces' gradients computed with the final ``out`` and ``lse``.
"""

from .backward import backward_chunk_heads, run_backward
from .call import CallSpec, ForwardResult, forward_call, lse_dtype, seed_projections
from .forward import accumulator_dtype, run_forward
from .plan import (
    ExactPiece,
    GlobalHeads,
    Pieces,
    Plan,
    SparsePiece,
    causal_split,
    draw_projections,
    is_exact_call,
    is_exact_shape,
    plan_attention,
    sparse_structure,
)

__all__ = [
    "CallSpec", "ExactPiece", "ForwardResult", "GlobalHeads", "Pieces", "Plan", "SparsePiece", "accumulator_dtype", "backward_chunk_heads", "causal_split",
    "draw_projections", "forward_call", "is_exact_call", "is_exact_shape", "lse_dtype", "plan_attention", "run_backward", "run_forward",
    "seed_projections", "sparse_structure",
]
