"""One episode of the agent loop, kept as token ids: start it, then feed it one sampled turn at a time.

The loop never re-tokenizes history. The context is the prompt's ids, then each turn's ids
exactly as the generator sampled them, then each observation's ids as appended; the
`Trajectory` records the same pieces, so the trainer sees the very tokens the sampler saw.
The turn's text is decoded only to hand it to `env.step`.

Every call into the env runs under a wall-clock limit and its result is checked; an env that
raises, hangs or returns garbage fails the trajectory with the reason instead of raising, so
the rollout worker can go on with its other episodes.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from forge.agent_side.env import call_with_timeout
from forge.middleware.types import Trajectory, Turn
from forge.policy.chat import visible_text
from forge.policy.sampling import Completion
from forge.policy.tokenizer import Tokenizer


@dataclass
class Episode:
    """A running episode: its env, its trajectory so far and the flat context ids."""

    env: Any
    traj: Trajectory
    context: list[int] = field(default_factory=list)
    """The flat token ids so far; equal to `traj.token_ids`, kept to avoid rebuilding it."""
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    def fail(self, reason: str) -> None:
        self.traj.status = "failed"
        self.traj.failure_reason = reason
        self.done = True


def start_episode(
    make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *,
    task_id: str, group_id: str, timeout_s: float,
) -> Episode:
    """Make a fresh env, reset it with `seed` and encode the prompt; a failure fails the episode."""
    ep = Episode(env=None, traj=Trajectory(task_id=task_id, group_id=group_id, prompt_ids=[]))
    outcome, env = call_with_timeout(make_env, timeout_s)
    if outcome != "ok":
        ep.fail(_describe("making the env", outcome, env, timeout_s))
        return ep
    ep.env = env
    outcome, result = call_with_timeout(env.reset, timeout_s, seed=seed)
    if outcome != "ok":
        ep.fail(_describe("env.reset", outcome, result, timeout_s))
        return ep
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)):
        ep.fail(f"garbage: env.reset returned {_preview(result)}; it must return (observation: str, info: dict)")
        return ep
    ep.traj.prompt_ids = [tokenizer.bos_id] + tokenizer.encode(result[0])
    ep.context = list(ep.traj.prompt_ids)
    ep.traj.timings = {"generate": 0.0, "env": 0.0, "total": 0.0}
    return ep


def turn_text(ids: list[int], tokenizer: Tokenizer) -> str:
    """The text `env.step` gets for a turn: the sampled ids without control tokens."""
    return visible_text(ids, tokenizer)


def apply_turn(ep: Episode, completion: Completion, tokenizer: Tokenizer, *, timeout_s: float, gen_s: float = 0.0) -> None:
    """Record a sampled turn, step the env with its text and append the observation's ids."""
    turn = Turn(
        sampled_ids=list(completion.token_ids), logprobs=list(completion.logprobs),
        policy_version=completion.policy_version, finish_reason=completion.finish_reason,
    )
    ep.traj.turns.append(turn)
    ep.context.extend(turn.sampled_ids)
    ep.traj.timings["generate"] += gen_s
    t0 = time.monotonic()
    outcome, result = call_with_timeout(ep.env.step, timeout_s, turn_text(turn.sampled_ids, tokenizer))
    ep.traj.timings["env"] += time.monotonic() - t0
    if outcome != "ok":
        ep.fail(_describe("env.step", outcome, result, timeout_s))
        return
    problem = _check_step(result)
    if problem:
        ep.fail(f"garbage: env.step returned {problem}")
        return
    obs, reward, terminated, truncated, info = result
    ep.traj.reward += float(reward)
    for kind in info.get("errors", ()) if isinstance(info, dict) else ():
        ep.traj.error_counts[kind] = ep.traj.error_counts.get(kind, 0) + 1
    if terminated or truncated:
        # No turn follows, so the last observation would be context nobody reads: not stored.
        ep.traj.terminated = bool(terminated)
        ep.done = True
        return
    turn.observation_ids = tokenizer.encode(obs)
    ep.context.extend(turn.observation_ids)


def finish(ep: Episode) -> Trajectory:
    """Close the env and stamp the total time; the trajectory is final after this."""
    ep.done = True
    ep.traj.timings["total"] = time.monotonic() - ep.started
    if ep.env is not None:
        # A close that hangs or raises must not cost the worker; the trajectory is already done.
        call_with_timeout(ep.env.close, 1.0)
    return ep.traj


def _check_step(result: Any) -> str | None:
    if not (isinstance(result, tuple) and len(result) == 5):
        return f"{_preview(result)}; it must return (obs, reward, terminated, truncated, info)"
    obs, reward, terminated, truncated, _ = result
    if not isinstance(obs, str):
        return f"an observation of type {type(obs).__name__}; it must be str"
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        return f"reward {reward!r}; it must be a finite number"
    # numpy's bool_ is what many envs return; anything else is not a flag.
    if not all(isinstance(f, bool) or type(f).__name__ == "bool_" for f in (terminated, truncated)):
        return f"terminated={terminated!r}, truncated={truncated!r}; both must be bool"
    return None


def _describe(what: str, outcome: str, value: Any, timeout_s: float) -> str:
    if outcome == "timeout":
        return f"timeout: {what} ran past {timeout_s} s"
    return f"raised: {what} raised {type(value).__name__}: {value}"


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
