"""MSA decoding over a paged KV cache: one or a few new tokens per sequence.

A cache page is one MSA block (block_size tokens) and holds the block's keys, values and index
keys, so a cached prefix is a list of pages that several sequences can share (prefix caching):
the page table maps each sequence's logical blocks to pages.

Decoding has few queries and a long cache, so the indexer spreads over pages instead of
queries: one program per (page, sequence) reads the page's index keys once and scores every
new token of every KV group against it (block max, causal for the newest pages). The scores,
[B, Tn, Hkv, max_pages] fp32 (1 MiB for one token, 8 groups and 1M cached tokens), then go
through torch.topk; the own block is always added. The sparse attention is the prefill
forward kernel reading pages (`USE_PAGES`).

Departure from the prefill indexer: ties between equal block scores are broken by torch.topk,
not by the lower block index.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge.kernels.msa.triton_attention import msa_attention_fwd

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def msa_decode_index_kernel(
    IQ, IKC, PAGES, KV_LEN, SCORES, TN,
    stride_iqb, stride_iqt, stride_iqh,
    stride_ikp, stride_ikt,
    stride_pb,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_len = tl.load(KV_LEN + b)
    # Rows are (new token, group) pairs: row r is token r // HKV, group r % HKV.
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < TN * HKV
    tok = rows // HKV
    grp = rows % HKV
    pos = kv_len - TN + tok  # [BLOCK_R]
    score = tl.full([BLOCK_R], float("-inf"), tl.float32)
    # Pages past the sequence and each token's own page (always kept) compete with -inf.
    if n * BLOCK_SIZE < kv_len:
        offs_d = tl.arange(0, DI)
        offs_n = tl.arange(0, BLOCK_SIZE)
        iq = tl.load(IQ + b * stride_iqb + tok[:, None] * stride_iqt + grp[:, None] * stride_iqh
                     + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, DI]
        page = tl.load(PAGES + b * stride_pb + n).to(tl.int64)
        keys = n * BLOCK_SIZE + offs_n
        ik = tl.load(IKC + page * stride_ikp + offs_n[None, :] * stride_ikt + offs_d[:, None],
                     mask=(keys < kv_len)[None, :], other=0.0)  # [DI, BLOCK_SIZE]
        if IS_INTERPRET:
            iq = iq.to(tl.float32)
            ik = ik.to(tl.float32)
        s = tl.dot(iq, ik)  # [BLOCK_R, BLOCK_SIZE]
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        score = tl.where(pos // BLOCK_SIZE == n, float("-inf"), tl.max(s, 1))  # [BLOCK_R]
    tl.store(SCORES + b * stride_sb + tok * stride_st + grp * stride_sh + n, score, mask=r_ok)


def select_blocks_decode(
    iq: torch.Tensor, ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor,
    *, block_size: int, top_k: int,
) -> torch.Tensor:
    """Kept logical blocks `[B, Tn, Hkv, top_k]` int32 for the Tn newest tokens of each sequence."""
    b, tn, hkv, di = iq.shape
    max_pages = page_table.shape[1]
    scores = torch.empty((b, tn, hkv, max_pages), dtype=torch.float32, device=iq.device)
    block_r = max(16, triton.next_power_of_2(tn * hkv))
    msa_decode_index_kernel[(max_pages, b)](
        iq, ik_cache, page_table, kv_len, scores, tn,
        iq.stride(0), iq.stride(1), iq.stride(2),
        ik_cache.stride(0), ik_cache.stride(1),
        page_table.stride(0),
        scores.stride(0), scores.stride(1), scores.stride(2),
        HKV=hkv, DI=di, BLOCK_SIZE=block_size, BLOCK_R=block_r, IS_INTERPRET=IS_INTERPRET,
        num_warps=4,
    )
    pos = kv_len.view(b, 1).long() - tn + torch.arange(tn, device=iq.device).view(1, tn)
    own = (pos // block_size).view(b, tn, 1, 1).expand(b, tn, hkv, 1)
    n_other = min(top_k - 1, max_pages)
    values, chosen = torch.topk(scores, n_other, dim=-1)
    chosen = torch.where(values > float("-inf"), chosen, torch.full_like(chosen, -1))
    kept = torch.cat([chosen, own], dim=-1)
    if kept.shape[-1] < top_k:
        pad = torch.full((b, tn, hkv, top_k - kept.shape[-1]), -1, device=iq.device, dtype=kept.dtype)
        kept = torch.cat([kept, pad], dim=-1)
    return kept.to(torch.int32).contiguous()


def msa_decode(
    q: torch.Tensor, iq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
    top_k: int = 16, scale: float | None = None,
) -> torch.Tensor:
    """MSA for the Tn newest tokens of each sequence, reading a paged cache.

    q: [B, Tn, Hq, D]; iq: [B, Tn, Hkv, Di]; k_cache, v_cache: [n_pages, block_size, Hkv, D];
    ik_cache: [n_pages, block_size, Di]; page_table: [B, max_pages] int32 (logical block ->
    page); kv_len: [B] int32, tokens in the cache per sequence counting the new ones, whose
    keys, values and index keys must already be written. Returns [B, Tn, Hq, D].
    """
    block_size = k_cache.shape[1]
    if ik_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(
            f"ik_cache {tuple(ik_cache.shape)} must have the pages and page size of k_cache "
            f"{tuple(k_cache.shape)}: a page holds one block's keys, values and index keys")
    page_table = page_table.to(torch.int32).contiguous()
    kv_len = kv_len.to(torch.int32).contiguous()
    selected = select_blocks_decode(iq, ik_cache, page_table, kv_len, block_size=block_size, top_k=top_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = msa_attention_fwd(q, k_cache, v_cache, selected, block_size=block_size, scale=scale,
                               kv_len=kv_len, page_table=page_table)
    return out
