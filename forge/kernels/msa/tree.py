"""MSA over a flattened prefix tree and over a position-indexed KV cache: the plain-PyTorch path.

A prefix tree flattened in DFS pre-order (forge.prefix_tree) gives each token its `position`
(its depth: its position in every sequence that contains it) and `subtree_end`; query q sees
key k iff `k <= q < subtree_end[k]`, i.e. k is q or one of its ancestors. MSA in that layout
keeps the definition of `naive.py` along each root-to-leaf path:

- only visible (ancestor) keys are scored, `iq[q, g] . ik[k]`;
- key k belongs to block `position[k] // block_size`: blocks are counted in position space,
  so a block may be split over several trie nodes, and a query's blocks are exactly those of
  its own sequence run alone;
- a block scores the max over its visible keys; the query keeps its own block and the
  `top_k - 1` best other visible blocks (ties to the lower block index, as in naive.py);
- attention is exact softmax over the visible keys of the kept blocks.

So every query computes what it computes in its own sequence, and merged training equals
unmerged training. Two switches make rows dense (every visible key kept): `dense=True` (the
warm-up) and `dense_below`, which makes queries at positions below it dense. The latter depends
only on the query's own position, which a shared token has in every sequence through it; a rule
on the sequence length would not be causal (a prefix's output would depend on how long the
sequence later grows) and would be ambiguous for a token shared by sequences of different lengths.

The index loss (`msa_tree_index_loss` or `with_index_loss=True`) is naive.py's KL per (query,
group) over the kept keys, averaged over groups, weighted per query by `token_weight` (its
multiplicity in the batch) and summed: for a chain of length T with unit weights it is `B * T`
times `msa_index_loss_naive`; in a tree it equals the sum over the unmerged sequences.

Memory: work runs in chunks of queries, each holding `[B, Hq, chunk, T]` scores (the chunk is
sized so that this stays near 2^24 elements: few chunks, so few kernel launches, at the
lengths the model trains on); with gradients on, each chunk is recomputed in the backward
pass (activation checkpointing), so the whole pass holds O(T * chunk) activations, never a
`[T, T]` tensor. Compute is O(T^2): every
query scores every key, as the reference does. Everything runs in the inputs' dtype but at
least fp32 (fp64 stays fp64, so the merged-vs-unmerged tests hold to 1e-10).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def select_tree_blocks(
    iq: torch.Tensor,
    ik: torch.Tensor,
    visible: torch.Tensor,
    key_block: torch.Tensor,
    own_block: torch.Tensor,
    *,
    top_k: int,
    n_blocks: int,
) -> torch.Tensor:
    """Kept blocks `[B, C, Hkv, top_k]` int32 in the Triton indexer's layout: the `top_k - 1` best
    other visible blocks (-1 where fewer exist), then the own block last.

    iq: [B, C, Hkv, Di]; ik: [B, S, Di]; visible: [B, C, S] bool; key_block: [B, S] long;
    own_block: [B, C] long; n_blocks: more than any block index. A block scores the max over its
    visible keys; equal scores rank the lower block first.
    """
    b, c, hkv, _ = iq.shape
    s = ik.shape[1]
    sel = torch.full((b, hkv, c, top_k), -1, dtype=torch.long, device=iq.device)
    n_other = min(top_k - 1, n_blocks)
    if n_other > 0:
        ct = _compute_dtype(iq)
        scores = torch.einsum("bcgd,bsd->bgcs", iq.to(ct), ik.to(ct))  # [B, Hkv, C, S]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        index = key_block[:, None, None, :].expand(b, hkv, c, s)
        blocks = torch.full((b, hkv, c, n_blocks), float("-inf"), dtype=ct, device=iq.device)
        blocks = blocks.scatter_reduce(-1, index, scores, reduce="amax")  # [B, Hkv, C, NB]
        own = own_block[:, None, :, None].expand(b, hkv, c, 1)
        others = blocks.scatter(-1, own, float("-inf"))
        # A stable descending sort ranks equal scores by the lower block index, as naive.py does.
        chosen = torch.sort(others, dim=-1, descending=True, stable=True).indices[..., :n_other]
        valid = torch.gather(others, -1, chosen) > float("-inf")
        sel[..., :n_other] = torch.where(valid, chosen, -1)
    sel[..., -1] = own_block[:, None, :]
    return sel.permute(0, 2, 1, 3).to(torch.int32)


def kept_keys(
    iq: torch.Tensor,
    ik: torch.Tensor,
    visible: torch.Tensor,
    key_block: torch.Tensor,
    own_block: torch.Tensor,
    dense_rows: torch.Tensor,
    *,
    top_k: int,
    selected: torch.Tensor | None = None,
    n_blocks: int | None = None,
) -> torch.Tensor:
    """Which keys each (query, group) attends to: `[B, Hkv, C, S]` bool.

    iq: [B, C, Hkv, Di] index queries of C queries; ik: [B, S, Di] index keys of S keys;
    visible: [B, C, S] bool; key_block: [B, S] long, each key's block; own_block: [B, C] long;
    dense_rows: [B, C] bool, rows that keep every visible key. `selected` [B, C, Hkv, K] (block
    indices, -1 for empty slots, any order) replaces the selection (`select_tree_blocks`), e.g.
    the Triton indexer's or a recorded one. `n_blocks` (more than any block index) spares reading
    the maximum back from the device.
    """
    b, c, hkv, _ = iq.shape
    s = ik.shape[1]
    if n_blocks is None:
        n_blocks = max(int(key_block.max()) + 1 if s else 1, int(own_block.max()) + 1 if c else 1)
    if selected is None:
        selected = select_tree_blocks(iq, ik, visible, key_block, own_block, top_k=top_k, n_blocks=n_blocks)
    kept_blocks = torch.zeros(b, hkv, c, n_blocks + 1, dtype=torch.bool, device=iq.device)
    sel = selected.long().permute(0, 2, 1, 3)  # [B, Hkv, C, K]
    kept_blocks.scatter_(-1, torch.where(sel < 0, n_blocks, sel), True)
    kept_blocks.scatter_(-1, own_block[:, None, :, None].expand(b, hkv, c, 1), True)
    kept = torch.gather(kept_blocks[..., :n_blocks], -1, key_block[:, None, None, :].expand(b, hkv, c, s))
    kept = kept | dense_rows[:, None, :, None]
    return kept & visible[:, None]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, C, Hq, D] over k, v [B, S, Hkv, D] where kept [B, Hkv, C, S].

    Returns the output [B, C, Hq, D] and the probabilities [B, Hkv, rep, C, S] (the index
    loss's teacher, so that it is not computed twice).
    """
    b, c, hq, d = q.shape
    hkv = k.shape[2]
    ct = _compute_dtype(q)
    qg = q.to(ct).view(b, c, hkv, hq // hkv, d)
    s = torch.einsum("bcgrd,bsgd->bgrcs", qg, k.to(ct)) * scale  # [B, Hkv, rep, C, S]
    p = torch.softmax(s.masked_fill(~kept[:, :, None], float("-inf")), dim=-1)
    out = torch.einsum("bgrcs,bsgd->bcgrd", p, v.to(ct))
    return out.reshape(b, c, hq, d).to(q.dtype), p


def _index_kl(
    q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, kept: torch.Tensor, scale: float,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(main-branch attention over kept keys || index distribution) per query, mean over groups: [B, C].

    The teacher is the softmax of q . k over the kept keys averaged over the group's heads, with q
    and k detached (or `probs`, those softmax probabilities [B, Hkv, rep, C, S] if already
    computed); the student is the softmax of `iq . ik * Di^-0.5` over the same keys.
    """
    b, c, hq, d = q.shape
    hkv = k.shape[2]
    ct = _compute_dtype(iq)
    neg = float("-inf")
    with torch.no_grad():
        if probs is None:
            qg = q.detach().to(ct).view(b, c, hkv, hq // hkv, d)
            s = torch.einsum("bcgrd,bsgd->bgrcs", qg, k.detach().to(ct)) * scale
            probs = torch.softmax(s.masked_fill(~kept[:, :, None], neg), dim=-1)
        target = probs.detach().to(ct).mean(dim=2)  # [B, Hkv, C, S]
        log_target = torch.log(target.clamp_min(torch.finfo(ct).tiny))
    logits = torch.einsum("bcgd,bsd->bgcs", iq.to(ct), ik.to(ct)) * iq.shape[-1] ** -0.5
    log_student = torch.log_softmax(logits.masked_fill(~kept, neg), dim=-1)
    terms = torch.where(kept, target * (log_target - log_student), torch.zeros_like(target))
    return terms.sum(-1).mean(1)  # [B, C]


def _tree_chunk(
    q, k, v, iq, ik, subtree_end, position, token_weight, t0: int, block_size: int, top_k: int,
    dense_below: int, dense: bool, scale: float, with_attention: bool, with_loss: bool, selected,
    n_blocks: int,
):
    """Output rows t0 : t0 + C and the chunk's weighted index-loss sum (or None for either)."""
    c = q.shape[1]
    t = k.shape[1]
    rows = t0 + torch.arange(c, device=q.device)  # [C]
    keys = torch.arange(t, device=q.device)  # [T]
    visible = (keys[None, None, :] <= rows[None, :, None]) & (rows[None, :, None] < subtree_end[:, None, :])  # [B, C, T]
    pos_rows = position[:, t0 : t0 + c]
    dense_rows = (pos_rows < dense_below) | dense
    with torch.no_grad():
        kept = kept_keys(iq, ik, visible, position // block_size, pos_rows // block_size, dense_rows,
                         top_k=top_k, selected=selected, n_blocks=n_blocks)
    out, probs = _attend(q, k, v, kept, scale) if with_attention else (None, None)
    loss = None
    if with_loss:
        loss = (_index_kl(q, k, iq, ik, kept, scale, probs) * token_weight[:, t0 : t0 + c]).sum()
    return out, loss


def msa_tree(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    iq: torch.Tensor,
    ik: torch.Tensor,
    subtree_end: torch.Tensor,
    position: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    dense_below: int = 0,
    dense: bool = False,
    scale: float | None = None,
    token_weight: torch.Tensor | None = None,
    with_attention: bool = True,
    with_index_loss: bool = False,
    selected: torch.Tensor | None = None,
    chunk: int | None = None,
    n_blocks: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """MSA attention output and/or index-loss sum over a flattened prefix tree.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; iq: [B, T, Hkv, Di]; ik: [B, T, Di];
    subtree_end, position: [B, T] integer (a causal row: subtree_end = T, position = arange(T));
    token_weight: [B, T] or None (1). Returns (out [B, T, Hq, D] in q's dtype or None,
    index-loss sum (a scalar, at least fp32) or None). The output is differentiable in q, k, v;
    the loss only in iq and ik. `selected` [B, T, Hkv, K] imposes a selection. `chunk`: queries
    per chunk (default: sized to the length); `n_blocks`: more than any block index (default:
    read from `position`).
    """
    b, t, hq, d = q.shape
    if t == 0:
        return (q.new_zeros(q.shape) if with_attention else None), (q.new_zeros(()) if with_index_loss else None)
    scale = d**-0.5 if scale is None else scale
    if token_weight is None:
        token_weight = torch.ones(b, t, dtype=_compute_dtype(q), device=q.device)
    if v is None:
        v = k
    if chunk is None:
        chunk = max(64, (1 << 24) // max(1, b * hq * t))
    if n_blocks is None:
        n_blocks = int(position.max()) // block_size + 1
    outs, total = [], None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, iq, ik))
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        args = (q[:, t0:t1], k, v, iq[:, t0:t1], ik, subtree_end, position, token_weight, t0, block_size, top_k,
                dense_below, dense, scale, with_attention, with_index_loss,
                None if selected is None else selected[:, t0:t1], n_blocks)
        out, loss = checkpoint(_tree_chunk, *args, use_reentrant=False) if grad else _tree_chunk(*args)
        if out is not None:
            outs.append(out)
        if loss is not None:
            total = loss if total is None else total + loss
    return (torch.cat(outs, dim=1) if with_attention else None), total


def select_blocks_tree(
    iq: torch.Tensor, ik: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor, *, block_size: int,
    top_k: int, chunk: int = 256,
) -> torch.Tensor:
    """The blocks `msa_tree` keeps over a flattened prefix tree, `[B, T, Hkv, top_k]` int32 in the
    layout of `select_tree_blocks` (and of the Triton indexer); arguments as in `msa_tree`."""
    t = iq.shape[1]
    n_blocks = int(position.max()) // block_size + 1 if t else 1
    keys = torch.arange(t, device=iq.device)
    parts = []
    for t0 in range(0, t, chunk):
        rows = keys[t0 : t0 + chunk]
        visible = (keys[None, None, :] <= rows[None, :, None]) & (rows[None, :, None] < subtree_end[:, None, :])
        parts.append(select_tree_blocks(iq[:, t0 : t0 + chunk], ik, visible, position // block_size,
                                        position[:, t0 : t0 + chunk] // block_size, top_k=top_k, n_blocks=n_blocks))
    return torch.cat(parts, dim=1) if parts else torch.empty(*iq.shape[:3], top_k, dtype=torch.int32)


def msa_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor,
    subtree_end: torch.Tensor, position: torch.Tensor, *, block_size: int = 128, top_k: int = 16,
    dense_below: int = 0, dense: bool = False, scale: float | None = None,
) -> torch.Tensor:
    """MSA over a flattened prefix tree, `[B, T, Hq, D]`; see the module docstring."""
    out, _ = msa_tree(q, k, v, iq, ik, subtree_end, position, block_size=block_size, top_k=top_k,
                      dense_below=dense_below, dense=dense, scale=scale)
    return out


def msa_tree_index_loss(
    q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, subtree_end: torch.Tensor,
    position: torch.Tensor, *, token_weight: torch.Tensor | None = None, block_size: int = 128,
    top_k: int = 16, dense_below: int = 0, dense: bool = False, scale: float | None = None,
) -> torch.Tensor:
    """Index-branch KL summed over queries (weighted by `token_weight`), mean over groups; a scalar."""
    _, loss = msa_tree(q, k, None, iq, ik, subtree_end, position, block_size=block_size, top_k=top_k,
                       dense_below=dense_below, dense=dense, scale=scale, token_weight=token_weight,
                       with_attention=False, with_index_loss=True)
    return loss


def _cache_chunks(position: torch.Tensor, s: int, block_size: int, chunk: int):
    """(c0, positions [B, C'], visible [B, C', S], key_block [B, S]) of each chunk of queries
    over a position-indexed cache of S slots."""
    slots = torch.arange(s, device=position.device)
    key_block = (slots // block_size).expand(position.shape[0], s)
    for c0 in range(0, position.shape[1], chunk):
        pos = position[:, c0 : c0 + chunk]
        yield c0, pos, slots[None, None, :] <= pos[:, :, None], key_block


def select_cache_blocks(
    iq: torch.Tensor, ik_cache: torch.Tensor, position: torch.Tensor, *, block_size: int, top_k: int,
    chunk: int = 128,
) -> torch.Tensor:
    """The blocks `msa_cache_attention` keeps, `[B, C, Hkv, top_k]` int32 (`select_tree_blocks`'
    layout); arguments as there."""
    n_blocks = -(-ik_cache.shape[1] // block_size)
    parts = [select_tree_blocks(iq[:, c0 : c0 + chunk], ik_cache, visible, key_block, pos // block_size,
                                top_k=top_k, n_blocks=n_blocks)
             for c0, pos, visible, key_block in _cache_chunks(position, ik_cache.shape[1], block_size, chunk)]
    return torch.cat(parts, dim=1)


def msa_cache_attention(
    q: torch.Tensor,
    iq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ik_cache: torch.Tensor,
    position: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    dense_below: int = 0,
    dense: bool = False,
    scale: float | None = None,
    chunk: int = 128,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSA of new queries over a position-indexed cache (slot j of a row holds position j).

    q: [B, C, Hq, D]; iq: [B, C, Hkv, Di]; k_cache, v_cache: [B, S, Hkv, D]; ik_cache: [B, S, Di];
    position: [B, C], each query's position; its keys (slots 0..position) must be written. The
    selection is the causal one of naive.py: a query sees slots up to its position; `selected`
    [B, C, Hkv, K] (`select_cache_blocks`) imposes one. Runs in chunks of `chunk` queries.
    Returns [B, C, Hq, D].
    """
    s = k_cache.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_blocks = -(-s // block_size)
    outs = []
    for c0, pos, visible, key_block in _cache_chunks(position, s, block_size, chunk):
        kept = kept_keys(iq[:, c0 : c0 + chunk], ik_cache, visible, key_block, pos // block_size,
                         (pos < dense_below) | dense, top_k=top_k, n_blocks=n_blocks,
                         selected=None if selected is None else selected[:, c0 : c0 + chunk])
        outs.append(_attend(q[:, c0 : c0 + chunk], k_cache, v_cache, kept, scale)[0])
    return torch.cat(outs, dim=1)
