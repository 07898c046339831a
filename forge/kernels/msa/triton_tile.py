"""Triton sparse attention, tile-outer: prefill forward and dQ for selections that neighbouring queries share.

One program takes a tile of `TILE_QUERIES` consecutive queries and one query head, and runs
an online softmax over the union of the blocks the tile's queries kept for the head's KV
group. Per union block it loads K and V once for the whole tile, scores every row against
them, and masks the rows that did not keep the block (and, in a query's own block, the keys
after it). Each output row is written once: no partials, no combine, no atomics.

In the backward the same tiles compute dQ (`msa_attn_bwd_dq_tile_kernel`), each row written
once, and the KV-outer backward kernel computes dK and dV alone, without its dQ atomics.

The tile does `|union| * TILE_QUERIES * block_size` (query, key) pairs where its queries keep
`sum(kept slots) * block_size`. The two are equal when the tile's queries keep the same
blocks, as an index branch whose neighbouring queries agree gives, and far apart when
selections are scattered (random index inputs at top 16: 8x at 32K tokens, 86x at 1M), where the KV-outer
forward (`triton_attention`) does less work. `tile_work_ratio` measures the ratio on a sample
of tiles, and `sparse_attention_triton(order="auto")` picks the tile forward at or below
`TILE_WORK_LIMIT` (docs/msa.md gives the measurements behind it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from forge.kernels.msa.triton_attention import softmax_step
from forge.kernels.precision import dot_precision

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Queries per tile (rows of the tensor-core tiles): the union is taken over this many queries.
# The interpreter pays per element, so it runs the smallest tiles tl.dot takes.
TILE_QUERIES = 128
INTERPRET_TILE_QUERIES = 16
# Keys per inner step, warps and pipeline depth of the tile forward, from `benchmarks/msa.py
# --sweep ... --sweep-parts tile` on an H100.
TILE_FORWARD = dict(BLOCK_N=128, num_warps=8, num_stages=3)
# The same for the tile-outer dQ kernel of the backward (it holds dO and dQ tiles as well).
TILE_BACKWARD = dict(BLOCK_N=64, num_warps=8, num_stages=2)
# `order="auto"` takes the tile forward when a tile's (query, key) pairs are at most this many
# times the pairs its queries kept (1.0: every query of a tile keeps the same blocks). On an
# H100 the two forwards broke even near 2.6 (benchmarks/msa.py, noisy selections at 512K-1M).
TILE_WORK_LIMIT = 2.5
# Tiles (per batch row and group) sampled by tile_work_ratio.
RATIO_SAMPLE_TILES = 64


@triton.jit
def load_keys(
    K, V, b, g, keys, T, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    D: tl.constexpr, CAUSAL: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    """K and V rows `keys` of group g, [BLOCK_N, D] each; bounds-checked only where CAUSAL (a tile's own blocks)."""
    offs_d = tl.arange(0, D)
    kv_rows = keys[:, None].to(tl.int64)
    k_ptrs = K + b * stride_kb + kv_rows * stride_kt + g * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kv_rows * stride_vt + g * stride_vh + offs_d[None, :]
    if CAUSAL:
        k = tl.load(k_ptrs, mask=(keys < T)[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(keys < T)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if IS_INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def tile_block_step(
    q, K, V, b, g, blk, kept, rows, m_i, l_i, acc, qk_scale, T,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """The tile's online softmax over union block `blk`, for the rows that kept it (`kept [BLOCK_Q]`).

    CAUSAL: the block may hold keys after some rows (a tile's own blocks) or past T; else every
    row sees the whole block and only the kept mask applies.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
        keys = blk * BLOCK_SIZE + n0 + offs_n  # [BLOCK_N]
        k, v = load_keys(K, V, b, g, keys, T, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         D=D, CAUSAL=CAUSAL, IS_INTERPRET=IS_INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_Q, BLOCK_N]
        if CAUSAL:
            s = tl.where(kept[:, None] & (keys[None, :] <= rows[:, None]), s, float("-inf"))
        else:
            s = tl.where(kept[:, None], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PRECISION)
    return m_i, l_i, acc


@triton.jit
def tile_program(
    Q, SEL, UPTR, UMID, T, NT, stride_qb, stride_qt, stride_qh, stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, TOPK: tl.constexpr,
    KP: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    """This program's tile and head: its rows, their queries and kept blocks, its union's range.

    Heads vary fastest in the launch order, so the REP programs of a group, which read the same
    K and V, run side by side and share them in L2.
    """
    h = tl.program_id(0)
    tile = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // REP
    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_ok = rows < T
    t64 = rows.to(tl.int64)
    offs_d = tl.arange(0, D)
    slot = tl.arange(0, KP)
    q = tl.load(Q + b * stride_qb + t64[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)  # [BLOCK_Q, D]
    if IS_INTERPRET:
        q = q.to(tl.float32)
    # Every row's kept blocks: a union block is tested against them with one compare.
    sel = tl.load(SEL + b * stride_sb + t64[:, None] * stride_st + g * stride_sh + slot[None, :],
                  mask=r_ok[:, None] & (slot[None, :] < TOPK), other=-1)  # [BLOCK_Q, KP]
    u = (b * NT + tile) * HKV + g
    return b, h, g, rows, r_ok, t64, q, sel, tl.load(UPTR + u), tl.load(UMID + u), tl.load(UPTR + u + 1)


@triton.jit(do_not_specialize=["T", "NT"])
def msa_attn_fwd_tile_kernel(
    Q, K, V, SEL, UPTR, UMID, UBLK, O, LSE, scale, T, NT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_sb, stride_st, stride_sh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, g, rows, r_ok, t64, q, sel, u0, u_mid, u1 = tile_program(
        Q, SEL, UPTR, UMID, T, NT, stride_qb, stride_qt, stride_qh, stride_sb, stride_st, stride_sh,
        HKV=HKV, REP=REP, D=D, BLOCK_Q=BLOCK_Q, TOPK=TOPK, KP=KP, IS_INTERPRET=IS_INTERPRET)
    offs_d = tl.arange(0, D)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    # Union blocks ascend: those before the tile's first own block are whole and visible to
    # every row, so they need no causal mask; the rest (the tile's own blocks) do.
    for i in range(u0, u_mid):
        blk = tl.load(UBLK + i)
        kept = tl.max(tl.where(sel == blk, 1, 0), 1) > 0  # [BLOCK_Q]
        m_i, l_i, acc = tile_block_step(
            q, K, V, b, g, blk, kept, rows, m_i, l_i, acc, qk_scale, T,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            D=D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False, IS_INTERPRET=IS_INTERPRET,
            PRECISION=PRECISION)
    for i in range(u_mid, u1):
        blk = tl.load(UBLK + i)
        kept = tl.max(tl.where(sel == blk, 1, 0), 1) > 0
        m_i, l_i, acc = tile_block_step(
            q, K, V, b, g, blk, kept, rows, m_i, l_i, acc, qk_scale, T,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            D=D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=True, IS_INTERPRET=IS_INTERPRET,
            PRECISION=PRECISION)
    # Every real row kept its own block, so it saw at least its own key; padding rows saw none.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + t64[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=r_ok[:, None])
    tl.store(LSE + b * stride_lb + t64 * stride_lt + h, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,
             mask=r_ok)


@triton.jit
def tile_dq_step(
    q, do, lse2, delta, K, V, b, g, blk, kept, rows, dq, qk_scale, T,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    """The tile's dQ share from union block `blk` (unscaled: sum of dS @ K), rows that kept it only."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
        keys = blk * BLOCK_SIZE + n0 + offs_n  # [BLOCK_N]
        k, v = load_keys(K, V, b, g, keys, T, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         D=D, CAUSAL=CAUSAL, IS_INTERPRET=IS_INTERPRET)
        if CAUSAL:
            ok = kept[:, None] & (keys[None, :] <= rows[:, None])
        else:
            ok = kept[:, None]
        p = tl.where(ok, tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_Q, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["T", "NT"])
def msa_attn_bwd_dq_tile_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEL, UPTR, UMID, UBLK, scale, T, NT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lt,
    stride_sb, stride_st, stride_sh,
    stride_dqb, stride_dqt, stride_dqh,
    HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # dQ of a (tile, head) over the forward's unions, each row written once, in DQ's dtype.
    b, h, g, rows, r_ok, t64, q, sel, u0, u_mid, u1 = tile_program(
        Q, SEL, UPTR, UMID, T, NT, stride_qb, stride_qt, stride_qh, stride_sb, stride_st, stride_sh,
        HKV=HKV, REP=REP, D=D, BLOCK_Q=BLOCK_Q, TOPK=TOPK, KP=KP, IS_INTERPRET=IS_INTERPRET)
    offs_d = tl.arange(0, D)
    do = tl.load(DO + b * stride_dob + t64[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=r_ok[:, None], other=0.0)
    if IS_INTERPRET:
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + b * stride_lb + t64 * stride_lt + h, mask=r_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * stride_lb + t64 * stride_lt + h, mask=r_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_Q, D], tl.float32)
    for i in range(u0, u_mid):
        blk = tl.load(UBLK + i)
        kept = tl.max(tl.where(sel == blk, 1, 0), 1) > 0
        dq = tile_dq_step(
            q, do, lse2, delta, K, V, b, g, blk, kept, rows, dq, qk_scale, T,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            D=D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False, IS_INTERPRET=IS_INTERPRET,
            PRECISION=PRECISION)
    for i in range(u_mid, u1):
        blk = tl.load(UBLK + i)
        kept = tl.max(tl.where(sel == blk, 1, 0), 1) > 0
        dq = tile_dq_step(
            q, do, lse2, delta, K, V, b, g, blk, kept, rows, dq, qk_scale, T,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            D=D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=True, IS_INTERPRET=IS_INTERPRET,
            PRECISION=PRECISION)
    tl.store(DQ + b * stride_dqb + t64[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=r_ok[:, None])


def _tiles(selected: torch.Tensor, tile: int) -> torch.Tensor:
    """`selected [B, T, Hkv, top_k]` as [B, n_tiles, Hkv, tile * top_k], padded with -1."""
    b, t, hkv, top_k = selected.shape
    nt = triton.cdiv(t, tile)
    if nt * tile != t:
        selected = F.pad(selected, (0, 0, 0, 0, 0, nt * tile - t), value=-1)
    return selected.view(b, nt, tile, hkv, top_k).permute(0, 1, 3, 2, 4).reshape(b, nt, hkv, tile * top_k)


def _distinct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x sorted, and a mask of each row's first occurrence of every block (>= 0)."""
    x = x.sort(dim=-1).values
    first = x >= 0
    first[..., 1:] &= x[..., 1:] != x[..., :-1]
    return x, first


def tile_work_ratio(selected: torch.Tensor, tile: int | None = None, samples: int = RATIO_SAMPLE_TILES) -> float:
    """(query, key) pairs the tile forward computes over the pairs kept, on evenly spaced tiles.

    Counted in blocks: a tile computes `|union| * tile` (query, block) pairs and its queries
    kept their non-empty slots. 1.0 when every query of each tile keeps the same blocks.
    """
    tile = tile_queries() if tile is None else tile
    x = _tiles(selected, tile)
    nt = x.shape[1]
    if nt > samples:
        x = x[:, torch.linspace(0, nt - 1, samples, device=x.device).long()]
    kept = (x >= 0).sum()
    x, first = _distinct(x)
    return float(first.sum()) * tile / max(float(kept), 1.0)


def tile_unions(selected: torch.Tensor, tile: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (batch, tile, group), the blocks any of the tile's queries kept, ascending.

    Returns (ptr [B * n_tiles * Hkv + 1] int32, mid [B * n_tiles * Hkv] int32, blocks [n] int32):
    row u's blocks are blocks[ptr[u]:ptr[u + 1]], with u = (b * n_tiles + tile) * Hkv + g, and
    those from mid[u] on are at or after the tile's first own block (they need a causal mask).
    """
    x, first = _distinct(_tiles(selected, tile))
    if first.sum() >= 2**31:
        raise ValueError("more than 2^31 union blocks: the tile forward indexes them with int32; split the batch")
    counts = first.sum(-1).flatten()
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=selected.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    own_first = (torch.arange(x.shape[1], device=x.device) * tile // block_size).view(1, -1, 1, 1)
    mid = ptr[:-1] + (first & (x < own_first)).sum(-1).flatten().to(torch.int32)
    return ptr, mid, x[first].to(torch.int32).contiguous()


def tile_queries() -> int:
    return INTERPRET_TILE_QUERIES if IS_INTERPRET else TILE_QUERIES


def msa_attention_fwd_tile(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, *, block_size: int, scale: float,
    unions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-outer prefill forward: out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] fp32 (natural log).

    k, v: [B, T, Hkv, D]; selected [B, T, Hkv, top_k] int32 (-1 = empty slot), contiguous;
    `unions`: tile_unions(selected, tile_queries(), block_size), if already made.
    """
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], selected.shape[-1]
    tile = tile_queries()
    nt = triton.cdiv(t, tile)
    ptr, mid, blocks = tile_unions(selected, tile, block_size) if unions is None else unions
    out = torch.empty_like(q)
    lse = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    cfg = dict(TILE_FORWARD)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size, 16 if IS_INTERPRET else block_size)
    msa_attn_fwd_tile_kernel[(hq, nt, b)](
        q, k, v, selected, ptr, mid, blocks, out, lse, scale, t, nt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        selected.stride(0), selected.stride(1), selected.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HKV=hkv, REP=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_Q=tile, TOPK=top_k,
        KP=triton.next_power_of_2(top_k), IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out, lse


def msa_attention_dq_tile(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    dq: torch.Tensor, selected: torch.Tensor, ptr: torch.Tensor, mid: torch.Tensor, blocks: torch.Tensor, *,
    block_size: int, scale: float,
) -> None:
    """Write dQ ([B, T, Hq, D], any float dtype) tile-outer over the forward's unions; dout's last dim contiguous."""
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], selected.shape[-1]
    tile = tile_queries()
    nt = triton.cdiv(t, tile)
    cfg = dict(TILE_BACKWARD)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size, 16 if IS_INTERPRET else block_size)
    msa_attn_bwd_dq_tile_kernel[(hq, nt, b)](
        q, k, v, dout, lse, delta, dq, selected, ptr, mid, blocks, scale, t, nt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        selected.stride(0), selected.stride(1), selected.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        HKV=hkv, REP=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_Q=tile, TOPK=top_k,
        KP=triton.next_power_of_2(top_k), IS_INTERPRET=IS_INTERPRET, PRECISION=dot_precision(q.dtype), **cfg,
    )
