"""Keys and values of recent sequences, kept between generation calls, so a multi-turn
conversation's next turn prefills only what was added since the last one.

An agent's turn k + 1 prompts with turn k's prompt, its completion and the tool's answer; without
a cache the generator runs all of it through the model again. `PrefixCache` keeps, for each
sequence a call ran (prompt plus the sampled tokens that were fed back), every layer's keys and
values (and MSA index keys) for its tokens, and hands back the longest common prefix of a new
prompt with any kept sequence. Keys at a position depend only on the tokens up to it, so a
common prefix's keys are exact whatever came after it in the kept sequence. Entries are valid for
one set of weights: the generator clears the cache when its policy version changes. Least
recently used sequences go first once the kept tokens pass the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from forge.policy.choices import Choices


@dataclass
class CachedPrefix:
    """One kept sequence: per layer, k and v [n, Hkv, D] and, for MSA layers, ik [n, Di]; the
    tokens' recorded choices [n, ...] when the generator records them (forge.policy.choices)."""

    tokens: np.ndarray
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ik: list[torch.Tensor | None]
    choices: Choices | None = None


class PrefixCache:
    """Least-recently-used sequences' keys and values, up to `budget_tokens` tokens in all."""

    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError(f"budget_tokens must be at least 1, got {budget_tokens}; use no cache to turn it off")
        self.budget_tokens = budget_tokens
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self.tokens = 0
        """Tokens held now."""
        self.hits = 0
        """Prompt tokens served from the cache since it was made (not prefilled again)."""
        self._matrix: tuple[list[tuple[int, ...]], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._matrix = None
        self.tokens = 0

    def _table(self) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """The kept sequences' keys and their tokens as one [E, longest] matrix padded with -1,
        rebuilt after a change, so a lookup compares against all of them in one operation."""
        if self._matrix is None:
            keys = list(self._entries)
            width = max(len(k) for k in keys)
            matrix = np.full((len(keys), width), -1, dtype=np.int64)
            for row, key in enumerate(keys):
                matrix[row, : len(key)] = self._entries[key].tokens
            self._matrix = (keys, matrix)
        return self._matrix

    def lookup(self, prompt: list[int]) -> tuple[CachedPrefix | None, int]:
        """The kept sequence sharing the longest prefix with `prompt`, and that length, at most
        len(prompt) - 1 (the last token always runs, for its logits); (None, 0) if none shares one."""
        if not self._entries or len(prompt) < 2:
            return None, 0
        keys, matrix = self._table()
        m = min(matrix.shape[1], len(prompt) - 1)
        same = matrix[:, :m] == np.asarray(prompt[:m], dtype=np.int64)  # [E, m]; padding never matches
        shared = np.where(same.all(axis=1), m, same.argmin(axis=1))  # [E]
        best = int(shared.argmax())
        n = int(shared[best])
        if n == 0:
            return None, 0
        self._entries.move_to_end(keys[best])
        self.hits += n
        return self._entries[keys[best]], n

    def store(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor],
              ik: list[torch.Tensor | None], choices: Choices | None = None) -> None:
        """Keep `tokens` with their keys (each [n, ...] for n = len(tokens)); evicts to the budget."""
        n = len(tokens)
        if n == 0 or n > self.budget_tokens:
            return
        key = tuple(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = CachedPrefix(np.asarray(tokens, dtype=np.int64), k, v, ik, choices)
        self._matrix = None
        self.tokens += n
        while self.tokens > self.budget_tokens:
            _, old = self._entries.popitem(last=False)
            self.tokens -= len(old.tokens)
