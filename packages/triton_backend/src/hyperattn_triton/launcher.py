"""Direct launches of compiled Triton kernels: Triton's per-call argument binding skipped.

``kernel[grid](*args, **meta)`` binds and specialises every argument, finds the compiled kernel
and launches it; with the forty-odd arguments of an attention launch that host time matters as
much as a short kernel's GPU time, and a causal call makes dozens of launches.  ``direct(kernel)``
launches the same way, but after the first launch of each specialisation it keeps the compiled
kernel under a key at least as fine as Triton's own specialisation, and later launches with that
key go straight to the compiled kernel's launcher (the one ``JITFunction.run`` calls):

* a tensor by its dtype and its address modulo 16 (finer than Triton's pointer specialisation,
  whether it is 16-byte aligned), an int by its value (finer than Triton's ``== 1`` and ``% 16``; an argument in
  the kernel's ``do_not_specialize`` by whether it fits int32, its only specialisation), a float
  or bool by its type (and a bool by its value), and the keyword arguments (constexprs, launch
  options) by value; any other argument, or a launch hook set (profilers), takes Triton's path.
* the device is the current one, as in Triton.

Under the interpreter (``TRITON_INTERPRET=1``) every launch takes Triton's path.
"""

from __future__ import annotations

import torch
from triton import knobs

from .launches import MAX_GRID_Y
from .options import interpreting

#: Keys kept per kernel before the cache starts again (ints are keyed by value).
CACHE_LIMIT = 512

_INT32 = (-(2**31), 2**31)


class DirectLaunch:
    """``direct(kernel)[grid](*args, **meta)``: ``kernel[grid](*args, **meta)`` with the binding
    skipped for specialisations launched before (see the module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", None)
        # positions whose int arguments Triton does not specialise on their value
        self._unspecialised = tuple(p.num for p in params if p.do_not_specialize) if params else ()
        self._cache = {}
        # Triton decides when it decorates a kernel whether the interpreter runs it
        self._interpreted = interpreting() or type(kernel).__name__ == "InterpretedFunction"

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args: tuple, meta: dict):
        if type(grid) is tuple and len(grid) > 1 and grid[1] > MAX_GRID_Y:  # CUDA's limit, not a launch error
            name = getattr(getattr(self.kernel, "fn", None), "__name__", "kernel")
            raise ValueError(f"{name}: batch x heads = {grid[1]} programs along the grid's second axis, CUDA "
                             f"allows {MAX_GRID_Y}: split the batch, or use backend='reference'")
        if self._interpreted or _hooked() or type(grid) is not tuple:
            return self.kernel[grid](*args, **meta)
        device = torch.cuda.current_device()
        key = self._key(device, args, meta)
        try:
            entry = None if key is None else self._cache.get(key)
        except TypeError:  # an unhashable keyword argument
            key = entry = None
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            if key is not None:
                self._remember(key, compiled, len(args), meta)
            return compiled
        compiled, tail = entry
        grid = grid + (1, 1)
        runtime = knobs.runtime  # the hooks as Triton passes them (no hook is active: no launch metadata)
        compiled.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, runtime.launch_enter_hook, runtime.launch_exit_hook, *args, *tail)
        return compiled

    def _key(self, device, args, meta):
        """A hashable key at least as fine as Triton's specialisation of these arguments, or None.

        One comprehension over the arguments, ints and plain tensors inline: it runs at every
        launch, dozens per call, and a loop of appends costs twice as much host time."""
        parts = [a if type(a) is int else (a.dtype, a.data_ptr() & 15) if type(a) is _TENSOR else _rare_part(a)
                 for a in args]
        for i in self._unspecialised:  # ints Triton types only by whether they fit int32
            a = parts[i] if i < len(parts) else None
            if type(a) is int:
                parts[i] = ("i32", _INT32[0] <= a < _INT32[1])
        if _UNKEYED in parts:
            return None
        return (device, *parts, *meta.items())

    def _remember(self, key, compiled, positional: int, meta: dict) -> None:
        """Keep ``compiled`` with the values of the parameters after the positional ones (constexprs
        given by keyword or left at their defaults): the launcher takes every parameter in order."""
        params = getattr(self.kernel, "params", None)
        if compiled is None or params is None or any(p.is_constexpr for p in params[:positional]):
            return  # a positional constexpr may be a float, keyed by its type only
        tail = []
        for param in params[positional:]:
            if param.name in meta:
                if not param.is_constexpr:  # a runtime argument by keyword: its value is not in the key
                    return
                tail.append(meta[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                return
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (compiled, tuple(tail))


_TENSOR = torch.Tensor
#: The key part of an argument that takes Triton's path (see ``_rare_part``).
_UNKEYED = ("unkeyed",)


def _rare_part(a):
    """The key part of an argument that is neither an int nor a plain tensor: a tensor subclass by
    its dtype and alignment, a float by its type, a bool or None by its value, anything else
    ``_UNKEYED``."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15
    if type(a) is float:
        return float
    if type(a) is bool or a is None:
        return type(a), a
    return _UNKEYED


def _hooked() -> bool:
    """Whether a launch-enter hook is active (a profiler: it reads each launch's metadata).  Triton
    keeps None or a chain of hooks, by version."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


_LAUNCHERS: dict = {}


def direct(kernel) -> DirectLaunch:
    """The (one) direct launcher of ``kernel``, a ``triton.jit`` function (kept by id: a kernel's
    own hash reads its source's hash under a lock, and kernels live as long as their modules)."""
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _LAUNCHERS[id(kernel)] = DirectLaunch(kernel)
    return launcher
