"""hyperattn-cupy: the CuPy backend of hyperattn (CUDA C++ kernels through cupy.RawModule)."""

__version__ = "0.1.0"


def get_backend():
    from .backend import CupyBackend

    return CupyBackend()
