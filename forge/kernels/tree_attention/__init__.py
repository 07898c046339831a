"""Attention under a prefix-tree mask: query q sees key k iff k <= q < subtree_end[k].

`tree_attention` is the entry point the policy calls: CUDA tensors in fp16, bf16 or fp32 go
through the Triton kernels (`triton_tree.py`), everything else (the CPU, fp64) through the
plain-PyTorch reference (`naive.py`). `flex.py` holds the FlexAttention baseline.
"""

from __future__ import annotations

import torch

from forge.kernels.tree_attention.naive import tree_attention_naive, tree_mask

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention, the entry point the policy calls.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; subtree_end: [B, T] integer (exclusive end of
    each token's subtree in flat DFS order). Returns [B, T, Hq, D].
    """
    if q.is_cuda and q.dtype in _TRITON_DTYPES:
        # Imported here so that CPU-only users never load Triton.
        from forge.kernels.tree_attention.triton_tree import tree_attention_triton

        return tree_attention_triton(q, k, v, subtree_end, scale=scale)
    return tree_attention_naive(q, k, v, subtree_end, scale=scale)


__all__ = ["tree_attention", "tree_attention_naive", "tree_mask"]
