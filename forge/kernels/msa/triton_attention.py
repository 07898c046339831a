"""Triton sparse attention for MSA: KV-outer prefill forward and backward, query-outer comparison.

The KV-outer forward cuts a query's softmax into one partial per kept block and merges the
partials in a combine kernel. A partial is the block's normalised output `P @ V / l` in the input dtype and its
log-sum-exp (log2 units, fp32); the combine weights each partial by `2^(lse_s - lse)`.

Prefill forward, KV-outer (the default): the kept-block lists are inverted into, for each
(query range, batch, group, block), the queries that kept the block (one sort). One program
takes one block and up to `ITEM_QUERIES` of those queries: it reads K and V once, computes
the block's partial for every (query, head) row with plain stores, no atomics, and a combine
kernel merges each query's partials. The partial buffer is [T, Hkv, top_k, rep, D]; at 1M
tokens that would be 200 GB, so the queries are processed in ranges whose partials fit
`PARTIAL_BYTES`, each range its own pair of launches. Before this, the KV-outer forward added
every partial into an fp32 output by atomics (two launches, an atomic max then atomic adds):
103 G scalar atomics at 1M tokens, 4.2x slower (docs/msa.md).

Prefill forward, tile-outer (`triton_tile.py`): where the queries of a tile keep the same
blocks, one program per (tile, head) attends to the union of their blocks and writes each row
once. `order="auto"`, the default, measures how much a selection's tiles share
(`forward_order`) and picks tile-outer or KV-outer.

Query-outer (the comparison, `order="query"`): one program per (query, KV group) holds the
group's query heads as the rows of its tiles, runs an online softmax over the query's kept
blocks and writes the output; it reads a kept block once per query that kept it. Its
per-block step, `attend_block`, is also the decode kernel's (`triton_decode`), over a page.

Backward, KV-outer over the same work list: one program loads a block's K and V once,
accumulates dK and dV in registers and adds each query's dQ share with fp32 atomics (a query
gets at most top_k of them). docs/msa.md records the measurements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge.kernels.precision import dot_precision

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Queries per KV-outer work item: one K/V load serves up to this many queries (x rep rows).
ITEM_QUERIES = 128
# Bytes of per-slot partial outputs held at once by the KV-outer prefill forward.
PARTIAL_BYTES = 6 << 30
# Launch settings of the KV-outer forward (rows per tile, warps, pipeline depth), chosen with
# `benchmarks/msa.py --sweep` on an H100; the interpreter runs 16-row tiles.
KV_FORWARD = dict(BLOCK_M=64, num_warps=4, num_stages=3)
# Keys per program (a block's keys split among programs), warps and pipeline depth of the
# KV-outer backward: with its dQ atomics, and computing dK and dV alone (beside the tile dQ),
# from `benchmarks/msa.py --sweep 131072 --sweep-parts bwd` on an H100.
KV_BACKWARD = dict(BLOCK_N=128, num_warps=8, num_stages=2)
KV_BACKWARD_DKDV = dict(BLOCK_N=64, num_warps=4, num_stages=2)


@triton.jit
def attend_block(
    q, K, V, PAGE_ROW, off_kb, off_vb, blk, pos, m_i, l_i, acc, off_kh, off_vh,
    stride_kb, stride_kt, stride_vb, stride_vt, qk_scale,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_PAGES: tl.constexpr, IS_INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step of the rows `q [BLOCK_H, D]` (log2 units) over kept block `blk`.

    `blk` -1 (an empty slot) loads and adds nothing. Keys after `pos` are masked. Paged: the
    block's page is PAGE_ROW[blk]; else the block is rows blk * BLOCK_SIZE... of the sequence
    at offsets off_kb, off_vb. off_kh, off_vh select the KV group.
    """
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, D)
    blk_safe = tl.maximum(blk, 0)
    if USE_PAGES:
        page = tl.load(PAGE_ROW + blk_safe).to(tl.int64)
        k_base = K + page * stride_kb
        v_base = V + page * stride_vb
    else:
        k_base = K + off_kb + (blk_safe * BLOCK_SIZE).to(tl.int64) * stride_kt
        v_base = V + off_vb + (blk_safe * BLOCK_SIZE).to(tl.int64) * stride_vt
    last = tl.where(blk >= 0, pos, -1)  # an empty slot sees no key
    k_ok = blk_safe * BLOCK_SIZE + offs_n <= last  # [BLOCK_SIZE]
    k = tl.load(k_base + offs_n[None, :] * stride_kt + off_kh + offs_d[:, None],
                mask=k_ok[None, :], other=0.0)  # [D, BLOCK_SIZE]
    v = tl.load(v_base + offs_n[:, None] * stride_vt + off_vh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_SIZE, D]
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.where(k_ok[None, :], tl.dot(q, k, input_precision=PRECISION) * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_SIZE]
    return softmax_step(qk, v, m_i, l_i, acc, PRECISION)


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Online softmax over one more tile of scores `s [M, N]` (log2 units, -inf masked) and values `v [N, D]`."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Until a row has seen a key its max stays -inf; keep exp2 away from (-inf) - (-inf).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def finish_block(m_i, l_i, acc):
    """Normalised output [BLOCK_H, D] and log-sum-exp (log2 units, -inf where no key was seen)."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None], m_i + tl.math.log2(l_safe)


@triton.jit
def msa_attn_fwd_kernel(
    Q, K, V, SEL, O, LSE, scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_sb, stride_st, stride_sh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    HKV: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
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
    for s in range(0, TOPK):
        blk = tl.load(sel_row + s)
        m_i, l_i, acc = attend_block(
            q, K, V, SEL, b * stride_kb, b * stride_vb, blk, t, m_i, l_i, acc,
            g * stride_kh, g * stride_vh, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale,
            D=D, BLOCK_SIZE=BLOCK_SIZE, USE_PAGES=False, IS_INTERPRET=IS_INTERPRET, PRECISION=PRECISION)
    out, lse2 = finish_block(m_i, l_i, acc)
    o_ptrs = O + b * stride_ob + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_ok[:, None])
    tl.store(LSE + b * stride_lb + t.to(tl.int64) * stride_lt + heads, lse2 * 0.6931471805599453, mask=h_ok)


@triton.jit(do_not_specialize=["T", "Q0", "TC", "NB", "NBATCH"])
def msa_attn_fwd_kv_kernel(
    Q, K, V, OP, LP, QS, WORK, scale, T, Q0, TC, NB, NBATCH,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TOPK: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # WORK[i] = (key, start, count): `count` entries QS[start:start+count] of the query range
    # starting at Q0 kept the block `key = ((range * B + b) * HKV + g) * NB + blk`; an entry is
    # `t * TOPK + slot`. A row of the tiles is an (entry, head) pair; each row's partial over
    # this one block is final, so it needs no running max: one pass, plain stores.
    item = tl.program_id(0)
    key = tl.load(WORK + item * 3)
    start = tl.load(WORK + item * 3 + 1)
    count = tl.load(WORK + item * 3 + 2)
    blk = key % NB
    g = (key // NB) % HKV
    b = ((key // (NB * HKV)) % NBATCH).to(tl.int64)
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
    for r0 in range(0, count * REP, BLOCK_M):
        rows = r0 + offs_m
        r_ok = rows < count * REP
        # Padding rows get a late query, which sees every key: no -inf rows, no NaN.
        qs = tl.load(QS + start + rows // REP, mask=r_ok, other=2**30)  # [BLOCK_M]
        t = (qs // TOPK).to(tl.int64)
        slot = qs % TOPK
        h = rows % REP
        q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + (g * REP + h)[:, None] * stride_qh
                    + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # [BLOCK_M, D]
        if IS_INTERPRET:
            q = q.to(tl.float32)
        # Only the query's own block (and the tail past T) holds keys after t.
        s = tl.where(keys[None, :] <= t[:, None], tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
        m = tl.max(s, 1)  # [BLOCK_M]; finite: a kept block holds a key <= t
        p = tl.math.exp2(s - m[:, None])  # [BLOCK_M, BLOCK_SIZE]
        l_sum = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l_sum[:, None]  # [BLOCK_M, D]
        part = ((b * TC + (t - Q0)) * HKV + g) * TOPK + slot  # [BLOCK_M]
        p_rows = part * REP + h
        tl.store(OP + p_rows[:, None] * D + offs_d[None, :], o.to(OP.dtype.element_ty), mask=r_ok[:, None])
        tl.store(LP + p_rows, m + tl.math.log2(l_sum), mask=r_ok)


@triton.jit(do_not_specialize=["Q0", "TC", "TQ"])
def msa_attn_combine_kernel(
    OP, LP, SEL, O, LSE, Q0, TC, TQ,
    stride_sb, stride_st, stride_sh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Rows are (query, head) pairs of one KV group: row r is query Q0 + r // REP, head r % REP.
    # Partials of slots that hold no block (-1) were never written and are skipped.
    pid_r = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    slot = tl.arange(0, KP)
    r_ok = rows < TQ * REP
    tc = (rows // REP).to(tl.int64)  # [BLOCK_R] query within the range
    h = rows % REP
    t = Q0 + tc
    # Every slot's selection and log-sum-exp in one tile: the loads below depend on no loop.
    ok = r_ok[:, None] & (slot[None, :] < TOPK)
    sel = tl.load(SEL + b * stride_sb + t[:, None] * stride_st + g * stride_sh + slot[None, :], mask=ok, other=-1)
    ok = ok & (sel >= 0)  # [BLOCK_R, KP]
    p_rows = (((b * TC + tc) * HKV + g) * TOPK)[:, None] * REP + slot[None, :] * REP + h[:, None]  # [BLOCK_R, KP]
    lse_s = tl.load(LP + p_rows, mask=ok, other=float("-inf"))
    lse_max = tl.max(lse_s, 1)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.math.exp2(lse_s - lse_ref[:, None])  # [BLOCK_R, KP], 0 where skipped
    w_sum = tl.sum(w, 1)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    # Unrolled: the TOPK partial loads are independent and can all be in flight at once.
    for s in tl.static_range(TOPK):
        w_s = tl.sum(tl.where(slot[None, :] == s, w, 0.0), 1)  # [BLOCK_R]
        row_s = tl.sum(tl.where(slot[None, :] == s, p_rows, 0), 1)
        o = tl.load(OP + row_s[:, None] * D + offs_d[None, :], mask=(w_s > 0)[:, None], other=0.0)  # [BLOCK_R, D]
        acc += w_s[:, None] * o.to(tl.float32)
    w_safe = tl.where(w_sum > 0, w_sum, 1.0)
    out = acc / w_safe[:, None]
    heads = g * REP + h
    tl.store(O + b * stride_ob + t[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=r_ok[:, None])
    tl.store(LSE + b * stride_lb + t * stride_lt + heads, (lse_ref + tl.math.log2(w_safe)) * 0.6931471805599453,
             mask=r_ok)


@triton.jit(do_not_specialize=["T", "NB", "NBATCH"])
def msa_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QS, WORK, scale, T, NB, NBATCH,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lt,
    stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOPK: tl.constexpr, WITH_DQ: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # The forward's work list: WORK[i] = (key, start, count), entries QS = t * TOPK + slot.
    # WITH_DQ False: dK and dV only (the tile-outer dQ kernel writes dQ, without atomics).
    # A program takes BLOCK_N of the block's keys (program_id(1) picks which): fewer keys keep
    # the dK and dV accumulators smaller, at the price of loading each row once per part.
    item = tl.program_id(0)
    key = tl.load(WORK + item * 3)
    start = tl.load(WORK + item * 3 + 1)
    count = tl.load(WORK + item * 3 + 2)
    blk = key % NB
    g = (key // NB) % HKV
    b = ((key // (NB * HKV)) % NBATCH).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)
    keys = blk * BLOCK_SIZE + tl.program_id(1) * BLOCK_N + offs_n  # [BLOCK_N]
    k_ok = keys < T

    k = tl.load(K + b * stride_kb + keys[:, None].to(tl.int64) * stride_kt + g * stride_kh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + b * stride_vb + keys[:, None].to(tl.int64) * stride_vt + g * stride_vh + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D]
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # Rows are (query, head) pairs: row r is entry r // REP of the item, head g * REP + r % REP.
    for r0 in range(0, count * REP, BLOCK_M):
        rows = r0 + offs_m
        r_ok = rows < count * REP
        t = (tl.load(QS + start + rows // REP, mask=r_ok, other=0) // TOPK).to(tl.int64)  # [BLOCK_M]
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
        visible = r_ok[:, None] & (keys[None, :] <= t[:, None])  # [BLOCK_M, BLOCK_N]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse[:, None] * 1.4426950408889634)
        p = tl.where(visible, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if WITH_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale  # [BLOCK_M, D]
            tl.atomic_add(DQ + b * stride_dqb + t[:, None] * stride_dqt + head[:, None] * stride_dqh
                          + offs_d[None, :], dq, mask=r_ok[:, None])
    dk_ptrs = b * stride_dkb + keys[:, None].to(tl.int64) * stride_dkt + g * stride_dkh + offs_d[None, :]
    tl.atomic_add(DK + dk_ptrs, dk * scale, mask=k_ok[:, None])
    tl.atomic_add(DV + dk_ptrs, dv, mask=k_ok[:, None])


def head_block(rep: int) -> int:
    # tl.dot needs at least 16 rows.
    return max(16, triton.next_power_of_2(rep))


def _rows_block() -> int:
    # (query, head) rows per tile of the KV-outer kernels; the interpreter pays per element.
    return 16 if IS_INTERPRET else 64


def _combine(op: torch.Tensor, lp: torch.Tensor, selected: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             *, q0: int, tq: int) -> None:
    """Merge the per-slot partials of queries [q0, q0 + tq) into out and lse (natural log)."""
    b, tc, hkv, top_k, rep, d = op.shape
    # 16 rows: the 16 unrolled partial loads of a program stay in registers (8 each).
    block_r = 16
    msa_attn_combine_kernel[(triton.cdiv(tq * rep, block_r), b * hkv)](
        op, lp, selected, out, lse, q0, tc, tq,
        selected.stride(0), selected.stride(1), selected.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HKV=hkv, REP=rep, D=d, TOPK=top_k, KP=triton.next_power_of_2(top_k), BLOCK_R=block_r, num_warps=4,
    )


def msa_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, *, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-outer prefill forward over kept blocks: out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] fp32.

    k, v: [B, T, Hkv, D]. The comparison for the KV-outer default; decoding has its own kernel.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
    msa_attn_fwd_kernel[(tq, b * hkv)](
        q, k, v, selected, out, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        selected.stride(0), selected.stride(1), selected.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HKV=hkv, REP=rep, BLOCK_H=head_block(rep), D=d, BLOCK_SIZE=block_size, TOPK=selected.shape[-1],
        IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=3,
    )
    return out, lse


class WorkList:
    """The KV-outer work list of a selection: per (query range, batch, group, block), its entries.

    qs [n_entries] int32: `t * top_k + slot` of every kept (query, group, slot), sorted by key.
    work [n_items, 3] int32: (key, start, count) items of <= ITEM_QUERIES entries, sorted by
    key, with key = ((range * B + b) * Hkv + g) * n_blocks + block. range_items: item offsets
    of each query range of `q_range` queries (n_ranges + 1 ints, on the host).
    """

    def __init__(self, selected: torch.Tensor, n_blocks: int, q_range: int, item_queries: int):
        b, t, hkv, top_k = selected.shape
        dev = selected.device
        n_ranges = triton.cdiv(t, q_range)
        n_keys = n_ranges * b * hkv * n_blocks
        if b * t * hkv * top_k >= 2**31 or n_keys >= 2**31 - 1:
            raise ValueError(f"{b * t * hkv * top_k} kept slots: the KV-outer kernels index them with int32;"
                             " split the batch")
        sel = selected.to(torch.int32)
        pos = torch.arange(t, device=dev, dtype=torch.int32)
        key = ((pos // q_range).view(1, t, 1, 1) * b + torch.arange(b, device=dev, dtype=torch.int32).view(b, 1, 1, 1))
        key = (key * hkv + torch.arange(hkv, device=dev, dtype=torch.int32).view(1, 1, hkv, 1)) * n_blocks + sel
        # Empty slots get key n_keys and sort after every real one; a stable sort keeps each
        # key's entries in query order.
        key = torch.where(sel < 0, n_keys, key).view(-1)
        key, order = torch.sort(key, stable=True)
        # The flat index of [B, T, Hkv, top_k] -> t * top_k + slot.
        self.qs = ((order // (hkv * top_k) % t) * top_k + order % top_k).to(torch.int32)
        del order
        bounds = torch.searchsorted(key, torch.arange(n_keys + 1, device=dev, dtype=torch.int32))
        counts = bounds[1:] - bounds[:-1]
        n_items = (counts + item_queries - 1) // item_queries
        per_range = n_items.view(n_ranges, -1).sum(1)
        total = int(per_range.sum())
        item_key = torch.repeat_interleave(torch.arange(n_keys, device=dev), n_items, output_size=total)
        first = torch.cumsum(n_items, 0) - n_items
        within = torch.arange(total, device=dev) - first[item_key]
        item_start = bounds[item_key] + within * item_queries
        item_count = torch.clamp(counts[item_key] - within * item_queries, max=item_queries)
        self.work = torch.stack([item_key, item_start, item_count], dim=1).to(torch.int32).contiguous()
        self.range_items = [0] + torch.cumsum(per_range, 0).tolist()
        self.q_range, self.n_blocks, self.batch = q_range, n_blocks, b


def build_work_list(selected: torch.Tensor, block_size: int, rep: int, head_dim: int, elt_bytes: int,
                    *, q_range: int | None = None, item_queries: int | None = None) -> WorkList:
    """The work list of `selected [B, T, Hkv, top_k]`, its query ranges sized to PARTIAL_BYTES."""
    b, t, hkv, top_k = selected.shape
    item_queries = ITEM_QUERIES if item_queries is None else item_queries
    if q_range is None:
        per_query = b * hkv * top_k * rep * (head_dim * elt_bytes + 4)
        # Equal ranges of whole blocks, as few as the budget allows.
        n_ranges = triton.cdiv(t, max(block_size, PARTIAL_BYTES // per_query))
        q_range = triton.cdiv(triton.cdiv(t, n_ranges), block_size) * block_size
    return WorkList(selected, triton.cdiv(t, block_size), min(q_range, t), item_queries)


def msa_attention_fwd_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, wl: WorkList, *,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-outer prefill forward over a work list, range by range: partials, then the combine.

    Returns (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] fp32).
    """
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], selected.shape[-1]
    rep = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    tc = wl.q_range
    op = torch.empty(b, tc, hkv, top_k, rep, d, dtype=q.dtype, device=q.device)
    lp = torch.empty(b, tc, hkv, top_k, rep, dtype=torch.float32, device=q.device)
    for r, q0 in enumerate(range(0, t, tc)):
        i0, i1 = wl.range_items[r], wl.range_items[r + 1]
        if i1 > i0:
            msa_attn_fwd_kv_kernel[(i1 - i0,)](
                q, k, v, op, lp, wl.qs, wl.work[i0:], scale, t, q0, tc, wl.n_blocks, b,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                HKV=hkv, REP=rep, D=d, BLOCK_SIZE=block_size, TOPK=top_k, IS_INTERPRET=IS_INTERPRET,
                PRECISION=dot_precision(q.dtype), **(dict(KV_FORWARD, BLOCK_M=16) if IS_INTERPRET else KV_FORWARD),
            )
        _combine(op, lp, selected, out, lse, q0=q0, tq=min(tc, t - q0))
    return out, lse


def msa_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wl: WorkList, top_k: int,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, *, block_size: int, scale: float,
    tiles: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes, KV-outer over the forward's work list.

    `tiles` (selected, and the tile forward's unions): dQ comes from the tile-outer dQ kernel,
    each row written once, and the KV-outer kernel computes dK and dV only.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # [B, T, Hq]
    # Tile-outer dQ writes each row once, in q's dtype; KV-outer adds shares into fp32.
    dq = torch.empty_like(q) if tiles is not None else torch.zeros(b, t, hq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if wl.work.shape[0]:
        cfg = dict(KV_BACKWARD if tiles is None else KV_BACKWARD_DKDV)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
        msa_attn_bwd_kernel[(wl.work.shape[0], block_size // cfg["BLOCK_N"])](
            q, k, v, dout, lse, delta, dq, dk, dv, wl.qs, wl.work, scale, t, wl.n_blocks, b,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            HKV=hkv, REP=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_M=_rows_block(), TOPK=top_k,
            WITH_DQ=tiles is None, IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(q.dtype), **cfg,
        )
    if tiles is not None:
        from forge.kernels.msa.triton_tile import msa_attention_dq_tile

        msa_attention_dq_tile(q, k, v, dout, lse, delta, dq, *tiles, block_size=block_size, scale=scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Prefill forward loop order, chosen by measurement on an H100 (docs/msa.md): "auto" takes the
# tile-outer forward where a tile's queries share their blocks (triton_tile.TILE_WORK_LIMIT),
# else KV-outer; "kv", "tile" and "query" force one.
PREFILL_FORWARD = "auto"
ORDERS = ("auto", "kv", "tile", "query")


def forward_order(selected: torch.Tensor, order: str) -> str:
    """The forward `order` runs for this selection: "auto" resolved by the tile work ratio."""
    if order != "auto":
        return order
    from forge.kernels.msa import triton_tile

    return "tile" if triton_tile.tile_work_ratio(selected) <= triton_tile.TILE_WORK_LIMIT else "kv"


class MSAAttentionFunction(torch.autograd.Function):
    """Sparse attention over given kept blocks; gradients for q, k, v (none for the selection)."""

    @staticmethod
    def forward(ctx, q, k, v, selected, block_size: int, scale: float, order: str):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        order = forward_order(selected, order)
        wl, ctx.tiles = None, None
        if order == "kv" or any(ctx.needs_input_grad[:3]):
            wl = build_work_list(selected, block_size, q.shape[2] // k.shape[2], q.shape[3], q.element_size())
        if order == "kv":
            out, lse = msa_attention_fwd_kv(q, k, v, selected, wl, block_size=block_size, scale=scale)
        elif order == "tile":
            from forge.kernels.msa.triton_tile import msa_attention_fwd_tile, tile_queries, tile_unions

            unions = tile_unions(selected, tile_queries(), block_size)
            out, lse = msa_attention_fwd_tile(q, k, v, selected, block_size=block_size, scale=scale, unions=unions)
            # Tiles that share their blocks in the forward share them in dQ too.
            ctx.tiles = (selected, *unions)
        else:
            out, lse = msa_attention_fwd(q, k, v, selected, block_size=block_size, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.wl, ctx.top_k = wl, selected.shape[-1]
        ctx.block_size, ctx.scale = block_size, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = msa_attention_bwd(q, k, v, ctx.wl, ctx.top_k, out, lse, dout,
                                       block_size=ctx.block_size, scale=ctx.scale, tiles=ctx.tiles)
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, *,
    block_size: int = 128, scale: float | None = None, order: str = PREFILL_FORWARD,
) -> torch.Tensor:
    """Attention over kept blocks `selected [B, T, Hkv, top_k]` (int32, -1 = empty slot).

    q: [B, T, Hq, D], k, v: [B, T, Hkv, D] (bf16/fp16/fp32; D a power of two >= 16).
    Returns [B, T, Hq, D] in q's dtype; differentiable in q, k, v. `order` picks the forward:
    "auto" (tile-outer where the queries of a tile share their blocks, else KV-outer), or one of
    "kv", "tile", "query" for the benchmark that chose the rule. The backward is KV-outer.
    """
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dimension {d} must be a power of two >= 16 for the Triton kernels")
    if order not in ORDERS:
        raise ValueError(f"order is {order!r}; it must be one of {ORDERS} ('auto' picks by the selection)")
    scale = d**-0.5 if scale is None else scale
    selected = selected.to(torch.int32).contiguous()
    return MSAAttentionFunction.apply(q, k, v, selected, block_size, scale, order)
