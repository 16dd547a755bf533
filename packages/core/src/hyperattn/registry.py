"""Backends: the first-party ones by module name, others through the ``hyperattn.backends``
entry-point group.  Loaded lazily; a backend that fails to load is listed with the reason.

A backend module (or entry point) exposes ``get_backend() -> Backend``.  Each backend is made
once per process; :func:`configure` replaces its options.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.metadata import entry_points

from .protocol import Backend, BackendOptions

ENTRY_POINT_GROUP = "hyperattn.backends"


@dataclass(frozen=True)
class KnownBackend:
    name: str
    module: str
    distribution: str
    source_dir: str


FIRST_PARTY = {
    b.name: b
    for b in (
        KnownBackend("triton", "hyperattn_triton", "hyperattn-triton", "packages/triton_backend"),
        KnownBackend("cupy", "hyperattn_cupy", "hyperattn-cupy", "packages/cupy_backend"),
        KnownBackend("reference", "hyperattn_reference", "hyperattn-reference", "packages/reference"),
    )
}


@dataclass(frozen=True)
class BackendStatus:
    """One row of :func:`available_backends`."""

    name: str
    available: bool
    reason: str  # why it is unavailable ("" when available)
    version: str
    install_hint: str
    backend: Backend | None = None
    #: The options the backend was made with (what ``configure(name, reset=True)`` restores).
    default_options: BackendOptions | None = None

    @property
    def runs_here(self) -> bool:
        """Installed and able to run on this machine (a GPU backend needs a GPU)."""
        return self.available and self.backend.unavailable_reason() is None

    def __repr__(self) -> str:
        if not self.available:
            state = f"unavailable: {self.reason}"
        else:
            cannot = self.backend.unavailable_reason()
            state = f"version {self.version}" + ("" if cannot is None else f", cannot run here: {cannot}")
        return f"BackendStatus({self.name!r}, {state})"


def install_hint(name: str) -> str:
    known = FIRST_PARTY.get(name)
    if known is None:
        return f"install a package that registers the {ENTRY_POINT_GROUP!r} entry point {name!r}"
    return f"pip install {known.distribution}  (from a checkout: pip install ./{known.source_dir})"


@lru_cache(maxsize=1)
def _third_party_entry_points() -> dict:
    """Scanned once per process: scanning every installed distribution costs milliseconds."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in FIRST_PARTY}


def known_backend_names() -> tuple[str, ...]:
    return tuple(FIRST_PARTY) + tuple(sorted(_third_party_entry_points()))


@cache
def backend_status(name: str) -> BackendStatus:
    """Load backend ``name`` (once) and report whether it works here."""
    hint = install_hint(name)
    try:
        if name in FIRST_PARTY:
            module = importlib.import_module(FIRST_PARTY[name].module)
            factory = module.get_backend
        else:
            entry = _third_party_entry_points().get(name)
            if entry is None:
                raise LookupError(f"no backend named {name!r}")
            factory = entry.load()
            factory = getattr(factory, "get_backend", factory)
        backend = factory()
    except ModuleNotFoundError as error:
        return BackendStatus(name, False, f"not installed ({error})", "", hint)
    except Exception as error:  # a broken install must not break the other backends
        return BackendStatus(name, False, f"failed to load: {type(error).__name__}: {error}", "", hint)
    return BackendStatus(name, True, "", backend.version(), hint, backend, backend.options)


def available_backends() -> list[BackendStatus]:
    """Every known backend, available or not, with the reason and how to install it."""
    return [backend_status(name) for name in known_backend_names()]


#: Counts ``configure`` calls that set options: compiled calls read it, so that ``torch.compile``
#: guards on it and traces again after a change (the crossover is decided when a call is traced).
_options_generation = 0


def options_generation() -> int:
    return _options_generation


def configure(name: str, *, reset: bool = False, **changes) -> BackendOptions:
    """Set options of backend ``name`` (fields of its ``options`` record) and return the options now
    in force.  ``reset=True`` first restores the defaults; no changes just returns the options.

    Takes effect on the next call, also after the backend has run: the backend reads its options
    on every call.  Process-wide, like ``torch.backends`` flags; not thread-safe against calls in
    flight on other threads.
    """
    status = backend_status(name) if name in known_backend_names() else None
    if status is None:
        raise ValueError(f"backend must be one of {known_backend_names()}, got {name!r}")
    if not status.available:
        raise ValueError(f"backend {name!r} is not available ({status.reason}); install it with: {status.install_hint}")
    backend = status.backend
    options = status.default_options if reset else backend.options
    if changes:
        valid = [f.name for f in dataclasses.fields(options)]
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise TypeError(f"backend {name!r} has no option(s) {unknown}; its options are {valid}")
        options = dataclasses.replace(options, **changes)
    if reset or changes:
        global _options_generation
        _options_generation += 1
    backend.options = options
    return options
