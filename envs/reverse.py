"""Reverse: the smallest environment, the example of the issue and of docs/envs.md.

It is here to be copied: a task generator, one tool, a score, and an oracle (optional: the
demonstrations of a supervised warm-start). It also makes a quick smoke test for a recipe,
since a policy that follows the protocol solves it in two turns.
"""

from __future__ import annotations

import random
import re
from typing import Generator

from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call, tool_results


class ReverseEnv(ToolEnv):
    """Reverse a five-letter word, with a `reverse` tool to help."""

    max_turns = 4

    def make_task(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(list("abcdef")) for _ in range(5))
        return f"Reverse the word {word}.", word[::-1]  # prompt, expected answer

    @tool
    def reverse(self, text: str) -> str:
        """Reverse a string."""
        return text[::-1]

    def score(self, answer: str, expected: str) -> float:
        return float(answer.strip() == expected)

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Turns that solve the task from what the agent sees: yields a turn, receives the reply."""
        word = re.search(r"Reverse the word (\w+)\.", prompt).group(1)
        reply = yield "<think>The tool reverses it.</think>" + render_tool_call("reverse", {"text": word})
        yield f"<answer>{tool_results(reply)[0]}</answer>"
