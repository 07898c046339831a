"""`ToolEnv`: the contract a user's tool-using environment fills in, on top of `gymnasium.Env`.

A subclass writes `make_task(rng) -> (prompt, expected)`, `score(answer, expected) -> float`,
some `@tool` methods and `max_turns`. `reset` renders the task prompt with the tools' schemas;
`step` takes the assistant's whole turn as text, runs its tool calls and returns their results
as the next observation. Nothing the policy writes makes `step` raise: malformed turns, unknown
tools, bad arguments, tools that raise or overrun their time limit all become error results the
policy reads, and are counted in `info["errors"]` and `self.error_counts`.

Spaces are `gymnasium.spaces.Text` over `string.printable`. Observations are made to fit it:
characters outside it are written as `\\uXXXX` escapes and long tool results are cut, so
`check_env` holds for any tool output. Actions are not checked against the action space: a
policy's turn may contain any Unicode, and the env must take it.

`make_task` gets a `random.Random` drawn from the env's seeded `np_random`, so tasks follow the
seed of `reset(seed=...)` and task generators can use the familiar stdlib API.
"""

from __future__ import annotations

import json
import random
import string
import threading
from typing import Any, ClassVar, SupportsFloat

import gymnasium as gym
from gymnasium import spaces

from forge.policy.chat import render_task
from forge.policy.protocol import ProtocolError, parse_turn, render_tool_result
from forge.agent_side.tools import ToolSpec, build_spec, check_arguments, collect_tools

COMPACT_TOOL = "compact"
"""The built-in context tool (forge.agent_side.context); offered after `offer_compaction()`."""

PRINTABLE = string.printable
_PRINTABLE_SET = frozenset(PRINTABLE)


def to_printable(text: str) -> str:
    """`text` with every character outside `string.printable` written as a `\\uXXXX` escape."""
    if all(c in _PRINTABLE_SET for c in text):
        return text
    return "".join(c if c in _PRINTABLE_SET else c.encode("unicode_escape").decode("ascii") for c in text)


def call_with_timeout(fn, timeout_s: float | None, *args, **kwargs) -> tuple[str, Any]:
    """Run `fn` in a daemon thread: ('ok', result), ('error', exc) or ('timeout', None).

    A Python thread cannot be killed, so a call past its limit is abandoned, not stopped; tools
    that may hang for real (running code) must bound themselves, as the python env's sandbox does.
    """
    # SystemExit too: a tool that calls sys.exit() must not end the worker.
    if timeout_s is None:
        try:
            return "ok", fn(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            return "error", exc
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["ok"] = fn(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"forge-call-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None
    if "error" in box:
        return "error", box["error"]
    return "ok", box.get("ok")


PROMPT_STYLES = ("full", "brief")


class ToolEnv(gym.Env[str, str]):
    """Base class of tool-using environments. Subclass it; see docs/envs.md."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    max_turns: int = 8
    """Turns before the episode is truncated."""
    tool_timeout_s: float | None = 10.0
    """Default wall-clock limit of one tool call; `@tool(timeout_s=...)` overrides it per tool."""
    max_result_chars: int = 16_000
    """Longest tool result kept; the rest is cut with a note, to bound the context."""
    max_calls_per_turn: int = 8
    """Most tool calls run in one turn."""
    max_text_chars: int = 1_000_000
    """Length bound of the observation and action Text spaces."""

    def __init__(self, difficulty: int = 0, render_mode: str | None = None, prompt_style: str = "full") -> None:
        if render_mode is not None:
            raise ValueError(f"{type(self).__name__} renders nothing; pass render_mode=None")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style '{prompt_style}' is not one of {', '.join(PROMPT_STYLES)}")
        self.difficulty = int(difficulty)
        self.prompt_style = prompt_style
        self.tools: dict[str, ToolSpec] = collect_tools(type(self))
        self.observation_space = spaces.Text(self.max_text_chars, min_length=0, charset=PRINTABLE)
        self.action_space = spaces.Text(self.max_text_chars, min_length=0, charset=PRINTABLE)
        self.prompt: str = ""
        self.task: str = ""
        self.expected: Any = None
        self.turn = 0
        self.done = False
        self.error_counts: dict[str, int] = {}
        self.compaction_offered = False
        """Whether the built-in `compact` tool is offered (rollout.context.compact)."""

    def offer_compaction(self) -> None:
        """Offer the policy the built-in `compact(summary)` tool from the next `reset` on.

        A call of it, alone in its turn, runs nothing: `step` reports the summary as
        `info["compact"]` and the agent loop goes on from a fresh context (docs/context.md).
        """
        if COMPACT_TOOL in self.tools and not self.compaction_offered:
            raise ValueError(f"{type(self).__name__} already has a tool named '{COMPACT_TOOL}', which the built-in "
                             "context tool needs; rename that tool or turn rollout.context.compact off")
        self.tools[COMPACT_TOOL] = build_spec(ToolEnv._compact_tool, COMPACT_TOOL, None, method="_compact_tool")
        self.compaction_offered = True

    def _compact_tool(self, summary: str) -> str:
        """Replace the conversation so far by your summary of it, to free context.

        Args:
            summary: What you need to remember to go on.
        """
        # Never run: step() takes a compact call apart before any tool runs.
        raise RuntimeError("compact is handled by ToolEnv.step")

    def make_task(self, rng: random.Random) -> tuple[str, Any]:
        """Return (task prompt, expected answer) for one episode, drawn from `rng`."""
        raise NotImplementedError(f"{type(self).__name__} must define make_task(self, rng) -> (prompt, expected)")

    def score(self, answer: str, expected: Any) -> float:
        """Reward of a final answer, usually in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} must define score(self, answer, expected) -> float")

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The JSON schema of each tool, in name order."""
        return [self.tools[name].schema() for name in sorted(self.tools)]

    def render_prompt(self, task: str) -> str:
        """The first observation: the task, the tools and the protocol. Override to restyle.

        'full' gives each tool's JSON schema and the protocol in words; 'brief' gives only the
        tools' signatures, for small models trained from scratch that learn the protocol from
        demonstrations, where every prompt token costs training time and says nothing new.
        """
        return render_task(task, self.tool_schemas(), self.prompt_style)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed, options=options)
        rng = random.Random(int(self.np_random.integers(2**63)))
        task, self.expected = self.make_task(rng)
        self.task = str(task)
        """The task's text as make_task wrote it, before render_prompt adds the tools."""
        self.prompt = self.render_prompt(self.task)
        self.turn = 0
        self.done = False
        self.error_counts = {}
        return self._observation(self.prompt), {"turn": 0, "tools": sorted(self.tools)}

    def step(self, action: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError(f"{type(self).__name__}.step() after the episode ended; call reset() first")
        self.turn += 1
        parsed = parse_turn(action, self.max_calls_per_turn)
        errors: list[ProtocolError] = list(parsed.errors)
        reward = 0.0
        terminated = False
        results: list[str] = []
        compact: str | None = None
        if parsed.answer is not None and not errors:
            reward = float(self.score(parsed.answer, self.expected))
            terminated = True
        elif self.compaction_offered and any(c.name == COMPACT_TOOL for c in parsed.calls):
            compact = self._take_compact(parsed.calls, errors, results)
        else:
            if errors:
                # Parser messages quote the protocol's markers on purpose and escape the
                # policy's own text, so they go out unescaped.
                results.append(render_tool_result("error", " ".join(e.message for e in errors), escape=False))
            for call in parsed.calls:
                results.append(self._run_call(call.name, call.arguments, errors))
        truncated = not terminated and self.turn >= self.max_turns
        self.done = terminated or truncated
        kinds = [e.kind for e in errors]
        for kind in kinds:
            self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        obs = "".join(results) + ("\n" if results else "")
        info = {"turn": self.turn, "errors": kinds, "calls": [c.name for c in parsed.calls]}
        if compact is not None:
            info["compact"] = compact
        return self._observation(obs), reward, terminated, truncated, info

    def _take_compact(self, calls: list, errors: list[ProtocolError], results: list[str]) -> str | None:
        """The summary of a well-formed compact call alone in its turn; otherwise an error result."""
        if errors or len(calls) > 1:
            msg = f"{COMPACT_TOOL} must be the only call of its turn, without errors; nothing was run"
            errors.append(ProtocolError("compact_not_alone", msg))
            results.append(render_tool_result(COMPACT_TOOL, "error: " + msg))
            return None
        problem = check_arguments(self.tools[COMPACT_TOOL], calls[0].arguments)
        if problem is not None:
            errors.append(ProtocolError("bad_arguments", problem))
            results.append(render_tool_result(COMPACT_TOOL, "error: " + problem))
            return None
        return calls[0].arguments["summary"]

    def _run_call(self, name: str, arguments: dict[str, Any], errors: list[ProtocolError]) -> str:
        spec = self.tools.get(name)
        if spec is None:
            msg = f"unknown tool '{name}'; the tools are: {', '.join(sorted(self.tools)) or 'none'}"
            errors.append(ProtocolError("unknown_tool", msg))
            return render_tool_result(name, "error: " + msg)
        problem = check_arguments(spec, arguments)
        if problem is not None:
            errors.append(ProtocolError("bad_arguments", problem))
            return render_tool_result(name, "error: " + problem)
        timeout = spec.timeout_s if spec.timeout_s is not None else self.tool_timeout_s
        outcome, value = call_with_timeout(getattr(self, spec.method), timeout, **arguments)
        if outcome == "timeout":
            errors.append(ProtocolError("tool_timeout", f"tool '{name}' ran past {timeout} s"))
            return render_tool_result(name, f"error: tool '{name}' ran past its time limit of {timeout} s")
        if outcome == "error":
            errors.append(ProtocolError("tool_error", f"{type(value).__name__}: {value}"))
            return render_tool_result(name, f"error: {type(value).__name__}: {value}")
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > self.max_result_chars:
            cut = len(text) - self.max_result_chars
            text = text[: self.max_result_chars] + f"\n[... {cut} more characters cut]"
        return render_tool_result(name, text)

    def _observation(self, text: str) -> str:
        obs = to_printable(text)
        return obs[: self.max_text_chars]
