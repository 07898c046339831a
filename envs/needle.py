"""Needle: multi-hop retrieval over a long generated document with `search` and `read` tools.

The document is numbered lines of filler prose with facts scattered through it: where each
artifact is kept, who guards each place, which city each guard comes from. A question chains
two or three facts ("Which city does the guard of the place where the silver compass is kept
come from?"), and decoy facts about other artifacts make a guess wrong. The agent cannot see
the document, only search it and read lines, so its context grows with what it reads.
Difficulty sets the length: about 2k characters at level 0, four times more per level (level 3
is about 140k characters and level 4 about 550k: tens of thousands of tokens with a subword
tokenizer, more with the byte one), and three hops from level 2 on.
"""

from __future__ import annotations

import random
import re
from typing import Generator

from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call, tool_results

_COLORS = ("silver", "golden", "crimson", "azure", "ivory", "jade", "amber", "violet", "copper", "obsidian")
_OBJECTS = ("compass", "lantern", "chalice", "key", "mirror", "scroll", "crown", "dagger", "globe", "harp")
_SIDES = ("north", "south", "east", "west", "upper", "lower", "old", "new", "inner", "outer")
_BUILDINGS = ("tower", "cellar", "library", "chapel", "vault", "stable", "garden", "mill", "gate", "hall")
_FIRST = ("Ada", "Bruno", "Clara", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca")
_LAST = ("Marsh", "Quill", "Stone", "Vale", "Thorne", "Reyes", "Okafor", "Lind", "Brandt", "Moreau")
_CITIES = ("Aldport", "Brightwater", "Coldharbor", "Dunmere", "Eastwick", "Fairhold", "Glenrock", "Highmoor",
           "Ironvale", "Juniper Bay", "Kingsreach", "Lowfield")
_FILLER_SUBJECTS = ("The river", "A merchant", "The old road", "A traveller", "The council", "The wind",
                    "A scholar", "The market", "A shepherd", "The harbour")
_FILLER_VERBS = ("passes", "watches", "remembers", "follows", "crosses", "describes", "ignores", "circles")
_FILLER_OBJECTS = ("the quiet hills", "a field of barley", "the morning fog", "an empty square",
                   "the long winter", "a row of lanterns", "the salt flats", "a broken fence")

LINES_PER_READ = 40


class NeedleEnv(ToolEnv):
    """Multi-hop questions over a long document; difficulty 0..4 sets length and hops."""

    max_turns = 12
    max_result_chars = 8000

    def make_task(self, rng: random.Random) -> tuple[str, str]:
        level = max(0, min(self.difficulty, 4))
        n_lines = 40 * 4**level
        hops = 2 if level < 2 else 3
        n_chains = 4 + 2 * level
        artifacts = rng.sample([f"{c} {o}" for c in _COLORS for o in _OBJECTS], n_chains)
        places = rng.sample([f"{s} {b}" for s in _SIDES for b in _BUILDINGS], n_chains)
        guards = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], n_chains)
        cities = [rng.choice(_CITIES) for _ in range(n_chains)]
        facts = []
        for a, p, g, c in zip(artifacts, places, guards, cities):
            facts.append(f"The {a} is kept in the {p}.")
            facts.append(f"The {p} is guarded by {g}.")
            facts.append(f"{g} comes from {c}.")
        lines = [self._filler(rng) for _ in range(n_lines)]
        # Facts land on distinct random lines, so a chain's links are far apart.
        for fact, at in zip(facts, rng.sample(range(n_lines), len(facts))):
            lines[at] = fact
        self.document = lines
        target = rng.randrange(n_chains)
        if hops == 2:
            question = f"Who guards the place where the {artifacts[target]} is kept?"
            answer = guards[target]
        else:
            question = f"Which city does the guard of the place where the {artifacts[target]} is kept come from?"
            answer = cities[target]
        prompt = (
            f"A document of {n_lines} numbered lines (0 to {n_lines - 1}) is hidden from you; use the tools "
            f"to search and read it. {question} Answer with the name only."
        )
        return prompt, answer

    @staticmethod
    def _filler(rng: random.Random) -> str:
        return " ".join(
            f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_OBJECTS)}."
            for _ in range(rng.randint(1, 2))
        )

    @tool
    def search(self, query: str) -> str:
        """Find the lines of the document that contain a phrase (case-insensitive).

        Args:
            query: The phrase to look for, e.g. "silver compass".
        """
        needle = query.strip().lower()
        if not needle:
            return "error: the query is empty"
        hits = [i for i, line in enumerate(self.document) if needle in line.lower()]
        if not hits:
            return f"no line contains {query!r}"
        shown = "\n".join(f"{i}: {self.document[i]}" for i in hits[:20])
        more = f"\n({len(hits) - 20} more lines match)" if len(hits) > 20 else ""
        return shown + more

    @tool
    def read(self, line: int, count: int = 10) -> str:
        """Read lines of the document, starting at a line number.

        Args:
            line: The first line to read.
            count: How many lines to read (at most 40).
        """
        if not 0 <= line < len(self.document):
            return f"error: line {line} is outside the document (0 to {len(self.document) - 1})"
        count = max(1, min(count, LINES_PER_READ))
        return "\n".join(f"{i}: {self.document[i]}" for i in range(line, min(line + count, len(self.document))))

    def score(self, answer: str, expected: str) -> float:
        return float(answer.strip().rstrip(".").lower() == expected.lower())

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Follow the chain with searches (and one read of the first hit's neighbourhood)."""
        artifact = re.search(r"where the (.+?) is kept", prompt).group(1)
        hit = tool_results((yield render_tool_call("search", {"query": f"The {artifact} is kept in"})))[0]
        place = re.search(r"kept in the (.+?)\.", hit).group(1)
        line = int(re.match(r"(\d+):", hit).group(1))
        yield "<think>Read around it.</think>" + render_tool_call("read", {"line": max(0, line - 2), "count": 5})
        hit = tool_results((yield render_tool_call("search", {"query": f"The {place} is guarded by"})))[0]
        guard = re.search(r"guarded by (.+?)\.", hit).group(1)
        if "Which city" not in prompt:
            yield f"<answer>{guard}</answer>"
            return
        hit = tool_results((yield render_tool_call("search", {"query": f"{guard} comes from"})))[0]
        yield "<answer>" + re.search(r"comes from (.+?)\.", hit).group(1) + "</answer>"
