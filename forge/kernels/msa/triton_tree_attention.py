"""MSA sparse attention over a flattened prefix tree in Triton: forward (with lse) and backward.

What it computes: `tree.msa_tree(..., selected=selected)`'s attention output, given the kept
blocks. The tree is flattened in DFS pre-order; query q sees key k iff
`k <= q < subtree_end[k]` (k is q or an ancestor), and key k lies in block
`position[k] // block_size` (blocks in position space, so one block may be split over several
trie nodes). Query q, head h, group g = h // (Hq // Hkv) keeps a visible key k iff

    dense_row(q) or block(k) in selected[q, g, :] or block(k) == block(q),

with `dense_row(q) = dense or position[q] < dense_below`; attention is exact softmax over the
kept keys. Empty slots (-1) match nothing, and a selected block that holds no visible key
adds nothing, as in `tree.kept_keys` (which ANDs with visibility).

Loop orders, no atomics, every element written by one program:
- forward and dQ are query-outer: a program owns a tile of queries and walks the key tiles
  listed for it, in increasing order;
- dK/dV is key-outer: a program owns a key tile and walks the query tiles listed for it (all
  lie in [the tile's first key, the largest `subtree_end` of its keys): a key's subtree is the
  contiguous range [k, subtree_end[k])), as in tree_attention/triton_tree.py. dQ gets its own
  query-outer pass instead of atomics, so the backward is deterministic.
delta = rowsum(dO * O) is computed on the host in fp32, as in triton_tree.py.

Work lists, built before the launches (`tile_pairs`, torch on the device, no host sync; the
index loss builds its own the same way): a (query tile, key tile) pair is listed for a KV group
when some query of the tile may see a key of the tile (the key tile starts at or before the
last query, and its largest `subtree_end` is past the first query) and some row of the tile is
dense or keeps a block (a selected slot or its own block) in the key tile's range of blocks.
`compact_pairs` turns the pair matrix into per-tile lists in both orders, so the loops run
over listed tiles with no test or branch inside: the first version tested each pair in the
loop, which keeps Triton from pipelining the loads (the same change made the dense tree
kernel 2.4x faster, commit 9b98edb; not yet timed here). Each order's lists take
B * Hkv * NUM_M * NUM_N int32: about 10 MB at 25K tokens, 4 groups and 16-token query tiles,
quadratic in the tokens (as the index loss's, which is computed beside it in training).

Inside a listed pair the per-element mask is
`visible & (dense_row | block(k) == own block | block(k) == any selected slot)`. Where the
key tile's real keys span fewer than 32 blocks (all but the tiles where a packed sequence or a
sibling branch restarts the positions), each row's kept blocks are first folded into one 32-bit
word relative to the tile's lowest block (a small host table of each key tile's block range,
`_key_tile_blocks`), so a key costs one shift and one test instead of a comparison per slot
(counted in operations, K = 8-16 comparisons and ORs over a 64 x 64 tile outweigh its two
dots on the tensor cores several times; not yet timed); otherwise the slots are tested in a
static loop over K. Unlike triton_tree.py there is no fully-visible class: every listed pair
needs the per-row selection mask anyway. The work is that of the union of the tile's kept
blocks: near top_k blocks per tile where neighbouring queries agree, as an index branch tends
to give, but up to every visible block under scattered selections (where the chain's KV-outer
kernels in triton_attention.py do less).

GQA: one program handles every query head of a KV group (rows are BLOCK_M // heads tokens
times the group's heads, padded to a power of two). The selection is per (token, group), so
the lists and the mask are the same for all heads of a group: one list entry and one K/V
tile load serve them all, the dK/dV program sums the heads inside its dots (no loop over
heads, no atomics), and a tile of fewer tokens has a smaller union of kept blocks, so fewer
pairs are listed than with one head per program.

Departures from the chain kernels (triton_attention.py, triton_tile.py): those walk the kept
blocks of each query; in a tree a position block is not a contiguous range of flat keys, so
these kernels walk flat key tiles and test block membership per key instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from forge.kernels.precision import dot_precision

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_INT32_MAX = 2**31 - 1
# Allocation of fresh outputs; tests swap in NaN-filled ones so an unwritten element fails.
_empty_like = torch.empty_like
_empty = torch.empty


@triton.jit
def _query_rows(SEL, POS, b, g, m0, T, DENSE_BELOW, stride_sb, stride_st, stride_sh,
                REP: tl.constexpr, HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                IS_DENSE: tl.constexpr):
    """The rows of a query tile from token m0: TOK = BLOCK_M // HEADS tokens of each of the
    group's heads. Returns each row's token, head and validity, its own block (-1 on a padding
    row), whether it is dense, and a pointer to its selection row."""
    TOK: tl.constexpr = BLOCK_M // HEADS
    rows = tl.arange(0, BLOCK_M)
    hr = rows // TOK
    offs_m = m0 + rows % TOK  # [BLOCK_M]
    heads = g * REP + hr
    row_ok = (offs_m < T) & (hr < REP)
    pos = tl.load(POS + b * T + offs_m, mask=row_ok, other=0)  # [BLOCK_M]
    own = tl.where(row_ok, pos // BLOCK_SIZE, -1)
    if IS_DENSE:
        dense = row_ok
    else:
        dense = row_ok & (pos < DENSE_BELOW)
    sel_ptr = SEL + b * stride_sb + offs_m.to(tl.int64) * stride_st + g * stride_sh  # [BLOCK_M]
    return offs_m, heads, row_ok, own, dense, sel_ptr


@triton.jit
def kept_block_bits(sel_ptr, row_ok, own, blo, TOPK: tl.constexpr):
    # [rows] int32: bit i set when the row keeps block blo + i (i < 32), a selected slot or its
    # own block. Empty slots and padding rows (own < 0) set nothing. The slots are read per key
    # tile (from cache), as the slot loop reads them. Shared with triton_tree_index_loss.py.
    rel = own - blo
    ok = (rel >= 0) & (rel < 32)
    bits = tl.where(ok, 1 << tl.where(ok, rel, 0), 0)
    for s in tl.static_range(TOPK):
        rel = tl.load(sel_ptr + s, mask=row_ok, other=-1) - blo
        ok = (rel >= 0) & (rel < 32)
        bits = bits | tl.where(ok, 1 << tl.where(ok, rel, 0), 0)
    return bits


@triton.jit
def keep_by_bits(bits, kb, blo):
    # [rows, keys]: whether each key's block (kb, blocks [blo, blo + 32) only) is set in the
    # row's bit word from `kept_block_bits`.
    rel = kb - blo
    in_range = (rel >= 0) & (rel < 32)
    return (((bits[:, None] >> tl.where(in_range, rel, 0)[None, :]) & 1) != 0) & in_range[None, :]


@triton.jit
def _kept(offs_m, offs_n, row_ok, se, kb, own, dense, sel_ptr, blo, bhi,
          TOPK: tl.constexpr, IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr):
    # [BLOCK_M, BLOCK_N]: visible (k <= q < subtree_end[k]; padding keys carry subtree_end 0)
    # and kept (a dense row, the row's own block, or one of its selected blocks). [blo, bhi]
    # holds the blocks of the tile's real keys. When it spans fewer than 32 blocks (nearly every
    # tile: a tile crosses a block boundary or two, more only where a packed sequence or a
    # sibling branch starts) each row's kept blocks become one word of bits, and a key's test
    # is one shift; otherwise each slot is compared with every key. Same mask either way.
    mask = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :]) & row_ok[:, None]
    if not IS_DENSE:
        if bhi - blo < 32:
            keep = keep_by_bits(kept_block_bits(sel_ptr, row_ok, own, blo, TOPK), kb, blo)
        else:
            keep = kb[None, :] == own[:, None]
            for s in tl.static_range(TOPK):
                blk = tl.load(sel_ptr + s, mask=row_ok, other=-1)  # [BLOCK_M]
                keep = keep | (kb[None, :] == blk[:, None])
        if USE_DENSE_BELOW:
            keep = keep | dense[:, None]
        mask = mask & keep
    return mask


@triton.jit
def _fwd_step(q, K_b, V_b, SE_b, POS_b, n0, offs_m, row_ok, own, dense, sel_ptr, blo, bhi, offs_d, m_i, l_i, acc,
              stride_kt, T, D, scale_log2, BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    kv_off = offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    kv_mask = n_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K_b + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V_b + kv_off, mask=kv_mask, other=0.0)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Keys past T: subtree_end 0, never visible.
    se = tl.load(SE_b + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
    kb = tl.load(POS_b + offs_n, mask=n_ok, other=0) // BLOCK_SIZE
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    mask = _kept(offs_m, offs_n, row_ok, se, kb, own, dense, sel_ptr, blo, bhi, TOPK, IS_DENSE,
                 USE_DENSE_BELOW)
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has kept nothing yet keeps -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["T", "NUM_M", "NUM_N", "stride_sb"])
def msa_tree_fwd_kernel(
    Q, K, V, SEL, SE, POS, KEY_BLOCKS, BY_Q, N_BY_Q, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_sb, stride_st, stride_sh,
    T, HQ, HKV, D, NUM_M, NUM_N, DENSE_BELOW, scale_log2,
    REP: tl.constexpr, HEADS: tl.constexpr, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # A program owns TOK tokens of every query head of one KV group (BLOCK_M rows) and walks the
    # key tiles its list names (`tile_pairs`): no test or branch per tile inside the loop.
    TOK: tl.constexpr = BLOCK_M // HEADS
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    m0 = pid_m * TOK
    offs_m, heads, row_ok, own, dense, sel_ptr = _query_rows(
        SEL, POS, b, g, m0, T, DENSE_BELOW, stride_sb, stride_st, stride_sh, REP, HEADS, BLOCK_SIZE, BLOCK_M,
        IS_DENSE)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if IS_INTERPRET:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = pid_bg.to(tl.int64) * NUM_M + pid_m  # this tile's list in BY_Q [B, HKV, NUM_M, NUM_N]
    for i in range(tl.load(N_BY_Q + row)):
        j = tl.load(BY_Q + row * NUM_N + i)
        span = KEY_BLOCKS + (b * NUM_N + j) * 2  # the key tile's (lowest, highest) block
        m_i, l_i, acc = _fwd_step(q, K + b * stride_kb + g * stride_kh, V + b * stride_kb + g * stride_kh,
                                  SE + b * T, POS + b * T, j * BLOCK_N, offs_m, row_ok, own, dense, sel_ptr,
                                  tl.load(span), tl.load(span + 1), offs_d, m_i, l_i, acc, stride_kt, T, D,
                                  scale_log2, BLOCK_SIZE, TOPK, BLOCK_N, IS_DENSE, USE_DENSE_BELOW, IS_INTERPRET,
                                  PRECISION)
    # Every real row keeps its own key, so l_i > 0 there; padding rows are masked on store.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + q_off, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_mask)
    # Log-sum-exp in the log2 domain of the scaled scores, [B, HQ, T].
    tl.store(LSE + (b * HQ + heads) * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _dkdv_step(Q, DO, LSE_b, DELTA_b, k, v, se, kb, blo, bhi, offs_n, offs_m, heads, row_ok, own, dense, sel_ptr,
               offs_d, dk, dv, q_base, stride_qt, stride_qh, T, D, scale_log2, TOPK: tl.constexpr,
               IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr,
               PRECISION: tl.constexpr):
    q_off = q_base + offs_m[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if IS_INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_t = heads.to(tl.int64) * T + offs_m  # [BLOCK_M] index into [HQ, T]
    lse = tl.load(LSE_b + row_t, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_b + row_t, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    mask = _kept(offs_m, offs_n, row_ok, se, kb, own, dense, sel_ptr, blo, bhi, TOPK, IS_DENSE,
                 USE_DENSE_BELOW)
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv, p


@triton.jit
def _dik_step(IQ_b, LSE_S_bg, W_b, SEL, POS, b, g, ik, p, se, kb, blo, bhi, offs_n, m0, dik, T, DI, stride_iqt,
              stride_sb, stride_st, stride_sh, DENSE_BELOW, index_scale_log2,
              REP: tl.constexpr, HEADS: tl.constexpr, TOK: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, IS_DENSE: tl.constexpr,
              USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # The index loss's gradient to this key tile's index keys from the TOK tokens from m0 (what
    # triton_tree_index_loss's d ik kernel computes), from the attention probabilities `p` of
    # the step: the teacher is their mean over the group's heads (rows h * TOK + i). The kept
    # mask is formed again for the TOK tokens (cheaper to hold than the rows' mask).
    offs_t, _, t_ok, own, dense, sel_ptr = _query_rows(
        SEL, POS, b, g, m0, T, DENSE_BELOW, stride_sb, stride_st, stride_sh, 1, 1, BLOCK_SIZE, TOK, IS_DENSE)
    kept = _kept(offs_t, offs_n, t_ok, se, kb, own, dense, sel_ptr, blo, bhi, TOPK, IS_DENSE, USE_DENSE_BELOW)
    offs_di = tl.arange(0, BLOCK_DI)
    iq = tl.load(IQ_b + offs_t[:, None].to(tl.int64) * stride_iqt + offs_di[None, :],
                 mask=t_ok[:, None] & (offs_di[None, :] < DI), other=0.0)  # [TOK, BLOCK_DI]
    if IS_INTERPRET:
        iq = iq.to(tl.float32)
    lse_s = tl.load(LSE_S_bg + offs_t, mask=t_ok, other=0.0)  # the student's, log2 domain
    w = tl.load(W_b + offs_t, mask=t_ok, other=0.0)
    teacher = tl.sum(tl.reshape(p, [HEADS, TOK, BLOCK_N]), axis=0) / REP  # [TOK, BLOCK_N]
    z = tl.dot(iq, tl.trans(ik), input_precision=PRECISION) * index_scale_log2  # [TOK, BLOCK_N]
    dz = (tl.exp2(tl.where(kept, z - lse_s[:, None], float("-inf"))) - teacher) * w[:, None]
    return dik + tl.dot(tl.trans(dz).to(iq.dtype), iq, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DI]


@triton.jit(do_not_specialize=["T", "NUM_M", "NUM_N", "stride_sb"])
def msa_tree_bwd_dkdv_kernel(
    Q, K, V, SEL, SE, POS, BY_K, N_BY_K, DO, LSE, DELTA, DK, DV, IQ, IK, LSE_S, W, DIK,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_sb, stride_st, stride_sh,
    stride_iqb, stride_iqt, stride_iqh, stride_ikb, stride_ikt,
    T, HQ, HKV, D, DI, NUM_M, NUM_N, DENSE_BELOW, scale, scale_log2, index_scale_log2,
    REP: tl.constexpr, HEADS: tl.constexpr, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    WITH_DIK: tl.constexpr, BLOCK_DI: tl.constexpr,
):
    # A program owns BLOCK_N keys of one KV group and walks the query tiles its list names; each
    # holds TOK tokens of every query head of the group, so dK and dV sum over the heads inside
    # the dots. WITH_DIK: also the index loss's gradient to the tile's index keys (one partial
    # per group, DIK [B, HKV, T, DI] fp32, unscaled), from the same probabilities.
    TOK: tl.constexpr = BLOCK_M // HEADS
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = b * stride_kb + g * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    kv_mask = n_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Keys past T: subtree_end 0 (never visible) and block -1 (outside every range).
    se = tl.load(SE + b * T + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
    kb = tl.where(n_ok, tl.load(POS + b * T + offs_n, mask=n_ok, other=0) // BLOCK_SIZE, -1)
    blo = tl.min(tl.where(n_ok, kb, 2147483647), axis=0)
    bhi = tl.max(kb, axis=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_di = tl.arange(0, BLOCK_DI)
    if WITH_DIK:
        ik = tl.load(IK + b * stride_ikb + offs_n[:, None].to(tl.int64) * stride_ikt + offs_di[None, :],
                     mask=n_ok[:, None] & (offs_di[None, :] < DI), other=0.0)  # [BLOCK_N, BLOCK_DI]
        if IS_INTERPRET:
            ik = ik.to(tl.float32)
    dik = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    row = pid_bg.to(tl.int64) * NUM_N + pid_n  # this tile's list in BY_K [B, HKV, NUM_N, NUM_M]
    for i in range(tl.load(N_BY_K + row)):
        m0 = tl.load(BY_K + row * NUM_M + i) * TOK
        offs_m, heads, row_ok, own, dense, sel_ptr = _query_rows(
            SEL, POS, b, g, m0, T, DENSE_BELOW, stride_sb, stride_st, stride_sh, REP, HEADS, BLOCK_SIZE, BLOCK_M,
            IS_DENSE)
        dk, dv, p = _dkdv_step(Q, DO, LSE + b * HQ * T, DELTA + b * HQ * T, k, v, se, kb, blo, bhi, offs_n,
                                     offs_m, heads, row_ok, own, dense, sel_ptr, offs_d, dk, dv, b * stride_qb,
                                     stride_qt, stride_qh, T, D, scale_log2, TOPK, IS_DENSE, USE_DENSE_BELOW,
                                     IS_INTERPRET, PRECISION)
        if WITH_DIK:
            dik = _dik_step(IQ + b * stride_iqb + g * stride_iqh, LSE_S + pid_bg.to(tl.int64) * T, W + b * T, SEL, POS,
                            b, g, ik, p, se, kb, blo, bhi, offs_n, m0, dik, T, DI, stride_iqt, stride_sb, stride_st,
                            stride_sh, DENSE_BELOW, index_scale_log2, REP, HEADS, TOK, BLOCK_N, BLOCK_DI, BLOCK_SIZE,
                            TOPK, IS_DENSE, USE_DENSE_BELOW, IS_INTERPRET, PRECISION)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if WITH_DIK:
        dik_off = (pid_bg.to(tl.int64) * T + offs_n[:, None]) * DI + offs_di[None, :]
        tl.store(DIK + dik_off, dik, mask=n_ok[:, None] & (offs_di[None, :] < DI))


@triton.jit
def _dq_step(q, do, lse, delta, K_b, V_b, SE_b, POS_b, n0, offs_m, row_ok, own, dense, sel_ptr, blo, bhi, offs_d, dq,
             stride_kt, T, D, scale_log2, BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
             IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr,
             PRECISION: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    kv_off = offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    kv_mask = n_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K_b + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V_b + kv_off, mask=kv_mask, other=0.0)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    se = tl.load(SE_b + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
    kb = tl.load(POS_b + offs_n, mask=n_ok, other=0) // BLOCK_SIZE
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    mask = _kept(offs_m, offs_n, row_ok, se, kb, own, dense, sel_ptr, blo, bhi, TOPK, IS_DENSE,
                 USE_DENSE_BELOW)
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit(do_not_specialize=["T", "NUM_M", "NUM_N", "stride_sb"])
def msa_tree_bwd_dq_kernel(
    Q, K, V, SEL, SE, POS, KEY_BLOCKS, BY_Q, N_BY_Q, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_sb, stride_st, stride_sh,
    T, HQ, HKV, D, NUM_M, NUM_N, DENSE_BELOW, scale, scale_log2,
    REP: tl.constexpr, HEADS: tl.constexpr, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_DENSE: tl.constexpr, USE_DENSE_BELOW: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # Rows and key-tile lists as in the forward.
    TOK: tl.constexpr = BLOCK_M // HEADS
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    m0 = pid_m * TOK
    offs_m, heads, row_ok, own, dense, sel_ptr = _query_rows(
        SEL, POS, b, g, m0, T, DENSE_BELOW, stride_sb, stride_st, stride_sh, REP, HEADS, BLOCK_SIZE, BLOCK_M,
        IS_DENSE)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if IS_INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_t = (b * HQ + heads) * T + offs_m  # [BLOCK_M] index into [B, HQ, T]
    lse = tl.load(LSE + row_t, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_t, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = pid_bg.to(tl.int64) * NUM_M + pid_m
    for i in range(tl.load(N_BY_Q + row)):
        j = tl.load(BY_Q + row * NUM_N + i)
        span = KEY_BLOCKS + (b * NUM_N + j) * 2  # the key tile's (lowest, highest) block
        dq = _dq_step(q, do, lse, delta, K + b * stride_kb + g * stride_kh, V + b * stride_kb + g * stride_kh,
                      SE + b * T, POS + b * T, j * BLOCK_N, offs_m, row_ok, own, dense, sel_ptr,
                      tl.load(span), tl.load(span + 1), offs_d, dq, stride_kt, T, D, scale_log2, BLOCK_SIZE,
                      TOPK, BLOCK_N, IS_DENSE, USE_DENSE_BELOW, IS_INTERPRET, PRECISION)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class MSATreeBlocks:
    """Tile sizes and launch settings of the kernels."""

    block_m: int = 64
    """Rows per query tile (tokens times the group's heads, padded to a power of two)."""
    block_n: int = 64
    """Keys per key tile."""
    num_warps: int = 8
    """Warps per program. At 64 x 64 tiles, D 64 and 4 heads a group, bf16, ptxas (sm_90a)
    reports about 250 registers for every kernel: spills of 250-450 bytes with 4 warps, none
    with 8. A compile-time count only: not yet timed on an H100."""
    num_stages: int = 2
    """Software-pipelining depth of the inner loops over listed tiles."""


def default_blocks() -> MSATreeBlocks:
    """64 x 64 tiles on a GPU (the targets: D 64, block_size 64, 4 query heads per group).

    The interpreter pays per operation, not per element: 16-key tiles (one test block) and
    32-row query tiles (16 tokens of a 2-head group), which halves its steps against 16 rows.
    """
    if _interpret():
        return MSATreeBlocks(32, 16, 4, 1)
    return MSATreeBlocks()


def _key_tile_blocks(position: torch.Tensor, block_size: int, block_n: int) -> torch.Tensor:
    """Per key tile of block_n keys: (smallest block, largest block), [B, NUM_N, 2] int32, the
    range a tile's bit words are relative to. Padding keys past T do not widen it."""
    b, t = position.shape
    num_n = triton.cdiv(t, block_n)
    pad = num_n * block_n - t
    kb = position // block_size

    def tiles(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=value).view(b, num_n, block_n)

    return torch.stack([tiles(kb, _INT32_MAX).amin(-1), tiles(kb, -1).amax(-1)], -1).to(torch.int32).contiguous()


def tile_pairs(
    subtree_end: torch.Tensor, key_block: torch.Tensor, position: torch.Tensor, selected: torch.Tensor, *,
    n_blocks: int, dense_below: int, dense: bool, block_m: int, block_n: int,
) -> torch.Tensor:
    """Which (query tile, key tile) pairs can hold a kept (query, key): `[B, Hkv, NUM_M, NUM_N]` bool.

    subtree_end, key_block, position: [B, T]; selected: [B, T, Hkv, K] (-1 empty). Blocks are
    clamped into [0, n_blocks - 1] (n_blocks = ceil(T / block_size), as position <= flat index):
    a monotone clamp keeps every meeting of a range and a set, so the test stays conservative
    without reading the largest position back from the device.
    """
    b, t = subtree_end.shape
    hkv, top_k = selected.shape[2], selected.shape[3]
    dev = subtree_end.device
    num_m, num_n = triton.cdiv(t, block_m), triton.cdiv(t, block_n)
    pad_m, pad_n = num_m * block_m - t, num_n * block_n - t
    # Padded keys get subtree_end 0: never visible.
    se_max = F.pad(subtree_end, (0, pad_n)).view(b, num_n, block_n).amax(-1)  # [B, NUM_N]
    m0 = torch.arange(num_m, device=dev) * block_m
    m_last = (m0 + block_m).clamp(max=t) - 1
    n0 = torch.arange(num_n, device=dev) * block_n
    # [B, NUM_M, NUM_N]: some key of the tile is at or before the tile's last query and sees past its first.
    visible = (n0[None, None, :] <= m_last[None, :, None]) & (se_max[:, None, :] > m0[None, :, None])
    if dense:
        return visible[:, None].expand(b, hkv, num_m, num_n)
    nb = n_blocks
    kb = key_block.long().clamp(0, nb - 1)
    lo = F.pad(kb, (0, pad_n), value=nb).view(b, num_n, block_n).amin(-1)  # [B, NUM_N]
    hi = F.pad(kb, (0, pad_n), value=0).view(b, num_n, block_n).amax(-1)
    # Union of the kept blocks of each (query tile, group); bucket nb collects empty slots and padding.
    sel = torch.where(selected < 0, nb, selected.long().clamp(max=nb - 1))
    sel = F.pad(sel, (0, 0, 0, 0, 0, pad_m), value=nb).view(b, num_m, block_m, hkv, top_k)
    sel = sel.permute(0, 1, 3, 2, 4).reshape(b, num_m, hkv, block_m * top_k)
    own = F.pad(kb, (0, pad_m), value=nb).view(b, num_m, 1, block_m).expand(b, num_m, hkv, block_m)
    union = torch.zeros(b, num_m, hkv, nb + 1, dtype=torch.bool, device=dev)
    union.scatter_(-1, sel, True).scatter_(-1, own, True)
    # below[x]: kept blocks < x; a key tile's range [lo, hi] meets the union iff below[hi + 1] > below[lo].
    below = F.pad(union[..., :nb].cumsum(-1, dtype=torch.int32), (1, 0))  # [B, NUM_M, HKV, NB + 1]
    at = lambda x: x[:, None, None, :].expand(b, num_m, hkv, num_n)  # noqa: E731
    meets = below.gather(-1, at(hi + 1)) > below.gather(-1, at(lo))  # [B, NUM_M, HKV, NUM_N]
    dense_tile = F.pad(position < dense_below, (0, pad_m)).view(b, num_m, block_m).any(-1)  # [B, NUM_M]
    pairs = visible[:, :, None, :] & (meets | dense_tile[:, :, None, None])
    return pairs.permute(0, 2, 1, 3)


def compact_pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `mask [..., N]`: the listed indices first, in order ([..., N] int32), and their count."""
    # A stable sort on "not listed" puts the listed indices first, in increasing order.
    idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return idx, mask.sum(-1, dtype=torch.int32).contiguous()


@dataclass(frozen=True)
class _Launch:
    """Host-side shapes and switches shared by the three launches."""

    block_size: int
    dense_below: int
    dense: bool
    scale: float
    blocks: MSATreeBlocks

    def constexprs(self, q: torch.Tensor, k: torch.Tensor, top_k: int) -> tuple[dict, int]:
        """The kernels' constexpr arguments and TOK, the tokens per query tile."""
        rep = q.shape[2] // k.shape[2]
        heads = triton.next_power_of_2(rep)
        block_m = max(self.blocks.block_m, heads)
        consts = dict(
            REP=rep, HEADS=heads, TOPK=top_k, BLOCK_SIZE=self.block_size,
            BLOCK_M=block_m, BLOCK_N=self.blocks.block_n, BLOCK_D=triton.next_power_of_2(max(q.shape[3], 16)),
            IS_DENSE=self.dense, USE_DENSE_BELOW=self.dense_below > 0 and not self.dense,
            IS_INTERPRET=_interpret(), PRECISION=dot_precision(q.dtype),
            num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages,
        )
        return consts, block_m // heads

    def pairs(self, sel: torch.Tensor, se: torch.Tensor, pos: torch.Tensor, tok: int) -> torch.Tensor:
        """`tile_pairs` for these kernels' tiles: [B, Hkv, NUM_M, NUM_N] bool."""
        t = se.shape[1]
        return tile_pairs(se, torch.div(pos, self.block_size, rounding_mode="floor"), pos, sel,
                          n_blocks=triton.cdiv(t, self.block_size), dense_below=self.dense_below, dense=self.dense,
                          block_m=tok, block_n=self.blocks.block_n)


def _fwd(q, k, v, sel, se, pos, blocks, pairs, cfg: _Launch):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    o = _empty_like(q)
    lse = _empty(b, hq, t, device=q.device, dtype=torch.float32)
    consts, tok = cfg.constexprs(q, k, sel.shape[-1])
    by_q, n_by_q = compact_pairs(pairs)
    msa_tree_fwd_kernel[(triton.cdiv(t, tok), b * hkv)](
        q, k, v, sel, se, pos, blocks, by_q, n_by_q, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        sel.stride(0), sel.stride(1), sel.stride(2),
        t, hq, hkv, d, pairs.shape[2], pairs.shape[3], cfg.dense_below, cfg.scale * _LOG2E, **consts,
    )
    return o, lse, by_q, n_by_q


@dataclass
class IndexGrad:
    """What the dK/dV kernel needs to also give the index loss's gradient to the index keys
    (`fused_index_grad`): iq [B, T, Hkv, Di] and ik [B, T, Di], the student's log-sum-exps
    [B, Hkv, T] (log2 domain, fp32), the token weights [B, T] fp32 and the index scale (log2)."""

    iq: torch.Tensor
    ik: torch.Tensor
    lse_s: torch.Tensor
    w: torch.Tensor
    index_scale_log2: float


def fused_index_grad(q: torch.Tensor, k: torch.Tensor, cfg: "_Launch") -> bool:
    """Whether the dK/dV kernel can take the index keys' gradient: its query steps must hold at
    least 16 tokens (a tensor-core product's smallest side)."""
    return cfg.constexprs(q, k, 1)[1] >= 16


def bwd(q, k, v, sel, se, pos, blocks, pairs, by_q, n_by_q, o, lse, do, cfg: _Launch,
         index: IndexGrad | None = None):
    """dq, dk, dv and, given `index`, the index keys' gradient partials [B, Hkv, T, Di] fp32
    (unscaled: sum over groups, times d ik's factor)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    do = do.contiguous()
    # delta_i = sum_d dO_i O_i, the softmax-backward row term, [B, HQ, T] in fp32.
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    consts, tok = cfg.constexprs(q, k, sel.shape[-1])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               sel.stride(0), sel.stride(1), sel.stride(2))
    num_m, num_n = pairs.shape[2], pairs.shape[3]
    by_k, n_by_k = compact_pairs(pairs.transpose(-1, -2))
    if index is None:
        di, dik, iq, ik, lse_s, w = 16, dk, q, k, lse, lse  # unread
        iq_strides, index_scale_log2 = (0, 0, 0, 0, 0), 1.0
    else:
        iq, ik, lse_s, w = index.iq, index.ik, index.lse_s, index.w
        di = iq.shape[3]
        dik = _empty(b, hkv, t, di, device=q.device, dtype=torch.float32)
        iq_strides = (iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1))
        index_scale_log2 = index.index_scale_log2
    msa_tree_bwd_dkdv_kernel[(num_n, b * hkv)](
        q, k, v, sel, se, pos, by_k, n_by_k, do, lse, delta, dk, dv, iq, ik, lse_s, w, dik, *strides,
        *iq_strides, t, hq, hkv, d, di, num_m, num_n, cfg.dense_below, cfg.scale, cfg.scale * _LOG2E,
        index_scale_log2, WITH_DIK=index is not None, BLOCK_DI=triton.next_power_of_2(max(di, 16)),
        # With index inputs in fp32 every product of the kernel is IEEE fp32, as in the index loss.
        **dict(consts, PRECISION=dot_precision(torch.float32 if torch.float32 in (q.dtype, iq.dtype) else q.dtype)),
    )
    msa_tree_bwd_dq_kernel[(num_m, b * hkv)](
        q, k, v, sel, se, pos, blocks, by_q, n_by_q, do, lse, delta, dq, *strides,
        t, hq, hkv, d, num_m, num_n, cfg.dense_below, cfg.scale, cfg.scale * _LOG2E, **consts,
    )
    return dq, dk, dv, (None if index is None else dik)


def launch(block_size: int, dense_below: int, dense: bool, scale: float | None, head_dim: int) -> _Launch:
    """The kernels' launch settings for these arguments (scale None: head_dim ** -0.5)."""
    return _Launch(block_size, int(dense_below), bool(dense), float(head_dim**-0.5 if scale is None else scale),
                   default_blocks())


def attention_forward(q, k, v, selected, subtree_end, position, cfg: _Launch) -> tuple[torch.Tensor, ...]:
    """The forward's launch and what its backward needs: (q, k, v, sel, se, pos, blocks, pairs,
    by_q, n_by_q, out, lse2), contiguous, indices int32, lse2 [B, Hq, T] in the log2 domain."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    sel = selected.to(torch.int32).contiguous()
    se = subtree_end.to(torch.int32).contiguous()
    pos = position.to(torch.int32).contiguous()
    blocks = _key_tile_blocks(pos, cfg.block_size, cfg.blocks.block_n)
    pairs = cfg.pairs(sel, se, pos, cfg.constexprs(q, k, sel.shape[-1])[1])
    o, lse2, by_q, n_by_q = _fwd(q, k, v, sel, se, pos, blocks, pairs, cfg)
    return q, k, v, sel, se, pos, blocks, pairs, by_q, n_by_q, o, lse2


class MSATreeAttentionFunction(torch.autograd.Function):
    """Sparse tree attention given the kept blocks; gradients for q, k, v only. Returns (out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, selected, subtree_end, position, cfg: _Launch):
        saved = attention_forward(q, k, v, selected, subtree_end, position, cfg)
        ctx.save_for_backward(*saved)
        o, lse2 = saved[-2:]
        ctx.cfg = cfg
        # The kernels keep the log-sum-exp in log2 units; callers get the natural log.
        lse = lse2 * _LN2
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, sel, se, pos, blocks, pairs, by_q, n_by_q, o, lse2 = ctx.saved_tensors
        dq, dk, dv, _ = bwd(q, k, v, sel, se, pos, blocks, pairs, by_q, n_by_q, o, lse2, do, ctx.cfg)
        return dq, dk, dv, None, None, None, None


def check(q, k, v, selected, subtree_end, position, block_size) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [B, T, Hq, D] and k, v [B, T, Hkv, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, T, Hkv, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take fp16, bf16 or fp32; got {q.dtype} (use tree.msa_tree for fp64)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype} (cast k and v to q's)")
    if selected.dim() != 4 or selected.shape[:3] != (b, t, hkv):
        raise ValueError(f"selected must be [B, T, Hkv, K] = [{b}, {t}, {hkv}, K]; got {tuple(selected.shape)}")
    for name, x in (("selected", selected), ("subtree_end", subtree_end), ("position", position)):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor; got {x.dtype} (pass indices as int32 or int64)")
    for name, x in (("subtree_end", subtree_end), ("position", position)):
        if x.shape != (b, t):
            raise ValueError(f"{name} must be [B, T] = [{b}, {t}]; got {tuple(x.shape)} (add a batch dimension)")
    devices = {x.device for x in (q, k, v, selected, subtree_end, position)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")


def msa_tree_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    subtree_end: torch.Tensor,
    position: torch.Tensor,
    *,
    block_size: int,
    dense_below: int = 0,
    dense: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MSA attention over a flattened prefix tree given the kept blocks, through the Triton kernels.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq a multiple of Hkv), fp32, bf16 or fp16;
    selected: [B, T, Hkv, K] integer block indices (-1 = empty slot, any order); subtree_end,
    position: [B, T] integer (a causal row: subtree_end = T, position = arange(T)). Query q of
    group g attends to the keys it sees whose block `position // block_size` is a selected one
    or its own; rows with position < dense_below, or every row if `dense`, to every key they
    see. Equals `tree.msa_tree(..., selected=selected)`'s output. Returns out [B, T, Hq, D] in
    q's dtype, differentiable in q, k and v; with `return_lse` also the per-row log-sum-exp
    [B, Hq, T] fp32 (natural log, of the scaled scores over the kept keys; not differentiable).
    `scale` defaults to D^-0.5.
    """
    check(q, k, v, selected, subtree_end, position, block_size)
    b, t, hq, d = q.shape
    if t == 0:
        out, lse = q.new_zeros(q.shape), torch.zeros(b, hq, 0, dtype=torch.float32, device=q.device)
    else:
        out, lse = MSATreeAttentionFunction.apply(q, k, v, selected, subtree_end, position,
                                                  launch(block_size, dense_below, dense, scale, d))
    return (out, lse) if return_lse else out
