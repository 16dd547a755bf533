"""hyperattn-reference: the NumPy/numba backend of hyperattn (CPU, and the oracle of the others)."""

__version__ = "0.1.0"


def get_backend():
    from .backend import ReferenceBackend

    return ReferenceBackend()
