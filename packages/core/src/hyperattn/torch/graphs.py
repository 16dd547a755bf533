"""CUDA graphs of one call site, per call signature: what ``HyperAttention(cuda_graphs=True)`` replays.

An eager HyperAttention call launches ~20 kernels and runs ~30 torch operations, which costs more
host time than its kernels take below ~32k tokens.  Replayed from a CUDA graph the same call costs
a few copies and one ``replay``.  ``CallGraphs`` captures one graph per signature (shapes,
strides, dtypes, device, flags, autocast state, the backends' option generation) on its first
call, the way ``torch.cuda.make_graphed_callables`` does (warm-up on a side stream, then the
capture, the backward captured after the forward in the same memory pool), and replays it on the
next calls of that signature:

* inputs are copied into the graph's static inputs; outputs and gradients are returned as fresh
  tensors (clones of the static ones), so a later replay never overwrites what a caller holds;
* the call's seed is computed inside the graph from the module's call count, which the graph
  advances: replay number i draws what eager call number i would (``HyperAttention``'s docstring);
* a forward that records gradients captures its backward too; that backward reads what the
  forward left in the graph's memory, so it must run before the next forward of the same
  signature replays (a backward after that raises instead of computing the wrong gradients).

Each signature holds its own memory (static inputs, outputs, saved tensors, the graph's pool);
``max_graphs`` bounds how many are kept (least recently used dropped first).  The backends'
cached memory a capture reads (device tables, pinned staging buffers) is kept by the capture
(``hyperattn.capture``) and freed with it.  One module's calls share static buffers: make them
from one stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ..capture import capture_scope
from ..registry import options_generation


def call_signature(tensors, flags) -> tuple:
    """What a captured graph is valid for: every tensor's shape, strides, dtype, device and
    ``requires_grad``, whether gradients are recorded and inference mode is on, the autocast
    state, the global modes a call reads when it runs (deterministic algorithms, the SDPA kernels
    enabled), the backends' option generation (``hyperattn.configure`` may change the plan) and
    ``flags`` (causal, scale, ...)."""
    grad = torch.is_grad_enabled()
    modes = (grad, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
             torch.get_autocast_dtype("cuda"), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    return (tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad and grad) for t in tensors),
            modes, options_generation(), flags)


class CapturedCall:
    """One signature's graphs: static inputs, the forward graph and its outputs, and, when an
    input requires grad, the backward graph, its static output gradients and input gradients."""

    def __init__(self, run: Callable, inputs: tuple, snapshot: Callable, warmup: int = 2):
        """Capture ``run(*static_inputs) -> tuple of tensors``.  ``snapshot()`` is called before the
        warm-up calls and returns what restores the caller's state before the capture (the module
        rewinds its call count: the warm-up calls are not calls of the caller's)."""
        restore = snapshot()
        self.generation = 0  # forward replays so far: a backward checks it is still the latest's
        self.static_inputs = tuple(_static_like(x) for x in inputs)
        self.grad_positions = tuple(i for i, x in enumerate(self.static_inputs) if x.requires_grad)
        needs_backward = torch.is_grad_enabled() and bool(self.grad_positions)
        device = inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):  # warm-up off the capture stream (compiles kernels, fills caches)
                for _ in range(warmup):
                    outputs = run(*self.static_inputs)
                    if needs_backward:
                        self._gradients(outputs, tuple(torch.zeros_like(o) for o in outputs))
                    del outputs
        finally:  # also when a call is refused (bad inputs): the caller's state as it was
            torch.cuda.current_stream(device).wait_stream(side)
            restore()
        pool = torch.cuda.graph_pool_handle()
        # on the inputs' device, on a capture stream of that device (torch.cuda.graph's default
        # stream is made once, on whichever device was current at a process's first capture)
        self.kept = []  # what the backends' cached memory the graphs read: freed with them
        with torch.cuda.device(device), capture_scope(self.kept):
            self.forward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.forward_graph, pool=pool, stream=side):
                self.static_outputs = tuple(run(*self.static_inputs))
            self.backward_graph = None
            if needs_backward:
                self.static_output_grads = tuple(torch.zeros_like(o) for o in self.static_outputs)
                self.backward_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.backward_graph, pool=pool, stream=side):
                    self.static_input_grads = self._gradients(self.static_outputs, self.static_output_grads)

    def _gradients(self, outputs, output_grads) -> tuple:
        differentiable = [(o, g) for o, g in zip(outputs, output_grads) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in differentiable], [self.static_inputs[i] for i in self.grad_positions],
                                   [g for _, g in differentiable], allow_unused=True)

    def replay_forward(self, inputs) -> tuple:
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.forward_graph.replay()
        self.generation += 1
        return tuple(o.clone() for o in self.static_outputs)  # the next replay overwrites the static ones

    def replay_backward(self, generation: int, output_grads) -> tuple:
        """Input gradients (None where an input needs none) for ``output_grads`` (None: zeros)."""
        if generation != self.generation:
            raise RuntimeError("HyperAttention(cuda_graphs=True): a backward ran after a later forward of the same "
                               "module and call signature had replayed its CUDA graph, which overwrote what this "
                               "backward reads; call backward before the next forward of that signature, or use "
                               "cuda_graphs=False (e.g. with activation checkpointing)")
        for static, grad in zip(self.static_output_grads, output_grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        self.backward_graph.replay()
        grads: list = [None] * len(self.static_inputs)
        for i, grad in zip(self.grad_positions, self.static_input_grads):
            grads[i] = None if grad is None else grad.clone()
        return tuple(grads)


class _Replay(torch.autograd.Function):
    """Autograd around one captured call: forward replays its forward graph, backward its backward."""

    @staticmethod
    def forward(ctx, captured: CapturedCall, *inputs):
        outputs = captured.replay_forward(inputs)
        ctx.captured, ctx.generation = captured, captured.generation
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable  # the graph's backward is not differentiable again
    def backward(ctx, *output_grads):
        return (None, *ctx.captured.replay_backward(ctx.generation, output_grads))


class CallGraphs:
    """Per-signature CUDA graphs of ``run``: ``graphs(run, inputs, flags, snapshot)`` returns
    ``run(*inputs)``'s outputs (a tuple) from a graph, captured on the signature's first call
    (``snapshot``: see :class:`CapturedCall`)."""

    def __init__(self, max_graphs: int = 8):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self._captured: OrderedDict[tuple, CapturedCall] = OrderedDict()

    def __len__(self) -> int:
        return len(self._captured)

    # a copy (copy.deepcopy of a model, pickling) starts with no graphs: CUDA graphs cannot be
    # copied, and a copy's buffers are not the ones they read
    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"])

    def clear(self) -> None:
        """Drop every captured graph (and the memory it holds)."""
        self._captured.clear()

    def __call__(self, run: Callable, inputs: tuple, flags: tuple, snapshot: Callable) -> tuple:
        key = call_signature(inputs, flags)
        captured = self._captured.get(key)
        if captured is None:
            captured = CapturedCall(run, inputs, snapshot)  # first: a refused call evicts nothing
            while len(self._captured) >= self.max_graphs:
                self._captured.popitem(last=False)
            self._captured[key] = captured
        else:
            self._captured.move_to_end(key)
        if captured.backward_graph is None:
            return captured.replay_forward(inputs)
        return _Replay.apply(captured, *inputs)


def _static_like(x: torch.Tensor) -> torch.Tensor:
    """An input's static copy: same shape, dtype and device (strides too, unless they overlap, as
    an expanded view's do: then contiguous), its values, its requires_grad."""
    static = torch.empty_like(x, memory_format=torch.preserve_format)
    static.copy_(x.detach())
    return static.requires_grad_(x.requires_grad and torch.is_grad_enabled())
