"""Sessions of the gateway: every call's exact tokens, and the trajectories they make.

A session is one agent episode: the calls an agent made under one `X-Forge-Session` header (or
`user` field), in order, each with the prompt's token ids as the gateway encoded them, the
completion's ids as sampled, the sampler's logprobs, the policy version and the finish reason.
The gateway reuses the ids it produced when an agent sends an assistant message back
(`forge.policy.chat.ProducedIndex`), so a well-behaved agent's later prompts extend its earlier
ones token for token, and the session is one `Trajectory`: the first prompt, then each
completion as a turn whose observation is what the next prompt added.

A call whose prompt does not extend any earlier call's context (the agent edited history,
dropped messages, or branched with `n` > 1) starts a new trajectory of the same session: its
prompt holds the whole earlier context as plain prompt tokens, so nothing sampled is trained
twice and the prefix tree still shares what the trajectories have in common. The trajectories
of a session are the context segments 0, 1, ... of one episode (`Trajectory.segment`, in the
order they started), so a session counts once in training however often its prefix broke;
each gets the session's reward.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from forge.middleware.types import Group, Trajectory, Turn
from forge.policy.chat import ProducedIndex


@dataclass
class CallRecord:
    """One completion the gateway sampled (one choice of a request)."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs: list[float]
    policy_version: int
    finish_reason: str
    """The sampler's: 'stop' (a stop token or string) or 'length' (the budget ran out)."""
    prefix_broken: bool = False
    """The prompt did not extend the session's previous call (history edited or re-tokenized)."""
    rerendered: int = 0
    """Assistant messages of the prompt the gateway did not produce and tokenized anew."""

    def as_json(self) -> dict:
        return {
            "prompt_token_ids": self.prompt_token_ids, "completion_token_ids": self.completion_token_ids,
            "logprobs": self.logprobs, "policy_version": self.policy_version, "finish_reason": self.finish_reason,
            "prefix_broken": self.prefix_broken, "rerendered": self.rerendered,
        }


@dataclass
class Session:
    """One episode's calls, in the order they were sampled."""

    id: str
    calls: list[CallRecord] = field(default_factory=list)
    produced: ProducedIndex = field(default_factory=ProducedIndex)
    reward: float | None = None
    """Set when the session is closed."""
    started: float = field(default_factory=time.monotonic)

    @property
    def closed(self) -> bool:
        return self.reward is not None

    def as_json(self) -> dict:
        return {"id": self.id, "calls": [c.as_json() for c in self.calls], "reward": self.reward,
                "closed": self.closed}


class SessionError(ValueError):
    """A session request that cannot be served (closed, unknown); the message names the fix."""


class SessionStore:
    """The gateway's sessions by id, safe to use from the server's threads.

    `on_close(session)` runs once per closed session (the `forge serve` writer, or the rollout
    worker collecting a group); a closed session takes no more calls.
    """

    def __init__(self, on_close: Callable[[Session], None] | None = None, max_open: int = 100_000) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.on_close = on_close
        self.max_open = max_open

    def open(self, session_id: str) -> Session:
        """The session with this id, created on first use; SessionError if it is closed."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                if len(self._sessions) >= self.max_open:
                    raise SessionError(f"{self.max_open} sessions are open; close finished ones with "
                                       "POST /forge/sessions/{id}/reward or DELETE them")
                session = self._sessions[session_id] = Session(session_id)
            if session.closed:
                raise SessionError(f"session '{session_id}' was closed with a reward; use a new session id "
                                   "(X-Forge-Session header) for a new episode")
            return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(session_id)
        return session

    def record(self, session: Session, call: CallRecord) -> None:
        with self._lock:
            if session.calls:
                last = session.calls[-1]
                context = last.prompt_token_ids + last.completion_token_ids
                call.prefix_broken = call.prompt_token_ids[: len(context)] != context
            session.calls.append(call)

    def close(self, session_id: str, reward: float) -> Session:
        """Set the reward (once) and hand the session to `on_close`; KeyError if no call opened it."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise KeyError(session_id)
            if session.closed:
                raise SessionError(f"session '{session_id}' already has a reward ({session.reward}); "
                                   "a session is one episode and is closed once")
            session.reward = float(reward)
        if self.on_close is not None:
            self.on_close(session)
        return session

    def pop(self, session_id: str) -> Session | None:
        """Forget a session (after its trajectories were taken)."""
        with self._lock:
            return self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def session_trajectories(session: Session, *, task_id: str, group_id: str, reward: float | None = None) -> list[Trajectory]:
    """The session's calls as trajectories (one unless a prompt broke the prefix), the segments 0,
    1, ... of one episode in the order they started, each with the session's reward (or
    `reward`). A session without calls gives none."""
    value = session.reward if reward is None else reward
    trajs: list[Trajectory] = []
    # The flat context of each trajectory: its prompt and turns, the last turn without observation.
    contexts: list[list[int]] = []
    for call in session.calls:
        best = -1
        for i, ctx in enumerate(contexts):
            if len(call.prompt_token_ids) >= len(ctx) and call.prompt_token_ids[: len(ctx)] == ctx:
                if best < 0 or len(ctx) > len(contexts[best]):
                    best = i
        turn = Turn(list(call.completion_token_ids), list(call.logprobs), call.policy_version,
                    finish_reason=call.finish_reason)
        if best >= 0:
            traj = trajs[best]
            traj.turns[-1].observation_ids = list(call.prompt_token_ids[len(contexts[best]) :])
            traj.turns.append(turn)
            contexts[best] = list(call.prompt_token_ids) + turn.sampled_ids
            continue
        traj = Trajectory(task_id=task_id, group_id=group_id, prompt_ids=list(call.prompt_token_ids), turns=[turn],
                          reward=float(value or 0.0), terminated=True, segment=len(trajs))
        trajs.append(traj)
        contexts.append(list(call.prompt_token_ids) + turn.sampled_ids)
    for traj in trajs:
        traj.reward = float(value or 0.0)
        traj.timings = {"total": time.monotonic() - session.started}
    return trajs


def session_group(session: Session, *, task_id: str | None = None) -> Group:
    """A closed session alone as a group (what `forge serve` writes): its trajectories."""
    task = task_id or session.id
    return Group(task_id=task, group_id=session.id,
                 trajectories=session_trajectories(session, task_id=task, group_id=session.id))
