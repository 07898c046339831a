"""MiniMax Sparse Attention: an index branch picks top-k key blocks per query, attention is exact over them.

`msa_attention` and `select_blocks` run the Triton kernels on CUDA and the plain-PyTorch
reference (`naive.py`) elsewhere; `msa_decode` reads a paged KV cache (Triton only);
`msa_index_loss` trains the index branch. `msa_tree_attention` and `msa_tree_index_loss`
(`tree.py`, plain PyTorch) are MSA over a flattened prefix tree, blocks counted in position
space. docs/msa.md gives the definition and where Forge departs from the paper.
"""

from __future__ import annotations

import torch

from forge.kernels.msa.config import MSAConfig
from forge.kernels.msa.index_loss import msa_index_loss_chunked
from forge.kernels.msa.naive import (
    _check_shapes,
    msa_attention_naive,
    msa_index_loss_naive,
    select_blocks_naive,
    sparse_attention_naive,
)
from forge.kernels.msa.tree import msa_tree_attention, msa_tree_index_loss


def select_blocks(iq: torch.Tensor, ik: torch.Tensor, *, block_size: int = 128, top_k: int = 16) -> torch.Tensor:
    """Kept blocks `[B, T, Hkv, top_k]` (block indices, -1 in empty slots, in no fixed order).

    iq: [B, T, Hkv, Di], ik: [B, T, Di]. Not differentiable.
    """
    with torch.no_grad():
        if iq.is_cuda:
            from forge.kernels.msa.triton_indexer import select_blocks_triton

            return select_blocks_triton(iq, ik, block_size=block_size, top_k=top_k)
        return select_blocks_naive(iq, ik, block_size=block_size, top_k=top_k)


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    iq: torch.Tensor,
    ik: torch.Tensor,
    *,
    block_size: int = 128,
    top_k: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """MSA over a causal sequence.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; iq: [B, T, Hkv, Di]; ik: [B, T, Di]. Returns
    [B, T, Hq, D] in q's dtype, differentiable in q, k and v (the selection is discrete: iq and
    ik learn through `msa_index_loss`). `scale` defaults to D^-0.5.
    """
    _check_shapes(q, k, iq, ik)
    if not q.is_cuda:
        return msa_attention_naive(q, k, v, iq, ik, block_size=block_size, top_k=top_k, scale=scale)
    from forge.kernels.msa.triton_attention import sparse_attention_triton

    selected = select_blocks(iq, ik, block_size=block_size, top_k=top_k)
    return sparse_attention_triton(q, k, v, selected, block_size=block_size, scale=scale)


def msa_index_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    iq: torch.Tensor,
    ik: torch.Tensor,
    *,
    block_size: int = 128,
    top_k: int = 16,
    scale: float | None = None,
    dense: bool = False,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL from the main branch's attention to the index branch's distribution, a scalar.

    Over the tokens of the kept blocks (`dense=True`: all causal tokens, the warm-up), the
    main branch's probabilities averaged over the heads of each KV group, q and k detached;
    index logits are `iq . ik * Di^-0.5`. Averaged over batch, tokens and groups. Pass the
    `selected` blocks of the forward to skip selecting again.
    """
    _check_shapes(q, k, iq, ik)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if selected is None and not dense:
        selected = select_blocks(iq, ik, block_size=block_size, top_k=top_k)
    return msa_index_loss_chunked(q, k, iq, ik, selected, block_size=block_size, scale=scale, dense=dense)


def msa_decode(
    q: torch.Tensor, iq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
    top_k: int = 16, scale: float | None = None,
) -> torch.Tensor:
    """MSA for the Tn newest tokens of each sequence over a paged KV cache (Triton).

    q: [B, Tn, Hq, D]; iq: [B, Tn, Hkv, Di]; k_cache, v_cache: [n_pages, block_size, Hkv, D];
    ik_cache: [n_pages, block_size, Di]; page_table: [B, max_pages] (logical block -> page);
    kv_len: [B] cached tokens per sequence, the Tn new ones included and already written.
    """
    return msa_decode_with_selection(q, iq, k_cache, v_cache, ik_cache, page_table, kv_len, top_k=top_k,
                                     scale=scale)[0]


def msa_decode_with_selection(
    q: torch.Tensor, iq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
    top_k: int = 16, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`msa_decode`'s output and the blocks it kept, [B, Tn, Hkv, top_k] int32 (own block last)."""
    from forge.kernels.msa.triton_decode import decode_with_selection

    return decode_with_selection(q, iq, k_cache, v_cache, ik_cache, page_table, kv_len, top_k=top_k, scale=scale)


__all__ = [
    "MSAConfig",
    "msa_attention",
    "msa_attention_naive",
    "msa_decode",
    "msa_decode_with_selection",
    "msa_index_loss",
    "msa_index_loss_naive",
    "msa_tree_attention",
    "msa_tree_index_loss",
    "select_blocks",
    "select_blocks_naive",
    "sparse_attention_naive",
]
