"""Train-inference mismatch: how far the sampler's logprobs are from the trainer's, and its correction.

The sampler reports, per sampled token, its logprob under the distribution it drew from
(forge.policy.generation); the trainer recomputes the same tokens' logprobs at the start of a
step (its "old" logprobs, at `algorithm.temperature`). Kernels, precision, batching and
staleness part the two. `mismatch_stats` measures the gap on the loss tokens every step; the
registered corrections reweight each token's loss by the trainer/sampler ratio
r = exp(old - sampler), as truncated importance sampling (TIS: min(r, C)) or masked importance
sampling (MIS: r where r <= C, else 0), per token or per sequence (r of a sequence is the
product over its loss tokens). This follows the fixes published for the mismatch (Yao et al.,
"Your efficient RL framework secretly brings you off-policy RL training", 2025: TIS; MIS as in
its follow-ups and verl's rollout correction). Weights are detached and multiply the token
losses; the reduction's normalisers (token counts) stay those of the loss mask, so a masked
token counts as a zero, not as absent.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor]


def log_ratios(old: Tensors, sampler: Tensors) -> list[torch.Tensor]:
    """Per sequence, log r = trainer old logprob - sampler logprob, in fp64 on the CPU."""
    if len(old) != len(sampler):
        raise ValueError(f"got {len(old)} trainer and {len(sampler)} sampler logprob tensors; pass one of each per sequence")
    out = []
    for i, (o, s) in enumerate(zip(old, sampler)):
        o, s = o.detach().double().cpu(), torch.as_tensor(s).double().cpu()
        if o.shape != s.shape:
            raise ValueError(f"sequence {i}: trainer logprobs {tuple(o.shape)} and sampler logprobs "
                             f"{tuple(s.shape)} differ; each holds one entry per token after the first")
        out.append(o - s)
    return out


def mismatch_stats(old: Tensors, sampler: Tensors, masks: Tensors) -> tuple[dict[str, float], torch.Tensor]:
    """Sums over the loss tokens, to be added over ranks: (stats, the per-token log ratios [N]).

    stats: `abs_sum` (sum of |log r|), `abs_max`, `k3_sum` (sum of r - 1 - log r, Schulman's k3
    estimator of KL(sampler || trainer) from the sampler's tokens, >= 0) and `tokens`.
    """
    d = [lr[m.bool().cpu()] for lr, m in zip(log_ratios(old, sampler), masks)]
    flat = torch.cat(d) if d else torch.zeros(0, dtype=torch.float64)
    if not flat.numel():
        return {"abs_sum": 0.0, "abs_max": 0.0, "k3_sum": 0.0, "tokens": 0.0}, flat
    return {"abs_sum": float(flat.abs().sum()), "abs_max": float(flat.abs().max()),
            "k3_sum": float((torch.expm1(flat) - flat).sum()), "tokens": float(flat.numel())}, flat


def _seq_log_ratio(log_r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (log_r * mask).sum()


def _no_correction(log_r: torch.Tensor, mask: torch.Tensor, threshold: float, level: str) -> torch.Tensor:
    return torch.ones_like(log_r)


def _tis(log_r: torch.Tensor, mask: torch.Tensor, threshold: float, level: str) -> torch.Tensor:
    """Truncated IS: min(r, C) per token, or the sequence's min(prod r, C) on each of its tokens."""
    cap = math.log(threshold)
    if level == "sequence":
        return torch.exp(_seq_log_ratio(log_r, mask).clamp(max=cap)).expand_as(log_r).clone()
    return torch.exp(log_r.clamp(max=cap))


def _mis(log_r: torch.Tensor, mask: torch.Tensor, threshold: float, level: str) -> torch.Tensor:
    """Masked IS: r where r <= C, else 0 (per token, or the whole sequence by its product)."""
    cap = math.log(threshold)
    if level == "sequence":
        s = _seq_log_ratio(log_r, mask)
        return (torch.exp(s) if s <= cap else torch.zeros((), dtype=log_r.dtype)).expand_as(log_r).clone()
    return torch.where(log_r <= cap, torch.exp(log_r.clamp(max=cap)), torch.zeros_like(log_r))


Correction = Callable[[torch.Tensor, torch.Tensor, float, str], torch.Tensor]

IS_CORRECTIONS: dict[str, Correction] = {"none": _no_correction, "tis": _tis, "mis": _mis}
"""Importance-sampling corrections of the sampler/trainer ratio, by the name a recipe gives
(`algorithm.is_correction`)."""

IS_LEVELS = ("token", "sequence")


def is_weights(kind: str, level: str, threshold: float, old: Tensors, sampler: Tensors,
               masks: Tensors) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Per sequence, detached fp64 CPU weights of each token's loss, and sums for the step's metrics.

    Sums: `weight_sum` over loss tokens, `reduced` (loss tokens whose weight the correction
    truncated or masked), `tokens`.
    """
    if kind not in IS_CORRECTIONS:
        raise ValueError(f"algorithm.is_correction {kind!r} is not one of {', '.join(IS_CORRECTIONS)}")
    if level not in IS_LEVELS:
        raise ValueError(f"algorithm.is_level {level!r} is not one of {', '.join(IS_LEVELS)}")
    if not threshold > 1.0:
        raise ValueError(f"algorithm.is_threshold must be > 1 (a ratio cap), got {threshold}")
    weights, w_sum, reduced, tokens = [], 0.0, 0.0, 0.0
    for log_r, m in zip(log_ratios(old, sampler), masks):
        m = m.detach().double().cpu()
        w = IS_CORRECTIONS[kind](log_r, m, threshold, level)
        weights.append(w)
        ratio = torch.exp(_seq_log_ratio(log_r, m)).expand_as(log_r) if level == "sequence" else torch.exp(log_r)
        w_sum += float((w * m).sum())
        reduced += float(((w < ratio * (1 - 1e-12)) * m).sum()) if kind != "none" else 0.0
        tokens += float(m.sum())
    return weights, {"weight_sum": w_sum, "reduced": reduced, "tokens": tokens}
