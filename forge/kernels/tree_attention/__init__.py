"""Attention under a prefix-tree mask: query q sees key k iff k <= q < subtree_end[k].

`tree_attention` is the entry point the policy calls. CUDA tensors in fp16 or bf16 go through
dense pieces on torch's cuDNN or flash attention (`decomposed.py`) when its cost rule says they pay, and
through the Triton kernels (`triton_tree.py`) otherwise; CUDA fp32 always through the Triton
kernels; everything else (the CPU, fp64) through the plain-PyTorch reference (`naive.py`), walked
branch by branch (`tree_attention_split`) rather than under one [T, T] mask.
`flex.py` holds the FlexAttention baseline.
"""

from __future__ import annotations

import torch

from forge.kernels.tree_attention.naive import tree_attention_naive, tree_attention_split, tree_mask

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Plans of recent subtree_end tensors: every layer of a forward sees the same tree. An entry
# holds (the tensor itself, its version counter, its host copy, the plan); holding the tensor
# keeps its identity unique, so the same unmodified tensor finds its plan with no device read.
_PLANS: list[tuple[torch.Tensor, int, torch.Tensor, object]] = []
_PLAN_CACHE = 4


def _plan(subtree_end: torch.Tensor, device: torch.device):
    from forge.kernels.tree_attention.decomposed import plan_tree

    for held, version, _, plan in _PLANS:
        if held is subtree_end and held._version == version:
            return plan
    # A new tensor: one device-to-host copy (the Triton path's block lists synchronise too).
    se = subtree_end.detach().to("cpu", torch.int64, copy=True)
    plan = next((p for _, _, key, p in _PLANS if key.shape == se.shape and p.base.seg.cu_q.device == device
                 and torch.equal(key, se)), None) or plan_tree(se).to(device)
    _PLANS.insert(0, (subtree_end, subtree_end._version, se, plan))
    del _PLANS[_PLAN_CACHE:]
    return plan


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
        from forge.kernels.tree_attention.decomposed import flash_supports, tree_attention_pieces
        from forge.kernels.tree_attention.triton_tree import tree_attention_triton

        if flash_supports(q, k):
            plan = _plan(subtree_end, q.device)
            if plan.pays:
                return tree_attention_pieces(q, k, v, subtree_end, scale=scale, plan=plan)
        return tree_attention_triton(q, k, v, subtree_end, scale=scale)
    return tree_attention_split(q, k, v, subtree_end, scale=scale)


__all__ = ["tree_attention", "tree_attention_naive", "tree_attention_split", "tree_mask"]
