"""The MoE layer: routing through the kernel entry points, load counted with multiplicity,
bias updated sign-wise towards balance across ranks, router statistics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge.kernels.moe import moe_experts_naive, route_naive
from forge.policy.config import ModelConfig
from forge.policy.model import Transformer
from forge.policy.moe import MoE, moe_layers, router_stats, update_expert_bias

CONFIG = dataclasses.replace(ModelConfig.tiny(), num_experts=4, top_k=2, num_shared_experts=1, bias_update_rate=0.1)


def _layer(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(CONFIG)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_layer_is_routed_experts_plus_shared_expert_and_bias_only_steers():
    layer = _layer()
    x = torch.randn(2, 5, CONFIG.hidden_size)
    layer.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 5.0]))
    out = layer(x)
    flat = x.reshape(10, -1)
    weights, experts, _ = route_naive(flat @ layer.router.t(), layer.expert_bias, 2)
    # A bias this large forces experts 1 and 3 on every token, but the weights stay unbiased.
    assert set(experts.unique().tolist()) == {1, 3}
    expected = moe_experts_naive(flat, weights, experts, layer.w_gate, layer.w_up, layer.w_down) + layer.shared(flat)
    torch.testing.assert_close(out.reshape(10, -1), expected)
    out.sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    assert "expert_bias" not in dict(layer.named_parameters())


def test_load_counts_tokens_with_multiplicity_only_in_training_with_grad():
    layer = _layer()
    x = torch.randn(1, 6, CONFIG.hidden_size)
    weight = torch.tensor([[3.0, 1.0, 1.0, 2.0, 0.0, 0.0]])
    layer.eval()
    layer(x, weight)
    assert layer.load.sum() == 0
    layer.train()
    with torch.no_grad():
        layer(x, weight)
    assert layer.load.sum() == 0
    layer(x, weight)
    layer(x, weight)
    assert layer.load.sum().item() == 2 * CONFIG.top_k * weight.sum().item()
    # Padding (weight 0) adds nothing: the same tokens without the padding give the same load.
    other = _layer()
    other.train()
    other(x[:, :4], weight[:, :4])
    torch.testing.assert_close(layer.load, 2 * other.load)


def test_bias_moves_sign_wise_towards_balance_across_ranks_and_counters_reset():
    model = Transformer(CONFIG).train()
    (_, first), *_ = moe_layers(model)
    first.load.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))
    # Another rank saw the opposite skew on expert 2 and 3: summed loads are [10, 2, 4, 8].
    other_rank = torch.zeros(len(moe_layers(model)), 4)
    other_rank[0] = torch.tensor([0.0, 0.0, 0.0, 8.0])
    stats = update_expert_bias(model, all_reduce=lambda loads: loads + other_rank)
    # Mean 6: expert 0 (10) and 3 (8) go down, 1 (2) and 2 (4) go up.
    torch.testing.assert_close(first.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    assert stats[0].tokens_per_expert == [10.0, 2.0, 4.0, 8.0]
    assert abs(stats[0].imbalance - 10.0 / 6.0) < 1e-6
    assert stats[0].bias == first.expert_bias.tolist()
    assert all(m.load.sum() == 0 for _, m in moe_layers(model))
    # A layer that routed nothing keeps its bias.
    later = [m for _, m in moe_layers(model)][1:]
    assert all(m.expert_bias.abs().sum() == 0 for m in later)


def test_bias_updates_balance_a_skewed_router():
    layer = _layer()
    # A step small against the score gaps, so that the sign updates settle instead of swinging.
    layer.bias_update_rate = 0.01
    x = torch.randn(256, CONFIG.hidden_size)
    # Experts 0 and 1 score far above 2 and 3 for most tokens: a collapsed router.
    logits = x @ layer.router.detach().t() + torch.tensor([3.0, 3.0, -3.0, -3.0])
    holder = torch.nn.ModuleList([layer])

    def imbalance_after_step() -> float:
        _, _, load = route_naive(logits, layer.expert_bias, CONFIG.top_k)
        layer.load += load
        return update_expert_bias(holder)[0].imbalance

    first = imbalance_after_step()
    trace = [imbalance_after_step() for _ in range(150)]
    last = sum(trace[-20:]) / 20
    assert first > 1.7 and last < 1.15, (first, last)
    assert layer.expert_bias[2:].min() > layer.expert_bias[:2].max()


def test_router_stats_report_every_moe_layer():
    model = Transformer(CONFIG).train()
    model(torch.randint(0, CONFIG.vocab_size, (2, 5)))
    stats = router_stats(model)
    assert [s.layer for s in stats] == list(range(CONFIG.dense_layers, CONFIG.num_layers))
    for s in stats:
        assert sum(s.tokens_per_expert) == 2 * 5 * CONFIG.top_k
        assert s.imbalance == max(s.tokens_per_expert) / (sum(s.tokens_per_expert) / 4)
        assert len(s.bias) == 4
    assert f"router/layer{stats[0].layer}/imbalance" in stats[0].metrics()


def test_model_config_loads_through_the_strict_recipe_loader():
    from forge.config import ConfigError, from_dict

    config = from_dict(ModelConfig, {"num_experts": 16, "score_func": "softmax", "rope_theta": 1e6, "qk_norm": True})
    assert (config.num_experts, config.score_func, config.rope_theta) == (16, "softmax", 1e6)
    with pytest.raises(ConfigError, match="qk_norm_scope"):
        from_dict(ModelConfig, {"qk_norm_scope": "global"})
    with pytest.raises(ConfigError, match="num_expert"):
        from_dict(ModelConfig, {"num_expert": 4})


def test_prefix_tree_load_with_multiplicity_equals_unmerged_load():
    """A shared prompt counted once with multiplicity 2 gives the loads of the two sequences."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).train()
    prompt, a, b = torch.randint(0, 256, (5,)), torch.randint(0, 256, (3,)), torch.randint(0, 256, (4,))
    p, t = 5, 12
    model(torch.cat([prompt, a])[None])
    model(torch.cat([prompt, b])[None])
    unmerged = [m.load.clone() for _, m in moe_layers(model)]
    for _, m in moe_layers(model):
        m.load.zero_()
    flat = torch.cat([prompt, a, b])[None]
    positions = torch.cat([torch.arange(p), p + torch.arange(3), p + torch.arange(4)])[None]
    subtree_end = torch.tensor([t] * p + [p + 3] * 3 + [t] * 4)[None]
    multiplicity = torch.tensor([[2.0] * p + [1.0] * 7])
    model(flat, position_ids=positions, subtree_end=subtree_end, token_weight=multiplicity)
    for merged, expected in zip((m.load for _, m in moe_layers(model)), unmerged):
        torch.testing.assert_close(merged, expected, rtol=0, atol=0)
