"""Relay: a multi-hop chase through long pages, longer than the context unless the agent compacts.

A long variant of needle's multi-hop retrieval, made for context management (docs/context.md).
The task names a start page; each page is a screen of filler prose, then one code fragment and
the number of the next page (from level 2 on, the two facts hide at random places in the
prose). The agent reads a page with `read(page)`, follows the chain, and answers with the
fragments in order. Every page it reads stays in its context, and the pages of a whole chase
do not fit in the recipe's `rollout.max_context_tokens`: with `rollout.context.compact` on, the
agent must compact (keep the fragments so far and the next page in its summary) to finish.
Difficulty sets the hops: 2 at level 0, one more per level, at most 9 (there are 10 pages).

Reward: the share of fragments answered in their place (partial credit), 1.0 for all of them.
The oracle reads each page, and compacts when the context asks it to.
"""

from __future__ import annotations

import random
import re
from typing import Generator

from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call, tool_results

PAGES = 10
_LETTERS = "abcdefghijkmnpqrstuvwxyz"
"""Fragments are single letters and pages single digits: each copy the agent makes is one token."""
_SUBJECTS = ("The river", "A merchant", "The old road", "A traveller", "The council", "The wind", "A scholar",
             "The market", "A shepherd", "The harbour", "The lamp", "A sailor")
_VERBS = ("passes", "watches", "remembers", "follows", "crosses", "describes", "ignores", "circles")
_OBJECTS = ("the quiet hills", "a field of barley", "the morning fog", "an empty square", "the long winter",
            "a row of lanterns", "the salt flats", "a broken fence")


class RelayEnv(ToolEnv):
    """Follow a chain of pages, collecting a code fragment from each; level sets the hops (2 + level)."""

    max_turns = 24
    page_sentences = 4
    """Filler sentences per page (about 30 characters each): sets how much context a page costs."""

    def make_task(self, rng: random.Random) -> tuple[str, list[str]]:
        hops = min(2 + max(0, self.difficulty), PAGES - 1)
        chain = rng.sample(range(PAGES), hops + 1)
        self.pages: dict[int, str] = {}
        fragments = []
        for i, page in enumerate(chain[:hops]):
            fragment = rng.choice(_LETTERS)
            fragments.append(fragment)
            facts = [f"Fragment: {fragment}."]
            facts.append(f"Next page: {chain[i + 1]}." if i + 1 < hops else "This is the last page.")
            lines = [self._filler(rng) for _ in range(self.page_sentences)]
            if self.difficulty < 2:
                # The page ends with its facts: what costs context is the prose before them.
                lines = lines + facts
            else:
                for fact, at in zip(facts, sorted(rng.sample(range(len(lines) + 1), len(facts)))):
                    lines.insert(at, fact)
            self.pages[page] = " ".join(lines)
        prompt = f"Each page gives a fragment and the next page; answer with the fragments in order. Read page {chain[0]}."
        return prompt, fragments

    @staticmethod
    def _filler(rng: random.Random) -> str:
        return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."

    @tool
    def read(self, page: int) -> str:
        """Read a page.

        Args:
            page: The page number.
        """
        if page in self.pages:
            return self.pages[page]
        if 0 <= page < PAGES:
            return f"page {page} is blank"
        return f"error: pages are numbered 0 to {PAGES - 1}"

    def score(self, answer: str, expected: list[str]) -> float:
        given = answer.replace(",", " ").split()
        return sum(1.0 for a, b in zip(given, expected) if a.strip(".").lower() == b) / len(expected) \
            if len(given) <= len(expected) else 0.0

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Read each page in turn; compact when asked, keeping the fragments and the next page."""
        found: list[str] = []
        page = int(re.search(r"Read page (\d+)", prompt).group(1))
        while True:
            obs = yield render_tool_call("read", {"page": page})
            text = " ".join(tool_results(obs))
            found.append(re.search(r"Fragment: (\w+)\.", text).group(1))
            if "This is the last page." in text:
                yield "<answer>" + " ".join(found) + "</answer>"
                return
            page = int(re.search(r"Next page: (\d+)\.", text).group(1))
            if "call compact" in obs:
                summary = f"fragments {' '.join(found)}, next page {page}"
                # The new context holds the prompt and this summary: go on from what it says.
                yield render_tool_call("compact", {"summary": summary})
