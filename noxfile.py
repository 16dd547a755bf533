"""Sessions: tests (default), demo, lint, bench, gpu.  `nox -s tests` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"  # not uv: uv would download a CUDA build of torch

TORCH = "torch==2.13.0"  # always pinned: an unpinned torch pulls a multi-GB CUDA build
TRITON = "triton==3.7.1"  # the version torch 2.13 pairs with
PACKAGES = ["./packages/core", "./packages/reference", "./packages/triton_backend", "./packages/cupy_backend"]
# the CuPy backend's array library: it imports without a GPU (the backend then says it cannot run)
CUPY = ["cupy-cuda13x==14.2.0", "ml_dtypes>=0.5"]
# asv: the suite is checked too; transformers and matplotlib: the integration and benchmark tests
TEST_DEPS = ["pytest>=8", "hypothesis>=6", "asv==0.6.6", "transformers>=5.17,<6", "matplotlib"]


def install_project(session: nox.Session, *extra: str) -> None:
    session.install(TORCH, TRITON, *CUPY, *extra)
    session.install(*PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (GPU tests are skipped without a GPU)."""
    install_project(session, *TEST_DEPS)
    session.run("pytest", "-q", "-m", "not gpu", *session.posargs, env={"PYTHONHASHSEED": "0"})


@nox.session
def demo(session: nox.Session) -> None:
    """HyperAttention against exact attention on a synthetic 32k-token input."""
    install_project(session)
    session.run("python", "-m", "hyperattn", "demo", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """asv against the packages installed in this session (asv.existing.conf.json):
    `nox -s bench -- --quick` for a fast pass.  To compare commits, each built in its own
    environment, run asv with asv.conf.json: `asv continuous main HEAD`."""
    install_project(session, "asv==0.6.6", "matplotlib")
    session.run("asv", "machine", "--yes")
    session.run("asv", "--config", "asv.existing.conf.json", "run", "--python=same", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU tests (on a machine with a CUDA GPU)."""
    install_project(session, *TEST_DEPS)
    session.run("pytest", "-q", "-m", "gpu", *session.posargs)
