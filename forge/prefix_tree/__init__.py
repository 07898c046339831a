"""Prefix-tree merging of token sequences: one forward pass per shared prefix."""
