"""The data pool between rollout workers and the trainer: windowed FIFO, staleness, backpressure.

Groups are registered when a worker starts them and delivered when they finish. The trainer
takes finished groups in the order they finished, but only from a sliding window over the
queue of *started* groups: the window covers the W groups that started from the oldest
untaken one on, taken ones still holding their places, and it slides only when that oldest
group is taken. A slow, hard task at the head of the queue therefore lets at most W-1 later
groups overtake it, so quick, easy tasks cannot crowd hard ones out of training (the bias a
plain "first finished, first trained" queue has). A group whose oldest turn lags the
trainer's policy version by more than `max_staleness` is dropped and counted. When the pool
holds `capacity` started-but-untaken groups, `try_start` says no and workers wait.

A group is known by its task id: a worker registers the task when it starts it, and the group
that comes back (whatever retries it took inside the worker) is delivered under that id.

This is plain Python; the training loop runs it as a Ray actor.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from forge.middleware.types import Group


@dataclass
class PoolConfig:
    """How the data pool admits and holds groups."""

    window: int = 8
    """Width of the sliding window over started groups from which finished groups are taken."""
    max_staleness: int = 1
    """Most policy versions a group's oldest turn may lag the trainer before it is dropped."""
    capacity: int = 64
    """Most started-but-untaken groups; workers wait (backpressure) beyond it."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"pool.window must be at least 1, got {self.window}")
        if self.capacity < self.window:
            raise ValueError(f"pool.capacity ({self.capacity}) must be at least pool.window ({self.window})")
        if self.max_staleness < 0:
            raise ValueError(f"pool.max_staleness must be 0 or more, got {self.max_staleness}")


class DataPool:
    """Windowed-FIFO queue of groups; see the module docstring for the policy."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        # task_id -> finished Group, None while running, or _TAKEN, in start order. Taken
        # groups keep their place until the head passes them, so the window cannot slide past
        # a slow group that has not been taken.
        self._started: OrderedDict[str, Group | None | object] = OrderedDict()
        self._finish_order: list[str] = []
        self._dropped: list[str] = []
        self._delivered: set[str] = set()
        self.counters = {"started": 0, "finished": 0, "taken": 0, "dropped_stale": 0, "abandoned": 0,
                         "refused_full": 0}

    def try_start(self, task_id: str) -> bool:
        """Register a task a worker is about to run; False (wait and retry) when the pool is full."""
        if task_id in self._started:
            raise ValueError(f"task '{task_id}' was already started; each task runs as one group")
        if self._held() >= self.config.capacity:
            self.counters["refused_full"] += 1
            return False
        self._started[task_id] = None
        self.counters["started"] += 1
        return True

    def put(self, group: Group) -> None:
        """Deliver the finished group of a task that was started with `try_start`."""
        key = group.task_id
        if key not in self._started:
            raise KeyError(f"task '{key}' was never started (call try_start first) or was already taken")
        if self._started[key] is not None:  # finished or taken already
            raise ValueError(f"task '{key}' was delivered twice")
        self._started[key] = group
        self._delivered.add(key)
        self._finish_order.append(key)
        self.counters["finished"] += 1

    def abandon(self, task_id: str) -> None:
        """Forget a started task whose group will never come (dropped after its retries)."""
        if self._started.get(task_id, _TAKEN) is None:
            del self._started[task_id]
            self.counters["abandoned"] += 1
            self._advance_head()

    def take(self, n: int, policy_version: int) -> list[Group]:
        """Up to `n` finished groups, in finish order, from the window; stale ones are dropped."""
        taken: list[Group] = []
        while len(taken) < n:
            self._drop_stale(policy_version)
            eligible = self._window()
            pick = next((gid for gid in self._finish_order if gid in eligible), None)
            if pick is None:
                break
            self._finish_order.remove(pick)
            group = self._started[pick]
            assert isinstance(group, Group)
            self._started[pick] = _TAKEN
            self._advance_head()
            taken.append(group)
        self.counters["taken"] += len(taken)
        return taken

    def abandon_unfinished(self, task_ids: list[str]) -> list[str]:
        """Of a dead worker's tasks, those whose group never arrived (to run again elsewhere):
        started ones are forgotten, as `abandon` does, so they can start again."""
        out = []
        for task_id in task_ids:
            if task_id in self._delivered:
                continue
            if self._started.get(task_id, _TAKEN) is None:
                del self._started[task_id]
                self.counters["abandoned"] += 1
            out.append(task_id)
        self._advance_head()
        return out

    def drain_dropped(self) -> list[str]:
        """Task ids dropped as stale since the last call (for the run's ledger)."""
        out, self._dropped = self._dropped, []
        return out

    def held_task_ids(self) -> list[str]:
        """Finished groups not yet taken: what a checkpoint of the pool keeps."""
        return [gid for gid, g in self._started.items() if isinstance(g, Group)]

    def ready(self, policy_version: int) -> int:
        """How many groups `take` could return now."""
        self._drop_stale(policy_version)
        eligible = self._window()
        return sum(1 for gid in self._finish_order if gid in eligible)

    def stats(self, policy_version: int) -> dict[str, float]:
        """Queue depth, lag and drop counters, for the metrics sink."""
        finished = [g for g in self._started.values() if isinstance(g, Group)]
        lags = [policy_version - g.min_policy_version for g in finished]
        out: dict[str, float] = {
            "pool/in_flight": float(sum(1 for g in self._started.values() if g is None)),
            "pool/finished_waiting": float(len(finished)),
            "pool/lag_mean": float(sum(lags) / len(lags)) if lags else 0.0,
            "pool/lag_max": float(max(lags)) if lags else 0.0,
        }
        out.update({f"pool/{k}": float(v) for k, v in self.counters.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: finished groups, start order and counters.

        Groups still running when the checkpoint is taken are not saved: their workers are
        gone after a restart, so they are started afresh.
        """
        return {
            "finished": [copy.deepcopy(g) for g in self._started.values() if isinstance(g, Group)],
            "finish_order": list(self._finish_order),
            "counters": dict(self.counters),
            "config": copy.deepcopy(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._started = OrderedDict((g.task_id, g) for g in state["finished"])
        self._finish_order = [gid for gid in state["finish_order"] if gid in self._started]
        self.counters = dict(state["counters"])
        self._dropped = []

    def _window(self) -> set[str]:
        return set(list(self._started)[: self.config.window])

    def _held(self) -> int:
        return sum(1 for g in self._started.values() if g is not _TAKEN)

    def _advance_head(self) -> None:
        while self._started and next(iter(self._started.values())) is _TAKEN:
            self._started.popitem(last=False)

    def _drop_stale(self, policy_version: int) -> None:
        limit = self.config.max_staleness
        for gid in list(self._finish_order):
            group = self._started[gid]
            assert isinstance(group, Group)
            if policy_version - group.min_policy_version > limit:
                self._finish_order.remove(gid)
                del self._started[gid]
                self.counters["dropped_stale"] += 1
                self._dropped.append(gid)
        self._advance_head()


_TAKEN = object()
