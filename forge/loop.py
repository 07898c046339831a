"""`forge train`: the RL loop across Ray actors, driven from one place.

The driver starts the trainer ranks, the rollout workers, an evaluation worker, the data pool
and the weight store, then loops: collect finished groups into the pool (workers keep two calls
queued so they sample while the trainer trains), take a batch in windowed-FIFO order, run one
optimizer step on every rank, publish the new weights. Workers pull weights between turns and
stamp each turn with the version that sampled it. Every fan-out to actors is written out here,
not hidden behind decorators.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray
import torch

from forge.agent_side.config import EnvConfig, RolloutConfig, load_env_class
from forge.agent_side.demos import oracle_batch
from forge.agent_side.rollout_actor import RolloutActor
from forge.config import init_seed
from forge.middleware.arrow import write_parquet
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
    """A `ModelGenerator` that pulls newer weights from the store before each batch of turns."""

    def __init__(self, model_cfg: ModelConfig, store: Any, seed: int, precision: str = "fp32",
                 prefix_cache_tokens: int = 0) -> None:
        self.store = store
        model = Transformer(model_cfg)
        if torch.cuda.is_available():
            # Ray hides every GPU from an actor that asked for none (rollout.actor_num_gpus).
            # On a GPU the policy samples in the trainer's precision, so that the sampler's
            # logprobs and the trainer's differ as little as the two code paths allow.
            model = model.cuda().to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.inner = ModelGenerator(model, ByteTokenizer(), seed=seed, policy_version=-1,
                                    prefix_cache_tokens=prefix_cache_tokens)
        self.sync_s = 0.0

    def generate(self, prompts, params):
        latest = ray.get(self.store.latest.remote(self.inner.policy_version))
        if latest is not None:
            t0 = time.perf_counter()
            version, (ref,) = latest
            self.inner.model.load_state_dict(ray.get(ref))
            self.inner.policy_version = version
            self.sync_s += time.perf_counter() - t0
        return self.inner.generate(prompts, params)


def _make_generator(model_cfg: ModelConfig, store: Any, seed: int, precision: str = "fp32",
                    prefix_cache_tokens: int = 0) -> SyncingGenerator:
    return SyncingGenerator(model_cfg, store, seed, precision, prefix_cache_tokens)


@dataclass
class _Rollouts:
    """Rollout workers and their queued `run` calls (ref -> worker index)."""

    workers: list
    pending: dict
    per_call: int
    """Groups per `run` call: enough to fill a worker's concurrency."""
    seed_base: int
    """Training task seeds are seed_base + a counter, so runs with other seeds see other tasks."""


def train(cfg: Any, run, monitor, state: DriverState, checkpointer: Checkpointer) -> DriverState:
    """Run warm-start (if due) and RL until `cfg.train.steps`; returns the final driver state."""
    load_env_class(cfg.env.cls)
    pool = ray.remote(DataPool).options(num_cpus=0).remote(cfg.pool)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    ranks = start_trainer_ranks(cfg.model, cfg.trainer, cfg.algorithm, init_seed(cfg))
    if state.step > 0 or state.warm_start_done:
        client = ray.get([r.call.remote("load", str(run.checkpoints), state.tag) for r in ranks])[0]
        ray.get(pool.load_state_dict.remote(client["pool"]))
    rollouts = _start_rollouts(cfg, store, state)
    evaluator = _start_evaluator(cfg, store)
    _record_placement(run, ranks, rollouts.workers)
    publish_s = _publish(ranks, store, state.version)
    if not state.warm_start_done:
        _warm_start(cfg, ranks, monitor)
        state.warm_start_done = True
        state.version += 1
        publish_s = _publish(ranks, store, state.version)
    # Warm-start takes the run's first steps; RL step k is logged as step warm_start.steps + k.
    base = cfg.warm_start.steps
    if state.step == 0 and not state.evals:
        _evaluate(cfg, evaluator, monitor, state, base)
    for w in range(len(rollouts.workers)):
        for _ in range(2):
            _submit(rollouts, w, pool, state)
    with monitor.progress(cfg.train.steps, "rl steps", initial=state.step) as bar:
        while state.step < cfg.train.steps:
            t_wait = time.perf_counter()
            rollout_metrics: dict[str, float] = {}
            while ray.get(pool.ready.remote(state.version)) < cfg.trainer.groups_per_step:
                _collect(rollouts, pool, state, rollout_metrics, timeout=0.2)
            _collect(rollouts, pool, state, rollout_metrics, timeout=0)
            wait_s = time.perf_counter() - t_wait
            groups = ray.get(pool.take.remote(cfg.trainer.groups_per_step, state.version))
            if cfg.train.keep_rollouts:
                write_parquet(groups, run.path / "rollouts" / f"step-{state.step + 1:06d}.parquet")
            metrics = _train_step(ranks, groups, state)
            state.step += 1
            state.version += 1
            publish_s = _publish(ranks, store, state.version)
            metrics.update(rollout_metrics)
            if rollout_metrics.get("rollout/generate_s"):
                # Summed over the workers' calls that finished since the last step: per worker-second.
                metrics["rollout/tokens_per_s"] = rollout_metrics["rollout/sampled_tokens"] / rollout_metrics["rollout/generate_s"]
            metrics.update(ray.get(pool.stats.remote(state.version)))
            metrics.update({"time/rollout_wait_s": wait_s, "time/weights_publish_s": publish_s,
                            "train/staleness_mean": sum(state.version - 1 - g.min_policy_version for g in groups) / len(groups)})
            metrics["train/rl_step"] = float(state.step)
            monitor.log(metrics, step=base + state.step)
            _log_samples(monitor, groups, base + state.step, cfg)
            for name, load in ray.get(ranks[0].call.remote("router_loads")).items():
                monitor.histogram(name, load, base + state.step)
            if state.step % cfg.eval.every == 0 or state.step == cfg.train.steps:
                _evaluate(cfg, evaluator, monitor, state, base)
            if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
                # Rows up to this step must be on disk before the checkpoint says it is done.
                monitor.flush()
                checkpointer.save(ranks, pool, state)
            bar.update()
    return state


def _start_rollouts(cfg: Any, store: Any, state: DriverState) -> _Rollouts:
    remote = ray.remote(num_cpus=cfg.rollout.actor_num_cpus, num_gpus=cfg.rollout.actor_num_gpus,
                        resources=cfg.rollout.actor_resources or None)(RolloutActor)
    seeds = [cfg.run.seed * 1000 + i + 7919 * state.step for i in range(cfg.rollout.num_workers)]
    workers = [
        remote.remote(cfg.env, cfg.rollout, partial(_make_generator, cfg.model, store, seed, cfg.trainer.precision,
                                                        cfg.rollout.prefix_cache_tokens))
        for seed in seeds
    ]
    per_call = max(1, cfg.rollout.concurrency // cfg.rollout.group_size)
    return _Rollouts(workers, {}, per_call, cfg.run.seed * 100_000_000)


def _record_placement(run, ranks: list, workers: list) -> None:
    """Write which Ray node each role landed on to placement.json in the run folder."""
    placement = {"trainer": ray.get([r.node_id.remote() for r in ranks]),
                 "rollout": ray.get([w.node_id.remote() for w in workers])}
    (run.path / "placement.json").write_text(json.dumps(placement, indent=2))
    nodes = len(set(placement["trainer"]) | set(placement["rollout"]))
    log.info("placed %d trainer ranks and %d rollout workers on %d node(s)", len(ranks), len(workers), nodes)


def _start_evaluator(cfg: Any, store: Any):
    eval_rollout = RolloutConfig(**{**vars(cfg.rollout), "group_size": 1, "temperature": cfg.eval.temperature,
                                    "concurrency": max(1, cfg.eval.num_tasks), "max_retries": 1})
    remote = ray.remote(num_cpus=0, num_gpus=cfg.rollout.actor_num_gpus)(RolloutActor)
    generator = partial(_make_generator, cfg.model, store, cfg.run.seed + 17, cfg.trainer.precision,
                        cfg.rollout.prefix_cache_tokens)
    return remote.remote(cfg.env, eval_rollout, generator)


def _submit(rollouts: _Rollouts, w: int, pool: Any, state: DriverState) -> None:
    """Queue one `run` call on worker w; its groups go straight to the pool as they finish."""
    seeds = [rollouts.seed_base + state.next_seed + i for i in range(rollouts.per_call)]
    state.next_seed += len(seeds)
    rollouts.pending[rollouts.workers[w].run.remote(seeds, pool)] = w


def _collect(rollouts: _Rollouts, pool: Any, state: DriverState, metrics: dict[str, float], *, timeout: float) -> None:
    """Add the counters of finished worker calls to `metrics` and queue those workers again."""
    ready, _ = ray.wait(list(rollouts.pending), num_returns=len(rollouts.pending), timeout=timeout)
    for ref in ready:
        w = rollouts.pending.pop(ref)
        for k, v in ray.get(ref).stats.as_metrics().items():
            metrics[k] = metrics.get(k, 0.0) + v
        _submit(rollouts, w, pool, state)


def _train_step(ranks: list, groups: list, state: DriverState) -> dict[str, float]:
    # Whole groups per rank: group-relative advantages never straddle ranks.
    shards = [groups[r::len(ranks)] for r in range(len(ranks))]
    results = ray.get([rank.call.remote("train_step", shard) for rank, shard in zip(ranks, shards)])
    return results[0]


def _publish(ranks: list, store: Any, version: int) -> float:
    t0 = time.perf_counter()
    weights = ray.get(ranks[0].call.remote("weights"))
    # A list keeps Ray from resolving the ref when it is passed to the store.
    ray.get(store.publish.remote(version, [ray.put(weights)]))
    return time.perf_counter() - t0


def _warm_start(cfg: Any, ranks: list, monitor) -> None:
    ws = cfg.warm_start
    if ws.steps <= 0:
        return
    tokenizer = ByteTokenizer()
    make_env = cfg.env.make
    with monitor.progress(ws.steps, "warm-start") as bar:
        for step in range(ws.steps):
            start = ws.seed_offset + step * ws.batch_size
            seqs, masks = oracle_batch(make_env, range(start, start + ws.batch_size), tokenizer)
            shard = len(ranks)
            results = ray.get([r.call.remote("sft_step", seqs[i::shard], masks[i::shard], ws.lr)
                               for i, r in enumerate(ranks)])
            monitor.log(results[0], step=step + 1)
            bar.update()


def _evaluate(cfg: Any, evaluator: Any, monitor, state: DriverState, base: int) -> None:
    seeds = [cfg.eval.seed_offset + i for i in range(cfg.eval.num_tasks)]
    t0 = time.perf_counter()
    mean, metrics = _eval_rewards(ray.get(evaluator.run.remote(seeds)), "eval/")
    note = ""
    if cfg.eval.greedy_too and cfg.eval.temperature > 0:
        greedy, more = _eval_rewards(ray.get(evaluator.run.remote(seeds, None, 0.0)), "eval/greedy_")
        metrics.update(more)
        state.greedy_evals.append((state.step, greedy))
        note = f" (greedy {greedy:.3f})"
    metrics["eval/time_s"] = time.perf_counter() - t0
    monitor.log(metrics, step=base + state.step)
    state.evals.append((state.step, mean))
    log.info("eval at step %d: reward %.3f%s on %d held-out tasks", state.step, mean, note, int(metrics["eval/tasks"]))


def _eval_rewards(result: Any, prefix: str) -> tuple[float, dict[str, float]]:
    rewards = [t.reward for g in result.groups for t in g.trajectories]
    mean = sum(rewards) / max(1, len(rewards))
    return mean, {f"{prefix}reward_mean": mean, f"{prefix}pass_rate": sum(r >= 1.0 for r in rewards) / max(1, len(rewards)),
                  f"{prefix}tasks": float(len(rewards))}


def _log_samples(monitor, groups: list, step: int, cfg: Any) -> None:
    from forge.trainer.advantages import group_advantages

    monitor.histogram("train/advantages", group_advantages(cfg.algorithm.advantage, [g.rewards for g in groups]), step)
    if step % cfg.train.table_every:
        return
    tok = ByteTokenizer()
    rows = [[g.task_id, t.reward, len(t.token_ids), tok.decode(t.token_ids[len(t.prompt_ids):])[:2000]]
            for g in groups[:2] for t in g.trajectories[:2]]
    monitor.table("samples", ["task", "reward", "tokens", "completion"], rows, step)
