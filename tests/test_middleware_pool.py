"""The data pool: windowed FIFO order, staleness drops, backpressure, and resume state."""

from __future__ import annotations

import pytest

from forge.middleware.pool import DataPool, PoolConfig
from forge.middleware.types import Group, Trajectory, Turn


def group(gid: str, version: int = 0) -> Group:
    traj = Trajectory(task_id=gid, group_id=f"{gid}#1", prompt_ids=[1, 2],
                      turns=[Turn(sampled_ids=[3], logprobs=[-0.5], policy_version=version)])
    return Group(task_id=gid, group_id=f"{gid}#1", trajectories=[traj], attempts=2)


def test_window_keeps_a_slow_head_from_being_overtaken_without_bound():
    pool = DataPool(PoolConfig(window=3, capacity=10))
    for gid in "abcdef":
        assert pool.try_start(gid)
    # 'a' is slow; everything after it finishes first, in reverse order.
    for gid in "fedcb":
        pool.put(group(gid))
    # Only b and c are inside the window [a, b, c]: they come out in finish order (c before b).
    assert [g.task_id for g in pool.take(10, policy_version=0)] == ["c", "b"]
    assert pool.ready(0) == 0
    pool.put(group("a"))
    # Taken b and c keep their places: the window stays [a, b, c] until a is taken, then
    # slides to [d, e, f], where finish order rules again.
    assert [g.task_id for g in pool.take(10, policy_version=0)] == ["a", "f", "e", "d"]


def test_take_order_across_window_slides():
    pool = DataPool(PoolConfig(window=2, capacity=10))
    for gid in "abcd":
        pool.try_start(gid)
    for gid in "dcba":
        pool.put(group(gid))
    # finish order d, c, b, a; window [a, b] -> b first (finished before a), then a;
    # then window [c, d] -> d (finished first), then c.
    assert [g.task_id for g in pool.take(4, 0)] == ["b", "a", "d", "c"]


def test_plain_fifo_when_window_covers_everything():
    pool = DataPool(PoolConfig(window=8, capacity=8))
    for gid in "abc":
        pool.try_start(gid)
    for gid in "cab":
        pool.put(group(gid))
    assert [g.task_id for g in pool.take(2, 0)] == ["c", "a"]
    assert [g.task_id for g in pool.take(2, 0)] == ["b"]


def test_stale_groups_are_dropped_and_counted():
    pool = DataPool(PoolConfig(window=4, max_staleness=1, capacity=8))
    for gid, version in [("old", 0), ("ok", 1), ("new", 2)]:
        pool.try_start(gid)
        pool.put(group(gid, version))
    assert [g.task_id for g in pool.take(5, policy_version=2)] == ["ok", "new"]
    stats = pool.stats(2)
    assert stats["pool/dropped_stale"] == 1 and stats["pool/taken"] == 2


def test_backpressure_refuses_starts_when_full():
    pool = DataPool(PoolConfig(window=2, capacity=2))
    assert pool.try_start("a") and pool.try_start("b")
    assert not pool.try_start("c")
    pool.put(group("a"))
    pool.take(1, 0)
    assert pool.try_start("c")
    assert pool.stats(0)["pool/refused_full"] == 1


def test_abandoned_group_frees_the_window():
    pool = DataPool(PoolConfig(window=1, capacity=4))
    pool.try_start("a")
    pool.try_start("b")
    pool.put(group("b"))
    assert pool.take(1, 0) == []
    pool.abandon("a")
    assert [g.task_id for g in pool.take(1, 0)] == ["b"]


def test_misuse_names_the_fix():
    pool = DataPool()
    with pytest.raises(KeyError, match="call try_start first"):
        pool.put(group("x"))
    pool.try_start("x")
    with pytest.raises(ValueError, match="already started"):
        pool.try_start("x")
    pool.put(group("x"))
    with pytest.raises(ValueError, match="delivered twice"):
        pool.put(group("x"))
    with pytest.raises(ValueError, match="pool.capacity"):
        PoolConfig(window=4, capacity=2)


def test_state_dict_round_trip_keeps_finished_groups_and_counters():
    pool = DataPool(PoolConfig(window=4, capacity=8))
    for gid in "abc":
        pool.try_start(gid)
    pool.put(group("c"))
    pool.put(group("a"))
    state = pool.state_dict()
    resumed = DataPool(PoolConfig(window=4, capacity=8))
    resumed.load_state_dict(state)
    assert resumed.counters == pool.counters
    assert [g.task_id for g in resumed.take(5, 0)] == ["c", "a"]
