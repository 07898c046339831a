"""MSA over a flattened prefix tree on Triton: selection, sparse attention and the index loss.

The fast path of `tree.msa_tree` with the same contract, for chains and trees alike (a causal
row is a tree with one path: subtree_end = T, position = arange(T)). One indexer serves both,
and a query's blocks reach it in the same order in either layout, so the same index queries
and keys give bitwise the same selections merged or unmerged. Three kernels families:

- `triton_tree_indexer.select_blocks_tree_triton`: block scores over each query's visible
  keys (blocks in position space) and a running top-(k-1), streaming key tiles in flat order;
- `triton_tree_attention.msa_tree_sparse_attention_triton`: exact softmax over the kept keys,
  forward and backward (dK, dV key-outer; dQ query-outer), skipping tiles no row keeps;
- `triton_tree_index_loss.msa_tree_index_loss_triton`: the index branch's KL to the main
  branch's attention over the kept keys, with its gradients to iq and ik; with the attention
  in the same call it reads the attention's log-sum-exps instead of computing them again, and
  in training both run as one autograd node whose dK/dV kernel also gives d ik
  (`msa_tree_attention_index_loss_triton`).

`tree.py` stays the reference; tests/test_msa_tree_*_triton.py compare against it.
"""

from __future__ import annotations

import torch


def msa_tree_triton(
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`tree.msa_tree` on Triton: (out [B, T, Hq, D] or None, index-loss sum (fp32 scalar) or None).

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; iq: [B, T, Hkv, Di]; ik: [B, T, Di]; subtree_end,
    position: [B, T] integer; token_weight: [B, T] or None (1). `selected` [B, T, Hkv, top_k]
    int32 imposes a selection (else the indexer's). CUDA tensors (or Triton's interpreter).
    """
    from forge.kernels.msa.triton_tree_attention import msa_tree_sparse_attention_triton
    from forge.kernels.msa.triton_tree_index_loss import (msa_tree_attention_index_loss_triton,
                                                          msa_tree_index_loss_triton)

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    se = subtree_end.to(torch.int32).contiguous()
    pos = position.to(torch.int32).contiguous()
    if selected is None:
        selected = select_blocks_tree_triton(iq, ik, se, pos, block_size=block_size, top_k=top_k)
    if with_attention and with_index_loss:
        # One autograd node where it applies: the attention's backward then gives the index
        # keys' gradient too (triton_tree_index_loss.TreeAttentionIndexLossFunction).
        fused = msa_tree_attention_index_loss_triton(
            q, k, k if v is None else v, iq, ik, selected, se, pos, token_weight=token_weight, block_size=block_size,
            dense_below=dense_below, dense=dense, scale=scale)
        if fused is not None:
            return fused[0], fused[2]
    out = lse = None
    if with_attention:
        # The attention's log-sum-exps over the kept keys are the index loss's teacher statistics:
        # passed on, so the loss does not compute the main scores a third time.
        out, lse = msa_tree_sparse_attention_triton(q, k, k if v is None else v, selected, se, pos,
                                                    block_size=block_size, dense_below=dense_below, dense=dense,
                                                    scale=scale, return_lse=True)
    loss = None
    if with_index_loss:
        loss = msa_tree_index_loss_triton(q.detach(), k.detach(), iq, ik, selected, se, pos, token_weight=token_weight,
                                          block_size=block_size, dense_below=dense_below, dense=dense, scale=scale,
                                          main_lse=lse)
    return out, loss


def select_blocks_tree_triton(
    iq: torch.Tensor, ik: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor, *, block_size: int,
    top_k: int,
) -> torch.Tensor:
    """The selection `msa_tree_triton` makes, `[B, T, Hkv, top_k]` int32 (own block last, -1
    empty): for callers that record or replace it (forge.policy.choices) and then pass it back as
    `selected`. Imported lazily, as the kernels are."""
    from forge.kernels.msa.triton_tree_indexer import select_blocks_tree_triton as select

    with torch.no_grad():
        return select(iq.detach(), ik.detach(), subtree_end.to(torch.int32).contiguous(),
                      position.to(torch.int32).contiguous(), block_size=block_size, top_k=top_k)
