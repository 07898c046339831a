"""Advantages against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from forge.trainer.advantages import ADVANTAGES, group_advantages


def loop_grpo(rewards, eps=1e-6):
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + eps) for r in rewards]


@pytest.mark.parametrize("rewards", [[1.0, 0.0, 0.0, 1.0], [0.5, 0.25, 1.0], [3.0], [1.0, 1.0, 1.0]],
                         ids=["binary", "graded", "single", "all-equal"])
def test_grpo_matches_a_loop(rewards):
    got = ADVANTAGES["grpo"](rewards)
    assert torch.allclose(got, torch.tensor(loop_grpo(rewards), dtype=torch.float64))


def test_dr_grpo_is_mean_centred_only():
    got = ADVANTAGES["dr_grpo"]([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(got, torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))


def test_groups_are_normalised_separately():
    flat = group_advantages("grpo", [[1.0, 0.0], [10.0, 10.0, 13.0]])
    assert flat.shape == (5,)
    assert torch.allclose(flat[:2], torch.tensor(loop_grpo([1.0, 0.0]), dtype=torch.float64))
    assert torch.allclose(flat[2:], torch.tensor(loop_grpo([10.0, 10.0, 13.0]), dtype=torch.float64))


def test_unknown_estimator_names_the_known_ones():
    with pytest.raises(ValueError, match="known: grpo, dr_grpo"):
        group_advantages("gae", [[1.0]])
