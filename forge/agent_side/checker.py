"""Forge's own checks of a `ToolEnv` class, on top of Gymnasium's `check_env`, each with its fix.

Gymnasium's checker covers the API (spaces, seeding, the five-tuple); these add what the agent
side relies on: the class builds with defaults, it has tools with schemas, a seed fixes the
task, the task changes with the seed, `score` returns a finite number, and random or malformed
turns never raise out of `step`.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

from gymnasium.utils.env_checker import check_env

from forge.agent_side.env import ToolEnv

MALFORMED_TURNS: tuple[str, ...] = (
    "",
    "no markers at all",
    "<think>unclosed thinking",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 3}</tool_call>',
    "<tool_call>[1, 2]</tool_call>",
    "<answer>unclosed",
    '<tool_call>{"name": "x"}</tool_call><answer>both</answer>',
    "\x00\x01\udcff<answer>\U0001f600</answer>",
)


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, whether it passed, and when it did not, the problem and the fix."""

    name: str
    ok: bool
    problem: str = ""
    fix: str = ""


def check_tool_env(cls: type[ToolEnv], seeds: int = 5, random_turns: int = 20) -> list[CheckResult]:
    """Run every check on `cls`; later checks are skipped when the env cannot even be built."""
    results: list[CheckResult] = []
    try:
        env = cls()
    except Exception as exc:
        return [CheckResult("builds with defaults", False, f"{cls.__name__}() raised {type(exc).__name__}: {exc}",
                            "give every __init__ argument a default and pass options through EnvConfig.kwargs")]
    results.append(CheckResult("builds with defaults", True))
    results.append(_check_tools(env))
    results.append(_check_gymnasium(env))
    results.append(_check_seeding(cls, seeds))
    results.append(_check_score(env))
    results.append(_check_bad_turns(env, random_turns))
    return results


def _check_tools(env: ToolEnv) -> CheckResult:
    if not env.tools:
        return CheckResult("has tools with schemas", False, "no method is marked @tool",
                           "decorate each tool method with @tool and give it type hints and a docstring")
    return CheckResult("has tools with schemas", True)


def _check_gymnasium(env: ToolEnv) -> CheckResult:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env, skip_render_check=True)
    except Exception as exc:
        text = str(exc)
        if "super().reset(seed=seed)" in text:
            fix = "call super().reset(seed=seed, options=options) first in reset, or do not override reset"
        elif "observation space" in text:
            fix = "return text from make_task and the tools; ToolEnv makes it printable unless reset/step are overridden"
        else:
            fix = "follow Gymnasium's message above; ToolEnv's own reset and step pass this check"
        return CheckResult("gymnasium check_env", False, f"{type(exc).__name__}: {text}", fix)
    return CheckResult("gymnasium check_env", True)


def _check_seeding(cls: type[ToolEnv], seeds: int) -> CheckResult:
    name = "reset is deterministic under a seed"
    fix = "draw all randomness in make_task from its rng argument, never from `random`, numpy's global state or time"
    try:
        a, b = cls(), cls()
        tasks = []
        for seed in range(seeds):
            obs_a, obs_b = a.reset(seed=seed)[0], b.reset(seed=seed)[0]
            if obs_a != obs_b or repr(a.expected) != repr(b.expected):
                return CheckResult(name, False, f"two resets with seed={seed} gave different tasks", fix)
            tasks.append(obs_a)
    except Exception as exc:
        return CheckResult(name, False, f"reset raised {type(exc).__name__}: {exc}", "make make_task work for any seed")
    if seeds > 1 and len(set(tasks)) == 1:
        return CheckResult(name, False, f"{seeds} different seeds gave the same task",
                           "make make_task draw the task from its rng argument")
    return CheckResult(name, True)


def _check_score(env: ToolEnv) -> CheckResult:
    name = "score returns a finite number"
    try:
        env.reset(seed=0)
        values = [env.score(str(env.expected), env.expected), env.score("", env.expected)]
    except Exception as exc:
        return CheckResult(name, False, f"score raised {type(exc).__name__}: {exc}",
                           "score must accept any answer string (the policy writes it) and return a float")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        return CheckResult(name, False, f"score returned {bad[0]!r}", "return a finite float, e.g. float(answer == expected)")
    return CheckResult(name, True)


def _check_bad_turns(env: ToolEnv, random_turns: int) -> CheckResult:
    name = "random and malformed turns do not crash step"
    rng = random.Random(0)
    turns: list[Any] = list(MALFORMED_TURNS)
    for tool_name, spec in sorted(env.tools.items()):
        # Every argument with a value of the wrong JSON type.
        wrong = {arg: [] if spec.parameters["properties"][arg].get("type") == "string" else "x" for arg in spec.hints}
        turns.append('<tool_call>{"name": "%s", "arguments": %s}</tool_call>' % (tool_name, json.dumps(wrong)))
    chars = [chr(i) for i in range(32, 127)] + ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "{", "}"]
    turns += ["".join(rng.choice(chars) for _ in range(rng.randint(0, 120))) for _ in range(random_turns)]
    env.reset(seed=0)
    for turn in turns:
        try:
            obs, reward, terminated, truncated, _ = env.step(turn)
        except Exception as exc:
            return CheckResult(name, False, f"step({turn[:60]!r}) raised {type(exc).__name__}: {exc}",
                               "if you override step, keep ToolEnv's handling: parse with parse_turn and report problems as results")
        if not env.observation_space.contains(obs):
            return CheckResult(name, False, f"step({turn[:60]!r}) returned an observation outside the Text space",
                               "do not override _observation; tools must return text")
        if terminated or truncated:
            env.reset(seed=0)
    return CheckResult(name, True)
