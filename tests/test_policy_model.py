"""The policy transformer: causal and prefix-tree attention agree, RoPE is relative, the presets
build, and the MiniMax-M2-like shape counts the published parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge.policy.config import ModelConfig
from forge.policy.model import Transformer, apply_rope, count_parameters, rope_tables

CONFIGS = {
    "tiny": ModelConfig.tiny(),
    # MiniMax-M2's attention features at toy size: partial RoPE and a QK-norm over all heads.
    "partial-rope-layer-qknorm": dataclasses.replace(
        ModelConfig.tiny(), rotary_dim=4, qk_norm_scope="layer", num_shared_experts=0, tie_embeddings=True
    ),
    "dense-qkv-bias": dataclasses.replace(ModelConfig.tiny(), num_experts=0, qk_norm=False, qkv_bias=True),
}


def _model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    # Random (not zero) biases and norm weights so that a path that skipped them would differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_is_causal_and_float32(name):
    config = CONFIGS[name]
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, config.vocab_size) and logits.dtype == torch.float32
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % config.vocab_size
    other = model(changed)
    torch.testing.assert_close(other[:, :6], logits[:, :6], rtol=0, atol=1e-5)
    assert (other[:, 6:] - logits[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefix_tree_forward_equals_separate_sequences(name):
    """Two sequences sharing a prompt, merged into one tree: each token's logits are those of
    its own sequence run alone."""
    config = CONFIGS[name]
    model = _model(config)
    g = torch.Generator().manual_seed(1)
    prompt, a, b = (torch.randint(0, config.vocab_size, (n,), generator=g) for n in (5, 4, 3))
    flat = torch.cat([prompt, a, b])[None]  # [1, 12]
    p, t = len(prompt), flat.shape[1]
    positions = torch.cat([torch.arange(p), p + torch.arange(len(a)), p + torch.arange(len(b))])[None]
    # Prompt tokens are ancestors of everything after them; each branch ends where it ends.
    subtree_end = torch.tensor([t] * p + [p + len(a)] * len(a) + [t] * len(b))[None]
    tree = model(flat, position_ids=positions, subtree_end=subtree_end)
    seq_a = model(torch.cat([prompt, a])[None])
    seq_b = model(torch.cat([prompt, b])[None])
    torch.testing.assert_close(tree[0, : p + len(a)], seq_a[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(tree[0, p + len(a) :], seq_b[0, p:], rtol=0, atol=2e-5)


def test_tree_forward_needs_positions():
    model = _model(ModelConfig.tiny())
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), subtree_end=torch.full((1, 3), 3))


def test_rope_scores_depend_only_on_relative_position_and_spare_unrotated_dims():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_tables(torch.tensor([[pq]]), 4, 10000.0)
        ck, sk = rope_tables(torch.tensor([[pk]]), 4, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)

    torch.testing.assert_close(score(3, 1), score(10, 8))
    assert (score(3, 1) - score(3, 2)).abs().max() > 1e-3
    cos, sin = rope_tables(torch.tensor([[5]]), 4, 10000.0)
    torch.testing.assert_close(apply_rope(q, cos, sin)[..., 4:], q[..., 4:], rtol=0, atol=0)


def test_presets_build_and_small_fits_the_cpu_recipe_size():
    tiny_total, _ = count_parameters(Transformer(ModelConfig.tiny()))
    small_total, small_active = count_parameters(Transformer(ModelConfig.small()))
    assert tiny_total < 200_000
    assert 1e6 <= small_total <= 10e6 and small_active < small_total


def test_minimax_m2_like_matches_published_parameter_counts():
    """MiniMax-M2 is published as 230B total and 10B activated parameters.

    Total: embedding, 62 x (attention, QK-norms, RMSNorms, router, 256 experts), final norm,
    untied head. Active: the same without the input embedding (a lookup) and with 8 of the 256
    experts per layer. The published 10B is rounded to one digit, hence the 5% band.
    """
    with torch.device("meta"):
        model = Transformer(ModelConfig.minimax_m2_like())
    total, active = count_parameters(model)
    assert abs(total - 230e9) / 230e9 < 0.02, total
    assert abs(active - 10e9) / 10e9 < 0.05, active
    assert sum(1 for b in model.layers if hasattr(b.mlp, "expert_bias")) == 62


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        ModelConfig(head_dim=8, rotary_dim=12)
