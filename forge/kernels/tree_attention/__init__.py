"""Attention under a prefix-tree mask: query q sees key k iff k <= q < subtree_end[k]."""

from __future__ import annotations

import torch

from forge.kernels.tree_attention.naive import tree_attention_naive, tree_mask


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention, the entry point the policy calls.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; subtree_end: [B, T] integer (exclusive end of
    each token's subtree in flat DFS order). Returns [B, T, Hq, D].
    """
    return tree_attention_naive(q, k, v, subtree_end, scale=scale)


__all__ = ["tree_attention", "tree_attention_naive", "tree_mask"]
