"""The rollout worker's logic, plain Python: many episodes at once, in groups, with retries.

`RolloutWorker.run(seeds)` runs one group of `group_size` episodes per seed (one task, G
samples), keeping up to `concurrency` episodes in flight. Each round sends every waiting
episode's context to the generator in one batch, then steps their envs in parallel threads.
A trajectory that fails (env raised, hung, returned garbage, passed the episode time limit)
fails its group, whose other members stop at once; the group is rerun with fresh envs up to `max_retries` times, then dropped and
counted. A group that leaves the worker has exactly G trajectories, all ok: groups are never
silently shrunk, because group-relative advantages over fewer members would change meaning.
A generator that raises is not an env fault: it propagates, since every episode depends on it.

The Ray actor around this is `rollout_actor.py`; tests call this module without a cluster.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol, Sequence

from forge.agent_side.config import RolloutConfig
from forge.agent_side.context import context_rules
from forge.agent_side.episode import Episode, apply_turn, finish, out_of_room, start_episode
from forge.middleware.types import Group
from forge.policy.sampling import Generator
from forge.policy.tokenizer import Tokenizer


@dataclass
class RolloutStats:
    """Counters of one or more `run` calls, for the metrics sink."""

    groups_done: int = 0
    groups_retried: int = 0
    groups_dropped: int = 0
    trajectories_ok: int = 0
    trajectories_failed: int = 0
    turns: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    """Failed trajectories by cause: 'raised', 'timeout', 'garbage', 'episode_timeout', 'context', 'cancelled'."""
    protocol_errors: dict[str, int] = field(default_factory=dict)
    """Protocol and tool errors of the policy by kind, over ok and failed trajectories."""
    generate_s: float = 0.0
    env_s: float = 0.0
    sampled_tokens: int = 0
    """Tokens the policy sampled; over generate_s, the rollout side's tokens per second."""
    faults_injected: dict[str, int] = field(default_factory=dict)
    """Faults the env's fault injection (env.faults) injected during these calls, by kind."""
    episodes: int = 0
    """Episodes of delivered groups (the context counters below are over these)."""
    segments: int = 0
    """Context segments of those episodes (equal to `episodes` without context management)."""
    compactions: int = 0
    """Compact actions that started a new segment."""
    context_tokens_saved: int = 0
    """Context tokens the compactions removed (the context before, less the new one)."""
    tool_results_dropped: int = 0
    """Tool results replaced by a stub (rollout.context.drop_tool_results_after)."""

    def merge(self, other: "RolloutStats") -> None:
        """Add another's counters to these (per-kind dicts key by key)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for key, n in theirs.items():
                    mine[key] = mine.get(key, 0) + n
            else:
                setattr(self, f.name, mine + theirs)

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        """Flat numbers for `forge.monitoring`: 'rollout/turns', 'rollout/failed/raised', ..."""
        sub = {"failure_reasons": "failed/", "protocol_errors": "errors/", "faults_injected": "faults/"}
        out: dict[str, float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                out.update({f"{prefix}{sub[f.name]}{k}": float(v) for k, v in value.items()})
            else:
                out[f"{prefix}{f.name}"] = float(value)
        return out


@dataclass
class RolloutResult:
    """What one `run` call returns: complete groups in the order they finished, and counters."""

    groups: list[Group]
    stats: RolloutStats
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """(task id, reason) of every group dropped after its retries: 'env_error', 'timeout' or 'context'."""


def context_metrics(metrics: dict[str, float], prefix: str = "rollout/") -> dict[str, float]:
    """Per-episode means of the context counters in summed `RolloutStats.as_metrics` numbers:
    'context/compactions_per_episode', 'context/tokens_saved' (context tokens the compactions
    removed, per episode), 'context/segments_per_episode', 'context/results_dropped_per_episode'."""
    n = metrics.get(prefix + "episodes", 0.0)
    if not n:
        return {}
    return {"context/compactions_per_episode": metrics.get(prefix + "compactions", 0.0) / n,
            "context/tokens_saved": metrics.get(prefix + "context_tokens_saved", 0.0) / n,
            "context/segments_per_episode": metrics.get(prefix + "segments", 0.0) / n,
            "context/results_dropped_per_episode": metrics.get(prefix + "tool_results_dropped", 0.0) / n}


def job_failures(job: "_GroupJob") -> list[str]:
    return [ep.traj.failure_reason for ep in job.episodes if not ep.traj.ok]


def drop_reason(failures: list[str]) -> str:
    """The ledger's reason for a group dropped after its retries, from its members' failures:
    'timeout' (an env call or the episode ran out of time), 'context' or 'env_error'."""
    causes = [f.split(":", 1)[0] for f in failures if not f.startswith("cancelled")]
    if any(c in ("timeout", "episode_timeout") for c in causes):
        return "timeout"
    if "context" in causes:
        return "context"
    return "env_error"


class GroupSink(Protocol):
    """Where finished groups go as they complete: `forge.middleware.pool.DataPool` fits."""

    def try_start(self, task_id: str) -> bool:
        """Register a task about to run; False means full, try again later."""
        ...

    def put(self, group: Group) -> None:
        """Deliver the complete group of a started task."""
        ...

    def abandon(self, task_id: str) -> None:
        """Forget a started task whose group was dropped after its retries."""
        ...


@dataclass
class _GroupJob:
    seed: int
    attempt: int
    episodes: list[Episode] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(ep.done for ep in self.episodes)


class RolloutWorker:
    """Runs groups of episodes of one env class against one generator."""

    def __init__(
        self, make_env: Callable[[], Any], generator: Generator, tokenizer: Tokenizer,
        cfg: RolloutConfig, env_name: str = "env",
    ) -> None:
        if cfg.group_size < 1 or cfg.concurrency < 1:
            raise ValueError(f"rollout.group_size ({cfg.group_size}) and rollout.concurrency ({cfg.concurrency}) must be >= 1")
        self.make_env = make_env
        self.generator = generator
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.env_name = env_name
        stops = (tokenizer.eos_id, tokenizer.token_id("</answer>"))
        self.params = cfg.sampling_params(stop_token_ids=stops)
        self.rules = context_rules(cfg)
        self._pool = ThreadPoolExecutor(max_workers=min(cfg.concurrency, 64), thread_name_prefix="forge-env")

    def run(self, seeds: Sequence[int], sink: GroupSink | None = None) -> RolloutResult:
        """One complete group per seed that succeeds within its retries; dropped ones are counted.

        Without a sink the groups are returned. With one (the data pool) each task is registered
        with `sink.try_start` before it starts, waiting while the sink is full, and each group
        goes to `sink.put` as soon as it is complete, or `sink.abandon` when it is dropped; the
        result then holds only the counters.
        """
        stats = RolloutStats()
        dropped: list[tuple[str, str]] = []
        queue: deque[_GroupJob] = deque(_GroupJob(int(s), 0) for s in seeds)
        active: list[_GroupJob] = []
        groups: list[Group] = []
        while queue or active:
            # A group starts only when all of it fits, so every group advances together.
            while queue and (not active or self._in_flight(active) + self.cfg.group_size <= self.cfg.concurrency):
                job = queue[0]
                if job.attempt == 0 and sink is not None and not sink.try_start(self.task_id(job.seed)):
                    break
                queue.popleft()
                self._start(job)
                active.append(job)
            if not active:
                # The sink is full and nothing here is running: wait for the trainer to take some.
                time.sleep(self.cfg.backpressure_wait_s)
                continue
            self._advance(active, stats)
            for job in [j for j in active if j.done]:
                active.remove(job)
                outcome = self._close(job, stats)
                if isinstance(outcome, _GroupJob):
                    queue.appendleft(outcome)
                elif isinstance(outcome, Group) and sink is not None:
                    sink.put(outcome)
                elif isinstance(outcome, Group):
                    groups.append(outcome)
                else:
                    dropped.append((self.task_id(job.seed), drop_reason(job_failures(job))))
                    if sink is not None:
                        sink.abandon(self.task_id(job.seed))
        return RolloutResult(groups, stats, dropped)

    def task_id(self, seed: int) -> str:
        """The task id of a seed: equal across a group and its retries."""
        return f"{self.env_name}:{seed}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _in_flight(self, active: list[_GroupJob]) -> int:
        return sum(1 for j in active for ep in j.episodes if not ep.done)

    def _start(self, job: _GroupJob) -> None:
        task_id = self.task_id(job.seed)
        group_id = f"{task_id}#{job.attempt}"

        def start(_: int) -> Episode:
            return start_episode(self.make_env, job.seed, self.tokenizer, task_id=task_id,
                                 group_id=group_id, timeout_s=self.cfg.turn_timeout_s, rules=self.rules)

        job.episodes = list(self._pool.map(start, range(self.cfg.group_size)))

    def _advance(self, active: list[_GroupJob], stats: RolloutStats) -> None:
        """One round: a batched generate for every waiting episode, then their env steps."""
        waiting: list[Episode] = []
        for job in active:
            # The group reruns anyway once a member failed: stop spending turns on the rest.
            if any(not ep.traj.ok for ep in job.episodes):
                for ep in job.episodes:
                    if not ep.done:
                        ep.fail("cancelled: another member of the group failed")
        for ep in (ep for j in active for ep in j.episodes if not ep.done):
            if time.monotonic() - ep.started > self.cfg.episode_timeout_s:
                ep.fail(f"episode_timeout: the episode ran past {self.cfg.episode_timeout_s} s")
            elif len(ep.context) + self.params.max_new_tokens > self.cfg.max_context_tokens and not ep.turn_count:
                ep.fail(f"context: the prompt's {len(ep.context)} tokens leave no room for {self.params.max_new_tokens} "
                        f"new ones in rollout.max_context_tokens={self.cfg.max_context_tokens}; raise it or shorten the task")
            elif len(ep.context) + self.params.max_new_tokens > self.cfg.max_context_tokens and out_of_room(ep, self.tokenizer):
                # Out of room after some turns: the episode ends truncated, like at its turn limit.
                # No turn reads the last observation, so it is not kept: a flooding tool cannot
                # make a trajectory longer than rollout.max_context_tokens (and the trainer's budget).
                # With rollout.context.on_full 'ask' a notice asked to compact first (out_of_room).
                ep.done = True
            else:
                waiting.append(ep)
        if not waiting:
            return
        t0 = time.monotonic()
        completions = self.generator.generate([ep.context for ep in waiting], self.params)
        gen_s = time.monotonic() - t0
        stats.generate_s += gen_s
        if len(completions) != len(waiting):
            raise RuntimeError(
                f"the generator returned {len(completions)} completions for {len(waiting)} prompts; "
                "it must return one per prompt, in order"
            )
        t0 = time.monotonic()
        share = gen_s / len(waiting)
        list(self._pool.map(
            lambda pair: apply_turn(pair[0], pair[1], self.tokenizer, timeout_s=self.cfg.turn_timeout_s, gen_s=share),
            zip(waiting, completions),
        ))
        stats.env_s += time.monotonic() - t0
        stats.turns += len(waiting)
        stats.sampled_tokens += sum(len(c.token_ids) for c in completions)

    def _close(self, job: _GroupJob, stats: RolloutStats) -> Group | _GroupJob | None:
        """The complete group, or the job to retry, or None when it is dropped; counts every case."""
        for ep in job.episodes:
            finish(ep)
        for ep in job.episodes:
            for seg in ep.trajectories:
                for kind, n in seg.error_counts.items():
                    stats.protocol_errors[kind] = stats.protocol_errors.get(kind, 0) + n
        # Counted per episode: the last segment holds the episode's fate.
        for t in (ep.traj for ep in job.episodes):
            if t.ok:
                stats.trajectories_ok += 1
            else:
                stats.trajectories_failed += 1
                cause = t.failure_reason.split(":", 1)[0]
                stats.failure_reasons[cause] = stats.failure_reasons.get(cause, 0) + 1
        if all(ep.traj.ok for ep in job.episodes):
            stats.groups_done += 1
            for ep in job.episodes:
                stats.episodes += 1
                stats.segments += len(ep.trajectories)
                stats.compactions += ep.compactions
                stats.context_tokens_saved += ep.tokens_saved
                stats.tool_results_dropped += ep.results_dropped
            trajs = [seg for ep in job.episodes for seg in ep.trajectories]
            return Group(trajs[0].task_id, trajs[0].group_id, trajs, attempts=job.attempt + 1)
        if job.attempt < self.cfg.max_retries:
            stats.groups_retried += 1
            return _GroupJob(job.seed, job.attempt + 1)
        stats.groups_dropped += 1
        return None
