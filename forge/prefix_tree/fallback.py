"""When to merge a batch into prefix trees, and when to run its sequences unmerged.

Merging saves the repeated prefixes but pays for it: a tree's attention runs in more, smaller
pieces than the causal attention of unmerged sequences, and a tree needs its plan. With little
sharing the saving does not cover that. The threshold below was measured on an H100
(docs/benchmarks.md, "Prefix tree"): one transformer layer with MoE, forward and backward in
bf16, groups of 8 sequences of 5K tokens sharing prompts of 0.5K to 4K. With the decomposed
tree attention (cuDNN pieces) the merged layer was faster at every ratio measured, down to
1.10 (37.1 vs 38.1 ms); with the Triton kernel alone the break-even had been 1.39.
"""

from __future__ import annotations

from dataclasses import dataclass

from forge.prefix_tree.trie import FlatTree


@dataclass
class MergeConfig:
    """Whether the trainer merges batches into prefix trees."""

    enabled: bool = True
    """Merge each batch (training forward, old and reference logprobs); False runs every sequence alone."""
    min_token_ratio: float = 1.1
    """Below this token ratio (sum of sequence lengths over unique tokens) the batch runs unmerged."""
    pad_unmerged: bool = True
    """On CUDA, unmerged sequences of similar length share one right-padded forward (exact); False: one forward each."""


def should_merge(tree: FlatTree, config: MergeConfig) -> bool:
    """True when merging is on and `tree` shares enough tokens for it to pay."""
    if config.min_token_ratio < 1.0:
        raise ValueError(
            f"min_token_ratio is {config.min_token_ratio}; a token ratio is never below 1, so use "
            "1.0 to merge every batch or enabled=False to merge none"
        )
    return config.enabled and tree.token_ratio() >= config.min_token_ratio
