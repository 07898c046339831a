"""The weight store: versions only move forward; workers fetch only what is newer."""

from __future__ import annotations

import pytest

from forge.middleware.weights import WeightStore


def test_publish_and_pull():
    store = WeightStore()
    assert store.version() == -1 and store.latest(-1) is None
    store.publish(0, ["w0"])
    assert store.latest(-1) == (0, ["w0"]) and store.latest(0) is None
    store.publish(3, ["w3"])
    assert store.latest(0) == (3, ["w3"])
    with pytest.raises(ValueError, match="not newer"):
        store.publish(3, ["again"])


def test_keeps_the_last_n_versions_for_pinned_calls():
    store = WeightStore(keep=2)
    for v in (1, 2, 3):
        store.publish(v, [f"w{v}"])
    assert store.get(2) == ["w2"] and store.get(3) == ["w3"]
    assert store.latest(1) == (3, ["w3"])
    with pytest.raises(KeyError, match=r"version 1 is not kept \(kept: 2..3\)"):
        store.get(1)
    with pytest.raises(ValueError, match="at least one"):
        WeightStore(keep=0)
