"""Context management in the agent loop: the `compact` action and the env-side context policies.

Long-horizon episodes outgrow any context window. Here managing the context is part of the
policy: with `rollout.context.compact` on, every env offers a built-in tool,

    <tool_call>{"name": "compact", "arguments": {"summary": "..."}}</tool_call>

after which the episode goes on from a fresh context: the first prompt's exact ids, the summary
as an observation, and the last `keep_last_turns` turns as they were. The episode becomes a
chain of segments (`Trajectory.segment` 0, 1, ...), each one token sequence, token-exact: a
segment's ids are exactly what the generator read and sampled. Every segment carries the
episode's reward, and the trainer weighs an episode once whatever its number of segments
(`algorithm.segment_weighting`). Because each segment starts with the first prompt's ids,
prefix-tree merging shares the system and task prefix across segments and group members.

Beside the action sit two env-side policies:

- asking: once the context passes `ask_at_tokens`, the observation ends with a notice asking
  the policy to compact; and with `on_full: ask`, an episode whose next turn would not fit in
  `rollout.max_context_tokens` is not truncated at once: its last observation is replaced by
  the notice (the policy can compact what it knew and redo the call). A policy that does not
  compact then is truncated as before.
- `drop_tool_results_after: N`: tool results older than N turns are replaced by a short stub.
  That rewrites earlier context, so it too starts a new segment (its prompt is the rewritten
  context; only later turns are trained in it).

The loop, not the env, builds the new context, because it holds the ids: the env only reports
the summary (`info["compact"]`). Departure from papers that compact by a separate summariser
call: here the summary is the policy's own sampled turn, trained with the episode's reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from forge.agent_side.env import COMPACT_TOOL
from forge.policy.protocol import escape_markers, render_tool_result

ON_FULL = ("ask", "truncate")


@dataclass
class ContextConfig:
    """How episodes manage their context (docs/context.md); everything off by default."""

    compact: bool = False
    """Offer the policy the built-in `compact(summary)` tool; the episode then goes on from the prompt and the summary."""
    keep_last_turns: int = 0
    """Turns before a compaction kept verbatim after the summary (0: only the prompt and the summary)."""
    on_full: str = "ask"
    """With compact on, when the next turn would not fit: 'ask' replaces the last observation by a notice asking to compact, once per segment; 'truncate' ends the episode."""
    ask_at_tokens: int = 0
    """With compact on: the observation that brings the context past this many tokens asks to compact (0: only when full)."""
    drop_tool_results_after: int = 0
    """Replace tool results older than this many turns by a stub, starting a new segment (0: keep them all)."""
    max_segments: int = 32
    """Segments an episode may have; past it a compaction ends the episode truncated."""

    def __post_init__(self) -> None:
        if self.on_full not in ON_FULL:
            raise ValueError(f"rollout.context.on_full '{self.on_full}' is not one of {', '.join(ON_FULL)}")
        for name in ("keep_last_turns", "ask_at_tokens", "drop_tool_results_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.context.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.max_segments < 1:
            raise ValueError(f"rollout.context.max_segments must be >= 1, got {self.max_segments}")

    @property
    def enabled(self) -> bool:
        return self.compact or self.drop_tool_results_after > 0


def summary_observation(summary: str) -> str:
    """The observation that opens a compacted context: the policy's summary, markers escaped."""
    return render_tool_result(COMPACT_TOOL, "your summary: " + escape_markers(summary)) + "\n"


DROPPED_STUB = render_tool_result("context", "older tool result dropped") + "\n"
"""What replaces a tool result older than `drop_tool_results_after` turns."""


def ask_notice(used: int, limit: int) -> str:
    """The notice that asks the policy to compact, appended to an observation."""
    return render_tool_result("context", f"{used}/{limit} tokens used: call compact", escape=False) + "\n"


@dataclass(frozen=True)
class ContextRules:
    """`ContextConfig` with the rollout's limits, as one episode applies it."""

    cfg: ContextConfig
    max_context_tokens: int
    max_new_tokens: int

    def should_ask(self, used: int, asked: bool) -> bool:
        """Whether the observation that brings the context to `used` tokens asks for a compaction
        (past `ask_at_tokens`, once per segment)."""
        return self.cfg.compact and not asked and 0 < self.cfg.ask_at_tokens < used

    def ask_when_full(self, asked: bool) -> bool:
        """Whether a context too full for the next turn asks to compact instead of ending."""
        return self.cfg.compact and self.cfg.on_full == "ask" and not asked


def context_rules(rollout) -> ContextRules | None:
    """The rules a `RolloutConfig`'s `context` section sets, or None when it turns nothing on."""
    if not rollout.context.enabled:
        return None
    return ContextRules(rollout.context, rollout.max_context_tokens, rollout.max_new_tokens)
