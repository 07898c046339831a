"""Policy-gradient losses as pure functions over per-sequence logprob lists, registered by name.

Each loss takes, per sequence, the current logprobs (differentiable), the logprobs of the
policy that sampled the tokens, a loss mask (1 where the token was sampled by the policy, 0
for prompt and tool-result tokens) and one advantage per sequence. Because the inputs are
per-sequence lists, the losses are the same whether the logprobs came from a merged prefix
tree or from each sequence alone.

Departures from the papers: GRPO here averages tokens within a sequence, then sequences (the
original GRPO normalization); PPO-clip and CISPO average over all loss tokens of the batch
(DAPO's token-level normalization, which CISPO's paper also uses). No KL term: a reference
penalty, if any, is the trainer's to add.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor]


def _check(logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor) -> None:
    if not (len(logprobs) == len(old_logprobs) == len(masks) == advantages.numel()):
        raise ValueError(
            f"got {len(logprobs)} logprob tensors, {len(old_logprobs)} old logprob tensors, "
            f"{len(masks)} masks and {advantages.numel()} advantages; pass one of each per sequence"
        )
    for i, (lp, old, m) in enumerate(zip(logprobs, old_logprobs, masks)):
        if lp.shape != old.shape or lp.shape != m.shape:
            raise ValueError(
                f"sequence {i}: logprobs {tuple(lp.shape)}, old logprobs {tuple(old.shape)} and mask "
                f"{tuple(m.shape)} differ; each holds one entry per token after the first"
            )


def _clipped_surrogate(lp, old, adv, clip_low: float, clip_high: float) -> torch.Tensor:
    ratio = torch.exp(lp - old.detach())
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * adv, clipped * adv)


def grpo_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_low: float = 0.2, clip_high: float = 0.2,
) -> torch.Tensor:
    """Clipped surrogate, mean over each sequence's loss tokens, then mean over sequences."""
    _check(logprobs, old_logprobs, masks, advantages)
    per_seq = []
    for lp, old, m, a in zip(logprobs, old_logprobs, masks, advantages):
        m = m.to(lp.dtype)
        per_seq.append((_clipped_surrogate(lp, old, a, clip_low, clip_high) * m).sum() / m.sum().clamp(min=1))
    return torch.stack(per_seq).mean()


def ppo_clip_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_low: float = 0.2, clip_high: float = 0.28,
) -> torch.Tensor:
    """Clipped surrogate averaged over all loss tokens of the batch."""
    _check(logprobs, old_logprobs, masks, advantages)
    total = sum((_clipped_surrogate(lp, old, a, clip_low, clip_high) * m.to(lp.dtype)).sum()
                for lp, old, m, a in zip(logprobs, old_logprobs, masks, advantages))
    return total / sum(m.sum() for m in masks).clamp(min=1)


def cispo_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_high: float = 4.0,
) -> torch.Tensor:
    """CISPO (MiniMax-M1): REINFORCE weighted by the importance ratio, clipped and detached.

    Every token keeps its gradient; only the weight is bounded, unlike PPO which drops the
    gradient of clipped tokens.
    """
    _check(logprobs, old_logprobs, masks, advantages)
    total = 0.0
    for lp, old, m, a in zip(logprobs, old_logprobs, masks, advantages):
        weight = torch.exp(lp - old).clamp(max=clip_high).detach()
        total = total + (-weight * a * lp * m.to(lp.dtype)).sum()
    return total / sum(m.sum() for m in masks).clamp(min=1)


LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {"grpo": grpo_loss, "ppo_clip": ppo_clip_loss, "cispo": cispo_loss}
"""Policy losses by the name a recipe gives."""
