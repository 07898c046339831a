"""The policy losses against a plain per-token loop over Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from forge.trainer.losses import LOSSES


def surrogate(lp: float, old: float, a: float, lo: float, hi: float) -> float:
    r = math.exp(lp - old)
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def loop_loss(name, lps, olds, masks, advs) -> float:
    if name == "grpo":
        per_seq = []
        for lp, old, m, a in zip(lps, olds, masks, advs):
            terms = [surrogate(x, o, a, 0.2, 0.2) for x, o, k in zip(lp, old, m) if k]
            per_seq.append(sum(terms) / max(len(terms), 1))
        return sum(per_seq) / len(per_seq)
    total, count = 0.0, 0
    for lp, old, m, a in zip(lps, olds, masks, advs):
        for x, o, k in zip(lp, old, m):
            if k:
                total += surrogate(x, o, a, 0.2, 0.28) if name == "ppo_clip" else -min(math.exp(x - o), 4.0) * a * x
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_plain_loop(name):
    gen = torch.Generator().manual_seed(0)
    lens = [5, 1, 8, 3]
    lps = [-torch.rand(n, generator=gen, dtype=torch.float64) * 3 for n in lens]
    # Ratios spread over [e^-1.5, e^1.5] so both clip bounds are hit.
    olds = [lp + (torch.rand(lp.shape, generator=gen, dtype=torch.float64) - 0.5) * 3 for lp in lps]
    masks = [torch.rand(n, generator=gen) > 0.3 for n in lens]
    advs = torch.randn(len(lens), generator=gen, dtype=torch.float64)
    got = LOSSES[name](lps, olds, masks, advs).item()
    want = loop_loss(name, [x.tolist() for x in lps], [x.tolist() for x in olds],
                     [x.tolist() for x in masks], advs.tolist())
    assert got == pytest.approx(want, rel=1e-12)


def test_mismatched_inputs_name_the_fix():
    x = [torch.zeros(3)]
    with pytest.raises(ValueError, match="one of each per sequence"):
        LOSSES["grpo"](x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="one entry per token after the first"):
        LOSSES["cispo"](x, [torch.zeros(2)], x, torch.zeros(1))
