"""Tree attention through PyTorch's FlexAttention: the baseline the Triton kernel is timed against.

The same mask (query q sees key k iff k <= q < subtree_end[k]) as a `mask_mod`; FlexAttention
builds its block mask from it, skips empty blocks and compiles the rest. Not on the training
path: it needs torch.compile and a fresh block mask per batch.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def tree_block_mask(subtree_end: torch.Tensor, *, block_size: int = 128):
    """FlexAttention `BlockMask` of the tree mask, from `subtree_end [B, T]`."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = subtree_end.shape
    se = subtree_end

    def tree(b_i, h_i, q_i, k_i):
        return (k_i <= q_i) & (q_i < se[b_i, k_i])

    return create_block_mask(tree, b, None, t, t, device=se.device, BLOCK_SIZE=block_size)


def tree_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
    block_mask=None,
    compile: bool = True,
) -> torch.Tensor:
    """Tree attention via FlexAttention. Shapes as `tree_attention`; `block_mask` may be reused."""
    from torch.nn.attention.flex_attention import flex_attention

    if block_mask is None:
        block_mask = tree_block_mask(subtree_end)
    fn = _compiled() if compile else flex_attention
    # FlexAttention takes [B, H, T, D]; GQA through enable_gqa.
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
