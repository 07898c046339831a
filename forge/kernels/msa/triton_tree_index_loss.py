"""The MSA index loss over a flattened prefix tree in Triton: `tree.msa_tree(..., with_index_loss=True)[1]`.

What it computes. Query q sees key k iff `k <= q < subtree_end[k]` (a causal row: subtree_end =
T). The kept keys of (q, KV group g) are the keys q sees whose block `position[k] // block_size`
is q's own block or one of `selected[q, g]`; a dense row (`position[q] < dense_below`, or every
row with `dense=True`) keeps every key it sees. Over the kept keys the teacher is the mean over
the group's heads of `softmax(q_h . k * scale)` (q and k detached) and the student is
`softmax(iq[q, g] . ik * Di^-0.5)`; the loss is `sum_q token_weight[q] * mean_g KL(teacher ||
student)`, a fp32 scalar whose gradient reaches iq and ik only, through
`d loss / d student_logit[q, g, k] = token_weight[q] / Hkv * (student - teacher)`.

Rows. A program's query rows are TOK tokens of one KV group; their main scores for all the
group's heads form one `[REP_P * TOK, BLOCK_N]` product (row h * TOK + i: head h, token i, as
triton_tree.py's pack_gqa), viewed as `[REP_P, TOK, BLOCK_N]`: q is loaded once per program, the
kept mask `[TOK, BLOCK_N]` is built once per key tile for every head and the student, and the
teacher is a sum over the first axis. TOK = max(16, BLOCK_R // REP_P), REP_P = Hq / Hkv rounded
up to a power of two (the extra heads read zeros and are masked).

Loop orders. Three kernels, no atomics: the result is the same bits on every run.
1. `tree_index_loss_lse_kernel`, query-outer, one program per (TOK queries, batch row, group):
   an online pass over the listed key tiles gives every head's log-sum-exp of the main scores
   over the kept keys, and the student's. Given `main_lse` (the sparse attention's forward
   computed the same statistics over the same kept keys, and `msa_tree_triton` passes them on)
   it computes the student's alone: one [TOK, Di] product per key tile instead of that plus a
   [REP_P * TOK, D] one.
2. `tree_index_loss_fwd_kernel`, query-outer, the same programs over the same key tiles: teacher
   and student probabilities from those statistics, each row's KL and d iq (a sum over keys).
3. `tree_index_loss_bwd_dik_kernel`, key-outer, one program per (BLOCK_N keys, batch row, group):
   d ik (a sum over queries) over the listed query tiles, from the statistics of kernel 1.
   Each group writes its own partial; the host adds the groups. In training, where the model
   calls attention and loss together (`msa_tree_attention_index_loss_triton`, one autograd
   node), the attention's dK/dV kernel computes this instead, from the probabilities it forms
   for its own gradients (their mean over the group's heads is the teacher), and d ik moves
   from the forward to the backward.

Which tile pairs run (`tile_pairs`, torch on the inputs' device, no device sync): a key tile is
listed for a query tile when some row of the tile can see it (the key tile starts at or before
the tile's last query and its largest subtree_end is past the tile's first query) and, unless a
row of the tile is dense, the key tile's range of position blocks meets the union of the kept
blocks (own block and selections) of the tile's rows for that group. Both tests are
conservative; the per-element mask in the kernels is exact. The pair matrix `[B, Hkv, NUM_M,
NUM_N]` is compacted into lists in both orders, so the kernels' loops have no skip branch (the
habit of triton_tree.py, whose in-loop branch cost 2.4x).

Departures from the suggested design. (a) Packed rows, above: the suggested per-head loop
reloads q per head and key tile and runs REP products of TOK rows; one product of REP_P * TOK
rows feeds the tensor cores better, and the smaller query tile (16 queries at 4 heads per
group) has a smaller union of kept blocks, so fewer key tiles are listed. (b) The gradients are
computed in the forward, when grad mode is on and iq or ik requires one; the backward only
scales them by the incoming gradient. The loss is always differentiated in training, and a
separate backward would recompute the teacher (kernel 2's work) once more. (c) The work lists
are per pair, not per-tile ranges. Membership in `selected` is a bit test against each row's
kept blocks folded into one 32-bit word where the key tile spans fewer than 32 blocks (nearly
every tile), and a static loop over the K slots elsewhere.

GPU status: written and tested under the interpreter only. All three kernels compile for sm_90
(bf16, fp16, fp32; 1 to 8 heads per group) through `triton.compile` on the CPU. In bf16 at 4
heads per group and 64-wide tiles they use 172-236 registers per thread and do not spill with 8
warps (with 4 they reach 255 and the key-outer kernel spills), hence `num_warps=8`. fp32 with
IEEE products (the default, forge.kernels.precision) runs its products on the FMA units and
spills heavily, the key-outer kernel most: right, but slow; train in bf16. Tile sizes are not
swept and speed is not measured.

Memory: the work lists and the block union hold O(B * Hkv * NUM_M * (NUM_N + T / block_size))
entries (about 20 MB each at T = 50K with 16-query tiles, 64-key tiles and 64-token blocks:
quadratic in T, so chunking would be needed far beyond that), the statistics O(B * Hq * T)
fp32, the gradients O(B * T * Hkv * Di) fp32 between forward and backward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from forge.kernels.msa import triton_tree_attention as tta
from forge.kernels.msa.triton_tree_attention import compact_pairs, keep_by_bits, kept_block_bits, tile_pairs
from forge.kernels.precision import dot_precision

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# BLOCK_R: rows of the main-score tile, (head, query) pairs of one group, so a program (and a
# step of the key-outer kernel) takes max(16, BLOCK_R // next_pow2(Hq / Hkv)) queries; BLOCK_N:
# keys per step; warps (8: no register spills, see the module docstring) and pipeline depth.
# FlashAttention-sized tiles for D = Di = 64, not swept on a GPU. The interpreter runs the
# smallest tiles tl.dot takes.
TILES = dict(BLOCK_R=64, BLOCK_N=64, num_warps=8, num_stages=2)
INTERPRET_TILES = dict(BLOCK_R=16, BLOCK_N=16, num_warps=1, num_stages=1)

_LOG2E = 1.4426950408889634
# Globals a kernel reads must be constexpr objects.
_LN2 = tl.constexpr(0.6931471805599453)
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)
# Allocation of fresh outputs; tests swap in NaN-filled ones so an unwritten element fails.
_empty = torch.empty


@triton.jit
def _query_tile(
    Q, IQ, POS, KB, SEL, LSE, LSE_S, W, b, g, m0, T, HQ, HKV, D, DI, dense_below,
    stride_qb, stride_qt, stride_qh, stride_iqb, stride_iqt, stride_iqh,
    REP: tl.constexpr, REP_P: tl.constexpr, TOK: tl.constexpr, TOPK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DI: tl.constexpr, IS_DENSE: tl.constexpr, WITH_STATS: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    # Everything a step needs about the TOK queries from m0 of group g (one nested call, which
    # the interpreter charges per call).
    offs_m = m0 + tl.arange(0, TOK)  # [TOK]
    row_ok = offs_m < T
    base = b.to(tl.int64) * T
    own = tl.load(KB + base + offs_m, mask=row_ok, other=-2)  # [TOK] the query's own block
    if IS_DENSE:
        dense_row = offs_m >= 0
    else:
        dense_row = tl.load(POS + base + offs_m, mask=row_ok, other=0) < dense_below
    sel_ptr = SEL + ((base + offs_m) * HKV + g) * TOPK  # [TOK] each row's TOPK selected blocks
    # Packed rows: row r is token offs_m[r % TOK] of head g * REP + r // TOK (rows of heads >= REP are 0).
    rows = tl.arange(0, REP_P * TOK)
    tok = m0 + rows % TOK
    head = rows // TOK
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr = (Q + b.to(tl.int64) * stride_qb + tok[:, None].to(tl.int64) * stride_qt
             + (g * REP + head)[:, None] * stride_qh + offs_d[None, :])
    q = tl.load(q_ptr, mask=(tok[:, None] < T) & (head[:, None] < REP) & (offs_d[None, :] < D), other=0.0)
    offs_di = tl.arange(0, BLOCK_DI)
    iq_ptr = (IQ + b.to(tl.int64) * stride_iqb + offs_m[:, None].to(tl.int64) * stride_iqt + g * stride_iqh
              + offs_di[None, :])
    iq = tl.load(iq_ptr, mask=row_ok[:, None] & (offs_di[None, :] < DI), other=0.0)  # [TOK, BLOCK_DI]
    if IS_INTERPRET:
        q = q.to(tl.float32)
        iq = iq.to(tl.float32)
    heads = tl.arange(0, REP_P)
    if WITH_STATS:
        # [REP_P, TOK]; +inf for padded heads and rows, so their probabilities are exp2(-inf) = 0.
        lse_ptr = LSE + (b * HQ + g * REP + heads)[:, None].to(tl.int64) * T + offs_m[None, :]
        lse = tl.load(lse_ptr, mask=(heads[:, None] < REP) & row_ok[None, :], other=float("inf"))
        lse_s = tl.load(LSE_S + (b * HKV + g).to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)  # [TOK]
        w = tl.load(W + base + offs_m, mask=row_ok, other=0.0)  # [TOK]
    else:
        lse = tl.zeros([REP_P, TOK], dtype=tl.float32)
        lse_s = tl.zeros([TOK], dtype=tl.float32)
        w = tl.zeros([TOK], dtype=tl.float32)
    return offs_m, own, dense_row, sel_ptr, q, iq, lse, lse_s, w


@triton.jit
def _key_tile(
    K, IK, SE, KB, b, g, n0, T, D, DI, stride_kb, stride_kt, stride_kh, stride_ikb, stride_ikt,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    # The BLOCK_N keys from n0: k of group g [BLOCK_N, BLOCK_D], ik [BLOCK_N, BLOCK_DI], their
    # subtree ends (0 past T: never visible) and position blocks.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < T
    base = b.to(tl.int64) * T
    se = tl.load(SE + base + offs_n, mask=key_ok, other=0)
    kb = tl.load(KB + base + offs_n, mask=key_ok, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptr = K + b.to(tl.int64) * stride_kb + offs_n[:, None].to(tl.int64) * stride_kt + g * stride_kh + offs_d[None, :]
    k = tl.load(k_ptr, mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    offs_di = tl.arange(0, BLOCK_DI)
    ik_ptr = IK + b.to(tl.int64) * stride_ikb + offs_n[:, None].to(tl.int64) * stride_ikt + offs_di[None, :]
    ik = tl.load(ik_ptr, mask=key_ok[:, None] & (offs_di[None, :] < DI), other=0.0)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        ik = ik.to(tl.float32)
    return offs_n, se, kb, k, ik


@triton.jit
def _kept(offs_m, offs_n, own, dense_row, sel_ptr, se, kb, T, TOPK: tl.constexpr):
    # [TOK, BLOCK_N] bool: the query sees the key, and the key's block is the query's own, one
    # of its selected blocks, or the row is dense. Padded rows and keys are never kept. When the
    # tile's real keys span fewer than 32 blocks [blo, bhi] (nearly every tile), each row's kept
    # blocks become one word of bits and a key's test is one shift; otherwise each slot is
    # compared with every key. Same mask either way (triton_tree_attention.py does the same).
    visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :])
    row_ok = offs_m < T
    blo = tl.min(tl.where(kb >= 0, kb, 2147483647), axis=0)
    bhi = tl.max(kb, axis=0)
    if bhi - blo < 32:
        # Padded rows (own -2) and keys (kb -1) fall outside every word.
        keep = keep_by_bits(kept_block_bits(sel_ptr, row_ok, own, blo, TOPK), kb, blo) | dense_row[:, None]
    else:
        keep = (kb[None, :] == own[:, None]) | dense_row[:, None]
        for j in tl.static_range(TOPK):
            blk = tl.load(sel_ptr + j, mask=row_ok, other=-1)  # [TOK]
            keep = keep | (blk[:, None] == kb[None, :])
    return visible & keep


@triton.jit
def _scores(q, iq, k, ik, kept, qk_scale_log2, index_scale_log2, REP_P: tl.constexpr, TOK: tl.constexpr,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # log2-domain scores: main [REP_P, TOK, BLOCK_N] (head, token, key), -inf where not kept, and
    # index [TOK, BLOCK_N], unmasked (finite, so that 0 * it stays 0).
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2  # [REP_P * TOK, BLOCK_N]
    s = tl.where(kept[None, :, :], tl.reshape(s, [REP_P, TOK, BLOCK_N]), float("-inf"))
    return s, _index_scores(iq, ik, index_scale_log2, PRECISION)


@triton.jit
def _index_scores(iq, ik, index_scale_log2, PRECISION: tl.constexpr):
    # The student's log2-domain scores [TOK, BLOCK_N], unmasked.
    return tl.dot(iq, tl.trans(ik), input_precision=PRECISION) * index_scale_log2


@triton.jit(do_not_specialize=["T", "NUM_M", "WIDTH"])
def tree_index_loss_lse_kernel(
    Q, K, IQ, IK, SE, POS, KB, SEL, LSE, LSE_S, IDX, CNT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_iqb, stride_iqt, stride_iqh, stride_ikb, stride_ikt,
    T, HQ, HKV, D, DI, NUM_M, WIDTH, dense_below, qk_scale_log2, index_scale_log2,
    REP: tl.constexpr, REP_P: tl.constexpr, TOK: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IS_DENSE: tl.constexpr, IS_INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, WITH_MAIN: tl.constexpr,
):
    # WITH_MAIN False: the main branch's statistics came from the sparse attention's forward
    # (the same kept keys), so only the student's are computed, and LSE is not written.
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    offs_m, own, dense_row, sel_ptr, q, iq, lse, lse_s, w = _query_tile(
        Q, IQ, POS, KB, SEL, LSE, LSE_S, LSE, b, g, pid_m * TOK, T, HQ, HKV, D, DI, dense_below,
        stride_qb, stride_qt, stride_qh, stride_iqb, stride_iqt, stride_iqh,
        REP, REP_P, TOK, TOPK, BLOCK_D, BLOCK_DI, IS_DENSE, False, IS_INTERPRET)
    m_h = tl.full([REP_P, TOK], float("-inf"), dtype=tl.float32)  # running max per (head, token)
    l_h = tl.zeros([REP_P, TOK], dtype=tl.float32)
    m_s = tl.full([TOK], float("-inf"), dtype=tl.float32)
    l_s = tl.zeros([TOK], dtype=tl.float32)
    row = (b * HKV + g).to(tl.int64) * NUM_M + pid_m
    n_tiles = tl.load(CNT + row)
    for j in range(0, n_tiles):
        offs_n, se, kb, k, ik = _key_tile(K, IK, SE, KB, b, g, tl.load(IDX + row * WIDTH + j) * BLOCK_N, T, D, DI,
                                          stride_kb, stride_kt, stride_kh, stride_ikb, stride_ikt,
                                          BLOCK_N, BLOCK_D, BLOCK_DI, IS_INTERPRET)
        kept = _kept(offs_m, offs_n, own, dense_row, sel_ptr, se, kb, T, TOPK)  # [TOK, BLOCK_N]
        if WITH_MAIN:
            s, z = _scores(q, iq, k, ik, kept, qk_scale_log2, index_scale_log2, REP_P, TOK, BLOCK_N, PRECISION)
            # Online log-sum-exp; a row that has kept nothing yet keeps -inf and shifts by 0, not NaN.
            m_new = tl.maximum(m_h, tl.max(s, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_h = l_h * tl.exp2(m_h - m_safe) + tl.sum(tl.exp2(s - m_safe[:, :, None]), axis=2)
            m_h = m_new
        else:
            z = _index_scores(iq, ik, index_scale_log2, PRECISION)  # [TOK, BLOCK_N]
        z = tl.where(kept, z, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_s = l_s * tl.exp2(m_s - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
        m_s = m_new
    # Every real row keeps itself, so l > 0 there; padded heads and rows are masked on store.
    if WITH_MAIN:
        heads = tl.arange(0, REP_P)
        lse_ptr = LSE + (b * HQ + g * REP + heads)[:, None].to(tl.int64) * T + offs_m[None, :]
        lse = m_h + tl.log2(tl.where(l_h == 0.0, 1.0, l_h))  # [REP_P, TOK]
        tl.store(lse_ptr, lse, mask=(heads[:, None] < REP) & (offs_m[None, :] < T))
    lse_s = m_s + tl.log2(tl.where(l_s == 0.0, 1.0, l_s))
    tl.store(LSE_S + (b * HKV + g).to(tl.int64) * T + offs_m, lse_s, mask=offs_m < T)


@triton.jit(do_not_specialize=["T", "NUM_M", "WIDTH"])
def tree_index_loss_fwd_kernel(
    Q, K, IQ, IK, SE, POS, KB, SEL, W, LSE, LSE_S, LOSS, DIQ, IDX, CNT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_iqb, stride_iqt, stride_iqh, stride_ikb, stride_ikt,
    T, HQ, HKV, D, DI, NUM_M, WIDTH, dense_below, qk_scale_log2, index_scale_log2, grad_scale,
    REP: tl.constexpr, REP_P: tl.constexpr, TOK: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IS_DENSE: tl.constexpr, USE_GRAD: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    offs_m, own, dense_row, sel_ptr, q, iq, lse, lse_s, w = _query_tile(
        Q, IQ, POS, KB, SEL, LSE, LSE_S, W, b, g, pid_m * TOK, T, HQ, HKV, D, DI, dense_below,
        stride_qb, stride_qt, stride_qh, stride_iqb, stride_iqt, stride_iqh,
        REP, REP_P, TOK, TOPK, BLOCK_D, BLOCK_DI, IS_DENSE, True, IS_INTERPRET)
    loss = tl.zeros([TOK], dtype=tl.float32)
    diq = tl.zeros([TOK, BLOCK_DI], dtype=tl.float32)
    row = (b * HKV + g).to(tl.int64) * NUM_M + pid_m
    n_tiles = tl.load(CNT + row)
    for j in range(0, n_tiles):
        offs_n, se, kb, k, ik = _key_tile(K, IK, SE, KB, b, g, tl.load(IDX + row * WIDTH + j) * BLOCK_N, T, D, DI,
                                          stride_kb, stride_kt, stride_kh, stride_ikb, stride_ikt,
                                          BLOCK_N, BLOCK_D, BLOCK_DI, IS_INTERPRET)
        kept = _kept(offs_m, offs_n, own, dense_row, sel_ptr, se, kb, T, TOPK)  # [TOK, BLOCK_N]
        s, z = _scores(q, iq, k, ik, kept, qk_scale_log2, index_scale_log2, REP_P, TOK, BLOCK_N, PRECISION)
        t = tl.sum(tl.exp2(s - lse[:, :, None]), axis=0) / REP  # [TOK, BLOCK_N] teacher, 0 where not kept
        zs = z - lse_s[:, None]  # log2 of the student's probability where kept
        term = t * (tl.log(tl.maximum(t, _FP32_TINY)) - zs * _LN2)
        loss += tl.sum(tl.where(kept, term, 0.0), axis=1)
        if USE_GRAD:
            dz = tl.exp2(tl.where(kept, zs, float("-inf"))) - t  # [TOK, BLOCK_N], 0 where not kept
            diq += tl.dot(dz.to(ik.dtype), ik, input_precision=PRECISION)
    tl.store(LOSS + (b * HKV + g).to(tl.int64) * T + offs_m, loss, mask=offs_m < T)
    if USE_GRAD:
        offs_di = tl.arange(0, BLOCK_DI)
        # DIQ is [B, T, HKV, DI] fp32, contiguous.
        diq_off = ((b.to(tl.int64) * T + offs_m[:, None]) * HKV + g) * DI + offs_di[None, :]
        tl.store(DIQ + diq_off, diq * (w * grad_scale)[:, None], mask=(offs_m[:, None] < T) & (offs_di[None, :] < DI))


@triton.jit(do_not_specialize=["T", "NUM_N", "WIDTH"])
def tree_index_loss_bwd_dik_kernel(
    Q, K, IQ, IK, SE, POS, KB, SEL, W, LSE, LSE_S, DIK, IDX, CNT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_iqb, stride_iqt, stride_iqh, stride_ikb, stride_ikt,
    T, HQ, HKV, D, DI, NUM_N, WIDTH, dense_below, qk_scale_log2, index_scale_log2, grad_scale,
    REP: tl.constexpr, REP_P: tl.constexpr, TOK: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, IS_DENSE: tl.constexpr, IS_INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    offs_n, se, kb, k, ik = _key_tile(K, IK, SE, KB, b, g, pid_n * BLOCK_N, T, D, DI,
                                      stride_kb, stride_kt, stride_kh, stride_ikb, stride_ikt,
                                      BLOCK_N, BLOCK_D, BLOCK_DI, IS_INTERPRET)
    dik = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    col = (b * HKV + g).to(tl.int64) * NUM_N + pid_n
    n_tiles = tl.load(CNT + col)
    for j in range(0, n_tiles):
        offs_m, own, dense_row, sel_ptr, q, iq, lse, lse_s, w = _query_tile(
            Q, IQ, POS, KB, SEL, LSE, LSE_S, W, b, g, tl.load(IDX + col * WIDTH + j) * TOK, T, HQ, HKV, D, DI,
            dense_below, stride_qb, stride_qt, stride_qh, stride_iqb, stride_iqt, stride_iqh,
            REP, REP_P, TOK, TOPK, BLOCK_D, BLOCK_DI, IS_DENSE, True, IS_INTERPRET)
        kept = _kept(offs_m, offs_n, own, dense_row, sel_ptr, se, kb, T, TOPK)  # [TOK, BLOCK_N]
        s, z = _scores(q, iq, k, ik, kept, qk_scale_log2, index_scale_log2, REP_P, TOK, BLOCK_N, PRECISION)
        t = tl.sum(tl.exp2(s - lse[:, :, None]), axis=0) / REP  # [TOK, BLOCK_N]
        dz = (tl.exp2(tl.where(kept, z - lse_s[:, None], float("-inf"))) - t) * w[:, None]  # [TOK, BLOCK_N]
        dik += tl.dot(tl.trans(dz).to(iq.dtype), iq, input_precision=PRECISION)
    # DIK is [B, HKV, T, DI] fp32: one partial per group, added on the host.
    offs_di = tl.arange(0, BLOCK_DI)
    dik_off = ((b * HKV + g).to(tl.int64) * T + offs_n[:, None]) * DI + offs_di[None, :]
    tl.store(DIK + dik_off, dik * grad_scale, mask=(offs_n[:, None] < T) & (offs_di[None, :] < DI))


def _tiles() -> dict:
    return dict(INTERPRET_TILES if IS_INTERPRET else TILES)


def _forward(q, k, iq, ik, selected, se, pos, w, block_size: int, dense_below: int, dense: bool, scale: float,
             need_diq: bool, need_dik: bool, main_lse: torch.Tensor | None = None,
             main_lse_log2: torch.Tensor | None = None):
    """(the loss (fp32 scalar), d loss / d iq [B, T, Hkv, Di] fp32 or None, d loss / d ik
    [B, T, Di] fp32 or None, the student's log-sum-exps [B, Hkv, T] (log2 domain)), the
    gradients where asked. `main_lse` [B, Hq, T]: the main branch's log-sum-exp (natural log)
    over the kept keys, if known; `main_lse_log2` the same in the log2 domain (the attention
    kernels' own)."""
    b, t, hq, d = q.shape
    hkv, di = iq.shape[2], iq.shape[3]
    top_k = selected.shape[3]
    cfg = _tiles()
    rep = hq // hkv
    rep_p = triton.next_power_of_2(rep)
    tok, block_n = max(16, cfg.pop("BLOCK_R") // rep_p), cfg.pop("BLOCK_N")
    key_block = torch.div(pos, block_size, rounding_mode="floor").to(torch.int32).contiguous()
    pairs = tile_pairs(se, key_block, pos, selected, n_blocks=triton.cdiv(t, block_size), dense_below=dense_below,
                       dense=dense, block_m=tok, block_n=block_n)
    by_query, n_by_query = compact_pairs(pairs)  # [B, HKV, NUM_M, NUM_N], [B, HKV, NUM_M]
    num_m, num_n = pairs.shape[2], pairs.shape[3]
    any32 = torch.float32 in (q.dtype, iq.dtype)
    consts = dict(
        REP=rep, REP_P=rep_p, TOK=tok, TOPK=top_k, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(max(d, 16)), BLOCK_DI=triton.next_power_of_2(max(di, 16)),
        IS_DENSE=dense, IS_INTERPRET=IS_INTERPRET,
        PRECISION=dot_precision(torch.float32 if any32 else q.dtype), **cfg,
    )
    tensors = (q, k, iq, ik, se, pos, key_block, selected)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1))
    # Positions fit int32; a larger threshold means every row is dense.
    dense_below = min(dense_below, 2**31 - 1)
    qk_scale_log2, index_scale_log2 = scale * _LOG2E, di**-0.5 * _LOG2E
    grad_scale = di**-0.5 / hkv
    # The kernels take log-sum-exps in the log2 domain of the scaled scores.
    if main_lse_log2 is not None:
        lse = main_lse_log2.contiguous()
    elif main_lse is not None:
        lse = (main_lse.float() * _LOG2E).contiguous()
    else:
        lse = _empty(b, hq, t, device=q.device, dtype=torch.float32)
    known = main_lse is not None or main_lse_log2 is not None
    lse_s = _empty(b, hkv, t, device=q.device, dtype=torch.float32)
    grid_m = (num_m, b * hkv)
    tree_index_loss_lse_kernel[grid_m](
        *tensors, lse, lse_s, by_query, n_by_query, *strides,
        t, hq, hkv, d, di, num_m, num_n, dense_below, qk_scale_log2, index_scale_log2, **consts,
        WITH_MAIN=not known,
    )
    rows = _empty(b, hkv, t, device=q.device, dtype=torch.float32)
    diq = _empty(b, t, hkv, di, device=q.device, dtype=torch.float32) if need_diq else rows
    tree_index_loss_fwd_kernel[grid_m](
        *tensors, w, lse, lse_s, rows, diq, by_query, n_by_query, *strides,
        t, hq, hkv, d, di, num_m, num_n, dense_below, qk_scale_log2, index_scale_log2, grad_scale,
        USE_GRAD=need_diq, **consts,
    )
    loss = (rows * w[:, None, :]).sum() / hkv
    dik = None
    if need_dik:
        by_key, n_by_key = compact_pairs(pairs.transpose(-1, -2))  # [B, HKV, NUM_N, NUM_M], [B, HKV, NUM_N]
        parts = _empty(b, hkv, t, di, device=q.device, dtype=torch.float32)
        tree_index_loss_bwd_dik_kernel[(num_n, b * hkv)](
            *tensors, w, lse, lse_s, parts, by_key, n_by_key, *strides,
            t, hq, hkv, d, di, num_n, num_m, dense_below, qk_scale_log2, index_scale_log2, grad_scale, **consts,
        )
        dik = parts.sum(1)
    return loss, (diq if need_diq else None), dik, lse_s


class TreeIndexLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, iq, ik, selected, se, pos, w, block_size, dense_below, dense, scale, need_diq, need_dik,
                main_lse):
        loss, diq, dik, _ = _forward(q, k, iq, ik, selected, se, pos, w, block_size, dense_below, dense, scale,
                                     need_diq, need_dik, main_lse)
        ctx.save_for_backward(diq, dik)
        ctx.dtypes = (iq.dtype, ik.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        diq, dik = ctx.saved_tensors
        diq = None if diq is None else (diq * grad).to(ctx.dtypes[0])
        dik = None if dik is None else (dik * grad).to(ctx.dtypes[1])
        return None, None, diq, dik, None, None, None, None, None, None, None, None, None, None, None



FUSED_BACKWARD = True
"""Whether `msa_tree_attention_index_loss_triton` runs at all (False: it declines, and
msa_tree_triton calls the attention and the loss apart). For A/B timing: compiled for sm_90 on
the CPU (benchmarks/kernel_resources.py) the fused dK/dV kernel uses 255 registers and spills
96 bytes on msa_100m (104 on msa_1b) where the unfused one spilled none; the loss's d ik
kernel, which it replaces, is gone."""

class TreeAttentionIndexLossFunction(torch.autograd.Function):
    """The sparse tree attention and the index loss as one autograd node, so that the
    backward's dK/dV kernel also gives the index keys' gradient: it forms the attention's
    probabilities of every (query tile, key tile) pair anyway, and their mean over the group's
    heads is the teacher. That replaces the index loss's own key-outer kernel (d ik), which
    formed the main scores once more. Forward: the attention, then the loss's first two
    kernels (the student's statistics; the loss and d iq), reading the attention's
    log-sum-exps. Returns (out, lse (natural log), loss)."""

    @staticmethod
    def forward(ctx, q, k, v, iq, ik, selected, se, pos, w, cfg, need_diq: bool):
        saved = tta.attention_forward(q, k, v, selected, se, pos, cfg)
        q, k, v, sel, se, pos = saved[:6]
        lse2 = saved[-1]
        iq, ik = iq.contiguous(), ik.contiguous()
        loss, diq, _, lse_s = _forward(q, k, iq, ik, sel, se, pos, w, cfg.block_size, cfg.dense_below, cfg.dense,
                                       cfg.scale, need_diq, False, main_lse_log2=lse2)
        ctx.save_for_backward(*saved, iq, ik, lse_s, w, diq)
        ctx.cfg = cfg
        lse = lse2 * _LN2.value
        ctx.mark_non_differentiable(lse)
        return saved[-2], lse, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse, dloss):
        *saved, iq, ik, lse_s, w, diq = ctx.saved_tensors
        di = iq.shape[3]
        index = tta.IndexGrad(iq, ik, lse_s, w, di**-0.5 * _LOG2E)
        dq, dk, dv, parts = tta.bwd(*saved, dout, ctx.cfg, index)
        # The d ik kernel's factor: d student logit = token_weight / Hkv * (student - teacher).
        dik = (parts.sum(1) * (dloss * (di**-0.5 / iq.shape[2]))).to(ik.dtype)
        diq = None if diq is None or not ctx.needs_input_grad[3] else (diq * dloss).to(iq.dtype)
        return dq, dk, dv, diq, dik, None, None, None, None, None, None


def msa_tree_attention_index_loss_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, selected: torch.Tensor,
    subtree_end: torch.Tensor, position: torch.Tensor, *, token_weight: torch.Tensor | None = None,
    block_size: int, dense_below: int = 0, dense: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`msa_tree_sparse_attention_triton(..., return_lse=True)` and `msa_tree_index_loss_triton`
    of the same inputs (the loss reading the attention's statistics) in one autograd node:
    (out, lse, loss), or None where the fused backward does not apply (no gradient wanted for
    ik, or query steps of fewer than 16 tokens: then call the two). Same results; the backward
    forms the main scores four times where the two separately form them five."""
    b, t, hq, d = q.shape
    cfg = tta.launch(block_size, dense_below, dense, scale, d)
    if (not FUSED_BACKWARD or t == 0 or not (torch.is_grad_enabled() and ik.requires_grad)
            or not tta.fused_index_grad(q, k, cfg)):
        return None
    _check(q, k, iq, ik, selected, subtree_end, position, token_weight, block_size)
    tta.check(q, k, v, selected, subtree_end, position, block_size)
    w = (torch.ones(b, t, device=q.device) if token_weight is None else token_weight).float().contiguous()
    return TreeAttentionIndexLossFunction.apply(q, k, v, iq, ik, selected, subtree_end, position, w, cfg,
                                                iq.requires_grad)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(q, k, iq, ik, selected, subtree_end, position, token_weight, block_size) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, Hq, D]; got shape {tuple(q.shape)}")
    b, t, hq, d = q.shape
    if k.dim() != 4 or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k must be [B, T, Hkv, D] = [{b}, {t}, Hkv, {d}] to match q; got {tuple(k.shape)}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if iq.dim() != 4 or iq.shape[:3] != (b, t, hkv):
        raise ValueError(f"iq must be [B, T, Hkv, Di] = [{b}, {t}, {hkv}, Di], one index head per KV group; "
                         f"got {tuple(iq.shape)}")
    if ik.shape != (b, t, iq.shape[3]):
        raise ValueError(f"ik must be [B, T, Di] = {(b, t, iq.shape[3])}, one index head shared by the groups; "
                         f"got {tuple(ik.shape)}")
    if selected.dim() != 4 or selected.shape[:3] != (b, t, hkv):
        raise ValueError(f"selected must be [B, T, Hkv, K] = [{b}, {t}, {hkv}, K] block ids (-1 empty); "
                         f"got {tuple(selected.shape)}")
    for name, x in (("subtree_end", subtree_end), ("position", position)):
        if x.shape != (b, t):
            raise ValueError(f"{name} must be [B, T] = {(b, t)}; got {tuple(x.shape)}")
    for name, x in (("selected", selected), ("subtree_end", subtree_end), ("position", position)):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor; got {x.dtype} (convert with .long())")
    if token_weight is not None and token_weight.shape != (b, t):
        raise ValueError(f"token_weight must be [B, T] = {(b, t)} or None; got {tuple(token_weight.shape)}")
    for name, x in (("q", q), ("k", k), ("iq", iq), ("ik", ik)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"the Triton kernels take fp32, bf16 or fp16 {name}; got {x.dtype} "
                             "(use forge.kernels.msa.tree.msa_tree for fp64)")
    if k.dtype != q.dtype or ik.dtype != iq.dtype:
        raise ValueError(f"q and k must share a dtype, and iq and ik; got q {q.dtype}, k {k.dtype}, "
                         f"iq {iq.dtype}, ik {ik.dtype} (cast them with .to())")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    devices = {x.device for x in (q, k, iq, ik, selected, subtree_end, position)}
    if token_weight is not None:
        devices.add(token_weight.device)
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def msa_tree_index_loss_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    iq: torch.Tensor,
    ik: torch.Tensor,
    selected: torch.Tensor,
    subtree_end: torch.Tensor,
    position: torch.Tensor,
    *,
    token_weight: torch.Tensor | None = None,
    block_size: int,
    dense_below: int = 0,
    dense: bool = False,
    scale: float | None = None,
    main_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MSA index-branch KL over a flattened prefix tree, through the Triton kernels: a fp32 scalar.

    q: [B, T, Hq, D], k: [B, T, Hkv, D] (one dtype), iq: [B, T, Hkv, Di], ik: [B, T, Di] (one
    dtype), each fp32, bf16 or fp16; selected: [B, T, Hkv, K] integer block ids (-1 empty, any
    order; a query's own block is kept whether listed or not); subtree_end, position: [B, T]
    integer (a causal row: subtree_end = T, position = arange(T)); token_weight: [B, T] float or
    None (1). Rows with position < dense_below, or all with dense=True, keep every key they see.
    Equals `tree.msa_tree(q, k, None, iq, ik, subtree_end, position, ..., selected=selected,
    with_attention=False, with_index_loss=True)[1]`. Differentiable in iq and ik; q and k get no
    gradient. See the module docstring for the kernels.

    main_lse: [B, Hq, T] fp32, each query head's log-sum-exp (natural log) of the scaled main
    scores over its kept keys, as `msa_tree_sparse_attention_triton(..., return_lse=True)` gives
    for the same inputs: the teacher's statistics are then read, not recomputed (the first
    kernel computes the student's alone).
    """
    _check(q, k, iq, ik, selected, subtree_end, position, token_weight, block_size)
    if main_lse is not None and (main_lse.shape != (q.shape[0], q.shape[2], q.shape[1])
                                 or main_lse.dtype != torch.float32 or main_lse.device != q.device):
        raise ValueError(f"main_lse must be fp32 [B, Hq, T] = {(q.shape[0], q.shape[2], q.shape[1])} on {q.device} "
                         f"(the sparse attention's return_lse); got {main_lse.dtype} {tuple(main_lse.shape)} "
                         f"on {main_lse.device}")
    b, t = q.shape[:2]
    if t == 0:
        return torch.zeros((), dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    w = (torch.ones(b, t, device=q.device) if token_weight is None else token_weight).float().contiguous()
    grad = torch.is_grad_enabled()
    return TreeIndexLossFunction.apply(
        q.detach().contiguous(), k.detach().contiguous(), iq.contiguous(), ik.contiguous(),
        selected.to(torch.int32).contiguous(), subtree_end.to(torch.int32).contiguous(),
        position.to(torch.int32).contiguous(), w, block_size, int(dense_below), bool(dense), scale,
        grad and iq.requires_grad, grad and ik.requires_grad, None if main_lse is None else main_lse.detach(),
    )
