"""Who keeps alive what a captured CUDA graph reads.

A backend whose captured kernels and copies read memory made outside the graph's pool (cached
device tables, pinned staging buffers) must keep it as long as the graph may replay.  Inside a
``capture_scope(kept)`` (``hyperattn.torch.graphs`` opens one around each capture of a graphed
module, whose capture owns ``kept``) ``keep_for_capture(obj)`` appends obj to ``kept``, so it is
freed with the graph; outside one (a capture the caller made itself, ``torch.compile``'s graph
trees) it returns False and the backend keeps obj for its own life.
"""

from __future__ import annotations

import contextlib
import contextvars

_kept: contextvars.ContextVar[list | None] = contextvars.ContextVar("hyperattn_capture_kept", default=None)


@contextlib.contextmanager
def capture_scope(kept: list):
    """Make ``keep_for_capture`` append to ``kept`` inside the block."""
    token = _kept.set(kept)
    try:
        yield kept
    finally:
        _kept.reset(token)


def keep_for_capture(obj) -> bool:
    """Hand ``obj`` to the capture scope in force (True), or say there is none (False)."""
    kept = _kept.get()
    if kept is None:
        return False
    kept.append(obj)
    return True
