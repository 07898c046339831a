"""Attention under a prefix-tree mask: query q sees key k iff k <= q < subtree_end[k]."""

from forge.kernels.tree_attention.naive import tree_attention_naive, tree_mask

__all__ = ["tree_attention_naive", "tree_mask"]
