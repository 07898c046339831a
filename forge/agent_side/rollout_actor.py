"""Rollout workers as Ray actors: a thin wrapper around `RolloutWorker`, and the fan-out to them.

Ray is imported here only. Each actor builds its own env factory and generator from picklable
pieces (the env config and a generator factory), so nothing unpicklable crosses the boundary;
only `Group`s and `RolloutStats` come back.
"""

from __future__ import annotations

import os

from dataclasses import replace
from typing import Any, Callable, Sequence

import ray

from forge.agent_side.config import AgentConfig, EnvConfig, RolloutConfig, fault_counts, load_env_class
from forge.agent_side.rollout import RolloutResult, RolloutStats, RolloutWorker
from forge.middleware.types import Group
from forge.policy.sampling import Generator
from forge.policy.tokenizer import ByteTokenizer, Tokenizer


class RolloutActor:
    """One rollout worker in its own process; start them with `start_rollout_actors`."""

    def __init__(
        self, env_cfg: EnvConfig, rollout_cfg: RolloutConfig,
        make_generator: Callable[[], Generator], make_tokenizer: Callable[[], Tokenizer] = ByteTokenizer,
        agent_cfg: AgentConfig | None = None,
    ) -> None:
        self.env_cfg = None if agent_cfg is not None and agent_cfg.enabled else env_cfg
        if agent_cfg is not None and agent_cfg.enabled:
            # A black-box agent in place of the env: same interface, episodes through a gateway.
            from forge.agent_side.agent import AgentRolloutWorker

            name = agent_cfg.cls.split(":")[0].rsplit(".", 1)[-1]
            self.worker = AgentRolloutWorker(agent_cfg, make_generator(), make_tokenizer(), rollout_cfg, name=name)
        else:
            # Resolve the class once here so a bad reference fails the actor's start, not every episode.
            load_env_class(env_cfg.cls)
            name = env_cfg.cls.split(":")[1]
            self.worker = RolloutWorker(env_cfg.make, make_generator(), make_tokenizer(), rollout_cfg, env_name=name)
        self.stats = RolloutStats()

    def run(self, seeds: Sequence[int], pool: Any = None, temperature: float | None = None,
            pin: tuple[int, int] | None = None) -> RolloutResult:
        """Run a group per seed; with `pool` (a DataPool actor handle) groups go there as they finish.
        `temperature` overrides the recipe's for this call only (the evaluator's greedy pass).
        `pin=(version, sample_seed)` samples the whole call with that weights version and restarts
        the sampler at that seed, so the call's groups depend on nothing else (the fixed-lag
        schedule and the evaluator); the generator must then have a `pin(version, seed)` method."""
        if pin is not None:
            pin_to = getattr(self.worker.generator, "pin", None)
            if pin_to is None:
                raise TypeError(f"run(pin=...) needs a generator with a pin(version, seed) method; "
                                f"{type(self.worker.generator).__name__} has none (forge.loop.SyncingGenerator has one)")
            pin_to(*pin)
        params = self.worker.params
        if temperature is not None:
            self.worker.params = replace(params, temperature=float(temperature))
        before = dict(self._fault_counts())
        try:
            result = self.worker.run(seeds, _PoolSink(pool) if pool is not None else None)
        finally:
            self.worker.params = params
        after = self._fault_counts()
        result.stats.faults_injected = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
        self.stats.merge(result.stats)
        return result

    def _fault_counts(self) -> dict[str, int]:
        """Faults injected so far in this process by the env's fault injection (env.faults)."""
        return fault_counts(self.env_cfg) if self.env_cfg is not None else {}

    def total_stats(self) -> RolloutStats:
        return self.stats

    def node_id(self) -> str:
        """The Ray node this worker runs on (the launcher records where each role landed)."""
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray gave this worker (a fractional share names the card it shares); [] on the CPU."""
        return [str(g) for g in ray.get_gpu_ids()]

    def pid(self) -> int:
        """This worker's process id (placement.json records it; benchmarks/chaos.py kills it)."""
        return os.getpid()


class _PoolSink:
    """A `GroupSink` that forwards to a data-pool actor, one blocking call each."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def try_start(self, task_id: str) -> bool:
        return ray.get(self.handle.try_start.remote(task_id))

    def put(self, group: Group) -> None:
        ray.get(self.handle.put.remote(group))

    def abandon(self, task_id: str) -> None:
        ray.get(self.handle.abandon.remote(task_id))


def start_rollout_actors(
    env_cfg: EnvConfig, rollout_cfg: RolloutConfig, make_generator: Callable[[], Generator],
    make_tokenizer: Callable[[], Tokenizer] = ByteTokenizer,
) -> list:
    """`rollout_cfg.num_workers` actor handles; Ray must be initialised by the caller."""
    remote_cls = ray.remote(num_cpus=rollout_cfg.actor_num_cpus, num_gpus=rollout_cfg.actor_num_gpus,
                            resources=rollout_cfg.actor_resources or None)(RolloutActor)
    return [remote_cls.remote(env_cfg, rollout_cfg, make_generator, make_tokenizer) for _ in range(rollout_cfg.num_workers)]


def run_groups(actors: list, seeds: Sequence[int], pool: Any = None) -> RolloutResult:
    """Deal the seeds round-robin to the actors, run them all, and gather groups and counters.

    With `pool` (a DataPool actor handle) the groups go to the pool as they finish and the
    result holds only the counters.
    """
    if not actors:
        raise ValueError("run_groups got no actors; start them with start_rollout_actors")
    shares = [list(seeds[i :: len(actors)]) for i in range(len(actors))]
    refs = [actor.run.remote(share, pool) for actor, share in zip(actors, shares) if share]
    groups: list[Group] = []
    stats = RolloutStats()
    for result in ray.get(refs):
        groups.extend(result.groups)
        stats.merge(result.stats)
    return RolloutResult(groups, stats)
