"""From groups of trajectories to what the loss needs, and micro-batches that keep groups whole.

Per sequence the loss works on the tokens after the first (the ones a logprob exists for):
the loss mask, the sampler's logprobs and the advantage are all aligned to that. Micro-batches
are formed by `forge.prefix_tree.pack_groups` under a budget of unique tokens, so the shared
prompt of a group is paid once per micro-batch, never split from its samples unless the group
alone is over the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.middleware.types import Group
from forge.prefix_tree import pack_groups
from forge.trainer.advantages import group_advantages


@dataclass
class RLBatch:
    """One optimizer step's data, flat over the sequences of its groups (in group order)."""

    sequences: list[list[int]]
    """Token ids of each trajectory."""
    masks: list[torch.Tensor]
    """Per sequence, [len - 1] float: 1 where the token was sampled by the policy."""
    sampler_logprobs: list[torch.Tensor]
    """Per sequence, [len - 1] float64: the sampler's logprob of each token (0 off the mask)."""
    advantages: torch.Tensor
    """[num sequences] float64."""
    rewards: torch.Tensor
    """[num sequences] float64."""
    group_sizes: list[int]
    """Sequences per group, in order."""
    min_policy_version: int
    """Oldest weights any turn of the batch was sampled with."""

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(m.sum().item() for m in self.masks))


def make_batch(groups: list[Group], advantage: str) -> RLBatch:
    """Flatten groups into an RLBatch, with advantages computed within each group."""
    if not groups:
        raise ValueError("make_batch got no groups")
    sequences, masks, sampler = [], [], []
    for group in groups:
        for traj in group.trajectories:
            if not traj.ok:
                raise ValueError(f"group {group.group_id} holds a failed trajectory ({traj.failure_reason}); "
                                 "rollout workers retry or drop such groups before they reach the trainer")
            ids = traj.token_ids
            if len(ids) < 2:
                raise ValueError(f"trajectory of group {group.group_id} has {len(ids)} tokens; it needs at least 2")
            sequences.append(ids)
            masks.append(torch.tensor(traj.loss_mask[1:], dtype=torch.float64))
            sampler.append(torch.tensor(traj.sampling_logprobs[1:], dtype=torch.float64))
    rewards = [g.rewards for g in groups]
    return RLBatch(
        sequences=sequences, masks=masks, sampler_logprobs=sampler,
        advantages=group_advantages(advantage, rewards),
        rewards=torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64),
        group_sizes=[len(g.trajectories) for g in groups],
        min_policy_version=min(g.min_policy_version for g in groups),
    )


def micro_batches(batch: RLBatch, token_budget: int) -> list[list[int]]:
    """Indices of the sequences of each micro-batch; whole groups together where they fit."""
    starts = [0]
    for size in batch.group_sizes:
        starts.append(starts[-1] + size)
    groups = [batch.sequences[a:b] for a, b in zip(starts, starts[1:])]
    return [pack.seq_ids for pack in pack_groups(groups, token_budget)]

