"""Packing prefix trees into micro-batches under a token budget.

A micro-batch is one row `[1, T]`: its trees lie one after the other, each root's
`subtree_end` stopping at its own tree's end, so trees in one pack never see each other. A
group (the samples of one prompt, the turns of one conversation) is never cut apart unless its
tree alone exceeds the budget; then its sequences are split, in sorted order, into sub-trees
that each fit, and the shared root path is repeated in each (paid again, but still exact).

Departure from AReaL's tree packing: bins are filled first-fit in decreasing tree size, which
is simple and within 22% of the optimum (the classic FFD bound); no solver is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from forge.prefix_tree.trie import FlatTree, TokenSeq, _common_prefix, as_token_list, build_tree


@dataclass
class Pack:
    """One micro-batch: several flattened trees in a single row."""

    tree: FlatTree
    """The concatenated trees; its `seq_index` maps into this pack's flat order."""
    seq_ids: list[int]
    """Global index (over all groups, in order) of each sequence of `tree.seq_index`."""

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`input_ids`, `position_ids`, `subtree_end`, `token_weight`, each [1, T]."""
        t = self.tree
        return {
            "input_ids": t.token_ids[None].to(device),
            "position_ids": t.position[None].to(device),
            "subtree_end": t.subtree_end[None].to(device),
            "token_weight": t.multiplicity[None].to(device),
        }


def concat_trees(trees: Sequence[FlatTree]) -> FlatTree:
    """Lay trees one after the other in one flat order, shifting their flat indices."""
    offsets, off = [], 0
    for t in trees:
        offsets.append(off)
        off += t.num_tokens
    return FlatTree(
        token_ids=torch.cat([t.token_ids for t in trees]),
        position=torch.cat([t.position for t in trees]),
        subtree_end=torch.cat([t.subtree_end + o for t, o in zip(trees, offsets)]),
        multiplicity=torch.cat([t.multiplicity for t in trees]),
        seq_index=[ix + o for t, o in zip(trees, offsets) for ix in t.seq_index],
    )


def _split_group(seqs: list[list[int]], ids: list[int], budget: int) -> list[tuple[list[list[int]], list[int]]]:
    """Cut a group whose tree exceeds `budget` into sub-groups whose trees fit.

    In lexicographic order, the tokens a sequence adds to a trie of the ones before it are its
    length minus its common prefix with the one just before it, so the size is known without
    building the trie.
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    chunks: list[tuple[list[list[int]], list[int]]] = []
    size, prev = 0, None
    for i in order:
        s = seqs[i]
        if len(s) > budget:
            raise ValueError(
                f"sequence {ids[i]} has {len(s)} tokens, more than the token budget {budget}; "
                "raise the micro-batch token budget or truncate the sequence"
            )
        add = len(s) - (0 if prev is None else _common_prefix(prev, s))
        if chunks and size + add <= budget:
            chunks[-1][0].append(s)
            chunks[-1][1].append(ids[i])
            size += add
        else:
            # A new sub-tree repeats the root path: the whole sequence is paid again.
            chunks.append(([s], [ids[i]]))
            size = len(s)
        prev = s
    return chunks


def trie_size(seqs: list[list[int]]) -> int:
    """Tokens of the trie over `seqs` (its distinct prefixes) without building it: in
    lexicographic order each sequence adds its length minus its common prefix with the one
    before (`build_tree(seqs).num_tokens`)."""
    total, prev = 0, None
    for s in sorted(seqs):
        total += len(s) - (0 if prev is None else _common_prefix(prev, s))
        prev = s
    return total


def pack_ids(groups: Sequence[Sequence[TokenSeq]], token_budget: int) -> list[list[int]]:
    """The sequence ids of `pack_groups`' packs, without building their trees: what a caller
    that builds its own trees (the trainer, per micro-batch) needs."""
    return [[i for _, _, ids in b for i in ids] for b in _bins(groups, token_budget)]


def pack_groups(groups: Sequence[Sequence[TokenSeq]], token_budget: int) -> list[Pack]:
    """Merge each group into a tree and pack the trees into micro-batches of <= token_budget.

    Sequence ids are global: group 0's sequences are 0..n0-1, group 1's follow, and so on.
    Every sequence appears in exactly one pack.
    """
    return [Pack(concat_trees([build_tree(seqs) for _, seqs, _ in b]), [i for _, _, ids in b for i in ids])
            for b in _bins(groups, token_budget)]


def _bins(groups: Sequence[Sequence[TokenSeq]], token_budget: int) -> list[list[tuple[int, list[list[int]], list[int]]]]:
    """The packs as bins of (trie size, sequences, global ids) items: each group one item, or
    its `_split_group` chunks where its trie passes the budget; first-fit decreasing."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be a positive number of tokens; got {token_budget}")
    items: list[tuple[int, list[list[int]], list[int]]] = []
    next_id = 0
    for group in groups:
        seqs = [as_token_list(s) for s in group]
        ids = list(range(next_id, next_id + len(seqs)))
        next_id += len(seqs)
        if not seqs:
            continue
        for i, s in zip(ids, seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty; drop empty sequences before merging")
        size = trie_size(seqs)
        if size <= token_budget:
            items.append((size, seqs, ids))
            continue
        for sub, sub_ids in _split_group(seqs, ids, token_budget):
            items.append((trie_size(sub), sub, sub_ids))
    # First-fit decreasing over tree sizes.
    items.sort(key=lambda it: -it[0])
    bins: list[list[tuple[int, list[list[int]], list[int]]]] = []
    room: list[int] = []
    for item in items:
        n = item[0]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(item)
                room[b] -= n
                break
        else:
            bins.append([item])
            room.append(token_budget - n)
    return bins
