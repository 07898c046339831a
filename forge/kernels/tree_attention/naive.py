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
