"""Maze: a stateful game that takes many tool calls in the right order.

The agent gets the maze's map and moves through it one cell per `move` call; `look` tells where
it stands and which ways are open. The exit holds a code word that only `look` at the exit
reveals, and the answer is that code, so an episode scores only if the agent really walked
there: the order of the calls matters, a wrong move hits a wall and changes nothing.
Difficulty sets the size (5x5 cells at level 0, two more per side per level).
"""

from __future__ import annotations

import random
import re
from collections import deque
from typing import Generator, Literal

from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call

_MOVES = {"north": (-1, 0), "south": (1, 0), "west": (0, -1), "east": (0, 1)}
_CODE_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "gale", "heron", "indigo", "juniper",
               "kestrel", "lotus", "maple", "nectar", "onyx", "pebble", "quartz", "raven", "sable", "thistle")


def carve(rng: random.Random, size: int) -> list[str]:
    """A perfect maze (one path between any two cells) as rows of '#' and ' ', drawn by DFS."""
    grid = [["#"] * (2 * size + 1) for _ in range(2 * size + 1)]
    stack = [(0, 0)]
    seen = {(0, 0)}
    grid[1][1] = " "
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc, dr, dc) for dr, dc in _MOVES.values()
                   if 0 <= r + dr < size and 0 <= c + dc < size and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        nr, nc, dr, dc = rng.choice(options)
        grid[2 * r + 1 + dr][2 * c + 1 + dc] = " "
        grid[2 * nr + 1][2 * nc + 1] = " "
        seen.add((nr, nc))
        stack.append((nr, nc))
    return ["".join(row) for row in grid]


class MazeEnv(ToolEnv):
    """Walk from S to E with `move`, read the exit's code with `look`, answer it."""

    max_calls_per_turn = 16

    def __init__(self, difficulty: int = 0, render_mode: str | None = None, prompt_style: str = "full") -> None:
        super().__init__(difficulty=difficulty, render_mode=render_mode, prompt_style=prompt_style)
        self.size = 5 + 2 * max(0, min(self.difficulty, 5))
        # Enough turns for a path through every cell at 16 moves per turn, plus slack.
        self.max_turns = self.size * self.size // 8 + 6

    def make_task(self, rng: random.Random) -> tuple[str, str]:
        self.rows = carve(rng, self.size)
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        self.start, self.exit = rng.sample(cells, 2)
        self.pos = self.start
        code = rng.choice(_CODE_WORDS) + "-" + str(rng.randint(100, 999))
        drawn = [list(row) for row in self.rows]
        drawn[2 * self.start[0] + 1][2 * self.start[1] + 1] = "S"
        drawn[2 * self.exit[0] + 1][2 * self.exit[1] + 1] = "E"
        picture = "\n".join("".join(row) for row in drawn)
        prompt = (
            f"You are at S in this maze ('#' is wall, north is up; each move goes one cell, two characters on the map):\n"
            f"{picture}\nWalk to E with the move tool. At E, use look to read the exit's code, "
            "and answer with the code."
        )
        self.code = code
        return prompt, code

    def _open(self, r: int, c: int) -> list[str]:
        return [d for d, (dr, dc) in _MOVES.items() if self.rows[2 * r + 1 + dr][2 * c + 1 + dc] == " "]

    @tool
    def move(self, direction: Literal["north", "south", "east", "west"]) -> str:
        """Move one cell in a direction, unless a wall is in the way.

        Args:
            direction: One of north, south, east, west.
        """
        r, c = self.pos
        if direction not in self._open(r, c):
            return f"a wall blocks the way {direction}; you stay at row {r}, column {c}"
        dr, dc = _MOVES[direction]
        self.pos = (r + dr, c + dc)
        return f"you are at row {self.pos[0]}, column {self.pos[1]}"

    @tool
    def look(self) -> str:
        """Describe where you stand: your cell, the open directions, and the code if this is the exit."""
        r, c = self.pos
        text = f"row {r}, column {c}; open: {', '.join(self._open(r, c))}"
        if self.pos == self.exit:
            text += f". This is the exit; the code is {self.code}"
        return text

    def score(self, answer: str, expected: str) -> float:
        # Only an agent that reached the exit can know the code; checking the position too keeps
        # a lucky guess from scoring.
        return float(answer.strip().lower() == expected and self.pos == self.exit)

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Find the path on the prompt's map (BFS), walk it in batches of calls, look, answer."""
        rows = [line for line in prompt.splitlines() if line.startswith("#")]
        where = {x: (r, c) for r, row in enumerate(rows) for c, x in enumerate(row) if x in "SE"}
        back: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {where["S"]: None}
        todo = deque([where["S"]])
        while todo:
            r, c = todo.popleft()
            for name, (dr, dc) in _MOVES.items():
                nxt = (r + 2 * dr, c + 2 * dc)
                if rows[r + dr][c + dc] != "#" and nxt not in back:
                    back[nxt] = ((r, c), name)
                    todo.append(nxt)
        path, at = [], where["E"]
        while back[at] is not None:
            at, name = back[at]
            path.append(name)
        path.reverse()
        for i in range(0, len(path), self.max_calls_per_turn):
            yield "".join(render_tool_call("move", {"direction": d}) for d in path[i : i + self.max_calls_per_turn])
        reply = yield render_tool_call("look", {})
        yield "<answer>" + re.search(r"the code is ([\w-]+)", reply).group(1) + "</answer>"
