"""Which backend runs a call: the named one, or for "auto" the fastest that can.

Every refusal has a reason, built in one place from the backend's :class:`Capabilities` (as
xformers' ``not_supported_reasons`` does), plus what only the backend can say
(``unavailable_reason``: nothing to run on here; ``unsupported_reason``: these inputs).
"""

from __future__ import annotations

from .protocol import Backend, Problem
from .registry import BackendStatus, available_backends, backend_status, known_backend_names


def not_supported_reasons(backend: Backend, problem: Problem) -> list[str]:
    """Why ``backend`` cannot run ``problem`` (empty when it can)."""
    caps = backend.capabilities
    reasons = []
    if problem.array_type not in caps.array_types:
        reasons.append(f"arrays of type {problem.array_type} are not supported (supported: {caps.array_types})")
    if problem.device_type not in caps.devices:
        reasons.append(f"inputs on {problem.device} are not supported (devices: {caps.devices})")
    if problem.dtype not in caps.dtypes:
        reasons.append(f"dtype {problem.dtype} is not supported (dtypes: {caps.dtypes})")
    if max(problem.head_dims) > caps.max_head_dim:
        reasons.append(
            f"head dims up to {caps.max_head_dim} are supported, got D={problem.head_dim}, Dv={problem.v_head_dim}")
    if problem.sampling not in caps.samplings:
        reasons.append(f"sampling={problem.sampling!r} is not supported (samplings: {caps.samplings})")
    if problem.requires_grad and not caps.supports_backward:
        reasons.append("inputs require grad but this backend has no backward")
    for extra in (backend.unavailable_reason(), None if reasons else backend.unsupported_reason(problem)):
        if extra is not None:
            reasons.append(extra)
    return reasons


def _status_reasons(status: BackendStatus, problem: Problem) -> list[str]:
    if not status.available:
        return [status.reason]
    return not_supported_reasons(status.backend, problem)


def resolve_backend(name, problem: Problem) -> Backend:
    """The backend that runs ``problem``: the named one (never another), or for "auto" the
    highest-priority one that can; else a ValueError listing every backend's reasons."""
    names = known_backend_names()
    if not isinstance(name, str) or (name != "auto" and name not in names):
        raise ValueError(f"backend must be one of {('auto',) + names}, got {name!r}")
    if name != "auto":
        status = backend_status(name)
        reasons = _status_reasons(status, problem)
        if reasons:
            extra = "" if status.available else f"; install it with: {status.install_hint}"
            raise ValueError(f"backend {name!r} cannot run these inputs ({describe(problem)}): "
                             f"{'; '.join(reasons)}{extra}")
        return status.backend
    statuses = sorted(
        available_backends(), key=lambda s: -(s.backend.capabilities.priority if s.available else -1)
    )
    lines = []
    for status in statuses:
        reasons = _status_reasons(status, problem)
        if not reasons:
            return status.backend
        hint = "" if status.available else f" [install: {status.install_hint}]"
        lines.append(f"  {status.name}: {'; '.join(reasons)}{hint}")
    raise ValueError(f"no backend can run these inputs ({describe(problem)}):\n" + "\n".join(lines))


def describe(problem: Problem) -> str:
    return (
        f"{problem.array_type} {problem.dtype} on {problem.device}, "
        f"D={problem.head_dim}, Dv={problem.v_head_dim}" + (", requires grad" if problem.requires_grad else "")
    )
