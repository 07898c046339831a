"""Per-sequence token logprobs of a batch, computed once per shared prefix.

`sequence_logprobs(model, sequences)` merges the batch into a prefix tree (forge.prefix_tree),
runs one forward pass over the flattened tree with tree attention, computes the log-softmax
normalizer (and, on request, the entropy) once per unique position, and gathers each
sequence's logprobs from it. At a branch point one row gives the labels of several children.
The result, and every gradient through it, equals running each sequence alone; tests hold it
to 1e-10 in fp64.

Departure from AReaL's tree training: the MoE router's load statistics count each unique token
with its multiplicity (`token_weight`), so load balancing sees the same counts as unmerged
training, not the smaller unique-token counts. The MSA index loss (`with_index_loss`) is
weighted the same way, so it too equals the sum over the sequences run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from forge.policy.choices import Choices
from forge.prefix_tree import FlatTree, TokenSeq, build_tree, pack_groups
from forge.prefix_tree.trie import as_token_list


class CausalLM(Protocol):
    """What sequence_logprobs needs of a model: forge.policy.Transformer's forward."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        subtree_end: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        return_index_loss: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class SequenceScores:
    """Per sequence, one entry per token after the first (length len - 1)."""

    logprobs: list[torch.Tensor]
    """Logprob of each token given its prefix."""
    entropies: list[torch.Tensor] | None = None
    """Entropy of the distribution each token was drawn from; None unless asked for."""
    index_loss: torch.Tensor | None = None
    """MSA index-branch KL summed over every token of every sequence and over MSA layers (mean
    over KV groups), as if each sequence ran alone; None unless asked for."""


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Log-softmax in bf16 loses the small logprobs RL ratios depend on; fp64 stays fp64.
    return x if x.dtype == torch.float64 else x.float()


def _invariant(model) -> bool:
    """`model.batch_invariant`: the log-softmax then accumulates in fp64 as the sampler's does
    (forge.policy.invariant), so the two agree to the bit."""
    return bool(getattr(getattr(model, "config", None), "batch_invariant", False))


def _token_logprobs(logits: torch.Tensor, rows, labels: torch.Tensor, lse: torch.Tensor,
                    invariant: bool) -> torch.Tensor:
    """logits[rows, labels] minus their rows' normalizers lse [R] (logits [N, V], rows an index
    or slice into N). Under batch-invariant numerics, the very operation the sampler runs
    (`forge.policy.generation._logprobs`): log_softmax of the rows in fp64, rounded once. A
    normalizer subtracted on its own rounds differently (x - (m + log s) against (x - m) - log s)
    and put logprobs near 0 one ulp apart on a few tokens of a run."""
    if invariant:
        full = torch.log_softmax(logits[rows].double(), dim=-1)
        return full.gather(-1, labels[:, None])[:, 0].to(_at_least_fp32(logits[:0]).dtype)
    return _at_least_fp32(logits[rows, labels] if isinstance(rows, torch.Tensor) else
                          logits[rows].gather(-1, labels[:, None])[:, 0]) - lse


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature} (greedy rollouts score at 1)")
    return logits if temperature == 1.0 else logits / temperature


def _row_scores(logits: torch.Tensor, with_entropy: bool,
                invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-normalizer [R] and, if asked, entropy [R] of logits [R, V], at least fp32; with
    `invariant`, the normalizer in fp64 and the entropy rounded back to at least fp32."""
    logits = logits.double() if invariant else _at_least_fp32(logits)
    lse = torch.logsumexp(logits, dim=-1)  # [R]
    if not with_entropy:
        return lse, None
    probs = torch.softmax(logits, dim=-1)
    ent = lse - (probs * logits).sum(-1)
    return lse, ent.float() if invariant and ent.dtype != torch.float64 else ent


def _check_records(seqs: list[list[int]], choices: Sequence[Choices]) -> None:
    """One record per sequence, each as long as its sequence; else a ValueError naming the fix."""
    if len(choices) != len(seqs):
        raise ValueError(f"choices must give one record per sequence: {len(choices)} for {len(seqs)} sequences")
    for i, (s, c) in enumerate(zip(seqs, choices)):
        n = next((x.shape[0] for x in (c.experts, c.blocks) if x is not None), len(s))
        if n != len(s):
            raise ValueError(f"sequence {i} has {len(s)} tokens but its choices {n}; record the choices of every "
                             "token of the sequence (prompt included)")


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """A sequence's flat index as runs of consecutive flat positions: (flat start, flat end,
    offset in the sequence). A sequence is a few runs of its tree (one per branch it takes)."""
    cuts = ((index[1:] - index[:-1]) != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *cuts, index.numel()]
    starts = index[bounds[:-1]].tolist()
    return [(a, a + (hi - lo), lo) for a, lo, hi in zip(starts, bounds[:-1], bounds[1:])]


def _records_agree(tree: FlatTree, choices: Sequence[Choices]) -> bool:
    """Whether the records are equal, element for element, wherever sequences share a token of
    `tree` (the plain tree of their ids). Then merging on (token, choices) merges exactly what
    merging on tokens does, and the plain tree is the keyed one. The usual case: a generator
    prefills a group's prompt once, so its samples carry one record of it."""
    runs = [_runs(ix) for ix in tree.seq_index]
    for name in ("experts", "blocks"):
        records = [getattr(c, name) for c in choices]
        if all(r is None for r in records):
            continue
        if any(r is None for r in records):
            return False  # some sequences carry this kind and some do not: the keyed build decides
        flat = [r.reshape(r.shape[0], -1) for r in records]
        width = {f.shape[1] for f in flat}
        if len(width) > 1:
            return False
        # Every sequence starts at the root, so the tokens of the sequences before it that lie
        # on its path are a prefix of it: compare that prefix with their record, and write the
        # rest as the first record of those tokens. Runs are slices: memory is compared and
        # copied, not indexed.
        ref = flat[0].new_empty((tree.num_tokens, width.pop()))
        seen = torch.zeros(tree.num_tokens, dtype=torch.bool)
        for rs, f in zip(runs, flat):
            for a, b, o in rs:
                shared = int(seen[a:b].sum())
                if shared and not torch.equal(ref[a:a + shared], f[o:o + shared]):
                    return False
                ref[a + shared:b] = f[o + shared:o + b - a]
                seen[a + shared:b] = True
    return True


def _keyed(seqs: list[list[int]], choices: Sequence[Choices]) -> tuple[list[list[int]], torch.Tensor]:
    """Each distinct (token id, choices) pair of the sequences as one id, so that a prefix tree
    over them merges tokens only where both agree: (the sequences in those ids, the token id of
    each)."""
    ids: dict[tuple, int] = {}
    keyed = []
    for s, c in zip(seqs, choices):
        keys = c.token_keys() if c.experts is not None or c.blocks is not None else [b""] * len(s)
        keyed.append([ids.setdefault(pair, len(ids)) for pair in zip(s, keys)])
    token_of = [0] * len(ids)
    for (tok, _), i in ids.items():
        token_of[i] = tok
    return keyed, torch.tensor(token_of, dtype=torch.long)


def _replay_merge(seqs: list[list[int]], choices: Sequence[Choices]) -> tuple[list[list[int]], torch.Tensor | None,
                                                                              FlatTree | None]:
    """What to build the prefix tree over under routing replay: (sequences, token ids, tree).
    Where the records agree on every shared token, the sequences themselves (ids None) and
    their plain tree, which is then the keyed one: a build and a comparison, about a tenth of
    the keyed build's time on 147K tokens (benchmarks/host_prep.py). Otherwise `_keyed`'s ids
    and no tree."""
    _check_records(seqs, choices)
    tree = build_tree(seqs)
    if _records_agree(tree, choices):
        return seqs, None, tree
    return (*_keyed(seqs, choices), None)


def replay_tree(sequences: Sequence[TokenSeq], choices: Sequence[Choices]) -> FlatTree:
    """`build_tree` for routing replay: tokens merge only where their ids and their recorded
    choices (forge.policy.choices, one [len]-led record per sequence) agree. Pass it with the
    same choices to `sequence_scores`."""
    keyed, token_of, tree = _replay_merge([as_token_list(s) for s in sequences], choices)
    return tree if tree is not None else _real_ids(build_tree(keyed), token_of)


def _real_ids(tree: FlatTree, token_of: torch.Tensor) -> FlatTree:
    tree.token_ids = token_of[tree.token_ids]
    return tree


def _flat_choices(tree: FlatTree, choices: Sequence[Choices]) -> Choices:
    """The choices of the tree's flat tokens, [1, N, ...], from its sequences' records (in the
    order of `tree.seq_index`)."""
    n = tree.num_tokens

    def gather(name: str) -> torch.Tensor | None:
        proto = getattr(choices[0], name)
        if proto is None:
            return None
        out = proto.new_empty((n, *proto.shape[1:]))
        for index, c in zip(tree.seq_index, choices):
            out[index] = getattr(c, name)
        return out[None]

    return Choices(gather("experts"), gather("blocks"))


def _merged(model, seqs: list[list[int]], tree: FlatTree, with_entropy: bool, with_index_loss: bool,
            temperature: float = 1.0, choices: Sequence[Choices] | None = None) -> SequenceScores:
    """`seqs` scored over `tree`; with `choices` (one record per sequence, the tree a
    `replay_tree` of them), the forward imposes them."""
    dev = _device(model)
    kw = {"return_index_loss": True} if with_index_loss else {}
    if choices is not None:
        kw["choices"] = _flat_choices(tree, choices)
    token_ids = tree.token_ids.to(dev)
    out = model(
        token_ids[None],
        position_ids=tree.position[None].to(dev),
        subtree_end=tree.subtree_end[None].to(dev),
        token_weight=tree.multiplicity[None].to(dev, torch.float32),
        **kw,
    )
    logits, index_loss = out if with_index_loss else (out, None)
    logits = _tempered(logits[0], temperature)  # [N, V]
    # Normalizer (and entropy) once per unique position, for all N rows: the rows that predict
    # nothing (the last token of each sequence) are few, and a gather of the R useful rows
    # would copy an [R, V] block.
    invariant = _invariant(model)
    lse, ent = _row_scores(logits, with_entropy, invariant)  # [N]
    # A branch point's row appears once per child label it predicts.
    rows = torch.cat([ix[:-1] for ix in tree.seq_index]).to(dev)  # [sum len - 1]
    # Each row's label is the token after it in its sequence, read from the tree on the device:
    # converting the sequences' lists again took 27 ms for 300K tokens on the host.
    labels = token_ids[torch.cat([ix[1:] for ix in tree.seq_index]).to(dev)]
    flat_lp = _token_logprobs(logits, rows, labels, lse[rows], invariant)
    sizes = [len(s) - 1 for s in seqs]
    entropies = list(ent[rows].split(sizes)) if ent is not None else None
    return SequenceScores(list(flat_lp.split(sizes)), entropies, index_loss)


PAD_WASTE = 0.25
"""Padded rows of unmerged sequences may hold at most this share of padding over their tokens."""


def _length_batches(lengths: list[int], waste: float = PAD_WASTE) -> list[list[int]]:
    """Indices of the sequences grouped, longest first, into batches whose right-padded size
    (count x longest) stays within (1 + waste) x their tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            b = batches[-1]
            tokens = sum(lengths[j] for j in b) + lengths[i]
            if (len(b) + 1) * lengths[b[0]] <= (1 + waste) * tokens:
                b.append(i)
                continue
        batches.append([i])
    return batches


def _padded_choices(choices: Sequence[Choices], width: int) -> Choices:
    """Per-sequence records stacked into [B, width, ...], unknown (-1) past each sequence's end."""

    def stack(name: str) -> torch.Tensor | None:
        parts = [getattr(c, name) for c in choices]
        if parts[0] is None:
            return None
        out = parts[0].new_full((len(parts), width, *parts[0].shape[1:]), -1)
        for row, x in enumerate(parts):
            out[row, : x.shape[0]] = x
        return out

    return Choices(stack("experts"), stack("blocks"))


def _unmerged(model, seqs: list[list[int]], with_entropy: bool, with_index_loss: bool,
              padded: bool | None = None, temperature: float = 1.0,
              choices: Sequence[Choices] | None = None) -> SequenceScores:
    """Each sequence as if alone: one forward per sequence, or (`padded`, the default on CUDA,
    where a small model's forwards are bound by kernel launches) sequences of similar length
    right-padded into one causal batch. Padding comes after every real token, so causal
    attention (dense or MSA) never lets a real token see it; its `token_weight` of 0 keeps it
    out of the MoE load counts and the index loss."""
    dev = _device(model)
    if padded is None:
        padded = dev.type == "cuda"
    logprobs: list = [None] * len(seqs)
    entropies: list = [None] * len(seqs)
    index_loss = None
    for batch in _length_batches([len(s) for s in seqs]) if padded else [[i] for i in range(len(seqs))]:
        width = len(seqs[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        weight = torch.zeros(len(batch), width)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
            weight[row, : len(seqs[i])] = 1.0
        ids = ids.to(dev)
        kw = {"token_weight": weight.to(dev)} if len(batch) > 1 else {}
        if choices is not None:
            kw["choices"] = _padded_choices([choices[i] for i in batch], width)
        if with_index_loss:
            logits, part = model(ids, return_index_loss=True, **kw)
            index_loss = part if index_loss is None else index_loss + part
        else:
            logits = model(ids, **kw)
        logits = _tempered(logits, temperature)
        invariant = _invariant(model)
        for row, i in enumerate(batch):
            n = len(seqs[i])
            lse, ent = _row_scores(logits[row, : n - 1], with_entropy, invariant)  # [n - 1]
            logprobs[i] = _token_logprobs(logits[row], slice(0, n - 1), ids[row, 1:n], lse, invariant)
            entropies[i] = ent
    return SequenceScores(logprobs, entropies if with_entropy else None, index_loss)


def sequence_scores(
    model: CausalLM,
    sequences: Sequence[TokenSeq],
    *,
    merge: bool = True,
    with_entropy: bool = False,
    token_budget: int | None = None,
    tree: FlatTree | None = None,
    with_index_loss: bool = False,
    padded: bool | None = None,
    temperature: float = 1.0,
    choices: Sequence[Choices] | None = None,
) -> SequenceScores:
    """Logprobs (and entropies) of every sequence's tokens after the first; see sequence_logprobs.

    token_budget: if given, the merged batch runs in micro-batches of at most this many unique
    tokens (forge.prefix_tree.pack_groups; a tree over it is split with its root path repeated).
    tree: `build_tree(sequences)` if the caller already has it (the trainer scores one
    micro-batch up to three times a step); ignored with a token_budget.
    with_index_loss: also return the model's MSA index loss (`SequenceScores.index_loss`),
    summed over sequences; the model must take `return_index_loss`.
    padded: with merge=False, run sequences of similar length as one right-padded batch
    (default: on CUDA) instead of one forward each; the results are the same up to rounding.
    temperature: score log_softmax(logits / temperature), the distribution a sampler at that
    temperature drew from (entropies too); 1 leaves the logits as they are.
    choices: routing replay (forge.policy.choices): per sequence, a `Choices` with leading dim
    [len] (every token's, the prompt's included), imposed on the forward; tokens then merge only
    where their ids and their choices agree (a `tree` given with them must be their
    `replay_tree`).
    """
    seqs = [as_token_list(s) for s in sequences]
    if not seqs:
        return SequenceScores([], [] if with_entropy else None)
    if choices is not None:
        _check_records(seqs, choices)
    if not merge:
        return _unmerged(model, seqs, with_entropy, with_index_loss, padded, temperature, choices)
    if token_budget is None:
        if tree is None:
            tree = build_tree(seqs) if choices is None else replay_tree(seqs, choices)
        return _merged(model, seqs, tree, with_entropy, with_index_loss, temperature, choices)
    merge_seqs, token_of, _ = (seqs, None, None) if choices is None else _replay_merge(seqs, choices)
    logprobs: list = [None] * len(seqs)
    entropies: list | None = [None] * len(seqs) if with_entropy else None
    index_loss = None
    for pack in pack_groups([merge_seqs], token_budget):
        tree = pack.tree if token_of is None else _real_ids(pack.tree, token_of)
        part = _merged(model, [seqs[i] for i in pack.seq_ids], tree, with_entropy, with_index_loss, temperature,
                       None if choices is None else [choices[i] for i in pack.seq_ids])
        if part.index_loss is not None:
            index_loss = part.index_loss if index_loss is None else index_loss + part.index_loss
        for j, i in enumerate(pack.seq_ids):
            logprobs[i] = part.logprobs[j]
            if entropies is not None:
                entropies[i] = part.entropies[j]
    return SequenceScores(logprobs, entropies, index_loss)


def sequence_logprobs(model: CausalLM, sequences: Sequence[TokenSeq], *, merge: bool = True) -> list[torch.Tensor]:
    """For each sequence, the logprob of each token after the first given its prefix.

    sequences: token-id lists or 1-D tensors, any lengths >= 1. Returns one tensor of length
    len - 1 per sequence, at least fp32, on the model's device, differentiable with respect to
    the model's parameters. merge=True runs the batch as one prefix tree (one forward pass per
    shared prefix); merge=False runs each sequence on its own. Both give the same result.
    """
    return sequence_scores(model, sequences, merge=merge).logprobs
