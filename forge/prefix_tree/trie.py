"""A trie over the token ids of a batch, flattened in DFS pre-order for one exact forward pass.

Every token of the flat order carries `position` (its depth, which is its position in each
sequence that contains it), `subtree_end` (exclusive end of its subtree in flat order: query q
sees key k exactly when k <= q < subtree_end[k]) and `multiplicity` (how many sequences of the
batch contain it). `seq_index[s]` lists, for sequence s, the flat index of each of its tokens,
so per-sequence quantities are gathered from the flat tree.

Departure from the papers (AReaL's tree training, Tree Training): the trie is a radix trie, a
node holds a run of tokens with no branch inside it, and nodes are split where a sequence ends,
so a sequence that stops at a branch point or duplicates another needs no special case. Several
sequences with different first tokens give a forest; its trees lie one after the other in the
flat order, each root's `subtree_end` stopping at its own tree's end.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Sequence, Union

import torch

TokenSeq = Union[Sequence[int], torch.Tensor]


def as_token_list(seq: TokenSeq) -> list[int]:
    """A sequence of token ids as a Python list (a 1-D tensor is converted once)."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"a sequence must be a 1-D tensor of token ids; got shape {tuple(seq.shape)}")
        return seq.tolist()
    return list(seq)


class _Node:
    """A run of tokens without a branch inside; `count` sequences pass through all of it."""

    __slots__ = ("tokens", "children", "count")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.children: dict[int, _Node] = {}
        self.count = 0

    def split(self, at: int) -> None:
        """Keep tokens[:at] here and move the rest into a single child."""
        tail = _Node(self.tokens[at:])
        tail.children, tail.count = self.children, self.count
        self.tokens = self.tokens[:at]
        self.children = {tail.tokens[0]: tail}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    # Whole-slice comparison runs in C; most walks through a shared prompt end here.
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    # Binary search on prefix equality keeps the Python-level work logarithmic.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class FlatTree:
    """A batch of sequences merged into a trie and flattened in DFS pre-order."""

    token_ids: torch.Tensor
    """[N] int64, the unique tokens in flat order."""
    position: torch.Tensor
    """[N] int64, each token's depth: its position in every sequence that contains it."""
    subtree_end: torch.Tensor
    """[N] int64, exclusive end of each token's subtree in flat order."""
    multiplicity: torch.Tensor
    """[N] int64, how many sequences contain each token."""
    seq_index: list[torch.Tensor]
    """Per sequence, [len] int64 flat index of each of its tokens."""

    @property
    def num_tokens(self) -> int:
        """Unique tokens in the tree."""
        return int(self.token_ids.numel())

    def seq_lengths(self) -> list[int]:
        return [int(ix.numel()) for ix in self.seq_index]

    def token_ratio(self) -> float:
        """Sum of sequence lengths over unique tokens: the forward-pass saving of merging."""
        return sum(self.seq_lengths()) / max(self.num_tokens, 1)

    def attention_pair_ratio(self) -> float:
        """Causal (query, key) pairs of the unmerged batch over the pairs of the tree mask.

        A tree query sees its ancestors and itself, `position + 1` keys; an unmerged sequence
        of length L has L (L + 1) / 2 pairs.
        """
        unmerged = sum(n * (n + 1) // 2 for n in self.seq_lengths())
        merged = int((self.position + 1).sum())
        return unmerged / max(merged, 1)


def build_tree(sequences: Sequence[TokenSeq]) -> FlatTree:
    """Merge `sequences` into a trie and flatten it; empty sequences are an error."""
    seqs = [as_token_list(s) for s in sequences]
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"sequence {i} is empty; drop empty sequences before merging")
    root = _Node([])
    for s in seqs:
        _insert(root, s)
    return _flatten(root, seqs)


def _insert(root: _Node, seq: list[int]) -> None:
    node, i = root, 0
    while i < len(seq):
        child = node.children.get(seq[i])
        if child is None:
            leaf = _Node(seq[i:])
            leaf.count = 1
            node.children[seq[i]] = leaf
            return
        # Compare with the run's length of the sequence only: slicing the whole rest at every
        # node made a long conversation's insert quadratic (64 turns: 10 ms of 20).
        run = child.tokens
        common = _common_prefix(run, seq[i:i + len(run)])
        if common < len(run):
            # Split where the sequence leaves this run or where it ends inside it, so that
            # every node is either wholly inside a sequence or wholly outside it.
            child.split(common)
        child.count += 1
        node, i = child, i + common


def _flatten(root: _Node, seqs: list[list[int]]) -> FlatTree:
    tokens: list[int] = []
    position: list[int] = []
    multiplicity: list[int] = []
    subtree_end: list[int] = []
    # Flat start of each node, for the per-sequence index maps.
    starts: dict[int, int] = {}
    # Iterative DFS: a conversation of thousands of turns would pass Python's recursion limit.
    stack: list[tuple[_Node, int, bool]] = [(c, 0, False) for c in reversed(list(root.children.values()))]
    while stack:
        node, depth, closing = stack.pop()
        n = len(node.tokens)
        if closing:
            # Every token of a run has the same subtree end: the end of the node's subtree.
            start = starts[id(node)]
            subtree_end[start:start + n] = [len(tokens)] * n
            continue
        starts[id(node)] = len(tokens)
        tokens.extend(node.tokens)
        position.extend(range(depth, depth + n))
        multiplicity.extend([node.count] * n)
        subtree_end.extend([0] * n)
        stack.append((node, depth, True))
        stack.extend((c, depth + n, False) for c in reversed(list(node.children.values())))
    seq_index = _path_indices(root, seqs, starts)
    return FlatTree(list_tensor(tokens), list_tensor(position), list_tensor(subtree_end), list_tensor(multiplicity),
                    seq_index)


_TYPECODES = {torch.long: "q", torch.float64: "d"}


def list_tensor(xs: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`torch.tensor(xs, dtype=dtype)` for a list of Python numbers (dtype long or float64), about
    5x faster on long lists: the list goes into a typed array, whose buffer the tensor takes over.
    A trainer step converts a few hundred thousand tokens' worth of lists while the GPU waits."""
    if dtype not in _TYPECODES:
        raise ValueError(f"list_tensor takes dtype torch.long or torch.float64, got {dtype}; use torch.tensor")
    if not xs:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(_TYPECODES[dtype], xs), dtype=dtype)


def _path_indices(root: _Node, seqs: list[list[int]], starts: dict[int, int]) -> list[torch.Tensor]:
    """Per sequence, the flat index of each of its tokens: the runs of the nodes on its path.
    Runs that follow each other in flat order too (a node and its first child, so a whole
    chain of turns) are one range, so a conversation's sequence is one arange, not one per
    turn (64 turns of one conversation: 2,080 aranges became 64)."""
    out = []
    for seq in seqs:
        pieces: list[tuple[int, int]] = []
        node, i = root, 0
        while i < len(seq):
            node = node.children[seq[i]]
            start, n = starts[id(node)], len(node.tokens)
            if pieces and pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], start + n)
            else:
                pieces.append((start, start + n))
            i += n
        out.append(torch.arange(*pieces[0]) if len(pieces) == 1 else
                   torch.cat([torch.arange(a, b) for a, b in pieces]))
    return out
