"""Prefix-tree merging of token sequences: one forward pass per shared prefix.

`build_tree` merges a batch into a trie and flattens it (positions, `subtree_end`,
multiplicity, per-sequence index maps); `pack_groups` packs the trees of many groups into
micro-batches under a token budget (`pack_ids`: only which sequences go together);
`should_merge` says when merging pays. Imports torch only.
"""

from forge.prefix_tree.fallback import MergeConfig, should_merge
from forge.prefix_tree.packing import Pack, concat_trees, pack_groups, pack_ids, trie_size
from forge.prefix_tree.trie import FlatTree, TokenSeq, build_tree

__all__ = ["FlatTree", "MergeConfig", "Pack", "TokenSeq", "build_tree", "concat_trees", "pack_groups", "pack_ids",
           "should_merge", "trie_size"]
