"""The ledger (forge.middleware.ledger): every scheduled group's fate once, its check, trimming on
resume; and the driver's recovery from a dead rollout worker, which the ledger must account for."""

from __future__ import annotations

import os

import pytest

from forge.middleware.ledger import Ledger, check, read_ledger
from forge.middleware.pool import DataPool, PoolConfig
from forge.middleware.types import Group, Trajectory, Turn


def test_a_clean_run_adds_up(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.scheduled(["t:1", "t:2", "t:3", "t:4"], step=0)
    ledger.trained("t:1", 1, 8)
    ledger.dropped("t:2", 1, "env_error")
    ledger.checkpoint(1, held=["t:3"])
    ledger.trained("t:3", 2, 8)
    ledger.dropped("t:4", 2, "run_ended")
    report = check(read_ledger(ledger.path), group_size=8)
    assert report.ok, report.summary()
    assert (report.scheduled, report.trained, dict(report.dropped), report.held) == (4, 2, {"env_error": 1, "run_ended": 1}, 0)
    assert "scheduled 4 = trained 2 + dropped 2" in report.summary() and "ledger OK" in report.summary()


def test_check_finds_groups_trained_twice_short_or_vanished(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.scheduled(["t:1", "t:2", "t:3", "t:4"], step=0)
    ledger.trained("t:1", 1, 8)
    ledger.trained("t:1", 2, 8)
    ledger.trained("t:2", 2, 7)
    ledger.checkpoint(2, held=["t:3"])
    report = check(read_ledger(ledger.path), group_size=8)
    assert not report.ok
    assert report.trained_twice == ["t:1"] and report.trained_short == ["t:2"] and report.vanished == ["t:4"]
    assert report.held == 1 and "ledger NOT OK" in report.summary()


def test_each_fate_is_written_once_and_rescheduling_is_idempotent(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.scheduled(["t:1", "t:2"], step=0)
    ledger.scheduled(["t:1", "t:2", "t:3"], step=1)  # a resumed fixed-lag run schedules again
    ledger.dropped("t:2", 1, "stale")
    ledger.dropped("t:2", 2, "run_ended")
    entries = read_ledger(ledger.path)
    assert [e["group"] for e in entries if e["status"] == "scheduled"] == ["t:1", "t:2", "t:3"]
    assert [e["reason"] for e in entries if e["status"] == "dropped"] == ["stale"]
    assert Ledger(ledger.path).open_groups() == ["t:1", "t:3"]


def test_trim_on_resume_drops_what_came_after_the_checkpoint(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.scheduled(["t:1", "t:2"], step=0)
    ledger.trained("t:1", 1, 2)
    ledger.scheduled(["t:3"], step=1)
    ledger.checkpoint(1, held=[])
    ledger.dropped("t:2", 1, "stale")     # after the checkpoint, same step: happens again
    ledger.scheduled(["t:4"], step=1)
    ledger.trained("t:2", 2, 2)           # a later step: happens again
    resumed = Ledger(ledger.path)
    assert resumed.trim(after_step=1) == 3
    assert [e["status"] for e in read_ledger(ledger.path)] == ["scheduled", "scheduled", "trained", "scheduled", "checkpoint"]
    assert resumed.open_groups() == ["t:2", "t:3"]
    assert len(read_ledger(tmp_path / "ledger.discarded.jsonl")) == 3


def test_a_group_delivered_after_the_last_checkpoint_ends_with_the_run(tmp_path):
    # Workers deliver to the live pool while a checkpoint saves it: a group that arrived after the
    # save is not in the checkpoint, so it must end as run_ended, not count as held (a resume
    # runs it again).
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.scheduled(["t:1", "t:2", "t:3", "t:4"], step=0)
    ledger.trained("t:1", 1, 2)
    ledger.checkpoint(1, held=["t:2"])
    ledger.end_run(1)   # t:3 arrived in the live pool after the save; t:4 still runs
    report = check(read_ledger(ledger.path), group_size=2)
    assert report.ok, report.summary()
    assert (report.held, dict(report.dropped)) == (1, {"run_ended": 2})
    resumed = Ledger(ledger.path)
    resumed.trim(after_step=1)
    assert resumed.open_groups() == ["t:2", "t:3", "t:4"]


def test_a_damaged_ledger_line_is_one_line_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"group": "t:1", "status": "scheduled", "step": 0}\n{"group": "t:1", "sta')
    with pytest.raises(ValueError, match="ledger.jsonl:2 is not a JSON line"):
        read_ledger(path)


def _group(task_id: str, version: int = 0) -> Group:
    traj = Trajectory(task_id=task_id, group_id=task_id + "#0", prompt_ids=[1, 2], turns=[Turn([3], [-0.1], version)])
    return Group(task_id, task_id + "#0", [traj, traj])


def test_pool_reports_stale_drops_held_groups_and_a_dead_workers_undelivered_tasks():
    pool = DataPool(PoolConfig(window=8, max_staleness=0, capacity=16))
    for t in ("t:1", "t:2", "t:3", "t:4"):
        assert pool.try_start(t)
    pool.put(_group("t:1", version=0))
    pool.put(_group("t:2", version=1))
    assert pool.take(1, policy_version=1)[0].task_id == "t:2"   # t:1 is stale at version 1
    assert pool.drain_dropped() == ["t:1"] and pool.drain_dropped() == []
    pool.put(_group("t:3", version=1))
    assert pool.held_task_ids() == ["t:3"]
    # A dead worker ran t:3 (delivered), t:4 (started, never delivered) and t:5 (never started).
    assert pool.abandon_unfinished(["t:3", "t:4", "t:5"]) == ["t:4", "t:5"]
    assert pool.try_start("t:4")  # free to start again


class _DiesOnce:
    """A stand-in rollout actor: the first instance dies on its first call, later ones run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def run(self, seeds, pool=None, temperature=None, pin=None):
        import ray

        from forge.agent_side.rollout import RolloutResult, RolloutStats

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        for s in seeds:
            task = f"t:{s}"
            assert ray.get(pool.try_start.remote(task))
            ray.get(pool.put.remote(_group(task)))
        return RolloutResult([], RolloutStats(groups_done=len(seeds)))


def test_a_dead_rollout_worker_is_replaced_and_its_groups_run_again(ray_session, tmp_path):
    from forge.loop import DriverState, _collect, _Rollouts, _submit

    import sys

    ray = ray_session
    # The stand-in actor lives in this test module, which Ray's workers cannot import by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = ray.remote(DataPool).options(num_cpus=0).remote(PoolConfig(window=8, capacity=16, max_staleness=4))
    marker = str(tmp_path / "died")
    actor = ray.remote(num_cpus=0, max_restarts=0)(_DiesOnce)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    rollouts = _Rollouts([actor.remote(marker)], {}, per_call=2, seed_base=100, start_worker=lambda i: actor.remote(marker),
                         task_name="t", ledger=ledger)
    state = DriverState()
    # Two calls queued on the worker, as the schedules keep them: both fail when it dies, and
    # it is replaced once.
    _submit(rollouts, 0, pool, state)
    _submit(rollouts, 0, pool, state)
    metrics: dict[str, float] = {}
    for _ in range(200):
        _collect(rollouts, pool, state, metrics, timeout=0.1)
        if ray.get(pool.ready.remote(0)) >= 4:
            break
    assert rollouts.restarts == 1
    taken = ray.get(pool.take.remote(4, 0))
    assert sorted(g.task_id for g in taken) == ["t:100", "t:101", "t:102", "t:103"]
    for g in taken:
        ledger.trained(g.task_id, 1, 2)
    # The replacement's own next calls are still running or done: account for them.
    for _ in range(100):
        _collect(rollouts, pool, state, metrics, timeout=0.1)
        if ray.get(pool.ready.remote(0)) >= 2:
            break
    for g in ray.get(pool.take.remote(2, 0)):
        ledger.trained(g.task_id, 2, 2)
    ledger.checkpoint(2, ray.get(pool.held_task_ids.remote()))
    ledger.end_run(2)
    report = check(read_ledger(ledger.path), group_size=2)
    assert report.ok and not report.trained_twice, report.summary()


class _AlwaysDies:
    def run(self, seeds, pool=None, temperature=None, pin=None):
        os._exit(1)


def test_a_worker_that_keeps_dying_stops_the_run_with_one_line(ray_session, tmp_path):
    import sys

    from forge.loop import MAX_WORKER_DEATHS_IN_A_ROW, DriverState, _collect, _Rollouts, _submit

    ray = ray_session
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = ray.remote(DataPool).options(num_cpus=0).remote(PoolConfig(window=8, capacity=16, max_staleness=4))
    actor = ray.remote(num_cpus=0, max_restarts=0)(_AlwaysDies)
    rollouts = _Rollouts([actor.remote()], {}, per_call=1, seed_base=0, start_worker=lambda i: actor.remote(),
                         task_name="t", ledger=Ledger(tmp_path / "ledger.jsonl"))
    state = DriverState()
    _submit(rollouts, 0, pool, state)
    with pytest.raises(RuntimeError, match=f"rollout worker 0 died {MAX_WORKER_DEATHS_IN_A_ROW + 1} times in a row"):
        for _ in range(300):
            _collect(rollouts, pool, state, {}, timeout=0.1)
    assert rollouts.restarts == MAX_WORKER_DEATHS_IN_A_ROW
