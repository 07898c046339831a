"""MSA decoding over a paged KV cache: one or a few new tokens per sequence.

A cache page is one MSA block (block_size tokens) and holds the block's keys, values and index
keys, so a cached prefix is a list of pages that several sequences can share (prefix caching):
the page table maps each sequence's logical blocks to pages.

Decoding reads the index keys of the whole cache and 16 pages per KV group; the index read is
nearly all of the bytes, so it is spread over every multiprocessor:

1. scan: one program per run of consecutive pages of one sequence reads each page's index keys
   once, scores every new token of every KV group against it (block max, causal for the newest
   pages) and keeps a running top-(k-1) per row, as the prefill indexer does;
2. merge: one program per (token, group) picks the k-1 best of the scan programs' candidates
   (ties to the lower block, as in prefill) and adds the own block;
3. attention split over the kept slots: one program per (token, group, slot) reads one page
   and writes a partial; the combine merges the 16 partials (`triton_attention`).

Four launches, no host synchronisation: a CUDA graph can hold a whole step. The index keys may
be stored in fp8 (float8_e4m3fn): the scan upcasts them, and the index read halves.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge.kernels.msa.triton_attention import msa_attention_fwd
from forge.kernels.msa.triton_indexer import insert_block

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Scan programs per multiprocessor and pages each keeps in flight (num_stages), chosen with
# `benchmarks/msa.py --sweep` on an H100.
SCAN_PROGRAMS_PER_SM = 2
SCAN_STAGES = 6


@triton.jit
def msa_decode_scan_kernel(
    IQ, IKC, PAGES, KV_LEN, CS, CI, TN, PPP, N_PROG,
    stride_iqb, stride_iqt, stride_iqh,
    stride_ikp, stride_ikt,
    stride_pb,
    HKV: tl.constexpr, DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    KP: tl.constexpr, NKEEP: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_len = tl.load(KV_LEN + b)
    # Rows are (new token, group) pairs: row r is token r // HKV, group r % HKV.
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < TN * HKV
    tok = rows // HKV
    grp = rows % HKV
    pos = kv_len - TN + tok  # [BLOCK_R]
    offs_d = tl.arange(0, DI)
    offs_n = tl.arange(0, BLOCK_SIZE)
    slot = tl.arange(0, KP)
    iq = tl.load(IQ + b * stride_iqb + tok[:, None] * stride_iqt + grp[:, None] * stride_iqh
                 + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_R, DI]
    if IS_INTERPRET:
        iq = iq.to(tl.float32)
    # Slots past NKEEP are locked at +inf so that they are never the minimum.
    top_s = tl.where(slot[None, :] < NKEEP, float("-inf"), float("inf")) + tl.zeros([BLOCK_R, KP], tl.float32)
    top_i = tl.full([BLOCK_R, KP], -1, tl.int32)
    n0 = pid * PPP
    n1 = tl.minimum(n0 + PPP, tl.cdiv(kv_len, BLOCK_SIZE))
    for n in range(n0, n1):
        page = tl.load(PAGES + b * stride_pb + n).to(tl.int64)
        keys = n * BLOCK_SIZE + offs_n
        ik = tl.load(IKC + page * stride_ikp + offs_n[None, :] * stride_ikt + offs_d[:, None],
                     mask=(keys < kv_len)[None, :], other=0.0)  # [DI, BLOCK_SIZE]
        s = tl.dot(iq, ik.to(iq.dtype))  # [BLOCK_R, BLOCK_SIZE]
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        # Each token's own page is always kept: it does not compete.
        score = tl.where(pos // BLOCK_SIZE == n, float("-inf"), tl.max(s, 1))  # [BLOCK_R]
        top_s, top_i = insert_block(top_s, top_i, score, n, slot, KP)
    cand = ((b * N_PROG + pid) * BLOCK_R + rows) * KP  # [BLOCK_R]
    keep = r_ok[:, None] & (slot[None, :] < NKEEP)
    tl.store(CS + cand[:, None] + slot[None, :], tl.where(keep, top_s, float("-inf")), mask=r_ok[:, None])
    tl.store(CI + cand[:, None] + slot[None, :], tl.where(keep, top_i, -1), mask=r_ok[:, None])


@triton.jit
def msa_decode_merge_kernel(
    CS, CI, SEL, KV_LEN, TN, N_PROG,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr,
    TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tok = r // HKV
    grp = r % HKV
    c = tl.arange(0, NC)
    c_ok = c < N_PROG * KP
    addr = ((b * N_PROG + c // KP) * BLOCK_R + r) * KP + c % KP  # [NC]
    cs = tl.load(CS + addr, mask=c_ok, other=float("-inf"))
    ci = tl.load(CI + addr, mask=c_ok, other=-1)
    sel_row = SEL + b * stride_sb + tok * stride_st + grp * stride_sh
    # Block indices are unique among candidates (scan programs own disjoint pages).
    for s in range(TOPK - 1):
        best = tl.max(cs, 0)
        blk = tl.min(tl.where(cs == best, ci, 2**31 - 1), 0)
        tl.store(sel_row + s, tl.where(best > float("-inf"), blk, -1))
        cs = tl.where(ci == blk, float("-inf"), cs)
    pos = tl.load(KV_LEN + b) - TN + tok
    tl.store(sel_row + TOPK - 1, pos // BLOCK_SIZE)


def select_blocks_decode(
    iq: torch.Tensor, ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor,
    *, block_size: int, top_k: int, pages_per_program: int | None = None,
) -> torch.Tensor:
    """Kept logical blocks `[B, Tn, Hkv, top_k]` int32 for the Tn newest tokens of each sequence.

    Slots 0..top_k-2 hold the best other blocks by descending score (-1 where fewer exist),
    the last slot the own block. `pages_per_program` (a tuning knob) sets the scan's grid.
    """
    b, tn, hkv, di = iq.shape
    max_pages = page_table.shape[1]
    if pages_per_program is None:
        if iq.is_cuda:
            n_sm = torch.cuda.get_device_properties(iq.device).multi_processor_count
            pages_per_program = triton.cdiv(max_pages * b, n_sm * SCAN_PROGRAMS_PER_SM)
        else:
            pages_per_program = 2
    ppp = max(1, pages_per_program)
    n_prog = triton.cdiv(max_pages, ppp)
    nkeep = min(top_k - 1, ppp)
    kp = triton.next_power_of_2(max(nkeep, 1))
    block_r = max(16, triton.next_power_of_2(tn * hkv))
    cs = torch.empty(b, n_prog, block_r, kp, dtype=torch.float32, device=iq.device)
    ci = torch.empty(b, n_prog, block_r, kp, dtype=torch.int32, device=iq.device)
    msa_decode_scan_kernel[(n_prog, b)](
        iq, ik_cache, page_table, kv_len, cs, ci, tn, ppp, n_prog,
        iq.stride(0), iq.stride(1), iq.stride(2),
        ik_cache.stride(0), ik_cache.stride(1),
        page_table.stride(0),
        HKV=hkv, DI=di, BLOCK_SIZE=block_size, BLOCK_R=block_r, KP=kp, NKEEP=nkeep,
        IS_INTERPRET=IS_INTERPRET, num_warps=4, num_stages=SCAN_STAGES,
    )
    sel = torch.empty(b, tn, hkv, top_k, dtype=torch.int32, device=iq.device)
    msa_decode_merge_kernel[(tn * hkv, b)](
        cs, ci, sel, kv_len, tn, n_prog,
        sel.stride(0), sel.stride(1), sel.stride(2),
        HKV=hkv, BLOCK_R=block_r, KP=kp, NC=triton.next_power_of_2(n_prog * kp), TOPK=top_k,
        BLOCK_SIZE=block_size, num_warps=8,
    )
    return sel


def msa_decode(
    q: torch.Tensor, iq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
    top_k: int = 16, scale: float | None = None,
) -> torch.Tensor:
    """MSA for the Tn newest tokens of each sequence, reading a paged cache.

    q: [B, Tn, Hq, D]; iq: [B, Tn, Hkv, Di]; k_cache, v_cache: [n_pages, block_size, Hkv, D];
    ik_cache: [n_pages, block_size, Di] in iq's dtype or float8_e4m3fn; page_table:
    [B, max_pages] int32 (logical block -> page); kv_len: [B] int32, tokens in the cache per
    sequence counting the new ones, whose keys, values and index keys must already be
    written. Returns [B, Tn, Hq, D].
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
                               kv_len=kv_len, page_table=page_table, split=True)
    return out
