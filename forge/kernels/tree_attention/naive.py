"""Plain-PyTorch definition of tree attention, the reference for the Triton kernel.

A prefix tree flattened in DFS pre-order gives each token `subtree_end`, the exclusive end of
its subtree in flat order. Query q sees key k exactly when k <= q < subtree_end[k]: k is q
itself or one of its ancestors. With `subtree_end[k] = T` for every k this is causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """Boolean visibility mask `[B, T, T]` (query, key) from `subtree_end [B, T]`."""
    t = subtree_end.shape[-1]
    idx = torch.arange(t, device=subtree_end.device)
    q = idx[:, None]  # [T, 1]
    k = idx[None, :]  # [1, T]
    return (k <= q) & (q < subtree_end[:, None, :])


def tree_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the tree mask, through scaled-dot-product attention.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq a multiple of Hkv (GQA);
    subtree_end: [B, T] integer. Returns [B, T, Hq, D] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    rep = hq // hkv
    mask = tree_mask(subtree_end)[:, None]  # [B, 1, T, T]
    qt = q.transpose(1, 2)  # [B, Hq, T, D]
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)  # [B, Hq, T, D]
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)



SPLIT_BELOW_TOKENS = 256
"""`tree_attention_split` attends spans of at most this many tokens in one masked call."""


def tree_attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """`tree_attention_naive` without the [T, T] mask of the whole tree (the CPU path).

    A merged micro-batch is mostly branches that cannot see each other: one [T, T] mask spends
    nearly all its work on masked pairs. This walks the tree instead: a root's trunk (the chain
    down to its first branch point) attends causally after the keys of its ancestors, and each
    of its children's subtrees is attended the same way with the trunk added to those ancestor
    keys; spans of at most SPLIT_BELOW_TOKENS tokens (several small roots together) take one
    masked call. Each query then works on its own ancestors and the small span around it, as
    in the GPU kernels. Same shapes and result as `tree_attention_naive`, up to rounding.
    """
    b, t = subtree_end.shape
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    rows = []
    for row in range(b):
        ends = subtree_end[row].tolist()
        for i, end in enumerate(ends):
            if not i < end <= t:
                raise ValueError(f"subtree_end[{row}, {i}] = {end} is not in ({i}, {t}]: not a flattened prefix tree "
                                 "(forge.prefix_tree.build_tree makes one)")
        parts: list[torch.Tensor] = []
        empty = k[row : row + 1, :0]
        _split_forest(q[row : row + 1], k[row : row + 1], v[row : row + 1], ends, subtree_end[row : row + 1],
                      empty, empty, scale, parts)
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return rows[0] if b == 1 else torch.cat(rows, dim=0)


def _split_forest(q, k, v, ends: list[int], subtree_end: torch.Tensor, past_k, past_v, scale, parts: list) -> None:
    """Append the outputs of the span's queries to `parts` in order. q, k, v: [1, n, H, D] of a
    span of whole subtrees; ends: its subtree_end relative to the span (a list);
    past_k, past_v: [1, p, Hkv, D] the keys every token of the span sees (its ancestors)."""
    n = len(ends)
    if n <= SPLIT_BELOW_TOKENS:
        parts.append(_attend_after(q, k, v, subtree_end, past_k, past_v, scale))
        return
    roots, start = [], 0
    while start < n:
        roots.append((start, ends[start]))
        start = ends[start]
    if len(roots) == 1:
        # The trunk: while the next token's subtree is all the rest, it is the only child.
        trunk = 1
        while trunk < n and ends[trunk] == n:
            trunk += 1
        parts.append(_attend_after(q[:, :trunk], k[:, :trunk], v[:, :trunk], subtree_end[:, :trunk].clamp(max=trunk),
                                   past_k, past_v, scale))
        if trunk < n:
            _split_forest(q[:, trunk:], k[:, trunk:], v[:, trunk:], [e - trunk for e in ends[trunk:]],
                          subtree_end[:, trunk:] - trunk, torch.cat([past_k, k[:, :trunk]], dim=1),
                          torch.cat([past_v, v[:, :trunk]], dim=1), scale, parts)
        return
    # Several roots: consecutive small ones share a call.
    spans: list[tuple[int, int]] = []
    for s, e in roots:
        if spans and e - spans[-1][0] <= SPLIT_BELOW_TOKENS:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    for s, e in spans:
        _split_forest(q[:, s:e], k[:, s:e], v[:, s:e], [x - s for x in ends[s:e]], subtree_end[:, s:e] - s,
                      past_k, past_v, scale, parts)


def _attend_after(q, k, v, subtree_end, past_k, past_v, scale) -> torch.Tensor:
    """Tree attention over a span [1, n] whose every token also sees `past_k`/`past_v` [1, p]."""
    n, p = q.shape[1], past_k.shape[1]
    mask = tree_mask(subtree_end)  # [1, n, n]
    if p:
        mask = torch.cat([torch.ones(1, n, p, dtype=torch.bool, device=mask.device), mask], dim=-1)
        k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
    rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, dim=1),
                                         v.transpose(1, 2).repeat_interleave(rep, dim=1), attn_mask=mask[:, None],
                                         scale=scale)
    return out.transpose(1, 2)
