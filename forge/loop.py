"""`forge train`: the RL loop across Ray actors, driven from one place.

The driver starts the trainer ranks, the rollout workers, an evaluation worker, the data pool
and the weight store, then loops: collect finished groups into the pool (workers keep two calls
queued so they sample while the trainer trains), take a batch in windowed-FIFO order, run one
optimizer step on every rank, publish the new weights. Workers pull weights between turns and
stamp each turn with the version that sampled it. Every fan-out to actors is written out here,
not hidden behind decorators.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import ray
import torch

from forge.agent_side.config import EnvConfig, RolloutConfig, fault_counts, load_env_class
from forge.agent_side.demos import oracle_batch
from forge.agent_side.context import context_rules
from forge.agent_side.rollout import context_metrics
from forge.agent_side.rollout_actor import RolloutActor
from forge.config import init_seed, trainer_algorithm
from forge.middleware.arrow import write_parquet
from forge.middleware.ledger import Ledger
from forge.middleware.pool import DataPool
from forge.middleware.weights import WeightStore
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.tokenizer import ByteTokenizer
from forge.run_state import Checkpointer, DriverState
from forge.trainer.trainer_actor import start_trainer_ranks

log = logging.getLogger("forge")


class SyncingGenerator:
    """A `ModelGenerator` that pulls newer weights from the store before each batch of turns,
    until `pin` fixes the version it samples with."""

    def __init__(self, model_cfg: ModelConfig, store: Any, seed: int, precision: str = "fp32",
                 prefix_cache_tokens: int = 0, record_choices: bool = False) -> None:
        self.store = store
        model = Transformer(model_cfg)
        if torch.cuda.is_available():
            # Ray hides every GPU from an actor that asked for none (rollout.actor_num_gpus).
            # On a GPU the policy samples in the trainer's precision, so that the sampler's
            # logprobs and the trainer's differ as little as the two code paths allow.
            model = model.cuda().to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.inner = ModelGenerator(model, ByteTokenizer(), seed=seed, policy_version=-1,
                                    prefix_cache_tokens=prefix_cache_tokens, record_choices=record_choices)
        self.sync_s = 0.0
        self.pinned = False
        """Whether `pin` fixed the version: then `generate` no longer pulls newer weights."""

    def pin(self, version: int, seed: int) -> None:
        """Sample with weights `version` from now on, the sampler restarted at `seed`."""
        if version != self.inner.policy_version:
            self._load(version, ray.get(self.store.get.remote(version)))
        self.inner.reseed(seed)
        self.pinned = True

    def generate(self, prompts, params):
        if not self.pinned:
            latest = ray.get(self.store.latest.remote(self.inner.policy_version))
            if latest is not None:
                self._load(*latest)
        return self.inner.generate(prompts, params)

    def _load(self, version: int, payload: list) -> None:
        t0 = time.perf_counter()
        (ref,) = payload
        self.inner.model.load_state_dict(ray.get(ref))
        self.inner.policy_version = version
        self.sync_s += time.perf_counter() - t0


def _make_generator(model_cfg: ModelConfig, store: Any, seed: int, precision: str = "fp32",
                    prefix_cache_tokens: int = 0, record_choices: bool = False) -> SyncingGenerator:
    return SyncingGenerator(model_cfg, store, seed, precision, prefix_cache_tokens, record_choices)


MAX_WORKER_DEATHS_IN_A_ROW = 3
"""A rollout worker slot whose actors die this often without a call returning stops the run."""


@dataclass
class _Rollouts:
    """Rollout workers, their queued `run` calls (ref -> (worker index, seeds, actor)) and the ledger."""

    workers: list
    pending: dict
    per_call: int
    """Groups per `run` call: enough to fill a worker's concurrency."""
    seed_base: int
    """Training task seeds are seed_base + a counter, so runs with other seeds see other tasks."""
    start_worker: Callable[[int], Any]
    """A fresh actor for worker slot i (the first ones, and replacements of dead ones)."""
    task_name: str
    """Task ids are '<task_name>:<seed>', as the workers name them."""
    ledger: Ledger
    reissue: deque = field(default_factory=deque)
    """Seeds to run again before new ones: in flight at a resumed checkpoint, or on a dead worker."""
    restarts: int = 0
    deaths_in_a_row: dict = field(default_factory=dict)
    """Per worker slot, deaths since its last call that returned."""

    def task_id(self, seed: int) -> str:
        return f"{self.task_name}:{seed}"

    def replace_dead(self, w: int, actor: Any, exc: Exception) -> None:
        """Start a fresh actor in slot w after `actor`, its actor, died (Ray's RayActorError). A
        failed call of an actor already replaced (its other queued calls) replaces nothing."""
        if self.workers[w] is not actor:
            return
        reason = str(exc).splitlines()[0][:300]
        self.deaths_in_a_row[w] = self.deaths_in_a_row.get(w, 0) + 1
        if self.deaths_in_a_row[w] > MAX_WORKER_DEATHS_IN_A_ROW:
            raise RuntimeError(f"rollout worker {w} died {self.deaths_in_a_row[w]} times in a row, the last time: "
                               f"{reason}; a worker that cannot start or run is not a transient fault: fix the cause "
                               "(forge.log and Ray's logs under /tmp/ray/session_latest/logs say more), then --resume")
        log.warning("rollout worker %d died (%s); starting a new one and running its groups again", w, reason)
        self.workers[w] = self.start_worker(w)
        self.restarts += 1

    def returned(self, w: int) -> None:
        self.deaths_in_a_row[w] = 0


def train(cfg: Any, run, monitor, state: DriverState, checkpointer: Checkpointer) -> DriverState:
    """Run warm-start (if due) and RL until `cfg.train.steps`; returns the final driver state."""
    load_env_class(cfg.env.cls)
    fixed_lag = cfg.train.rollout_schedule == "fixed_lag"
    pool = ray.remote(DataPool).options(num_cpus=0).remote(cfg.pool)
    # Under the fixed-lag schedule a queued call may sample with a version max_staleness steps old.
    store = ray.remote(WeightStore).options(num_cpus=0).remote(cfg.pool.max_staleness + 1 if fixed_lag else 1)
    ranks = start_trainer_ranks(cfg.model, cfg.trainer, trainer_algorithm(cfg), init_seed(cfg))
    if state.step > 0 or state.warm_start_done:
        client = ray.get([r.call.remote("load", str(run.checkpoints), state.tag) for r in ranks])[0]
        ray.get(pool.load_state_dict.remote(client["pool"]))
    ledger = Ledger(run.path / "ledger.jsonl")
    if state.step > 0 or state.warm_start_done:
        # A resume: what was written after the checkpoint happens again from here.
        ledger.trim(state.step)
    rollouts = _start_rollouts(cfg, store, state, ledger)
    evaluator = _start_evaluator(cfg, store)
    _record_placement(run, ranks, rollouts.workers)
    publish_s = _publish(ranks, store, state.version, _keeps(cfg))
    if not state.warm_start_done:
        _warm_start(cfg, ranks, monitor, evaluator, store, state)
        state.warm_start_done = True
        state.version += 1
        publish_s = _publish(ranks, store, state.version, _keeps(cfg))
    # Warm-start takes the run's first steps; RL step k is logged as step warm_start.steps + k
    # (also when warm-start stopped early at its target_reward).
    base = cfg.warm_start.steps
    if state.step == 0 and not state.evals:
        _evaluate(cfg, evaluator, monitor, state, base)
    schedule = _FixedLagSchedule(cfg, rollouts) if fixed_lag else _AsyncSchedule(cfg, rollouts, pool)
    schedule.start(state)
    with monitor.progress(cfg.train.steps, "rl steps", initial=state.step) as bar:
        while state.step < cfg.train.steps:
            t_wait = time.perf_counter()
            groups, rollout_metrics = schedule.next_batch(state)
            wait_s = time.perf_counter() - t_wait
            if cfg.train.keep_rollouts:
                write_parquet(groups, run.path / "rollouts" / f"step-{state.step + 1:06d}.parquet")
            metrics = _train_step(ranks, groups, state, cfg.trainer.lr_at(state.step, cfg.train.steps))
            state.step += 1
            for g in groups:
                ledger.trained(g.task_id, state.step, len(g.episodes))
            state.version += 1
            publish_s = _publish(ranks, store, state.version, _keeps(cfg))
            schedule.published(state)
            metrics.update(rollout_metrics)
            if rollout_metrics.get("rollout/generate_s"):
                # Summed over the worker calls behind this step's groups (fixed_lag) or those that
                # finished since the last step (async): per worker-second.
                metrics["rollout/tokens_per_s"] = rollout_metrics["rollout/sampled_tokens"] / rollout_metrics["rollout/generate_s"]
            if cfg.rollout.context.enabled or rollout_metrics.get("rollout/segments", 0) > rollout_metrics.get("rollout/episodes", 0):
                metrics.update(context_metrics(rollout_metrics))
            metrics.update(schedule.stats(state))
            metrics["rollout/workers_restarted"] = float(rollouts.restarts)
            metrics.update({"time/rollout_wait_s": wait_s, "time/weights_publish_s": publish_s,
                            "train/staleness_mean": sum(state.version - 1 - g.min_policy_version for g in groups) / len(groups)})
            metrics["train/rl_step"] = float(state.step)
            monitor.log(metrics, step=base + state.step)
            _log_samples(monitor, groups, base + state.step, cfg)
            for name, load in ray.get(ranks[0].call.remote("router_loads")).items():
                monitor.histogram(name, load, base + state.step)
            monitor.histogram("mismatch/log_ratio", ray.get(ranks[0].call.remote("mismatch_log_ratios")), base + state.step)
            if state.step % cfg.eval.every == 0 or state.step == cfg.train.steps:
                _evaluate(cfg, evaluator, monitor, state, base)
            if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
                # Rows up to this step must be on disk before the checkpoint says it is done.
                monitor.flush()
                ledger.checkpoint(state.step, checkpointer.save(ranks, pool, state))
            bar.update()
    ledger.end_run(state.step)
    return state


class _AsyncSchedule:
    """`train.rollout_schedule: async`: workers keep two calls queued and pull the newest weights
    between turns; groups go to the data pool as they finish and each step takes
    `groups_per_step` of them in windowed-FIFO order, dropping those staler than
    `pool.max_staleness`. Fastest, but which groups a step trains on, and which weights sampled
    them, depend on how long everything takes."""

    def __init__(self, cfg: Any, rollouts: _Rollouts, pool: Any) -> None:
        self.cfg, self.rollouts, self.pool = cfg, rollouts, pool

    def start(self, state: DriverState) -> None:
        # After a resume, tasks that were in flight at the checkpoint run again, before new ones.
        held = set(ray.get(self.pool.held_task_ids.remote()))
        r = self.rollouts
        r.reissue.extend(int(g.rsplit(":", 1)[1]) for g in r.ledger.open_groups() if g not in held)
        for w in range(len(r.workers)):
            for _ in range(2):
                _submit(r, w, self.pool, state)

    def next_batch(self, state: DriverState) -> tuple[list, dict[str, float]]:
        metrics: dict[str, float] = {}
        while ray.get(self.pool.ready.remote(state.version)) < self.cfg.trainer.groups_per_step:
            _collect(self.rollouts, self.pool, state, metrics, timeout=0.2)
        _collect(self.rollouts, self.pool, state, metrics, timeout=0)
        groups = ray.get(self.pool.take.remote(self.cfg.trainer.groups_per_step, state.version))
        for task_id in ray.get(self.pool.drain_dropped.remote()):
            self.rollouts.ledger.dropped(task_id, state.step, "stale")
        return groups, metrics

    def published(self, state: DriverState) -> None:
        pass

    def stats(self, state: DriverState) -> dict[str, float]:
        return ray.get(self.pool.stats.remote(state.version))


class _FixedLagSchedule:
    """`train.rollout_schedule: fixed_lag`: rollouts overlap training by a fixed number of steps.

    RL step k+1 trains batch k: the tasks seed_base + k*n ... seed_base + k*n + n-1 (n =
    `trainer.groups_per_step`), sampled with the weights published after step k - L (L =
    `pool.max_staleness`; the warm-started weights for the first L+1 batches). Batch k is
    queued as soon as those weights exist, in calls of `per_call` groups dealt round-robin to the
    workers, each call pinned to its version and its sampler restarted at its first task seed.
    So every step trains on the same groups, sampled by the same weights, however long anything
    takes: a run repeats exactly on one machine. With L=1 the workers sample batch k+1 while the
    trainer trains batch k (one-step off-policy); with L=0 rollouts and training alternate.
    """

    def __init__(self, cfg: Any, rollouts: _Rollouts) -> None:
        self.rollouts = rollouts
        self.lag = cfg.pool.max_staleness
        self.n = cfg.trainer.groups_per_step
        self.steps = cfg.train.steps
        self.calls: dict[int, list] = {}

    def start(self, state: DriverState) -> None:
        # After a resume the groups that were in flight are gone and the weights that were to
        # sample them too: the first L+1 batches are sampled with the checkpoint's weights.
        for batch in range(state.step, state.step + self.lag + 1):
            self._submit(batch, state)

    def next_batch(self, state: DriverState) -> tuple[list, dict[str, float]]:
        results = [self._result(call, state) for call in self.calls.pop(state.step)]
        metrics: dict[str, float] = {}
        groups = []
        for result in results:
            # A call returns its groups as they finished; the batch keeps task order.
            groups.extend(sorted(result.groups, key=lambda g: int(g.task_id.rsplit(":", 1)[1])))
            for k, v in result.stats.as_metrics().items():
                metrics[k] = metrics.get(k, 0.0) + v
            for task_id, reason in result.dropped:
                self.rollouts.ledger.dropped(task_id, state.step, reason)
        if not groups:
            raise RuntimeError(f"every group of RL step {state.step + 1} was dropped after its retries "
                               f"(rollout/groups_dropped={metrics.get('rollout/groups_dropped', 0):.0f}); "
                               "forge.log and the rollout/failed/* metrics say why the episodes failed")
        return groups, metrics

    def published(self, state: DriverState) -> None:
        self._submit(state.step + self.lag, state)

    def stats(self, state: DriverState) -> dict[str, float]:
        return {}

    def _submit(self, batch: int, state: DriverState) -> None:
        if batch >= self.steps or batch in self.calls:
            return
        r = self.rollouts
        seeds = [r.seed_base + batch * self.n + i for i in range(self.n)]
        chunks = [seeds[i : i + r.per_call] for i in range(0, self.n, r.per_call)]
        r.ledger.scheduled([r.task_id(s) for s in seeds], state.step)
        self.calls[batch] = []
        for j, chunk in enumerate(chunks):
            w = (batch * len(chunks) + j) % len(r.workers)
            pin = (state.version, chunk[0])
            self.calls[batch].append((r.workers[w].run.remote(chunk, None, None, pin), w, chunk, pin, r.workers[w]))
        state.next_seed = max(state.next_seed, (batch + 1) * self.n)

    def _result(self, call: tuple, state: DriverState) -> Any:
        """A queued call's result; if its worker died, a new worker runs the same call again
        (same tasks, same pinned weights and sampler seed, so the same groups)."""
        ref, w, chunk, pin, actor = call
        while True:
            try:
                result = ray.get(ref)
                self.rollouts.returned(w)
                return result
            except ray.exceptions.RayActorError as exc:
                self.rollouts.replace_dead(w, actor, exc)
                actor = self.rollouts.workers[w]
                ref = actor.run.remote(chunk, None, None, pin)


def _start_rollouts(cfg: Any, store: Any, state: DriverState, ledger: Ledger) -> _Rollouts:
    for warning in cfg.rollout.warnings():
        log.warning(warning)
    remote = ray.remote(num_cpus=cfg.rollout.actor_num_cpus, num_gpus=cfg.rollout.actor_num_gpus,
                        resources=cfg.rollout.actor_resources or None)(RolloutActor)
    seeds = [cfg.run.seed * 1000 + i + 7919 * state.step for i in range(cfg.rollout.num_workers)]

    started = itertools.count()

    def start_worker(i: int) -> Any:
        # Named, so tools can reach a worker (benchmarks/chaos.py kills one); a replacement gets
        # a new name, since a dead actor's name may not be free yet.
        n = next(started)
        name = f"rollout-{i}" if n < cfg.rollout.num_workers else f"rollout-{i}-{n}"
        return remote.options(name=name).remote(cfg.env, cfg.rollout, partial(_make_generator, cfg.model, store, seeds[i],
                                                           cfg.trainer.precision, cfg.rollout.prefix_cache_tokens,
                                                           cfg.rollout.routing_replay),
                             agent_cfg=cfg.agent)

    workers = [start_worker(i) for i in range(cfg.rollout.num_workers)]
    per_call = max(1, cfg.rollout.concurrency // cfg.rollout.group_size)
    return _Rollouts(workers, {}, per_call, cfg.run.seed * 100_000_000, start_worker, task_name(cfg), ledger)


def task_name(cfg: Any) -> str:
    """What rollout workers call the recipe's tasks ('<name>:<seed>'): the env class's name, or
    the agent's module name (forge.agent_side.rollout_actor.RolloutActor)."""
    if cfg.agent.enabled:
        return cfg.agent.cls.split(":")[0].rsplit(".", 1)[-1]
    return cfg.env.cls.split(":")[1]


def _record_placement(run, ranks: list, workers: list) -> None:
    """Write which Ray node and GPUs each role landed on, and its process id, to placement.json."""
    def ask(actors: list, method: str) -> list:
        return ray.get([getattr(a, method).remote() for a in actors])

    def per_role(method: str) -> dict:
        return {**{f"trainer-{i}": x for i, x in enumerate(ask(ranks, method))},
                **{f"rollout-{i}": x for i, x in enumerate(ask(workers, method))}}

    placement = {"trainer": ask(ranks, "node_id"), "rollout": ask(workers, "node_id"),
                 "gpus": per_role("gpu_ids"), "pids": per_role("pid")}
    (run.path / "placement.json").write_text(json.dumps(placement, indent=2))
    nodes = len(set(placement["trainer"]) | set(placement["rollout"]))
    log.info("placed %d trainer ranks and %d rollout workers on %d node(s)", len(ranks), len(workers), nodes)


def _start_evaluator(cfg: Any, store: Any):
    eval_rollout = RolloutConfig(**{**vars(cfg.rollout), "group_size": 1, "temperature": cfg.eval.temperature,
                                    "concurrency": max(1, cfg.eval.num_tasks), "max_retries": 1})
    remote = ray.remote(num_cpus=0, num_gpus=cfg.rollout.actor_num_gpus)(RolloutActor)
    generator = partial(_make_generator, cfg.model, store, cfg.run.seed + 17, cfg.trainer.precision,
                        cfg.rollout.prefix_cache_tokens)
    return remote.remote(cfg.env, eval_rollout, generator, agent_cfg=cfg.agent)


def _submit(rollouts: _Rollouts, w: int, pool: Any, state: DriverState, seeds: list[int] | None = None) -> None:
    """Queue one `run` call on worker w; its groups go straight to the pool as they finish.
    Without `seeds`: those to run again first, then new ones."""
    if seeds is None:
        seeds = []
        while rollouts.reissue and len(seeds) < rollouts.per_call:
            seeds.append(rollouts.reissue.popleft())
        fresh = rollouts.per_call - len(seeds)
        seeds += [rollouts.seed_base + state.next_seed + i for i in range(fresh)]
        state.next_seed += fresh
    rollouts.ledger.scheduled([rollouts.task_id(s) for s in seeds], state.step)
    actor = rollouts.workers[w]
    rollouts.pending[actor.run.remote(seeds, pool)] = (w, seeds, actor)


def _collect(rollouts: _Rollouts, pool: Any, state: DriverState, metrics: dict[str, float], *, timeout: float) -> None:
    """Add the counters of finished worker calls to `metrics` and queue those workers again."""
    ready, _ = ray.wait(list(rollouts.pending), num_returns=len(rollouts.pending), timeout=timeout)
    for ref in ready:
        w, seeds, actor = rollouts.pending.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            # The worker died: its groups not yet delivered to the pool run again on a new one.
            rollouts.replace_dead(w, actor, exc)
            undelivered = set(ray.get(pool.abandon_unfinished.remote([rollouts.task_id(s) for s in seeds])))
            _submit(rollouts, w, pool, state, [s for s in seeds if rollouts.task_id(s) in undelivered])
            continue
        rollouts.returned(w)
        for k, v in result.stats.as_metrics().items():
            metrics[k] = metrics.get(k, 0.0) + v
        for task_id, reason in result.dropped:
            rollouts.ledger.dropped(task_id, state.step, reason)
        _submit(rollouts, w, pool, state)


def _train_step(ranks: list, groups: list, state: DriverState, lr: float) -> dict[str, float]:
    # Whole groups per rank: group-relative advantages never straddle ranks.
    shards = [groups[r::len(ranks)] for r in range(len(ranks))]
    results = ray.get([rank.call.remote("train_step", shard, lr) for rank, shard in zip(ranks, shards)])
    return results[0]


def _keeps(cfg: Any) -> bool:
    return cfg.algorithm.mismatch_weights == "sampling"


def _publish(ranks: list, store: Any, version: int, keep: bool = False) -> float:
    """Publish rank 0's weights as `version`; with `keep` (algorithm.mismatch_weights 'sampling')
    every rank also keeps a copy, to score that version's samples with."""
    t0 = time.perf_counter()
    # Every rank joins (ZeRO-3 gathers the shards collectively); only rank 0's copy travels.
    refs = [ranks[0].call.remote("weights")] + [r.call.remote("weights", False) for r in ranks[1:]]
    weights = ray.get(refs)[0]
    # A list keeps Ray from resolving the ref when it is passed to the store.
    ray.get(store.publish.remote(version, [ray.put(weights)]))
    if keep:
        ray.get([r.call.remote("published", version) for r in ranks])
    return time.perf_counter() - t0


def _warm_start(cfg: Any, ranks: list, monitor, evaluator: Any, store: Any, state: DriverState) -> None:
    ws = cfg.warm_start
    if ws.steps <= 0:
        return
    tokenizer = ByteTokenizer()
    make_env = cfg.env.make
    with monitor.progress(ws.steps, "warm-start") as bar:
        for step in range(ws.steps):
            start = ws.seed_offset + step * ws.batch_size
            demo_stats: dict[str, int] = {}
            injected = sum(fault_counts(cfg.env).values())
            seqs, masks = oracle_batch(make_env, range(start, start + ws.batch_size), tokenizer, stats=demo_stats,
                                       rules=context_rules(cfg.rollout))
            injected = sum(fault_counts(cfg.env).values()) - injected
            shard = len(ranks)
            lr = ws.lr_at(step)
            results = ray.get([r.call.remote("sft_step", seqs[i::shard], masks[i::shard], lr)
                               for i, r in enumerate(ranks)])
            metrics = {**results[0], "warmstart/lr": lr}
            if demo_stats.get("demos_failed") or injected:
                # Demonstrations whose episode failed (env faults) and were replaced by spare seeds.
                metrics["warmstart/demos_failed"] = float(demo_stats.get("demos_failed", 0))
                metrics["warmstart/faults_injected"] = float(injected)
            reached = False
            if ws.checks_at(step + 1):
                reward = _warm_start_check(cfg, ranks, evaluator, store, state)
                metrics["warmstart/check_reward"] = reward
                reached = reward >= ws.target_reward
                log.info("warm-start check at step %d: reward %.3f (T=%s) on %d validation tasks%s", step + 1, reward,
                         ws.check_temperature, ws.check_tasks, f", reached {ws.target_reward}: RL starts" if reached else "")
            monitor.log(metrics, step=step + 1)
            bar.update()
            if reached:
                return
    if ws.target_reward is not None:
        log.warning("warm-start ran all %d steps without reaching warm_start.target_reward=%s; RL starts anyway "
                    "(raise warm_start.steps, or lower the target)", ws.steps, ws.target_reward)


def _warm_start_check(cfg: Any, ranks: list, evaluator: Any, store: Any, state: DriverState) -> float:
    """Reward of the current weights on warm-start's validation tasks (not the evaluation's)."""
    ws = cfg.warm_start
    state.version += 1
    _publish(ranks, store, state.version, _keeps(cfg))
    seeds = [ws.check_seed_offset + i for i in range(ws.check_tasks)]
    result = ray.get(evaluator.run.remote(seeds, None, ws.check_temperature, _eval_pin(cfg, state)))
    return _eval_rewards(result, "")[0]


def _evaluate(cfg: Any, evaluator: Any, monitor, state: DriverState, base: int) -> None:
    seeds = [cfg.eval.seed_offset + i for i in range(cfg.eval.num_tasks)]
    t0 = time.perf_counter()
    pin = _eval_pin(cfg, state)
    mean, metrics = _eval_rewards(ray.get(evaluator.run.remote(seeds, None, None, pin)), "eval/")
    note = ""
    if cfg.eval.greedy_too and cfg.eval.temperature > 0:
        greedy, more = _eval_rewards(ray.get(evaluator.run.remote(seeds, None, 0.0, pin)), "eval/greedy_")
        metrics.update(more)
        state.greedy_evals.append((state.step, greedy))
        note = f" (greedy {greedy:.3f})"
    metrics["eval/time_s"] = time.perf_counter() - t0
    monitor.log(metrics, step=base + state.step)
    state.evals.append((state.step, mean))
    log.info("eval at step %d: reward %.3f%s on %d held-out tasks", state.step, mean, note, int(metrics["eval/tasks"]))


def _eval_pin(cfg: Any, state: DriverState) -> tuple[int, int]:
    """The evaluator's pin: the current weights, the sampler restarted at one seed, so an
    evaluation depends on the weights only and evaluations of one run differ by what the policy
    learned, not by sampling."""
    return state.version, cfg.run.seed + 17


def _eval_rewards(result: Any, prefix: str) -> tuple[float, dict[str, float]]:
    rewards = [r for g in result.groups for r in g.episode_rewards]
    mean = sum(rewards) / max(1, len(rewards))
    context = {f"{prefix}{k.split('/', 1)[1]}": v for k, v in context_metrics(result.stats.as_metrics()).items()
               if prefix and result.stats.segments > result.stats.episodes}
    return mean, {f"{prefix}reward_mean": mean, f"{prefix}pass_rate": sum(r >= 1.0 for r in rewards) / max(1, len(rewards)),
                  f"{prefix}tasks": float(len(rewards)), **context}


def _log_samples(monitor, groups: list, step: int, cfg: Any) -> None:
    from forge.trainer.advantages import group_advantages

    # The advantages the trainer used: over episodes, or over segments (algorithm.segment_weighting).
    per = "episode_rewards" if cfg.algorithm.segment_weighting == "episode" else "rewards"
    monitor.histogram("train/advantages", group_advantages(cfg.algorithm.advantage, [getattr(g, per) for g in groups]), step)
    if step % cfg.train.table_every:
        return
    tok = ByteTokenizer()
    rows = [[g.task_id, t.reward, len(t.token_ids), tok.decode(t.token_ids[len(t.prompt_ids):])[:2000]]
            for g in groups[:2] for t in g.trajectories[:2]]
    monitor.table("samples", ["task", "reward", "tokens", "completion"], rows, step)
