"""One episode of the agent loop, kept as token ids: start it, then feed it one sampled turn at a time.

The loop never re-tokenizes history. The context is the prompt's ids, then each turn's ids
exactly as the generator sampled them, then each observation's ids as appended; the
`Trajectory` records the same pieces, so the trainer sees the very tokens the sampler saw.
The turn's text is decoded only to hand it to `env.step`.

Every call into the env runs under a wall-clock limit and its result is checked; an env that
raises, hangs or returns garbage fails the trajectory with the reason instead of raising, so
the rollout worker can go on with its other episodes.

With context management (`forge.agent_side.context`) an episode may go on in a fresh context:
the current trajectory is closed as a segment and a new one starts whose prompt is the new
context's ids. The context is kept as pieces (prompt, turn, observation, note) so that it can
be rebuilt from the exact ids: the first prompt, a summary, the last turns, stubs for dropped
tool results.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from forge.agent_side.context import DROPPED_STUB, ContextRules, ask_notice, summary_observation
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
    rules: ContextRules | None = None
    """Context management (rollout.context), or None when it is off."""
    segments: list[Trajectory] = field(default_factory=list)
    """The episode's earlier context segments, closed; `traj` is the current one."""
    pieces: list[tuple[str, int, list[int]]] = field(default_factory=list)
    """The context as (kind, turn number, ids): 'prompt', 'turn', 'obs', 'note'; their ids add up to `context`."""
    reward: float = 0.0
    """The episode's reward so far (every segment gets it at the end)."""
    last_observation: list[int] = field(default_factory=list)
    """What the loop appended after the latest turn: its observation, or the new context's tail."""
    asked: bool = False
    """Whether the current segment's context already asked the policy to compact."""
    compactions: int = 0
    tokens_saved: int = 0
    """Context tokens the compactions removed (context before, less the new context)."""
    results_dropped: int = 0

    def fail(self, reason: str) -> None:
        self.traj.status = "failed"
        self.traj.failure_reason = reason
        self.done = True

    @property
    def trajectories(self) -> list[Trajectory]:
        """Every segment of the episode, in order (one without context management)."""
        return [*self.segments, self.traj]

    @property
    def turn_count(self) -> int:
        return sum(len(t.turns) for t in self.trajectories)


def start_episode(
    make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *,
    task_id: str, group_id: str, timeout_s: float, rules: ContextRules | None = None,
) -> Episode:
    """Make a fresh env, reset it with `seed` and encode the prompt; a failure fails the episode.

    With `rules` whose `compact` is on, the env offers the built-in compact tool."""
    ep = Episode(env=None, traj=Trajectory(task_id=task_id, group_id=group_id, prompt_ids=[]), rules=rules)
    outcome, env = call_with_timeout(make_env, timeout_s)
    if outcome != "ok":
        ep.fail(_describe("making the env", outcome, env, timeout_s))
        return ep
    ep.env = env
    if rules is not None and rules.cfg.compact:
        outcome, err = call_with_timeout(getattr(env, "offer_compaction", _no_compaction), timeout_s)
        if outcome != "ok":
            ep.fail(_describe("env.offer_compaction", outcome, err, timeout_s))
            return ep
    outcome, result = call_with_timeout(env.reset, timeout_s, seed=seed)
    if outcome != "ok":
        ep.fail(_describe("env.reset", outcome, result, timeout_s))
        return ep
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)):
        ep.fail(f"garbage: env.reset returned {_preview(result)}; it must return (observation: str, info: dict)")
        return ep
    ep.traj.prompt_ids = [tokenizer.bos_id] + tokenizer.encode(result[0])
    ep.context = list(ep.traj.prompt_ids)
    ep.pieces = [("prompt", 0, list(ep.traj.prompt_ids))]
    ep.traj.timings = {"generate": 0.0, "env": 0.0, "total": 0.0}
    return ep


def _no_compaction() -> None:
    raise TypeError("the env has no offer_compaction(); subclass forge.agent_side.ToolEnv to use rollout.context.compact")


def turn_text(ids: list[int], tokenizer: Tokenizer) -> str:
    """The text `env.step` gets for a turn: the sampled ids without control tokens."""
    return visible_text(ids, tokenizer)


def apply_turn(ep: Episode, completion: Completion, tokenizer: Tokenizer, *, timeout_s: float, gen_s: float = 0.0) -> None:
    """Record a sampled turn, step the env with its text and append the observation's ids."""
    turn = Turn(
        sampled_ids=list(completion.token_ids), logprobs=list(completion.logprobs),
        policy_version=completion.policy_version, finish_reason=completion.finish_reason,
    )
    if completion.choices is not None and ep.context == ep.traj.token_ids:
        # Routing replay: the call ran exactly the trajectory so far, so its record (prompt and
        # sampled tokens) is the trajectory's. A context rewritten in place is not what the
        # trainer runs: its tokens keep the last record that was, the rest stay unknown.
        from forge.policy.choices import pack

        ep.traj.choice_experts, ep.traj.choice_blocks = pack(completion.choices)
    ep.traj.turns.append(turn)
    ep.context.extend(turn.sampled_ids)
    number = ep.turn_count
    ep.pieces.append(("turn", number, turn.sampled_ids))
    ep.last_observation = []
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
    ep.reward += float(reward)
    for kind in info.get("errors", ()) if isinstance(info, dict) else ():
        ep.traj.error_counts[kind] = ep.traj.error_counts.get(kind, 0) + 1
    if terminated or truncated:
        # No turn follows, so the last observation would be context nobody reads: not stored.
        ep.traj.terminated = bool(terminated)
        ep.done = True
        return
    rules = ep.rules
    summary = info.get("compact") if isinstance(info, dict) and rules is not None and rules.cfg.compact else None
    if isinstance(summary, str):
        if len(ep.segments) + 1 >= rules.cfg.max_segments:
            ep.done = True  # out of segments: ends truncated, as at the turn limit
            return
        _compact(ep, summary, number, tokenizer)
        return
    turn.observation_ids = tokenizer.encode(obs)
    if rules is not None and rules.should_ask(len(ep.context) + len(turn.observation_ids), ep.asked):
        turn.observation_ids += tokenizer.encode(ask_notice(len(ep.context) + len(turn.observation_ids),
                                                            rules.max_context_tokens))
        ep.asked = True
    ep.context.extend(turn.observation_ids)
    ep.pieces.append(("obs", number, turn.observation_ids))
    ep.last_observation = list(turn.observation_ids)
    if rules is not None and rules.cfg.drop_tool_results_after > 0:
        _drop_old_results(ep, number - rules.cfg.drop_tool_results_after, tokenizer)


def drop_last_observation(ep: Episode) -> None:
    """Take the latest turn's observation out of the context (an episode out of room ends without it)."""
    last = ep.traj.turns[-1] if ep.traj.turns else None
    if last is None or not last.observation_ids:
        return
    del ep.context[len(ep.context) - len(last.observation_ids):]
    if ep.pieces and ep.pieces[-1][0] == "obs":
        ep.pieces.pop()
    last.observation_ids = []


def out_of_room(ep: Episode, tokenizer: Tokenizer) -> bool:
    """The next turn does not fit in the context: ask to compact in place of the last observation
    (rollout.context.on_full 'ask', once per segment) and return False if that makes it fit;
    otherwise drop the last observation and return True (the episode ends truncated)."""
    rules = ep.rules
    last = ep.traj.turns[-1] if ep.traj.turns else None
    if rules is not None and last is not None and rules.ask_when_full(ep.asked):
        kept = len(ep.context) - len(last.observation_ids)
        notice = tokenizer.encode(ask_notice(kept, rules.max_context_tokens))
        if kept + len(notice) + rules.max_new_tokens <= rules.max_context_tokens:
            drop_last_observation(ep)
            last.observation_ids = notice
            ep.context.extend(notice)
            ep.pieces.append(("obs", ep.turn_count, notice))
            ep.last_observation = list(notice)
            ep.asked = True
            return False
    drop_last_observation(ep)
    return True


def _new_segment(ep: Episode, pieces: list[tuple[str, int, list[int]]]) -> None:
    """Close the current segment and go on from the context `pieces` make (its prompt)."""
    old = ep.traj
    old.timings["total"] = time.monotonic() - ep.started
    if old.turns:
        # Read only in the new context: in this segment's sequence no turn follows it.
        old.turns[-1].observation_ids = []
    ep.segments.append(old)
    prompt = [i for _, _, ids in pieces for i in ids]
    ep.traj = Trajectory(task_id=old.task_id, group_id=old.group_id, prompt_ids=prompt, segment=old.segment + 1,
                         timings={"generate": 0.0, "env": 0.0, "total": 0.0})
    ep.context = list(prompt)
    ep.pieces = pieces
    ep.asked = False


def _compact(ep: Episode, summary: str, number: int, tokenizer: Tokenizer) -> None:
    """Go on from the first prompt, the summary and the last `keep_last_turns` turns before this one."""
    before = len(ep.context)
    keep = ep.rules.cfg.keep_last_turns
    kept = [p for p in ep.pieces if p[0] in ("turn", "obs") and number - keep <= p[1] < number] if keep else []
    note = ("note", number, tokenizer.encode(summary_observation(summary)))
    _new_segment(ep, [ep.pieces[0], note, *kept])
    ep.compactions += 1
    ep.tokens_saved += max(0, before - len(ep.context))
    ep.last_observation = [i for _, _, ids in (note, *kept) for i in ids]


def _drop_old_results(ep: Episode, last_old_turn: int, tokenizer: Tokenizer) -> None:
    """Stub out the observations of turns up to `last_old_turn`; rewriting them starts a segment."""
    old = [i for i, p in enumerate(ep.pieces) if p[0] == "obs" and p[1] <= last_old_turn]
    if not old:
        return
    stub = tokenizer.encode(DROPPED_STUB)
    pieces = [("note", p[1], stub) if i in old else p for i, p in enumerate(ep.pieces)]
    _new_segment(ep, pieces)
    ep.results_dropped += len(old)


def finish(ep: Episode) -> Trajectory:
    """Close the env and stamp the total time; the trajectory is final after this.

    Every segment of the episode gets its reward, and a failure fails them all; the current
    (last) segment is returned, `ep.trajectories` holds them all."""
    ep.done = True
    ep.traj.timings["total"] = time.monotonic() - ep.started
    for seg in ep.segments:
        seg.reward = ep.reward
        if not ep.traj.ok:
            seg.status, seg.failure_reason = ep.traj.status, ep.traj.failure_reason
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
