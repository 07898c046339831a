"""The policy losses against a plain per-token loop over Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from forge.trainer.losses import DEFAULT_REDUCTION, LOSSES, REDUCTIONS


def surrogate(lp: float, old: float, a: float, lo: float, hi: float) -> float:
    r = math.exp(lp - old)
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def token_term(name, x, o, a) -> float:
    if name == "grpo":
        return surrogate(x, o, a, 0.2, 0.2)
    if name == "ppo_clip":
        return surrogate(x, o, a, 0.2, 0.28)
    return -min(math.exp(x - o), 4.0) * a * x


def loop_loss(name, reduction, lps, olds, masks, advs) -> float:
    per_seq = [[token_term(name, x, o, a) for x, o, k in zip(lp, old, m) if k]
               for lp, old, m, a in zip(lps, olds, masks, advs)]
    if reduction == "seq_mean":
        return sum(sum(t) / max(len(t), 1) for t in per_seq) / len(per_seq)
    if reduction == "dr_grpo":
        return sum(sum(t) for t in per_seq) / len(per_seq) / 16
    return sum(sum(t) for t in per_seq) / max(sum(len(t) for t in per_seq), 1)


def random_inputs():
    gen = torch.Generator().manual_seed(0)
    lens = [5, 1, 8, 3]
    lps = [-torch.rand(n, generator=gen, dtype=torch.float64) * 3 for n in lens]
    # Ratios spread over [e^-1.5, e^1.5] so both clip bounds are hit.
    olds = [lp + (torch.rand(lp.shape, generator=gen, dtype=torch.float64) - 0.5) * 3 for lp in lps]
    masks = [torch.rand(n, generator=gen) > 0.3 for n in lens]
    advs = torch.randn(len(lens), generator=gen, dtype=torch.float64)
    return lps, olds, masks, advs


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_plain_loop_with_its_default_reduction(name):
    lps, olds, masks, advs = random_inputs()
    got = LOSSES[name](lps, olds, masks, advs).item()
    want = loop_loss(name, DEFAULT_REDUCTION[name], [x.tolist() for x in lps], [x.tolist() for x in olds],
                     [x.tolist() for x in masks], advs.tolist())
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_every_reduction(name, reduction):
    lps, olds, masks, advs = random_inputs()
    got = LOSSES[name](lps, olds, masks, advs, reduction=reduction, dr_grpo_constant=16).item()
    want = loop_loss(name, reduction, [x.tolist() for x in lps], [x.tolist() for x in olds],
                     [x.tolist() for x in masks], advs.tolist())
    assert got == pytest.approx(want, rel=1e-12)


def test_reductions_differ_when_lengths_differ():
    lps, olds, masks, advs = random_inputs()
    values = {r: LOSSES["grpo"](lps, olds, masks, advs, reduction=r).item() for r in REDUCTIONS}
    assert len({round(v, 9) for v in values.values()}) == 3


def test_unknown_reduction_names_the_choices():
    lps, olds, masks, advs = random_inputs()
    with pytest.raises(ValueError, match="token_mean, seq_mean, dr_grpo"):
        LOSSES["grpo"](lps, olds, masks, advs, reduction="mean")


def test_mismatched_inputs_name_the_fix():
    x = [torch.zeros(3)]
    with pytest.raises(ValueError, match="one of each per sequence"):
        LOSSES["grpo"](x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="one entry per token after the first"):
        LOSSES["cispo"](x, [torch.zeros(2)], x, torch.zeros(1))
