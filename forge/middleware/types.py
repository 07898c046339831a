"""Process-boundary types between rollout workers and the trainer: `Turn`, `Trajectory`, `Group`.

A trajectory is stored as token ids exactly as they were sampled or appended, never as text,
so the trainer scores the same tokens the sampler produced (see DESIGN.md, "Token in, token
out"). The flat sequence is `prompt_ids + turn_0.sampled + turn_0.observation + turn_1...`;
everything flat (ids, loss mask, logprobs, turn boundaries) is derived from the turns, so there
is one source of truth and no way for the mask to drift from the ids. Only plain Python types
appear here, so the structures pickle across Ray and convert to Arrow without forge imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RolloutStatus = Literal["ok", "failed"]
"""'ok': the episode ran to an answer or to its turn limit; 'failed': the env or policy broke."""


@dataclass
class Turn:
    """One assistant turn, exactly as sampled, and the observation appended after it."""

    sampled_ids: list[int]
    """Token ids the policy sampled for this turn (stop token included)."""
    logprobs: list[float]
    """The sampler's logprob of each sampled id."""
    policy_version: int
    """Version of the weights that sampled this turn."""
    observation_ids: list[int] = field(default_factory=list)
    """Ids of the environment's reply appended after the turn (tool results); not trained on."""
    finish_reason: str = "stop"
    """The generator's finish reason: 'stop' or 'length'."""

    def __post_init__(self) -> None:
        if len(self.sampled_ids) != len(self.logprobs):
            raise ValueError(
                f"Turn has {len(self.sampled_ids)} sampled ids but {len(self.logprobs)} logprobs; "
                "store the generator's Completion unchanged"
            )


@dataclass
class Trajectory:
    """One episode of one environment: the exact token sequence, its reward and its fate."""

    task_id: str
    """Which task (environment and seed) this episode solved; equal across a group."""
    group_id: str
    """The group this trajectory belongs to (unique per attempt of a task)."""
    prompt_ids: list[int]
    """Token ids of the task prompt, before the first turn."""
    turns: list[Turn] = field(default_factory=list)
    """Assistant turns in order, each with the observation that followed it."""
    reward: float = 0.0
    """The environment's reward for the episode (sum over steps)."""
    status: RolloutStatus = "ok"
    """'ok' or 'failed'; a failed trajectory is never trained on."""
    failure_reason: str = ""
    """Why the episode failed (empty when ok): the exception, time limit or garbage returned."""
    terminated: bool = False
    """The episode ended with an answer (as opposed to the turn limit)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per phase: 'generate', 'env', 'total'."""
    error_counts: dict[str, int] = field(default_factory=dict)
    """Protocol and tool errors by kind, e.g. {'bad_json': 1, 'tool_timeout': 2}."""
    segment: int = 0
    """This sequence's index among its episode's context segments (docs/context.md): 0 for the
    first or only one. An episode that compacted its context, or whose context was rewritten,
    goes on as segments 1, 2, ..., each a sequence of its own, stored right after the one before
    it in its group, with the episode's reward."""
    choice_experts: bytes = b""
    """Routing replay (forge.policy.choices, `rollout.routing_replay`): the sampler's MoE experts
    for the first tokens of `token_ids`, as `choices.pack` writes them; b"" when not recorded.
    Tokens past the record (the last sampled one, an observation no turn followed) are unknown."""
    choice_blocks: bytes = b""
    """The same for the MSA layers' kept blocks."""

    @property
    def token_ids(self) -> list[int]:
        """The flat sequence: prompt, then each turn's sampled ids and observation ids."""
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids.extend(turn.sampled_ids)
            ids.extend(turn.observation_ids)
        return ids

    @property
    def loss_mask(self) -> list[int]:
        """1 on sampled tokens, 0 on prompt and observation tokens; aligned with `token_ids`."""
        mask = [0] * len(self.prompt_ids)
        for turn in self.turns:
            mask.extend([1] * len(turn.sampled_ids))
            mask.extend([0] * len(turn.observation_ids))
        return mask

    @property
    def sampling_logprobs(self) -> list[float]:
        """The sampler's logprob per flat token; 0.0 where the loss mask is 0."""
        out = [0.0] * len(self.prompt_ids)
        for turn in self.turns:
            out.extend(turn.logprobs)
            out.extend([0.0] * len(turn.observation_ids))
        return out

    @property
    def turn_boundaries(self) -> list[tuple[int, int]]:
        """Flat [start, end) of each turn's sampled ids (observations lie between them)."""
        bounds = []
        pos = len(self.prompt_ids)
        for turn in self.turns:
            bounds.append((pos, pos + len(turn.sampled_ids)))
            pos += len(turn.sampled_ids) + len(turn.observation_ids)
        return bounds

    @property
    def policy_versions(self) -> list[int]:
        """The weights' version of each turn; a trajectory may span a weight update."""
        return [turn.policy_version for turn in self.turns]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Group:
    """G episodes of one task, the unit of group-relative advantages. Never shrunk.

    Each episode is one trajectory, or several consecutive ones when it was split into context
    segments (`Trajectory.segment`)."""

    task_id: str
    """The task every member solved."""
    group_id: str
    """Unique id of this group (task and attempt)."""
    trajectories: list[Trajectory] = field(default_factory=list)
    """The members, all with status 'ok' once the group leaves a rollout worker."""
    attempts: int = 1
    """How many times the group was run (1 + retries after a failed member)."""

    @property
    def rewards(self) -> list[float]:
        """The reward of each trajectory (each segment of a segmented episode)."""
        return [t.reward for t in self.trajectories]

    @property
    def episodes(self) -> list[list[Trajectory]]:
        """The members' trajectories by episode: each run of segments 0, 1, ..., in order.

        A group of G episodes without compaction is G lists of one. Raises ValueError when the
        segments are out of order (a segment k > 0 that does not follow segment k - 1).
        """
        out: list[list[Trajectory]] = []
        for t in self.trajectories:
            if t.segment == 0:
                out.append([t])
            elif out and out[-1][-1].segment == t.segment - 1:
                out[-1].append(t)
            else:
                raise ValueError(f"group {self.group_id}: segment {t.segment} of an episode does not follow its "
                                 f"segment {t.segment - 1}; store each episode's segments in order, from 0")
        return out

    @property
    def episode_rewards(self) -> list[float]:
        """The reward of each episode (its segments share it)."""
        return [segs[0].reward for segs in self.episodes]

    @property
    def min_policy_version(self) -> int:
        """Oldest weights any member sampled with; the data pool's staleness bound uses it."""
        versions = [v for t in self.trajectories for v in t.policy_versions]
        return min(versions) if versions else 0
