"""Train-inference mismatch: the logged gap and the TIS / MIS weights on hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch

from forge.trainer.losses import LOSSES, reduce_token_losses
from forge.trainer.mismatch import IS_CORRECTIONS, is_weights, mismatch_stats

LN2 = math.log(2.0)
# Two sequences; the first token of each is outside the loss (a prompt or tool token).
OLD = [torch.tensor([-1.0, -1.0, -1.0 + LN2, -1.0 - LN2]), torch.tensor([-2.0, -2.0 + 3 * LN2, -2.0 + LN2])]
SAMPLER = [torch.tensor([-1.5, -1.0, -1.0, -1.0]), torch.tensor([-2.0, -2.0, -2.0])]
MASKS = [torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])]
# log r on loss tokens: [0, ln2, -ln2] and [3 ln2, ln2]: ratios 1, 2, 1/2 and 8, 2.


def test_stats_are_the_gap_on_loss_tokens_only():
    stats, log_r = mismatch_stats(OLD, SAMPLER, MASKS)
    d = torch.tensor([0.0, LN2, -LN2, 3 * LN2, LN2], dtype=torch.float64)
    torch.testing.assert_close(log_r, d)
    assert stats["tokens"] == 5
    assert stats["abs_sum"] == pytest.approx(float(d.abs().sum()))
    assert stats["abs_max"] == pytest.approx(3 * LN2)  # the masked -0.5 of the first token is not counted
    k3 = sum(math.exp(x) - 1 - x for x in d.tolist())
    assert stats["k3_sum"] == pytest.approx(k3) and stats["k3_sum"] > 0


def test_equal_logprobs_give_zero_gap_and_unit_weights():
    stats, _ = mismatch_stats(OLD, OLD, MASKS)
    assert stats["abs_max"] == 0 and stats["k3_sum"] == 0
    for kind in IS_CORRECTIONS:
        for level in ("token", "sequence"):
            w, sums = is_weights(kind, level, 2.0, OLD, OLD, MASKS)
            assert all(torch.equal(x, torch.ones_like(x)) for x in w)
            assert sums["reduced"] == 0


def test_token_tis_truncates_at_the_threshold():
    w, sums = is_weights("tis", "token", 1.5, OLD, SAMPLER, MASKS)
    torch.testing.assert_close(w[0][1:], torch.tensor([1.0, 1.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(w[1][1:], torch.tensor([1.5, 1.5], dtype=torch.float64))
    assert sums["reduced"] == 3 and sums["tokens"] == 5
    assert sums["weight_sum"] == pytest.approx(1.0 + 1.5 + 0.5 + 1.5 + 1.5)


def test_token_mis_zeroes_tokens_above_the_threshold():
    w, sums = is_weights("mis", "token", 4.0, OLD, SAMPLER, MASKS)
    torch.testing.assert_close(w[0][1:], torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(w[1][1:], torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert sums["reduced"] == 1


def test_sequence_level_weights_take_the_product_over_loss_tokens():
    # Sequence ratios: 1 * 2 * 1/2 = 1 and 8 * 2 = 16 (the masked first token not included).
    w, _ = is_weights("tis", "sequence", 4.0, OLD, SAMPLER, MASKS)
    torch.testing.assert_close(w[0], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.full((3,), 4.0, dtype=torch.float64))
    w, sums = is_weights("mis", "sequence", 4.0, OLD, SAMPLER, MASKS)
    torch.testing.assert_close(w[0], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.zeros(3, dtype=torch.float64))
    assert sums["reduced"] == 2


def test_weights_scale_token_losses_but_not_the_normaliser():
    losses = [torch.tensor([5.0, 1.0, 2.0, 3.0]), torch.tensor([7.0, 4.0, 6.0])]
    w, _ = is_weights("mis", "token", 4.0, OLD, SAMPLER, MASKS)
    got = reduce_token_losses(losses, MASKS, "token_mean", weights=[x.float() for x in w])
    assert float(got) == pytest.approx((1 * 1 + 2 * 2 + 3 * 0.5 + 4 * 0 + 6 * 2) / 5)
    # Through a loss: a zero weight removes a token's gradient, a weight of 2 doubles it.
    lp = [o.clone().requires_grad_() for o in OLD]
    adv = torch.tensor([1.0, -1.0])
    LOSSES["ppo_clip"](lp, OLD, MASKS, adv, weights=[x.float() for x in w]).backward()
    plain = [o.clone().requires_grad_() for o in OLD]
    LOSSES["ppo_clip"](plain, OLD, MASKS, adv).backward()
    torch.testing.assert_close(lp[1].grad, plain[1].grad * torch.tensor([0.0, 0.0, 2.0]))
    torch.testing.assert_close(lp[0].grad, plain[0].grad * torch.tensor([1.0, 1.0, 2.0, 0.5]))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="algorithm.is_correction 'xis' is not one of none, tis, mis"):
        is_weights("xis", "token", 2.0, OLD, SAMPLER, MASKS)
    with pytest.raises(ValueError, match="algorithm.is_level"):
        is_weights("tis", "batch", 2.0, OLD, SAMPLER, MASKS)
    with pytest.raises(ValueError, match="is_threshold must be > 1"):
        is_weights("tis", "token", 1.0, OLD, SAMPLER, MASKS)
    with pytest.raises(ValueError, match="sequence 1"):
        mismatch_stats(OLD, [SAMPLER[0], SAMPLER[1][:2]], MASKS)
