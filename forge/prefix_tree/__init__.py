"""Prefix-tree merging of token sequences: one forward pass per shared prefix.

`build_tree` merges a batch into a trie and flattens it (positions, `subtree_end`,
multiplicity, per-sequence index maps); `pack_groups` packs the trees of many groups into
micro-batches under a token budget. Imports torch only.
"""

from forge.prefix_tree.packing import Pack, concat_trees, pack_groups
from forge.prefix_tree.trie import FlatTree, TokenSeq, build_tree

__all__ = ["FlatTree", "Pack", "TokenSeq", "build_tree", "concat_trees", "pack_groups"]
