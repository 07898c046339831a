"""Policy-gradient losses as pure functions over per-sequence logprob lists, registered by name.

Each loss takes, per sequence, the current logprobs (differentiable), the logprobs of the
policy that sampled the tokens, a loss mask (1 where the token was sampled by the policy, 0
for prompt and tool-result tokens) and one advantage per sequence. Because the inputs are
per-sequence lists, the losses are the same whether the logprobs came from a merged prefix
tree or from each sequence alone.

Reductions: by default GRPO averages tokens within a sequence, then sequences (the original
GRPO normalization); PPO-clip and CISPO average over all loss tokens of the batch (DAPO's
token-level normalization, which CISPO's paper also uses). Every loss takes any of the three
reductions of `reduce_token_losses` (token mean, sequence mean, Dr. GRPO's constant). No KL
term: a reference penalty, if any, is the trainer's to add.

An episode that compacted its context is several sequences; `episode_weights` gives the
per-sequence factors that make the sequence reductions count each such episode once, as one
sequence holding all its segments' loss tokens (AlgorithmConfig.segment_weighting 'episode').
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


REDUCTIONS = ("token_mean", "seq_mean", "dr_grpo")
"""How per-token losses become one number; `reduce_token_losses` documents each."""


def reduce_token_losses(
    token_losses: Tensors, masks: Tensors, reduction: str, *, dr_grpo_constant: int = 1024,
    weights: Tensors | None = None,
) -> torch.Tensor:
    """One scalar from per-sequence token losses, counting only tokens where the mask is 1.

    `weights` (per sequence, per token, no gradient) multiply the token losses, e.g. the
    importance weights of forge.trainer.mismatch; the normalisers stay the masks' counts.

    'token_mean': the sum over all loss tokens of the batch over their number (DAPO); long
    sequences weigh more. 'seq_mean': each sequence's mean, then the mean over sequences
    (the original GRPO); every sequence weighs the same. 'dr_grpo': the sum over each
    sequence's loss tokens divided by a constant, then the mean over sequences (Dr. GRPO),
    which removes the length bias of both means.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if dr_grpo_constant <= 0:
        raise ValueError(f"dr_grpo_constant must be positive, got {dr_grpo_constant}")
    if weights is None:
        sums = [(t * m.to(t.dtype)).sum() for t, m in zip(token_losses, masks)]
    else:
        if len(weights) != len(masks):
            raise ValueError(f"got {len(weights)} weight tensors for {len(masks)} sequences; pass one per sequence")
        sums = [(t * m.to(t.dtype) * w.to(t.device, t.dtype).detach()).sum() for t, m, w in zip(token_losses, masks, weights)]
    if reduction == "token_mean":
        return torch.stack(sums).sum() / sum(m.sum() for m in masks).clamp(min=1)
    if reduction == "seq_mean":
        return torch.stack([s / m.sum().clamp(min=1) for s, m in zip(sums, masks)]).mean()
    return torch.stack(sums).mean() / dr_grpo_constant


def episode_weights(
    masks: Tensors, episode_index: Sequence[int], reduction: str, *, sequences: float, episodes: float,
) -> torch.Tensor | None:
    """[num sequences] float64: what multiplies each sequence's token losses so that a sequence
    reduction averages over episodes instead of sequences; None for 'token_mean', which counts
    tokens and so counts an episode's tokens once already.

    The sequences of an episode (its context segments) must all be in `masks`; `sequences` and
    `episodes` are the counts the step is normalised by (over all ranks and micro-batches, whose
    losses are scaled by their share of `sequences`). Sequence i of episode e, with n_i loss tokens
    of the episode's N_e, gets n_i / N_e * sequences / episodes under 'seq_mean' (the episode's
    value is then its loss tokens' mean over all its segments) and sequences / episodes under
    'dr_grpo' (their sum over the constant); each episode weighs 1 / episodes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if len(episode_index) != len(masks):
        raise ValueError(f"got {len(episode_index)} episode indices for {len(masks)} sequences; pass one per sequence")
    if reduction == "token_mean":
        return None
    scale = sequences / max(episodes, 1.0)
    if reduction == "dr_grpo":
        return torch.full((len(masks),), scale, dtype=torch.float64)
    n = torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64)
    index = torch.as_tensor(list(episode_index), dtype=torch.long)
    per_episode = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=torch.float64).index_add_(0, index, n)
    return n / per_episode[index].clamp(min=1) * scale


def grpo_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_low: float = 0.2, clip_high: float = 0.2, reduction: str = "seq_mean", dr_grpo_constant: int = 1024,
    weights: Tensors | None = None,
) -> torch.Tensor:
    """Clipped surrogate; by default the mean over each sequence's loss tokens, then over sequences."""
    _check(logprobs, old_logprobs, masks, advantages)
    per_token = [_clipped_surrogate(lp, old, a, clip_low, clip_high)
                 for lp, old, a in zip(logprobs, old_logprobs, advantages)]
    return reduce_token_losses(per_token, masks, reduction, dr_grpo_constant=dr_grpo_constant, weights=weights)


def ppo_clip_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_low: float = 0.2, clip_high: float = 0.28, reduction: str = "token_mean", dr_grpo_constant: int = 1024,
    weights: Tensors | None = None,
) -> torch.Tensor:
    """Clipped surrogate; by default averaged over all loss tokens of the batch."""
    _check(logprobs, old_logprobs, masks, advantages)
    per_token = [_clipped_surrogate(lp, old, a, clip_low, clip_high)
                 for lp, old, a in zip(logprobs, old_logprobs, advantages)]
    return reduce_token_losses(per_token, masks, reduction, dr_grpo_constant=dr_grpo_constant, weights=weights)


def cispo_loss(
    logprobs: Tensors, old_logprobs: Tensors, masks: Tensors, advantages: torch.Tensor,
    *, clip_high: float = 4.0, reduction: str = "token_mean", dr_grpo_constant: int = 1024,
    weights: Tensors | None = None,
) -> torch.Tensor:
    """CISPO (MiniMax-M1): REINFORCE weighted by the importance ratio, clipped and detached.

    Every token keeps its gradient; only the weight is bounded, unlike PPO which drops the
    gradient of clipped tokens. By default averaged over all loss tokens of the batch.
    """
    _check(logprobs, old_logprobs, masks, advantages)
    per_token = [-torch.exp(lp - old).clamp(max=clip_high).detach() * a * lp
                 for lp, old, a in zip(logprobs, old_logprobs, advantages)]
    return reduce_token_losses(per_token, masks, reduction, dr_grpo_constant=dr_grpo_constant, weights=weights)


DEFAULT_REDUCTION = {"grpo": "seq_mean", "ppo_clip": "token_mean", "cispo": "token_mean"}
"""Each loss's reduction as its paper has it; a recipe's `algorithm.reduction` may override it."""


LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {"grpo": grpo_loss, "ppo_clip": ppo_clip_loss, "cispo": cispo_loss}
"""Policy losses by the name a recipe gives."""
