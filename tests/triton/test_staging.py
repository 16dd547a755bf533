"""The Triton backend's device caches while a CUDA graph is captured (simulated on the CPU):
nothing recorded during capture lands in a cache, and what a graph reads is never let go."""

from __future__ import annotations

import numpy as np
import pytest
import torch

staging = pytest.importorskip("hyperattn_triton.staging")


@pytest.fixture
def capturing(monkeypatch):
    state = {"on": False}
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
    recorded = tables.get(table, like, 4)  # a miss: built for the graph, not cached
    capturing["on"] = False
    assert len(tables) == 1 and tables.held == [warm, recorded]
    tables.get(table, like, 5)  # capacity 1: evicts the warm entry, the graph still holds it
    assert len(tables) == 1 and tables.held[0] is warm
    assert tables.get(table, like, 4) is not recorded and built == [3, 4, 5, 4]  # eager calls never see it


def test_derived_tensors_hold_what_a_capture_reads_and_keep_recorded_ones_from_eager_calls(capturing):
    derived = staging.DerivedTensors()
    source = torch.ones(3)
    warm = derived.get(source, "k", lambda: source * 2)
    capturing["on"] = True
    assert derived.get(source, "k", lambda: source * 3) is warm
    recorded = derived.get(source, "other", lambda: source * 4)
    assert derived.get(source, "other", lambda: source * 9) is recorded  # shared inside the capture
    capturing["on"] = False
    assert derived.held == [warm, recorded, recorded]
    fresh = derived.get(source, "other", lambda: source * 5)  # an eager call makes its own
    assert torch.equal(fresh, source * 5) and derived.get(source, "other", lambda: source * 6) is fresh
