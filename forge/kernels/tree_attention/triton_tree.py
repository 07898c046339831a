"""Flash-attention forward and backward under a prefix-tree mask, with GQA, in Triton.

The mask is never materialized. Query q sees key k iff k <= q < subtree_end[k], and a token's
subtree is the contiguous range [k, subtree_end[k]), so the mask has block structure:
- a key block whose largest `subtree_end` is <= the first query of a tile, or that starts
  after the tile's last query, is invisible to the whole tile (a sibling branch): skipped;
- a key block that lies wholly before the tile and whose smallest `subtree_end` is past the
  tile's last query is fully visible (a shared prefix): no per-element mask;
- every other block is partial: the kernel reads `subtree_end` of its keys and masks.
The forward and dQ kernels walk, per query tile, a list of full blocks, then a list of
partial ones. The dK/dV kernel walks, per key block, the query tiles in [block start, largest
`subtree_end`): a partial run, a full run up to the smallest `subtree_end`, a partial tail.

Departures from FlashAttention-2: no dropout, no bias; softmax statistics in the log2 domain;
GQA by reading the shared key/value head (forward, dQ) and by looping the query heads of a
group inside the dK/dV program, so no atomics. With `pack_gqa` a program's rows are the tokens
of all query heads of one K/V head (BLOCK_M // group tokens each), so a K/V tile is loaded once
per group in the forward and dQ, and the dK/dV steps hold every head of the group at once. Departure from the first version of this file:
the full/partial/skip test per (tile, block) ran inside the loop, one branch per key block; the
branch kept Triton from pipelining the loads and made the kernel 2.4x slower than
FlexAttention on an H100 (docs/benchmarks.md), so the classification now runs as a pre-pass
over block maxima and minima of `subtree_end` (the same test) that writes the two lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from forge.kernels.precision import dot_precision


@triton.jit
def _load_rows(ptr, offs_t, offs_d, stride_t, T, D):
    # [len(offs_t), BLOCK_D], zero outside the sequence and the head dimension.
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_heads(ptr, offs_t, heads, offs_d, stride_t, stride_h, T, D):
    # [len(offs_t), BLOCK_D]: row i is token offs_t[i] of head heads[i]; zero outside T and D.
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    off = offs_t[:, None].to(tl.int64) * stride_t + heads[:, None] * stride_h + offs_d[None, :]
    return tl.load(ptr + off, mask=mask, other=0.0)


@triton.jit
def _tree_visible(offs_m, offs_n, se):
    # [BLOCK_M, BLOCK_N]: k <= q < subtree_end[k]; out-of-range keys carry subtree_end 0.
    return (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :])


@triton.jit
def _fwd_step(q, k_base, v_base, se_base, n0, offs_m, offs_d, m_i, l_i, acc, stride_kt, T, D, scale_log2,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, stride_kt, T, D)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(v_base, offs_n, offs_d, stride_kt, T, D)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        se = tl.load(se_base + offs_n, mask=offs_n < T, other=0)  # [BLOCK_N]
        s = tl.where(_tree_visible(offs_m, offs_n, se), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen nothing yet keeps -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["T", "NUM_M", "WIDTH"])
def tree_attention_fwd_kernel(
    Q, K, V, SE, O, LSE, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh,
    T, HQ, REP, D, NUM_M, WIDTH, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr, PACK: tl.constexpr,
):
    # A program owns BLOCK_M rows: BLOCK_M // PACK tokens of PACK query heads that share one
    # key/value head (PACK > 1 loads each K/V tile once for the whole group).
    TOK: tl.constexpr = BLOCK_M // PACK
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // (HQ // PACK)
    g = pid_bg % (HQ // PACK)
    hk = (g * PACK) // REP
    rows = tl.arange(0, BLOCK_M)
    heads = g * PACK + rows // TOK  # [BLOCK_M]
    offs_m = pid_m * TOK + rows % TOK  # [BLOCK_M] the token of each row
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_kb + hk * stride_kh
    se_base = SE + b.to(tl.int64) * T
    q = _load_heads(Q + b.to(tl.int64) * stride_qb, offs_m, heads, offs_d, stride_qt, stride_qh, T, D)
    if IS_INTERPRET:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b.to(tl.int64) * NUM_M + pid_m
    n_full = tl.load(FULL_CNT + row)
    for j in range(0, n_full):
        n0 = tl.load(FULL_IDX + row * WIDTH + j) * BLOCK_N
        m_i, l_i, acc = _fwd_step(q, k_base, v_base, se_base, n0, offs_m, offs_d, m_i, l_i, acc, stride_kt, T, D,
                                  scale_log2, BLOCK_N, False, IS_INTERPRET, PRECISION)
    n_part = tl.load(PART_CNT + row)
    for j in range(0, n_part):
        n0 = tl.load(PART_IDX + row * WIDTH + j) * BLOCK_N
        m_i, l_i, acc = _fwd_step(q, k_base, v_base, se_base, n0, offs_m, offs_d, m_i, l_i, acc, stride_kt, T, D,
                                  scale_log2, BLOCK_N, True, IS_INTERPRET, PRECISION)
    # Every real query sees itself, so l_i > 0 there; padded rows are masked on store.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptr = O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
    o_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    # Log-sum-exp in the log2 domain of the scaled scores, [B, HQ, T].
    tl.store(LSE + (b * HQ + heads).to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=offs_m < T)


@triton.jit
def _dkdv_step(q_base, do_base, lse_base, delta_base, h0, m0, k, v, se, offs_n, offs_d, dk, dv, stride_qt,
               stride_qh, T, D, scale_log2, BLOCK_M: tl.constexpr, PACK: tl.constexpr, MASKED: tl.constexpr,
               IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # BLOCK_M rows: BLOCK_M // PACK tokens from m0 of the query heads h0 .. h0 + PACK - 1.
    TOK: tl.constexpr = BLOCK_M // PACK
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows % TOK  # [BLOCK_M]
    heads = h0 + rows // TOK
    q = _load_heads(q_base, offs_m, heads, offs_d, stride_qt, stride_qh, T, D)  # [BLOCK_M, BLOCK_D]
    do = _load_heads(do_base, offs_m, heads, offs_d, stride_qt, stride_qh, T, D)
    if IS_INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_t = heads.to(tl.int64) * T + offs_m
    lse = tl.load(lse_base + row_t, mask=offs_m < T, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(delta_base + row_t, mask=offs_m < T, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(_tree_visible(offs_m, offs_n, se), p, 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["T"])
def tree_attention_bwd_dkdv_kernel(
    Q, K, V, SE, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, HKV, REP, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr, PACK: tl.constexpr,
):
    # Query steps of TOK tokens; with PACK > 1 a step holds PACK query heads of the group.
    TOK: tl.constexpr = BLOCK_M // PACK
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_off = b.to(tl.int64) * stride_kb + hk * stride_kh
    k = _load_rows(K + k_off, offs_n, offs_d, stride_kt, T, D)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(V + k_off, offs_n, offs_d, stride_kt, T, D)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    se = tl.load(SE + b.to(tl.int64) * T + offs_n, mask=offs_n < T, other=0)  # [BLOCK_N]
    se_max = tl.max(se, axis=0)
    se_min = tl.min(se, axis=0)
    # Queries that see this block lie in [n0, se_max): the union of its keys' subtrees. Steps
    # from the first one wholly at or after the block's last key up to se_min see all of it.
    lo = (n0 // TOK) * TOK
    hi = tl.cdiv(se_max, TOK) * TOK
    full_lo = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, TOK) * TOK, hi)
    full_hi = tl.maximum(full_lo, tl.minimum((se_min // TOK) * TOK, hi))
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b.to(tl.int64) * stride_qb
    do_base = DO + b.to(tl.int64) * stride_qb
    lse_base = LSE + (b * HQ).to(tl.int64) * T
    delta_base = DELTA + (b * HQ).to(tl.int64) * T
    for r in range(0, REP // PACK):
        h0 = hk * REP + r * PACK
        for m0 in range(lo, full_lo, TOK):
            dk, dv = _dkdv_step(q_base, do_base, lse_base, delta_base, h0, m0, k, v, se, offs_n, offs_d, dk, dv,
                                stride_qt, stride_qh, T, D, scale_log2, BLOCK_M, PACK, True, IS_INTERPRET,
                                PRECISION)
        for m0 in range(full_lo, full_hi, TOK):
            dk, dv = _dkdv_step(q_base, do_base, lse_base, delta_base, h0, m0, k, v, se, offs_n, offs_d, dk, dv,
                                stride_qt, stride_qh, T, D, scale_log2, BLOCK_M, PACK, False, IS_INTERPRET,
                                PRECISION)
        for m0 in range(full_hi, hi, TOK):
            dk, dv = _dkdv_step(q_base, do_base, lse_base, delta_base, h0, m0, k, v, se, offs_n, offs_d, dk, dv,
                                stride_qt, stride_qh, T, D, scale_log2, BLOCK_M, PACK, True, IS_INTERPRET,
                                PRECISION)
    dk = dk * scale
    st_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    st_off = offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    tl.store(DK + k_off + st_off, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + k_off + st_off, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_step(q, do, lse, delta, k_base, v_base, se_base, n0, offs_m, offs_d, dq, stride_kt, T, D, scale_log2,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, stride_kt, T, D)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(v_base, offs_n, offs_d, stride_kt, T, D)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        se = tl.load(se_base + offs_n, mask=offs_n < T, other=0)  # [BLOCK_N]
        p = tl.where(_tree_visible(offs_m, offs_n, se), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit(do_not_specialize=["T", "NUM_M", "WIDTH"])
def tree_attention_bwd_dq_kernel(
    Q, K, V, SE, DO, LSE, DELTA, DQ, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, REP, D, NUM_M, WIDTH, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr, PACK: tl.constexpr,
):
    # Rows as in the forward: BLOCK_M // PACK tokens of PACK query heads of one K/V head.
    TOK: tl.constexpr = BLOCK_M // PACK
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // (HQ // PACK)
    g = pid_bg % (HQ // PACK)
    hk = (g * PACK) // REP
    rows = tl.arange(0, BLOCK_M)
    heads = g * PACK + rows // TOK  # [BLOCK_M]
    offs_m = pid_m * TOK + rows % TOK  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)
    q_base = b.to(tl.int64) * stride_qb
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_kb + hk * stride_kh
    se_base = SE + b.to(tl.int64) * T
    q = _load_heads(Q + q_base, offs_m, heads, offs_d, stride_qt, stride_qh, T, D)  # [BLOCK_M, BLOCK_D]
    do = _load_heads(DO + q_base, offs_m, heads, offs_d, stride_qt, stride_qh, T, D)
    if IS_INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_t = (b * HQ + heads).to(tl.int64) * T + offs_m  # [BLOCK_M] index into [B, HQ, T]
    lse = tl.load(LSE + row_t, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + row_t, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b.to(tl.int64) * NUM_M + pid_m
    n_full = tl.load(FULL_CNT + row)
    for j in range(0, n_full):
        n0 = tl.load(FULL_IDX + row * WIDTH + j) * BLOCK_N
        dq = _dq_step(q, do, lse, delta, k_base, v_base, se_base, n0, offs_m, offs_d, dq, stride_kt, T, D,
                      scale_log2, BLOCK_N, False, IS_INTERPRET, PRECISION)
    n_part = tl.load(PART_CNT + row)
    for j in range(0, n_part):
        n0 = tl.load(PART_IDX + row * WIDTH + j) * BLOCK_N
        dq = _dq_step(q, do, lse, delta, k_base, v_base, se_base, n0, offs_m, offs_d, dq, stride_kt, T, D,
                      scale_log2, BLOCK_N, True, IS_INTERPRET, PRECISION)
    dq = dq * scale
    st_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    dq_off = q_base + offs_m[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=st_mask)


_LOG2E = 1.4426950408889634
# Allocation of fresh outputs; tests swap in NaN-filled ones so an unwritten element fails.
_empty_like = torch.empty_like
_empty = torch.empty


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TreeAttentionBlocks:
    """Tile sizes and launch settings of the kernels."""

    fwd_m: int = 64
    """Query rows per forward program."""
    fwd_n: int = 64
    """Keys per inner step of the forward."""
    bwd_m: int = 64
    """Query rows per step of the backward (dQ programs own this many rows)."""
    bwd_n: int = 64
    """Keys per dK/dV program and per inner step of dQ."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 3
    """Software-pipelining depth of the inner loops."""
    pack_gqa: bool = False
    """Forward and dQ programs take the tokens of all query heads of a K/V head at once
    (fwd_m // group tokens per program), so each K/V tile is loaded once per group; dK/dV
    steps hold bwd_m // group tokens of every head of the group."""

    def pack(self, rep: int) -> int:
        """Query heads per program: the GQA group when packing applies, else 1."""
        ok = self.pack_gqa and rep & (rep - 1) == 0 and self.fwd_m % rep == 0 and self.bwd_m % rep == 0
        return rep if ok else 1


def default_blocks(d: int) -> TreeAttentionBlocks:
    """Defaults by head size; the interpreter gets the smallest legal tiles."""
    if _interpret():
        return TreeAttentionBlocks(16, 16, 16, 16, 4, 1)
    # Best of a sweep on an H100 at D=128 with the in-loop-branch version (docs/benchmarks.md).
    return TreeAttentionBlocks(64, 64, 64, 64, 4, 3)


@dataclass
class BlockLists:
    """Per query tile, the key blocks it sees fully and partly (skipped blocks are in neither)."""

    full_idx: torch.Tensor
    """[B, NUM_M, WIDTH] int32 key-block indices, fully visible first, in key order."""
    full_cnt: torch.Tensor
    """[B, NUM_M] int32, how many entries of full_idx are used."""
    part_idx: torch.Tensor
    """[B, NUM_M, WIDTH] int32 key-block indices that need the per-element mask."""
    part_cnt: torch.Tensor
    """[B, NUM_M] int32."""


def block_lists(se: torch.Tensor, block_m: int, block_n: int) -> BlockLists:
    """Classify every (query tile, key block) pair from block maxima and minima of subtree_end.

    Skipped: the block starts after the tile's last query, or its largest subtree_end is <= the
    tile's first query. Full: the block ends at or before the tile's first query and its
    smallest subtree_end is past the tile's last row. Partial: the rest.
    """
    b, t = se.shape
    num_m, num_n = triton.cdiv(t, block_m), triton.cdiv(t, block_n)
    # Padded keys get subtree_end 0: never visible, and a block holding one is never full.
    blocks = torch.nn.functional.pad(se, (0, num_n * block_n - t)).view(b, num_n, block_n)
    bmax, bmin = blocks.amax(-1)[:, None, :], blocks.amin(-1)[:, None, :]  # [B, 1, NUM_N]
    m0 = torch.arange(num_m, device=se.device)[:, None] * block_m  # [NUM_M, 1]
    m_last = (m0 + block_m).clamp(max=t) - 1
    n0 = torch.arange(num_n, device=se.device)[None, :] * block_n  # [1, NUM_N]
    visible = (n0 <= m_last) & (bmax > m0)  # [B, NUM_M, NUM_N]
    full = (n0 + block_n - 1 <= m0) & (bmin >= m0 + block_m)
    part = visible & ~full
    full_cnt, part_cnt = full.sum(-1, dtype=torch.int32), part.sum(-1, dtype=torch.int32)
    width = max(int(torch.maximum(full_cnt, part_cnt).max()), 1)

    def compact(mask: torch.Tensor) -> torch.Tensor:
        # A stable sort on "not in the list" puts the listed block indices first, in order.
        return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width].to(torch.int32).contiguous()

    return BlockLists(compact(full), full_cnt.contiguous(), compact(part), part_cnt.contiguous())


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, subtree_end: torch.Tensor) -> None:
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, T, Hkv, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")
    if subtree_end.shape != (b, t):
        raise ValueError(f"subtree_end must be [B, T] = {(b, t)}; got {tuple(subtree_end.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32; got {q.dtype} (use tree_attention_naive)")


def _fwd(q, k, v, se, scale, cfg: TreeAttentionBlocks, lists: BlockLists):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    o = _empty_like(q)
    lse = _empty(b, hq, t, device=q.device, dtype=torch.float32)
    pack = cfg.pack(hq // hkv)
    grid = (triton.cdiv(t, cfg.fwd_m // pack), b * hq // pack)
    tree_attention_fwd_kernel[grid](
        q, k, v, se, o, lse, lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        t, hq, hq // hkv, d, grid[0], lists.full_idx.shape[-1], scale * _LOG2E,
        BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=triton.next_power_of_2(max(d, 16)),
        IS_INTERPRET=_interpret(), PRECISION=dot_precision(q.dtype), PACK=pack,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def _bwd(q, k, v, se, o, lse, do, scale, cfg: TreeAttentionBlocks, lists: BlockLists):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    do = do.contiguous()
    # delta_i = sum_d dO_i O_i, the softmax-backward row term, [B, HQ, T] in fp32.
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    common = dict(
        BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, BLOCK_D=triton.next_power_of_2(max(d, 16)),
        IS_INTERPRET=_interpret(), PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    pack = cfg.pack(hq // hkv)
    tree_attention_bwd_dkdv_kernel[(triton.cdiv(t, cfg.bwd_n), b * hkv)](
        q, k, v, se, do, lse, delta, dk, dv, *strides,
        t, hq, hkv, hq // hkv, d, scale, scale * _LOG2E, PACK=pack, **common,
    )
    num_m = triton.cdiv(t, cfg.bwd_m // pack)
    tree_attention_bwd_dq_kernel[(num_m, b * hq // pack)](
        q, k, v, se, do, lse, delta, dq, lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt,
        *strides, t, hq, hq // hkv, d, num_m, lists.full_idx.shape[-1], scale, scale * _LOG2E, PACK=pack, **common,
    )
    return dq, dk, dv


class TreeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, subtree_end, scale, blocks):
        se = subtree_end.to(torch.int32).contiguous()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        pack = blocks.pack(q.shape[2] // k.shape[2])
        lists = block_lists(se, blocks.fwd_m // pack, blocks.fwd_n)
        o, lse = _fwd(q, k, v, se, scale, blocks, lists)
        ctx.save_for_backward(q, k, v, se, o, lse)
        ctx.scale, ctx.blocks = scale, blocks
        # The dQ kernel walks the same lists when its tiles match the forward's.
        ctx.lists = lists if (blocks.bwd_m, blocks.bwd_n) == (blocks.fwd_m, blocks.fwd_n) else None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, se, o, lse = ctx.saved_tensors
        blocks = ctx.blocks
        pack = blocks.pack(q.shape[2] // k.shape[2])
        lists = ctx.lists or block_lists(se, blocks.bwd_m // pack, blocks.bwd_n)
        dq, dk, dv = _bwd(q, k, v, se, o, lse, do, ctx.scale, blocks, lists)
        return dq, dk, dv, None, None, None


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
    blocks: TreeAttentionBlocks | None = None,
) -> torch.Tensor:
    """Tree attention through the Triton kernels, differentiable in q, k and v.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq a multiple of Hkv), fp16, bf16 or fp32;
    subtree_end: [B, T] integer, each entry in (index, T]. Returns [B, T, Hq, D] in q's dtype.
    Positions (RoPE) are the caller's: the kernel sees only flat order and `subtree_end`.
    `blocks` overrides the tile sizes (benchmarks sweep them); default by head size.
    """
    _check(q, k, v, subtree_end)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    blocks = blocks or default_blocks(q.shape[-1])
    return TreeAttentionFunction.apply(q, k, v, subtree_end, float(scale), blocks)
