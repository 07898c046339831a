"""From groups of trajectories to what the loss needs, and micro-batches that keep groups whole.

Per sequence the loss works on the tokens after the first (the ones a logprob exists for):
the loss mask, the sampler's logprobs and the advantage are all aligned to that. Micro-batches
are formed as `forge.prefix_tree.pack_groups` forms them (`pack_ids`) under a budget of unique tokens, so the shared
prompt of a group is paid once per micro-batch, never split from its samples unless the group
alone is over the budget.

An episode that compacted its context is several sequences (its segments, consecutive in its
group); `episode_index` ties them together, and under segment weighting 'episode' (the
default, AlgorithmConfig.segment_weighting) the advantages are those of the group's episodes,
each broadcast to all of an episode's segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.middleware.types import Group
from forge.prefix_tree import pack_ids
from forge.prefix_tree.trie import list_tensor
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
    episode_index: list[int]
    """Per sequence, its episode's index in the batch (0, 1, ...): segments of one episode share it."""
    choices: list[tuple[bytes, bytes]] | None = None
    """Per sequence, the sampler's packed routing-replay record (`Trajectory.choice_experts`,
    `choice_blocks`); None when no trajectory of the batch carries one."""

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(m.sum().item() for m in self.masks))

    @property
    def num_episodes(self) -> int:
        return self.episode_index[-1] + 1 if self.episode_index else 0

    @property
    def episode_rewards(self) -> torch.Tensor:
        """[num episodes] float64: each episode's reward (that of its first segment)."""
        first = [j for j, e in enumerate(self.episode_index) if j == 0 or self.episode_index[j - 1] != e]
        return self.rewards[first]


SEGMENT_WEIGHTINGS = ("episode", "segment")
"""How a segmented episode counts; AlgorithmConfig.segment_weighting documents each."""


def make_batch(groups: list[Group], advantage: str, weighting: str = "episode") -> RLBatch:
    """Flatten groups into an RLBatch, with advantages computed within each group: over its
    episodes' rewards (weighting 'episode') or over its sequences' (weighting 'segment')."""
    if not groups:
        raise ValueError("make_batch got no groups")
    if weighting not in SEGMENT_WEIGHTINGS:
        raise ValueError(f"segment weighting {weighting!r} is not one of {', '.join(SEGMENT_WEIGHTINGS)}")
    sequences, masks, sampler, episode_index, choices = [], [], [], [], []
    n_episodes = 0
    for group in groups:
        for segments in group.episodes:
            if len({t.reward for t in segments}) > 1:
                raise ValueError(f"group {group.group_id}: an episode's segments carry rewards "
                                 f"{[t.reward for t in segments]}; give every segment the episode's reward")
            for traj in segments:
                if not traj.ok:
                    raise ValueError(f"group {group.group_id} holds a failed trajectory ({traj.failure_reason}); "
                                     "rollout workers retry or drop such groups before they reach the trainer")
                ids = traj.token_ids
                if len(ids) < 2:
                    raise ValueError(f"trajectory of group {group.group_id} has {len(ids)} tokens; it needs at least 2")
                sequences.append(ids)
                masks.append(list_tensor(traj.loss_mask[1:], torch.float64))
                sampler.append(list_tensor(traj.sampling_logprobs[1:], torch.float64))
                episode_index.append(n_episodes)
                choices.append((traj.choice_experts, traj.choice_blocks))
            n_episodes += 1
    rewards = [g.rewards for g in groups]
    if weighting == "episode":
        advantages = group_advantages(advantage, [g.episode_rewards for g in groups])[episode_index]
    else:
        advantages = group_advantages(advantage, rewards)
    return RLBatch(
        sequences=sequences, masks=masks, sampler_logprobs=sampler, advantages=advantages,
        rewards=torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64),
        group_sizes=[len(g.trajectories) for g in groups],
        min_policy_version=min(g.min_policy_version for g in groups), episode_index=episode_index,
        choices=choices if any(e or b for e, b in choices) else None,
    )


def micro_batches(batch: RLBatch, token_budget: int) -> list[list[int]]:
    """Indices of the sequences of each micro-batch; whole groups together where they fit."""
    starts = [0]
    for size in batch.group_sizes:
        starts.append(starts[-1] + size)
    groups = [batch.sequences[a:b] for a, b in zip(starts, starts[1:])]
    return pack_ids(groups, token_budget)

