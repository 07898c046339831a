"""Advantages as pure functions of a group's rewards, registered by name.

Each takes the rewards of one group (the G samples of one task) and returns one advantage per
sample; the trainer broadcasts it over the sample's loss tokens.

- `grpo`: (r - mean) / (std + eps), the group-normalised advantage of DeepSeekMath's GRPO.
- `dr_grpo`: r - mean, without the division by the standard deviation (Dr. GRPO, "Understanding
  R1-Zero-like training"), which otherwise up-weights groups whose rewards barely differ.

A group whose rewards are all equal gets zero advantages under both: it carries no signal.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

AdvantageFn = Callable[[Sequence[float]], torch.Tensor]


def grpo_advantages(rewards: Sequence[float], *, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages; std is the population std of the group."""
    r = torch.as_tensor(list(rewards), dtype=torch.float64)
    centred = r - r.mean()
    return centred / (r.std(unbiased=False) + eps)


def dr_grpo_advantages(rewards: Sequence[float]) -> torch.Tensor:
    """Mean-centred advantages without std normalisation (Dr. GRPO)."""
    r = torch.as_tensor(list(rewards), dtype=torch.float64)
    return r - r.mean()


ADVANTAGES: dict[str, AdvantageFn] = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages}
"""Advantage estimators by the name a recipe gives."""


def group_advantages(name: str, groups_rewards: Sequence[Sequence[float]]) -> torch.Tensor:
    """Advantages of every sample of every group, flat in group order."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator '{name}'; known: {', '.join(ADVANTAGES)}")
    fn = ADVANTAGES[name]
    return torch.cat([fn(r) for r in groups_rewards]) if groups_rewards else torch.zeros(0, dtype=torch.float64)
