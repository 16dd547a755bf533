"""The Triton backend's device caches while a CUDA graph is captured (simulated on the CPU):
nothing recorded during capture lands in a cache or outlives its last use, and what a graph reads
from before the capture is never let go."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

staging = pytest.importorskip("hyperattn_triton.staging")


@pytest.fixture
def capturing(monkeypatch):
    state = {"on": False}
    monkeypatch.setattr(staging, "graph_pool_on", lambda like: state["on"])
    monkeypatch.setattr(staging, "capturing_on", lambda like: state["on"])
    return state


def test_device_tables_hold_what_a_capture_reads_and_add_nothing(capturing):
    built = []

    def table(n):
        built.append(n)
        return np.arange(n)

    tables = staging.DeviceTables(lambda values, like: torch.from_numpy(values.copy()), lambda: 1)
    like = torch.empty(0)
    warm = tables.get(table, like, 3)
    capturing["on"] = True
    assert tables.get(table, like, 3) is warm  # a hit: the same tensor, now held
    recorded = weakref.ref(tables.get(table, like, 4))  # a miss: built for the graph, neither cached nor kept
    capturing["on"] = False
    assert len(tables) == 1 and list(tables.held.values()) == [warm] and recorded() is None
    tables.get(table, like, 5)  # capacity 1: evicts the warm entry, the graph still holds it
    assert len(tables) == 1 and next(iter(tables.held.values())) is warm
    assert built == [3, 4, 5]


def test_inside_a_capture_scope_the_capture_keeps_what_it_reads(capturing):
    """A graphed module's capture (``hyperattn.capture.capture_scope``) keeps the cached tables
    and derived tensors its graph reads, so they go with it; the caches hold nothing for it."""
    from hyperattn.capture import capture_scope

    tables = staging.DeviceTables(lambda values, like: torch.from_numpy(values.copy()), lambda: 1)
    derived = staging.DerivedTensors()
    like = torch.empty(0)
    warm = tables.get(lambda n: np.arange(n), like, 3)
    base = torch.ones(3)
    made = derived.get(base, "twice", lambda: base * 2)
    kept = []
    capturing["on"] = True
    with capture_scope(kept):
        assert tables.get(lambda n: np.arange(n), like, 3) is warm
        assert derived.get(base, "twice", lambda: base * 3) is made
    capturing["on"] = False
    assert not tables.held and not derived.held
    assert [id(x) for x in kept] == [id(warm), id(made)]
    held = weakref.ref(warm)
    tables.get(lambda n: np.arange(n), like, 5)  # capacity 1: evicts it; the capture still has it
    del warm
    assert held() is not None
    kept.clear()  # the capture is dropped: so is what it kept
    assert held() is None


def test_derived_tensors_hold_what_a_capture_reads_and_keep_recorded_ones_from_eager_calls(capturing):
    derived = staging.DerivedTensors()
    source = torch.ones(3)
    warm = derived.get(source, "k", lambda: source * 2)
    capturing["on"] = True
    assert derived.get(source, "k", lambda: source * 3) is warm
    recorded = derived.get(source, "other", lambda: source * 4)
    assert derived.get(source, "other", lambda: source * 9) is recorded  # shared inside the capture
    capturing["on"] = False
    assert [id(x) for x in derived.held.values()] == [id(warm)]  # held once however often read
    fresh = derived.get(source, "other", lambda: source * 5)  # an eager call makes its own
    assert torch.equal(fresh, source * 5) and derived.get(source, "other", lambda: source * 6) is fresh


def test_derived_tensors_keep_nothing_a_capture_made_past_its_last_use(capturing):
    """CUDA-graph trees refuse pool memory alive after the capture that is not an output; the graph
    refills such a tensor on every replay, so a capture's later use makes it again once it is gone."""
    derived = staging.DerivedTensors()
    source = torch.ones(3)
    capturing["on"] = True
    recorded = weakref.ref(derived.get(source, "other", lambda: source * 4))
    assert recorded() is None and not derived.held
    again = derived.get(source, "other", lambda: source * 7)
    assert torch.equal(again, source * 7)


def test_derived_tuples_made_during_a_capture_are_shared_while_alive(capturing):
    """A presort is a (hist, order) pair: both parts are referred to weakly."""
    derived = staging.DerivedTensors()
    source = torch.ones(3)
    capturing["on"] = True
    pair = derived.get(source, "presort", lambda: (source * 2, source * 3))
    assert derived.get(source, "presort", lambda: (source * 4, source * 5)) is not None
    assert derived.get(source, "presort", lambda: None)[0] is pair[0]
    del pair
    again = derived.get(source, "presort", lambda: (source * 6, source * 7))
    assert torch.equal(again[0], source * 6)


def test_the_graph_pool_includes_cuda_graph_trees_warm_up(monkeypatch):
    """torch.compile(mode="reduce-overhead") warms a function up eagerly on the trees' own stream,
    allocating from the pool it captures in: the caches must treat that like a capture (else an
    entry made then outlives the warm-up, and the trees refuse the pool).  Simulated with a stand-in
    for inductor's manager; off its stream, or out of warm-up, or without inductor, it is not."""
    import sys
    import types

    class Device:
        type, index = "cuda", 0

    class Like:
        device = Device()

    manager = types.SimpleNamespace(in_warmup=True, stream="trees' stream")
    containers = {0: types.SimpleNamespace(tree_manager=manager)}
    # the containers as the trees find them: in this thread, or (autograd's device threads, where a
    # backward warms up) in the thread-local state autograd propagates
    trees = types.SimpleNamespace(local=None, get_obj=lambda local, name: containers)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "trees' stream")
    monkeypatch.setitem(sys.modules, "torch._inductor.cudagraph_trees", trees)
    assert staging.graph_pool_on(Like())
    manager.in_warmup = False
    assert not staging.graph_pool_on(Like())
    manager.in_warmup = True
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "the caller's stream")
    assert not staging.graph_pool_on(Like())
    monkeypatch.delitem(sys.modules, "torch._inductor.cudagraph_trees")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "trees' stream")
    assert not staging.graph_pool_on(Like())
    assert not staging.graph_pool_on(torch.empty(0))  # CPU tensors: never
