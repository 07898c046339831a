"""MSA decoding over a paged KV cache: one or a few new tokens per sequence.

A cache page is one MSA block (block_size tokens) and holds the block's keys, values and index
keys, so a cached prefix is a list of pages that several sequences can share (prefix caching):
the page table maps each sequence's logical blocks to pages.

Decoding reads the index keys of the whole cache and 16 pages per KV group; the index read is
nearly all of the bytes, so it is spread over every multiprocessor. Two launches:

1. scan: one program per run of consecutive pages of one sequence reads each page's index keys
   once, scores every new token of every KV group against it (block max, causal for the newest
   pages) and keeps a running top-(k-1) per row, as the prefill indexer does; its candidates
   go to a small buffer, and its first program zeroes the next launch's arrival counters;
2. attention, one program per (token, group, kept slot): it merges the scan's candidates of
   its row itself (`merge_candidates`, the same in every program of the row, so each knows its
   slot's block), reads that one page and writes a partial; the last of the row's programs to
   arrive (an atomic counter) merges the row's partials, in slot order.

No host synchronisation, counters reset by the scan: a CUDA graph holds a whole step, and the
output does not depend on which program comes last. The index keys may be stored in fp8
(float8_e4m3fn): the scan upcasts them, and the index read halves.

The merge picks the k-1 best of the scan programs' candidates (about 15 x 264 per row at 1M
tokens) without k-1 rounds of block-wide reductions: the (k-1)-th best maximum of `MERGE_GROUPS`
disjoint groups of candidates is a lower bound on the (k-1)-th best candidate (that many distinct
blocks reach it), few candidates reach it (about 17 on random scores), and those are compacted
and ranked against each other in one step. If more than `MERGE_CAP` reach it (many equal
scores), the merge takes the k-1 best one by one instead. Ties go to the lower block either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge.kernels.msa.triton_attention import attend_block, finish_block, head_block
from forge.kernels.precision import dot_precision
from forge.kernels.msa.triton_indexer import insert_block

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Scan programs per multiprocessor, and bytes of index-key pages each keeps in flight (its
# pipeline depth is this over a page's bytes, 2 to 8), chosen with `benchmarks/msa.py --sweep`
# on an H100.
SCAN_PROGRAMS_PER_SM = 2
SCAN_BYTES_IN_FLIGHT = 96 << 10
# Groups of candidates whose maxima bound the merge, and the most candidates it ranks at once.
MERGE_GROUPS = 64
MERGE_CAP = 64
# Warps of the attention programs (merge, one page, combine).
DECODE_WARPS = 8


@triton.jit
def msa_decode_scan_kernel(
    IQ, IKC, PAGES, KV_LEN, CS, CI, CNT, TN, PPP, N_PROG,
    stride_iqb, stride_iqt, stride_iqh,
    stride_ikp, stride_ikt,
    stride_pb,
    HKV: tl.constexpr, DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    KP: tl.constexpr, NKEEP: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
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
    if pid == 0:
        # The attention launch after this one counts its programs' arrivals from zero.
        tl.store(CNT + b * BLOCK_R + rows, tl.zeros([BLOCK_R], tl.int32))
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
        s = tl.dot(iq, ik.to(iq.dtype), input_precision=PRECISION)  # [BLOCK_R, BLOCK_SIZE]
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        # Each token's own page is always kept: it does not compete.
        score = tl.where(pos // BLOCK_SIZE == n, float("-inf"), tl.max(s, 1))  # [BLOCK_R]
        top_s, top_i = insert_block(top_s, top_i, score, n, slot, KP)
    # A row's candidates are contiguous, program after program: [B, BLOCK_R, N_PROG * NKEEP].
    cand = (b * BLOCK_R + rows) * (N_PROG * NKEEP) + pid * NKEEP  # [BLOCK_R]
    keep = r_ok[:, None] & (slot[None, :] < NKEEP)
    tl.store(CS + cand[:, None] + slot[None, :], top_s, mask=keep)
    tl.store(CI + cand[:, None] + slot[None, :], top_i, mask=keep)


@triton.jit
def merge_candidates(
    CS, CI, SCR_S, SCR_I, row, N_CAND,
    NC: tl.constexpr, NG: tl.constexpr, CAP: tl.constexpr, NSEL: tl.constexpr, KSEL: tl.constexpr,
):
    """The NSEL best of one row's N_CAND scan candidates: blocks [KSEL] int32 by descending score, -1 past the last.

    The row's candidates are CS[row:row + N_CAND] (scores, -inf for empty) and CI (distinct
    blocks); SCR_S, SCR_I: CAP scratch scores and blocks of this program. Ties go to the lower block.
    """
    c = tl.arange(0, NC)
    cs = tl.load(CS + row + c, mask=c < N_CAND, other=float("-inf"))  # [NC]
    ci = tl.load(CI + row + c, mask=c < N_CAND, other=-1)
    # The NSEL-th best maximum of NG disjoint groups of candidates is reached by NSEL distinct
    # blocks, so no block below it is among the NSEL best.
    g_max = tl.max(tl.reshape(cs, [NG, NC // NG]), 1)  # [NG]
    n_ge = tl.sum((g_max[None, :] >= g_max[:, None]).to(tl.int32), 1)  # [NG]
    bound = tl.max(tl.where(n_ge >= NSEL, g_max, float("-inf")), 0)
    reach = (cs >= bound) & (cs > float("-inf"))  # [NC]
    n_reach = tl.sum(reach.to(tl.int32), 0)
    slot = tl.arange(0, KSEL)
    if n_reach <= CAP:
        at = tl.cumsum(reach.to(tl.int32), 0) - 1
        tl.store(SCR_S + at, cs, mask=reach)
        tl.store(SCR_I + at, ci, mask=reach)
        tl.debug_barrier()
        k = tl.arange(0, CAP)
        k_ok = k < n_reach
        ss = tl.load(SCR_S + k, mask=k_ok, other=float("-inf"))
        si = tl.load(SCR_I + k, mask=k_ok, other=2**31 - 1)
        # Rank of candidate x: how many candidates y come before it (higher, or equal and lower block).
        before = (ss[None, :] > ss[:, None]) | ((ss[None, :] == ss[:, None]) & (si[None, :] < si[:, None]))
        rank = tl.where(k_ok, tl.sum((before & k_ok[None, :]).to(tl.int32), 1), CAP)  # [CAP]
        best = tl.max(tl.where(rank[None, :] == slot[:, None], si[None, :], -1), 1)  # [KSEL]
    else:
        best = tl.full([KSEL], -1, tl.int32)
        for s in range(NSEL):
            top = tl.max(cs, 0)
            blk = tl.min(tl.where(cs == top, ci, 2**31 - 1), 0)
            best = tl.where(slot == s, tl.where(top > float("-inf"), blk, -1), best)
            cs = tl.where(ci == blk, float("-inf"), cs)
    return best


@triton.jit
def msa_decode_merge_kernel(
    CS, CI, SCR_S, SCR_I, SEL, KV_LEN, TN, N_CAND,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, BLOCK_R: tl.constexpr, NC: tl.constexpr, NG: tl.constexpr,
    CAP: tl.constexpr, KSEL: tl.constexpr, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # The selection alone (select_blocks_decode): one program per (token, group).
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    sel_row = SEL + b * stride_sb + (r // HKV) * stride_st + (r % HKV) * stride_sh
    if TOPK > 1:
        scr = (b * BLOCK_R + r) * CAP
        best = merge_candidates(CS, CI, SCR_S + scr, SCR_I + scr, (b * BLOCK_R + r) * N_CAND, N_CAND,
                                NC=NC, NG=NG, CAP=CAP, NSEL=TOPK - 1, KSEL=KSEL)
        slot = tl.arange(0, KSEL)
        tl.store(sel_row + slot, best, mask=slot < TOPK - 1)
    pos = tl.load(KV_LEN + b) - TN + r // HKV
    tl.store(sel_row + TOPK - 1, pos // BLOCK_SIZE)


@triton.jit
def msa_decode_fwd_kernel(
    Q, K, V, PAGES, KV_LEN, CS, CI, SCR_S, SCR_I, SEL, OP, LP, CNT, O, scale, TN, N_CAND,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb,
    stride_sb, stride_st, stride_sh,
    stride_ob, stride_ot, stride_oh,
    HKV: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    NC: tl.constexpr, NG: tl.constexpr, CAP: tl.constexpr, KSEL: tl.constexpr, IS_INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r = tl.program_id(0)  # row: token r // HKV, group r % HKV
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)  # kept slot; the last one holds the own block
    tok = r // HKV
    g = r % HKV
    pos = tl.load(KV_LEN + b) - TN + tok
    blk = pos // BLOCK_SIZE
    row_part = (b * BLOCK_R + r) * TOPK  # this row's first partial
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    h_ok = offs_h < REP
    q = tl.load(Q + b * stride_qb + tok * stride_qt + (g * REP + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None], other=0.0)  # [BLOCK_H, D]
    if IS_INTERPRET:
        q = q.to(tl.float32)
    if s < TOPK - 1:
        scr = (row_part + s) * CAP
        best = merge_candidates(CS, CI, SCR_S + scr, SCR_I + scr, (b * BLOCK_R + r) * N_CAND, N_CAND,
                                NC=NC, NG=NG, CAP=CAP, NSEL=TOPK - 1, KSEL=KSEL)
        blk = tl.sum(tl.where(tl.arange(0, KSEL) == s, best, 0), 0)
    tl.store(SEL + b * stride_sb + tok * stride_st + g * stride_sh + s, blk)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    m_i, l_i, acc = attend_block(
        q, K, V, PAGES + b * stride_pb, 0, 0, blk, pos, m_i, l_i, acc,
        g * stride_kh, g * stride_vh, stride_kb, stride_kt, stride_vb, stride_vt, scale * 1.4426950408889634,
        D=D, BLOCK_SIZE=BLOCK_SIZE, USE_PAGES=True, IS_INTERPRET=IS_INTERPRET, PRECISION=PRECISION)
    out, lse2 = finish_block(m_i, l_i, acc)  # an empty slot (-1): lse2 = -inf, out = 0
    p_rows = (row_part + s) * BLOCK_H + offs_h  # [BLOCK_H] rows of OP [B, BLOCK_R, TOPK, BLOCK_H, D]
    tl.store(OP + p_rows[:, None] * D + offs_d[None, :], out, mask=h_ok[:, None])
    tl.store(LP + p_rows, lse2, mask=h_ok)

    # Every thread's partial is stored before the arrival is counted (release); the last
    # program reads the others' partials from L2 after its count (acquire).
    tl.debug_barrier()
    arrived = tl.atomic_add(CNT + b * BLOCK_R + r, 1, sem="acq_rel")
    if arrived == TOPK - 1:
        slots = tl.arange(0, TOPK_P)
        rows_all = (row_part + slots)[:, None] * BLOCK_H + offs_h[None, :]  # [TOPK_P, BLOCK_H]
        lse_s = tl.load(LP + rows_all, mask=(slots < TOPK)[:, None] & h_ok[None, :], other=float("-inf"),
                        cache_modifier=".cg")
        lse_max = tl.max(lse_s, 0)
        lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        w = tl.math.exp2(lse_s - lse_ref[None, :])  # [TOPK_P, BLOCK_H], 0 for empty slots
        o = tl.zeros([BLOCK_H, D], tl.float32)
        # Unrolled: the TOPK partial loads are independent and can all be in flight at once.
        for i in tl.static_range(TOPK):
            w_i = tl.sum(tl.where(slots[:, None] == i, w, 0.0), 0)  # [BLOCK_H]
            o_i = tl.load(OP + ((row_part + i) * BLOCK_H + offs_h)[:, None] * D + offs_d[None, :],
                          mask=h_ok[:, None], other=0.0, cache_modifier=".cg")  # [BLOCK_H, D]
            o += w_i[:, None] * o_i
        w_sum = tl.sum(w, 0)
        o = o / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
        tl.store(O + b * stride_ob + tok * stride_ot + (g * REP + offs_h)[:, None] * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=h_ok[:, None])


class _Scan:
    """The scan's candidates for a step: cs, ci [B, block_r, n_cand] and zeroed counters cnt [B, block_r]."""

    def __init__(self, iq, ik_cache, page_table, kv_len, *, block_size: int, top_k: int,
                 pages_per_program: int | None):
        b, tn, hkv, di = iq.shape
        max_pages = page_table.shape[1]
        if pages_per_program is None:
            if iq.is_cuda:
                n_sm = torch.cuda.get_device_properties(iq.device).multi_processor_count
                pages_per_program = triton.cdiv(max_pages * b, n_sm * SCAN_PROGRAMS_PER_SM)
            else:
                pages_per_program = 2
        ppp = max(1, pages_per_program)
        self.n_prog = triton.cdiv(max_pages, ppp)
        nkeep = min(top_k - 1, ppp)
        self.n_cand = self.n_prog * nkeep
        self.block_r = max(16, triton.next_power_of_2(tn * hkv))
        dev = iq.device
        self.cs = torch.empty(b, self.block_r, self.n_cand, dtype=torch.float32, device=dev)
        self.ci = torch.empty(b, self.block_r, self.n_cand, dtype=torch.int32, device=dev)
        self.cnt = torch.empty(b, self.block_r, dtype=torch.int32, device=dev)
        stages = max(2, min(8, SCAN_BYTES_IN_FLIGHT // (block_size * di * ik_cache.element_size())))
        msa_decode_scan_kernel[(self.n_prog, b)](
            iq, ik_cache, page_table, kv_len, self.cs, self.ci, self.cnt, tn, ppp, self.n_prog,
            iq.stride(0), iq.stride(1), iq.stride(2),
            ik_cache.stride(0), ik_cache.stride(1),
            page_table.stride(0),
            HKV=hkv, DI=di, BLOCK_SIZE=block_size, BLOCK_R=self.block_r,
            KP=triton.next_power_of_2(max(nkeep, 1)), NKEEP=nkeep,
            IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(iq.dtype), num_warps=4, num_stages=stages,
        )
        nc = triton.next_power_of_2(max(self.n_cand, 1))
        self.merge = dict(NC=nc, NG=min(MERGE_GROUPS, nc), CAP=MERGE_CAP,
                          KSEL=triton.next_power_of_2(max(top_k - 1, 1)))


def select_blocks_decode(
    iq: torch.Tensor, ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor,
    *, block_size: int, top_k: int, pages_per_program: int | None = None,
) -> torch.Tensor:
    """Kept logical blocks `[B, Tn, Hkv, top_k]` int32 for the Tn newest tokens of each sequence.

    Slots 0..top_k-2 hold the best other blocks by descending score (-1 where fewer exist),
    the last slot the own block. `pages_per_program` (a tuning knob) sets the scan's grid.
    The selection `msa_decode` attends to, computed alone.
    """
    b, tn, hkv, _ = iq.shape
    scan = _Scan(iq, ik_cache, page_table, kv_len, block_size=block_size, top_k=top_k,
                 pages_per_program=pages_per_program)
    sel = torch.empty(b, tn, hkv, top_k, dtype=torch.int32, device=iq.device)
    scr_s = torch.empty(b, scan.block_r, MERGE_CAP, dtype=torch.float32, device=iq.device)
    scr_i = torch.empty(b, scan.block_r, MERGE_CAP, dtype=torch.int32, device=iq.device)
    msa_decode_merge_kernel[(tn * hkv, b)](
        scan.cs, scan.ci, scr_s, scr_i, sel, kv_len, tn, scan.n_cand,
        sel.stride(0), sel.stride(1), sel.stride(2),
        HKV=hkv, BLOCK_R=scan.block_r, TOPK=top_k, BLOCK_SIZE=block_size, **scan.merge, num_warps=8,
    )
    return sel


def decode_with_selection(
    q: torch.Tensor, iq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ik_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
    top_k: int = 16, scale: float | None = None, pages_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`msa_decode`'s output and the kept blocks it attended to ([B, Tn, Hkv, top_k], as select_blocks_decode)."""
    block_size = k_cache.shape[1]
    if ik_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(
            f"ik_cache {tuple(ik_cache.shape)} must have the pages and page size of k_cache "
            f"{tuple(k_cache.shape)}: a page holds one block's keys, values and index keys")
    b, tn, hq, d = q.shape
    hkv = k_cache.shape[2]
    rep = hq // hkv
    page_table = page_table.to(torch.int32).contiguous()
    kv_len = kv_len.to(torch.int32).contiguous()
    scale = d**-0.5 if scale is None else scale
    scan = _Scan(iq, ik_cache, page_table, kv_len, block_size=block_size, top_k=top_k,
                 pages_per_program=pages_per_program)
    dev = q.device
    block_h = head_block(rep)
    sel = torch.empty(b, tn, hkv, top_k, dtype=torch.int32, device=dev)
    scr_s = torch.empty(b, scan.block_r, top_k, MERGE_CAP, dtype=torch.float32, device=dev)
    scr_i = torch.empty(b, scan.block_r, top_k, MERGE_CAP, dtype=torch.int32, device=dev)
    op = torch.empty(b, scan.block_r, top_k, block_h, d, dtype=torch.float32, device=dev)
    lp = torch.empty(b, scan.block_r, top_k, block_h, dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    msa_decode_fwd_kernel[(tn * hkv, b, top_k)](
        q, k_cache, v_cache, page_table, kv_len, scan.cs, scan.ci, scr_s, scr_i, sel, op, lp, scan.cnt, out,
        scale, tn, scan.n_cand,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        sel.stride(0), sel.stride(1), sel.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HKV=hkv, REP=rep, BLOCK_H=block_h, D=d, BLOCK_SIZE=block_size, TOPK=top_k,
        TOPK_P=triton.next_power_of_2(top_k), BLOCK_R=scan.block_r, **scan.merge,
        IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(q.dtype), num_warps=DECODE_WARPS, num_stages=1,
    )
    return out, sel


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
    return decode_with_selection(q, iq, k_cache, v_cache, ik_cache, page_table, kv_len, top_k=top_k,
                                 scale=scale)[0]
