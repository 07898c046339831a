"""Black-box agents: any program written against OpenAI's API, rolled out through the gateway.

A recipe's `agent:` section names `cls: my_pkg.my_agent:run`, an `async def run(task: dict,
client: openai.AsyncOpenAI) -> float`, and `tasks: my_pkg.my_agent:tasks`, a `tasks(seed: int)
-> dict` that gives the task of a seed. `AgentRolloutWorker` has `RolloutWorker`'s interface
(`run(seeds, sink) -> RolloutResult`, `params`, `generator`), so the loop, the data pool, the
fixed-lag schedule and the evaluator use it unchanged. Inside, it serves the gateway
(`forge.middleware.gateway`) on 127.0.0.1 in its own process, over its generator, and runs
every episode as a coroutine with a client already pointed at the gateway and its session set
(`X-Forge-Session`). An episode's calls are recorded token for token; when `run` returns its
reward, the session becomes the episode's trajectory (`session_trajectories`).

A group is G episodes of one task, as with environments. An episode fails when the agent
raises, returns something that is not a finite number, passes `rollout.episode_timeout_s`, or
makes no call; a group with a failed member is rerun up to `rollout.max_retries` times, then
dropped, never shrunk. The recipe's sampling settings (`rollout.temperature`, `top_p`,
`max_new_tokens`) override what an agent asks for, because the trainer scores every token at one
temperature (`algorithm.temperature`); an agent's `max_tokens` may only lower the budget.

Unlike an environment's episodes, which calls share a decoding step depends on timing, so two
runs of a recipe with an agent are not bitwise equal even under the fixed-lag schedule.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import numbers
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from forge.agent_side.config import AgentConfig, EnvLoadError, RolloutConfig, resolve_callable
from forge.agent_side.rollout import GroupSink, RolloutResult, RolloutStats, drop_reason
from forge.middleware.gateway.app import SESSION_HEADER, GatewayConfig, create_app
from forge.middleware.gateway.engine import BatchingEngine
from forge.middleware.gateway.server import GatewayServer
from forge.middleware.gateway.sessions import SessionStore, session_trajectories
from forge.middleware.types import Group, Trajectory
from forge.policy.sampling import Generator
from forge.policy.tokenizer import Tokenizer


def load_agent(cfg: AgentConfig) -> tuple[Callable, Callable]:
    """(run, tasks) of an agent section, checked: run is a coroutine function, tasks a callable;
    EnvLoadError (one line) if not."""
    run = resolve_callable(cfg.cls, "agent.cls")
    tasks = resolve_callable(cfg.tasks, "agent.tasks")
    if not inspect.iscoroutinefunction(run):
        raise EnvLoadError(f"agent.cls '{cfg.cls}' is not an async function; define it as "
                             "`async def run(task: dict, client: openai.AsyncOpenAI) -> float`")
    return run, tasks


@dataclass
class _Outcome:
    trajectories: list[Trajectory]
    failure: str = ""
    calls: int = 0
    sampled: int = 0


class AgentRolloutWorker:
    """Runs groups of a black-box agent's episodes against one generator, through a gateway."""

    def __init__(self, agent_cfg: AgentConfig, generator: Generator, tokenizer: Tokenizer, cfg: RolloutConfig,
                 name: str = "agent") -> None:
        if cfg.group_size < 1 or cfg.concurrency < 1:
            raise ValueError(f"rollout.group_size ({cfg.group_size}) and rollout.concurrency ({cfg.concurrency}) must be >= 1")
        self.run_fn, self.tasks_fn = load_agent(agent_cfg)
        self.agent_cfg, self.cfg, self.name = agent_cfg, cfg, name
        self.generator = generator
        self.params = cfg.sampling_params(stop_token_ids=(tokenizer.eos_id, tokenizer.token_id("</answer>")))
        """The sampling settings every call gets; the rollout actor swaps them for one `run`."""
        self.store = SessionStore()
        self.engine = BatchingEngine(generator, max_rows=max(cfg.concurrency, 1))
        gateway = GatewayConfig(model_name=agent_cfg.model_name, max_context_tokens=cfg.max_context_tokens,
                                default_max_tokens=cfg.max_new_tokens, tool_style=agent_cfg.tool_style)
        app = create_app(self.engine, tokenizer, self.store, gateway,
                         policy_version=lambda: getattr(generator, "policy_version", 0), sampling=lambda: self.params)
        self.server = GatewayServer(app).start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forge-agents", daemon=True)
        self._thread.start()

    def run(self, seeds: Sequence[int], sink: GroupSink | None = None) -> RolloutResult:
        """One complete group per seed that succeeds within its retries (see RolloutWorker.run)."""
        return asyncio.run_coroutine_threadsafe(self._run([int(s) for s in seeds], sink), self._loop).result()

    def task_id(self, seed: int) -> str:
        return f"{self.name}:{seed}"

    def close(self) -> None:
        self.server.stop()
        self.engine.close()
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _run(self, seeds: list[int], sink: GroupSink | None) -> RolloutResult:
        stats = RolloutStats()
        groups: list[Group] = []
        dropped: list[tuple[str, str]] = []
        busy0 = self.engine.stats.busy_s
        slots = asyncio.Semaphore(max(1, self.cfg.concurrency // self.cfg.group_size))

        async def one(seed: int) -> None:
            async with slots:
                task_id = self.task_id(seed)
                if sink is not None:
                    while not await asyncio.to_thread(sink.try_start, task_id):
                        await asyncio.sleep(self.cfg.backpressure_wait_s)
                group, failures = await self._group(seed, task_id, stats)
                if group is not None and sink is not None:
                    await asyncio.to_thread(sink.put, group)
                elif group is not None:
                    groups.append(group)
                else:
                    dropped.append((task_id, drop_reason(failures)))
                    if sink is not None:
                        await asyncio.to_thread(sink.abandon, task_id)

        await asyncio.gather(*(one(s) for s in seeds))
        stats.generate_s += self.engine.stats.busy_s - busy0
        return RolloutResult(groups, stats, dropped)

    async def _group(self, seed: int, task_id: str, stats: RolloutStats) -> tuple[Group | None, list[str]]:
        for attempt in range(self.cfg.max_retries + 1):
            group_id = f"{task_id}#{attempt}"
            try:
                task = self.tasks_fn(seed)
            except Exception as exc:
                outcomes = [_Outcome([], f"raised: agent.tasks({seed}) raised {type(exc).__name__}: {exc}")]
            else:
                outcomes = await asyncio.gather(*(self._episode(task, task_id, f"{group_id}/{m}")
                                                  for m in range(self.cfg.group_size)))
            for o in outcomes:
                stats.turns += o.calls
                stats.sampled_tokens += o.sampled
                if o.failure:
                    stats.trajectories_failed += 1
                    cause = o.failure.split(":", 1)[0]
                    stats.failure_reasons[cause] = stats.failure_reasons.get(cause, 0) + 1
                else:
                    stats.trajectories_ok += 1
            if not any(o.failure for o in outcomes):
                stats.groups_done += 1
                trajs = [t for o in outcomes for t in o.trajectories]
                # A session whose client rewrote its history (compacted it, say) is one episode
                # of several segments (session_trajectories numbers them).
                stats.episodes += len(outcomes)
                stats.segments += len(trajs)
                return Group(task_id, group_id, trajs, attempts=attempt + 1), []
            if attempt < self.cfg.max_retries:
                stats.groups_retried += 1
        stats.groups_dropped += 1
        return None, [o.failure for o in outcomes if o.failure]

    async def _episode(self, task: Any, task_id: str, session_id: str) -> _Outcome:
        import openai

        client = openai.AsyncOpenAI(base_url=self.server.base_url, api_key="forge", max_retries=0,
                                    timeout=self.cfg.turn_timeout_s, default_headers={SESSION_HEADER: session_id})
        failure, reward = "", None
        started = time.monotonic()
        try:
            reward = await asyncio.wait_for(self.run_fn(copy.deepcopy(task), client), self.cfg.episode_timeout_s)
        except asyncio.TimeoutError:
            failure = f"episode_timeout: the agent ran past {self.cfg.episode_timeout_s} s"
        except Exception as exc:
            failure = f"raised: the agent raised {type(exc).__name__}: {str(exc)[:300]}"
        finally:
            await client.close()
        if not failure and (isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward)):
            failure = f"garbage: the agent returned {reward!r}; run(task, client) must return the reward as a finite number"
        session = self.store.pop(session_id)
        calls = len(session.calls) if session else 0
        sampled = sum(len(c.completion_token_ids) for c in session.calls) if session else 0
        if not failure and not calls:
            failure = "no_calls: the agent made no chat call through the client it was given"
        if failure:
            return _Outcome([], failure, calls, sampled)
        trajs = session_trajectories(session, task_id=task_id, group_id=session_id.rsplit("/", 1)[0], reward=float(reward))
        for t in trajs:
            t.timings = {"total": time.monotonic() - started}
        return _Outcome(trajs, "", calls, sampled)
