"""Direct launches (``hyperattn_triton.launcher``) against a stand-in for a Triton kernel, on the
CPU: the key separates what Triton specialises on, and a cached launch passes every parameter in
order.  The GPU tests run every kernel through it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

launcher = pytest.importorskip("hyperattn_triton.launcher")


class FakeKernel:
    """Parameters (x, n, seed [not specialised], SCALE: constexpr, BLOCK: constexpr = 64)."""

    def __init__(self):
        names = [("x", False, False), ("n", False, False), ("seed", False, True), ("SCALE", True, False),
                 ("BLOCK", True, False)]
        self.params = [SimpleNamespace(num=i, name=name, is_constexpr=const, do_not_specialize=dns,
                                       has_default=name == "BLOCK", default=64)
                       for i, (name, const, dns) in enumerate(names)]
        self.slow, self.fast = [], []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.slow.append((grid, args, meta))
            return SimpleNamespace(function="f", packed_metadata="m", run=lambda *a: self.fast.append(a))
        return launch


@pytest.fixture
def compiled_mode(monkeypatch):
    monkeypatch.setattr(launcher, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


def test_a_repeated_launch_goes_straight_to_the_compiled_kernel_with_every_parameter(compiled_mode):
    kernel = FakeKernel()
    run = launcher.DirectLaunch(kernel)
    x = torch.zeros(8)
    run[(3, 2)](x, 5, 99, SCALE=0.5)
    assert len(kernel.slow) == 1 and not kernel.fast
    run[(4, 2)](x, 5, 12345, SCALE=0.5)  # another seed: not specialised, same kernel
    assert len(kernel.slow) == 1
    grid_x, grid_y, grid_z, stream, function, metadata, launch_meta, enter, exit_hook, *args = kernel.fast[0]
    assert (grid_x, grid_y, grid_z, stream, function, metadata, launch_meta) == (4, 2, 1, 1234, "f", "m", None)
    assert args == [x, 5, 12345, 0.5, 64]  # the constexpr given by keyword, then the default


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int value", "seed beyond int32", "constexpr", "warps"])
def test_what_triton_specialises_on_takes_its_path_again(compiled_mode, change):
    kernel = FakeKernel()
    run = launcher.DirectLaunch(kernel)
    x = torch.zeros(16)
    base = dict(args=(x, 16, 7), meta=dict(SCALE=1.0, num_warps=4))
    run[(1,)](*base["args"], **base["meta"])
    args, meta = list(base["args"]), dict(base["meta"])
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.double()
    elif change == "int value":
        args[1] = 17
    elif change == "seed beyond int32":
        args[2] = 2**40
    elif change == "constexpr":
        meta["SCALE"] = 2.0
    else:
        meta["num_warps"] = 8
    run[(1,)](*args, **meta)
    assert len(kernel.slow) == 2 and not kernel.fast


def test_unknown_arguments_and_the_interpreter_take_tritons_path(compiled_mode, monkeypatch):
    kernel = FakeKernel()
    run = launcher.DirectLaunch(kernel)
    for _ in range(2):
        run[(1,)](torch.zeros(4), (1, 2), 3, SCALE=1.0)  # a tuple argument: not keyed
    assert len(kernel.slow) == 2
    monkeypatch.setattr(launcher, "interpreting", lambda: True)  # decided when the launcher is made
    interpreted = launcher.DirectLaunch(kernel)
    for _ in range(2):
        interpreted[(1,)](torch.zeros(4), 5, 3, SCALE=1.0)
    assert len(kernel.slow) == 4 and not kernel.fast


def test_an_interpreted_kernel_takes_tritons_path(compiled_mode):
    """Triton decides at decoration whether the interpreter runs a kernel: one of its
    InterpretedFunction type is never launched directly, whatever the environment says now."""
    InterpretedFunction = type("InterpretedFunction", (FakeKernel,), {})
    kernel = InterpretedFunction()
    run = launcher.DirectLaunch(kernel)
    for _ in range(2):
        run[(1,)](torch.zeros(4), 5, 3, SCALE=1.0)
    assert len(kernel.slow) == 2 and not kernel.fast


def test_direct_gives_one_launcher_per_kernel():
    kernel = FakeKernel()
    assert launcher.direct(kernel) is launcher.direct(kernel)


def test_a_grid_beyond_cudas_second_axis_limit_is_refused_with_its_reason(compiled_mode):
    """batch x heads programs along axis 1 above 65535 would fail inside the launch: a clear error."""
    kernel = FakeKernel()
    run = launcher.DirectLaunch(kernel)
    with pytest.raises(ValueError, match="batch x heads = 65536.*65535"):
        run[(1, 65536)](torch.zeros(4), 5, 3, SCALE=1.0)
    assert not kernel.slow
    run[(1, 65535)](torch.zeros(4), 5, 3, SCALE=1.0)
    assert len(kernel.slow) == 1
