"""Triton sparse attention for MSA: query-outer forward (prefill and paged decode), KV-outer backward.

Forward, query-outer: one program per (query, KV group) holds the group's query heads as the
rows of its tiles and walks the query's kept blocks with an online softmax, so each output row
is written once with no merging. The same kernel reads a paged KV cache (USE_PAGES): a page is
one MSA block, so decoding is this kernel with a page table. Its cost is that a block chosen by
many queries is read once per query (from L2 when neighbours agree, from HBM when selections
are scattered).

Backward, KV-outer: the forward's kept-block lists are inverted into, for each (group, block),
the queries that kept it (a sort on the host side). One program takes one block and a chunk of
those queries: it reads K and V once, accumulates dK and dV in registers, and adds each query's
dQ share with fp32 atomics (a query gets at most top_k of them). Query-outer backward would
instead need atomics on dK and dV for every (query, block) pair: top_k * block_size * D of them
per query and group, against rep * D for dQ here. docs/msa.md records the measurements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def msa_attn_fwd_kernel(
    Q, K, V, SEL, O, LSE, KV_LEN, PAGES, scale, TQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_sb, stride_st, stride_sh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    stride_pb,
    HKV: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, USE_PAGES: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    # Queries are the last TQ tokens of the sequence (TQ = T in prefill).
    pos = tl.load(KV_LEN + b) - TQ + t
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_SIZE)
    h_ok = offs_h < REP
    heads = g * REP + offs_h

    q_ptrs = Q + b * stride_qb + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=h_ok[:, None], other=0.0)  # [BLOCK_H, D]
    if IS_INTERPRET:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    sel_row = SEL + b * stride_sb + t.to(tl.int64) * stride_st + g * stride_sh
    # No branch on empty slots (-1): they load nothing and add nothing, and a branch-free loop
    # lets the compiler pipeline the next block's loads behind this block's math.
    for s in range(TOPK):
        blk = tl.load(sel_row + s)
        blk_safe = tl.maximum(blk, 0)
        if USE_PAGES:
            page = tl.load(PAGES + b * stride_pb + blk_safe).to(tl.int64)
            k_base = K + page * stride_kb
            v_base = V + page * stride_vb
        else:
            k_base = K + b * stride_kb + (blk_safe * BLOCK_SIZE).to(tl.int64) * stride_kt
            v_base = V + b * stride_vb + (blk_safe * BLOCK_SIZE).to(tl.int64) * stride_vt
        last = tl.where(blk >= 0, pos, -1)  # an empty slot sees no key
        k_ok = blk_safe * BLOCK_SIZE + offs_n <= last  # [BLOCK_SIZE]
        k = tl.load(k_base + offs_n[None, :] * stride_kt + g * stride_kh + offs_d[:, None],
                    mask=k_ok[None, :], other=0.0)  # [D, BLOCK_SIZE]
        v = tl.load(v_base + offs_n[:, None] * stride_vt + g * stride_vh + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
        if IS_INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.where(k_ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_SIZE]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Until a row has seen a key its max stays -inf; keep exp2 away from (-inf) - (-inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * stride_lb + t.to(tl.int64) * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def msa_attn_fwd_kv_kernel(
    Q, K, V, M, L, O, QIDX, WORK, scale, T,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_mb, stride_mt,
    stride_ob, stride_ot, stride_oh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, N_BLOCKS: tl.constexpr, ACCUMULATE: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    # KV-outer forward, two launches over the same work list as the backward. First
    # (ACCUMULATE=False): each row's max score, by atomic max into M (log2 units). Second: with
    # M fixed, every block's share of the softmax sum and of P @ V is final, so the shares add
    # up by atomics into L and O (fp32) and no rescaling between blocks is needed.
    item = tl.program_id(0)
    key = tl.load(WORK + item * 3)
    start = tl.load(WORK + item * 3 + 1)
    count = tl.load(WORK + item * 3 + 2)
    blk = key % N_BLOCKS
    g = (key // N_BLOCKS) % HKV
    b = (key // (N_BLOCKS * HKV)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    keys = blk * BLOCK_SIZE + offs_n  # [BLOCK_SIZE]
    k_ok = keys < T
    k = tl.load(K + b * stride_kb + keys[:, None].to(tl.int64) * stride_kt + g * stride_kh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
    if IS_INTERPRET:
        k = k.to(tl.float32)
    if ACCUMULATE:
        v = tl.load(V + b * stride_vb + keys[:, None].to(tl.int64) * stride_vt + g * stride_vh + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
        if IS_INTERPRET:
            v = v.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    for r0 in range(0, count * REP, BLOCK_M):
        rows = r0 + offs_m
        r_ok = rows < count * REP
        t = tl.load(QIDX + start + rows // REP, mask=r_ok, other=0).to(tl.int64)  # [BLOCK_M]
        head = g * REP + rows % REP
        q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None], other=0.0)  # [BLOCK_M, D]
        if IS_INTERPRET:
            q = q.to(tl.float32)
        visible = r_ok[:, None] & (keys[None, :] <= t[:, None])  # [BLOCK_M, BLOCK_SIZE]
        s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_ptrs = M + b * stride_mb + t * stride_mt + head  # [BLOCK_M]
        if ACCUMULATE:
            m = tl.load(m_ptrs, mask=r_ok, other=0.0)
            p = tl.where(visible, tl.math.exp2(s - m[:, None]), 0.0)  # [BLOCK_M, BLOCK_SIZE]
            tl.atomic_add(L + b * stride_mb + t * stride_mt + head, tl.sum(p, 1), mask=r_ok)
            o = tl.dot(p.to(v.dtype), v)  # [BLOCK_M, D]
            tl.atomic_add(O + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                          o, mask=r_ok[:, None])
        else:
            tl.atomic_max(m_ptrs, tl.max(s, 1), mask=r_ok)


@triton.jit
def msa_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QIDX, WORK, scale, T,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lt,
    stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, N_BLOCKS: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    # WORK[i] = (key, start, count): `count` queries QIDX[start:start+count] kept the block
    # `key = (b * HKV + g) * N_BLOCKS + blk`.
    item = tl.program_id(0)
    key = tl.load(WORK + item * 3)
    start = tl.load(WORK + item * 3 + 1)
    count = tl.load(WORK + item * 3 + 2)
    blk = key % N_BLOCKS
    g = (key // N_BLOCKS) % HKV
    b = (key // (N_BLOCKS * HKV)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    keys = blk * BLOCK_SIZE + offs_n  # [BLOCK_SIZE]
    k_ok = keys < T

    k = tl.load(K + b * stride_kb + keys[:, None].to(tl.int64) * stride_kt + g * stride_kh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
    v = tl.load(V + b * stride_vb + keys[:, None].to(tl.int64) * stride_vt + g * stride_vh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_SIZE, D], tl.float32)
    dv = tl.zeros([BLOCK_SIZE, D], tl.float32)
    # Rows are (query, head) pairs: row r is query r // REP of the chunk, head g * REP + r % REP.
    for r0 in range(0, count * REP, BLOCK_M):
        rows = r0 + offs_m
        r_ok = rows < count * REP
        t = tl.load(QIDX + start + rows // REP, mask=r_ok, other=0).to(tl.int64)  # [BLOCK_M]
        head = g * REP + rows % REP
        q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None], other=0.0)  # [BLOCK_M, D]
        do = tl.load(DO + b * stride_dob + t[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                     mask=r_ok[:, None], other=0.0)  # [BLOCK_M, D]
        lse = tl.load(LSE + b * stride_lb + t * stride_lt + head, mask=r_ok, other=0.0)  # [BLOCK_M]
        delta = tl.load(DELTA + b * stride_lb + t * stride_lt + head, mask=r_ok, other=0.0)
        if IS_INTERPRET:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        visible = r_ok[:, None] & (keys[None, :] <= t[:, None])  # [BLOCK_M, BLOCK_SIZE]
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_SIZE]
        p = tl.math.exp2(qk * qk_scale - lse[:, None] * 1.4426950408889634)
        p = tl.where(visible, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))  # [BLOCK_M, BLOCK_SIZE]
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k) * scale  # [BLOCK_M, D]
        tl.atomic_add(DQ + b * stride_dqb + t[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
                      dq, mask=r_ok[:, None])
    dk_ptrs = b * stride_dkb + keys[:, None].to(tl.int64) * stride_dkt + g * stride_dkh + offs_d[None, :]
    tl.atomic_add(DK + dk_ptrs, dk * scale, mask=k_ok[:, None])
    tl.atomic_add(DV + dk_ptrs, dv, mask=k_ok[:, None])


def _head_block(rep: int) -> int:
    # tl.dot needs at least 16 rows.
    return max(16, triton.next_power_of_2(rep))


def msa_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, *,
    block_size: int, scale: float, kv_len: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over kept blocks. Returns (out [B, Tq, Hq, D] in q's dtype, lse [B, Tq, Hq] fp32).

    Prefill: k, v [B, T, Hkv, D], Tq = T. Paged (decode): k, v [n_pages, block_size, Hkv, D],
    page_table [B, max_pages] int32 (logical block -> page), kv_len [B] int32 tokens in the
    cache counting the Tq new ones, which are its last Tq tokens.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    top_k = selected.shape[-1]
    if kv_len is None:
        kv_len = torch.full((b,), tq, dtype=torch.int32, device=q.device)
    pages = page_table if page_table is not None else kv_len  # unused when not paged
    out = torch.empty_like(q)
    lse = torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
    msa_attn_fwd_kernel[(tq, b * hkv)](
        q, k, v, selected, out, lse, kv_len, pages, scale, tq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        selected.stride(0), selected.stride(1), selected.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        pages.stride(0),
        HKV=hkv, REP=rep, BLOCK_H=_head_block(rep), D=d, BLOCK_SIZE=block_size, TOPK=top_k,
        USE_PAGES=page_table is not None, IS_INTERPRET=IS_INTERPRET,
        num_warps=4, num_stages=3,
    )
    return out, lse


def msa_attention_fwd_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qidx: torch.Tensor, work: torch.Tensor, *,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-outer prefill forward over the inverted selection (`_invert_selection`).

    Returns (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] fp32). Holds an fp32 copy of the
    output while it accumulates.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    m = torch.full((b, t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(b, t, hq, d, dtype=torch.float32, device=q.device)
    for accumulate in (False, True):
        if not work.shape[0]:
            break
        msa_attn_fwd_kv_kernel[(work.shape[0],)](
            q, k, v, m, l_sum, acc, qidx, work, scale, t,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            m.stride(0), m.stride(1),
            acc.stride(0), acc.stride(1), acc.stride(2),
            HKV=hkv, REP=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_M=_rows_block(),
            N_BLOCKS=triton.cdiv(t, block_size), ACCUMULATE=accumulate, IS_INTERPRET=IS_INTERPRET,
            num_warps=8 if accumulate else 4, num_stages=2,
        )
    # In place: a second fp32 copy would be 24 GiB at 1M tokens and 48 heads.
    out = acc.div_(l_sum.unsqueeze(-1)).to(q.dtype)
    lse = (m + torch.log2(l_sum)) * LN2
    return out, lse


def _rows_block() -> int:
    # (query, head) rows per tile of the KV-outer kernels; the interpreter pays per element.
    return 16 if IS_INTERPRET else 64


def _invert_selection(selected: torch.Tensor, n_blocks: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, group, block) the queries that kept it, cut into chunks of <= `chunk` queries.

    Returns (qidx [n_entries] int32 query positions sorted by key, work [n_items, 3] int32).
    """
    b, t, hkv, top_k = selected.shape
    sel = selected.long()
    bg = (torch.arange(b, device=sel.device).view(b, 1, 1, 1) * hkv
          + torch.arange(hkv, device=sel.device).view(1, 1, hkv, 1))
    keys = (bg * n_blocks + sel).masked_fill(sel < 0, -1).reshape(-1)
    pos = torch.arange(t, device=sel.device).view(1, t, 1, 1).expand(b, t, hkv, top_k).reshape(-1)
    keep = keys >= 0
    keys, pos = keys[keep], pos[keep]
    keys, order = torch.sort(keys, stable=True)
    qidx = pos[order].to(torch.int32)
    counts = torch.bincount(keys, minlength=b * hkv * n_blocks)
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    item_key = torch.repeat_interleave(torch.arange(counts.numel(), device=sel.device), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    within = torch.arange(item_key.numel(), device=sel.device) - first[item_key]
    item_start = starts[item_key] + within * chunk
    item_count = torch.minimum(counts[item_key] - within * chunk, torch.full_like(item_key, chunk))
    work = torch.stack([item_key, item_start, item_count], dim=1).to(torch.int32).contiguous()
    return qidx, work


def invert_selection(selected: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV-outer work list of a selection `[B, T, Hkv, top_k]`: (qidx, work), see `_invert_selection`."""
    # 64 queries per work item on a GPU (6 row tiles at 6 heads a group): long lists split evenly.
    chunk = max(_rows_block() // 8, 1) * 8
    return _invert_selection(selected, triton.cdiv(selected.shape[1], block_size), chunk=chunk)


def msa_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qidx: torch.Tensor, work: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, *, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes, KV-outer over the inverted selection."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # [B, T, Hq]
    dq = torch.zeros(b, t, hq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if work.shape[0]:
        msa_attn_bwd_kernel[(work.shape[0],)](
            q, k, v, dout, lse, delta, dq, dk, dv, qidx, work, scale, t,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            HKV=hkv, REP=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_M=_rows_block(),
            N_BLOCKS=triton.cdiv(t, block_size), IS_INTERPRET=IS_INTERPRET, num_warps=8, num_stages=2,
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Prefill forward loop order, chosen by measurement on an H100 (docs/msa.md): "kv" or "query".
PREFILL_FORWARD = "kv"


class MSAAttentionFunction(torch.autograd.Function):
    """Sparse attention over given kept blocks; gradients for q, k, v (none for the selection)."""

    @staticmethod
    def forward(ctx, q, k, v, selected, block_size: int, scale: float, order: str):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        needs_list = order == "kv" or any(ctx.needs_input_grad[:3])
        qidx, work = invert_selection(selected, block_size) if needs_list else (None, None)
        if order == "kv":
            out, lse = msa_attention_fwd_kv(q, k, v, qidx, work, block_size=block_size, scale=scale)
        else:
            out, lse = msa_attention_fwd(q, k, v, selected, block_size=block_size, scale=scale)
        ctx.save_for_backward(q, k, v, qidx, work, out, lse)
        ctx.block_size, ctx.scale = block_size, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, qidx, work, out, lse = ctx.saved_tensors
        dq, dk, dv = msa_attention_bwd(q, k, v, qidx, work, out, lse, dout,
                                       block_size=ctx.block_size, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, *,
    block_size: int = 128, scale: float | None = None, order: str = PREFILL_FORWARD,
) -> torch.Tensor:
    """Attention over kept blocks `selected [B, T, Hkv, top_k]` (int32, -1 = empty slot).

    q: [B, T, Hq, D], k, v: [B, T, Hkv, D] (bf16/fp16/fp32; D a power of two >= 16).
    Returns [B, T, Hq, D] in q's dtype; differentiable in q, k, v. `order` picks the forward's
    loop order ("kv" or "query"), for the benchmark that chose the default.
    """
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dimension {d} must be a power of two >= 16 for the Triton kernels")
    if order not in ("kv", "query"):
        raise ValueError(f"order is {order!r}; it must be 'kv' (KV-outer) or 'query' (query-outer)")
    scale = d**-0.5 if scale is None else scale
    selected = selected.to(torch.int32).contiguous()
    return MSAAttentionFunction.apply(q, k, v, selected, block_size, scale, order)
