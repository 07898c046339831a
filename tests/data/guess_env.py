"""A one-turn environment where any answer earns some reward, for loop tests that need RL to
move the weights within a few steps (the calculator pays nothing until a model can add)."""

from __future__ import annotations

import random
import re
from typing import Generator

from forge.agent_side import ToolEnv, tool


class GuessEnv(ToolEnv):
    """Guess a digit: 1 for the right one, 0.5 for any other digit, 0 for anything else."""

    max_turns = 1

    def make_task(self, rng: random.Random) -> tuple[str, str]:
        digit = str(rng.randrange(10))
        return f"Say {digit}.", digit

    @tool
    def echo(self, text: str) -> str:
        """Return the text."""
        return text

    def score(self, answer: str, expected: str) -> float:
        answer = answer.strip()
        return 1.0 if answer == expected else 0.5 if answer.isdigit() else 0.0

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        digit = re.search(r"Say (\d)\.", prompt).group(1)
        yield f"<answer>{digit}</answer>"
