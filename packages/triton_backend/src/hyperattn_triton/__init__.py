"""hyperattn-triton: the Triton (NVIDIA GPU) backend of hyperattn."""

__version__ = "0.1.0"


def get_backend():
    from .backend import TritonBackend

    return TritonBackend()
