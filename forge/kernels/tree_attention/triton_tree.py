"""Flash-attention forward and backward under a prefix-tree mask, with GQA, in Triton.

The mask is never materialized: each kernel reads `subtree_end` (query q sees key k iff
k <= q < subtree_end[k]) for the key block in hand. Because a token's subtree is the contiguous
range [k, subtree_end[k]), the mask has block structure the kernels use:
- a key block whose largest `subtree_end` is <= the first query of the tile is invisible to
  the whole tile (a sibling branch) and is skipped after one small load;
- a key block that lies wholly before the tile and whose smallest `subtree_end` is past the
  tile's last query is fully visible (a shared prefix) and runs without per-element masking;
- the backward's key-centric loop walks query blocks only up to the block's largest
  `subtree_end`, since no query past it can see any of its keys.

Departures from FlashAttention-2: no dropout, no bias; the softmax statistics are kept in the
log2 domain; GQA is handled by reading the shared key/value head (forward, dQ) and by looping
the query heads of one group inside the dK/dV program so that no atomics are needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, offs_t, offs_d, stride_t, T, D):
    # [len(offs_t), BLOCK_D], zero outside the sequence and the head dimension.
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def tree_attention_fwd_kernel(
    Q, K, V, SE, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh,
    T, HQ, REP, D, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // REP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_kb + hk * stride_kh
    se_base = SE + b.to(tl.int64) * T
    q = _load_rows(q_base, offs_m, offs_d, stride_qt, T, D)  # [BLOCK_M, BLOCK_D]
    if IS_INTERPRET:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys after the tile's last query are never visible (k <= q).
    hi = tl.minimum(m0 + BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        se = tl.load(se_base + offs_n, mask=offs_n < T, other=0)  # [BLOCK_N]
        if tl.max(se, axis=0) > m0:
            k = _load_rows(k_base, offs_n, offs_d, stride_kt, T, D)  # [BLOCK_N, BLOCK_D]
            v = _load_rows(v_base, offs_n, offs_d, stride_kt, T, D)
            if IS_INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
            # Fully visible (shared prefix) blocks skip the per-element mask.
            partial = (n0 + BLOCK_N > m0 + 1) | (tl.min(se, axis=0) < m0 + BLOCK_M)
            if partial:
                vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :])
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen nothing yet keeps -inf; shift by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    # Every real query sees itself, so l_i > 0 there; padded rows are masked on store.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh
    o_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    # Log-sum-exp in the log2 domain of the scaled scores, [B, HQ, T].
    lse = m_i + tl.log2(l_safe)
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def tree_attention_bwd_dkdv_kernel(
    Q, K, V, SE, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, HKV, REP, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries that can see this block lie in [n0, max subtree_end): its keys' subtrees.
    lo = (n0 // BLOCK_M) * BLOCK_M
    for r in range(0, REP):
        h = hk * REP + r
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_qb + h * stride_qh
        row_base = (b * HQ + h).to(tl.int64) * T
        for m0 in range(lo, se_max, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, stride_qt, T, D)  # [BLOCK_M, BLOCK_D]
            do = _load_rows(do_base, offs_m, offs_d, stride_qt, T, D)
            if IS_INTERPRET:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=float("inf"))  # [BLOCK_M]
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
            p = tl.exp2(s - lse[:, None])
            partial = (n0 + BLOCK_N > m0 + 1) | (se_min < m0 + BLOCK_M)
            if partial:
                vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :])
                p = tl.where(vis, p, 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dk = dk * scale
    st_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    st_off = offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    tl.store(DK + k_off + st_off, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + k_off + st_off, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def tree_attention_bwd_dq_kernel(
    Q, K, V, SE, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, REP, D, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // REP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_kb + hk * stride_kh
    se_base = SE + b.to(tl.int64) * T
    q = _load_rows(Q + q_off, offs_m, offs_d, stride_qt, T, D)  # [BLOCK_M, BLOCK_D]
    do = _load_rows(DO + q_off, offs_m, offs_d, stride_qt, T, D)
    if IS_INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(m0 + BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        se = tl.load(se_base + offs_n, mask=offs_n < T, other=0)  # [BLOCK_N]
        if tl.max(se, axis=0) > m0:
            k = _load_rows(k_base, offs_n, offs_d, stride_kt, T, D)  # [BLOCK_N, BLOCK_D]
            v = _load_rows(v_base, offs_n, offs_d, stride_kt, T, D)
            if IS_INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
            p = tl.exp2(s - lse[:, None])
            # Fully visible (shared prefix) blocks skip the per-element mask.
            partial = (n0 + BLOCK_N > m0 + 1) | (tl.min(se, axis=0) < m0 + BLOCK_M)
            if partial:
                vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se[None, :])
                p = tl.where(vis, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    st_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    tl.store(DQ + q_off + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=st_mask)


_LOG2E = 1.4426950408889634
# Allocation of fresh outputs; tests swap in NaN-filled ones so an unwritten element fails.
_empty_like = torch.empty_like
_empty = torch.empty


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(d: int) -> dict[str, int]:
    """Tile sizes and launch settings; the interpreter gets the smallest legal tiles."""
    if _interpret():
        return {"fwd_m": 16, "fwd_n": 16, "bwd_m": 16, "bwd_n": 16, "warps": 4, "stages": 1}
    if d <= 64:
        return {"fwd_m": 128, "fwd_n": 64, "bwd_m": 64, "bwd_n": 64, "warps": 4, "stages": 3}
    return {"fwd_m": 128, "fwd_n": 64, "bwd_m": 64, "bwd_n": 64, "warps": 8, "stages": 2}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products, so fp32 training matches the reference to fp32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


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


def _fwd(q, k, v, se, scale):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    cfg = _blocks(d)
    o = _empty_like(q)
    lse = _empty(b, hq, t, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(t, cfg["fwd_m"]), b * hq)
    tree_attention_fwd_kernel[grid](
        q, k, v, se, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        t, hq, hq // hkv, d, scale * _LOG2E,
        BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], BLOCK_D=triton.next_power_of_2(max(d, 16)),
        IS_INTERPRET=_interpret(), PRECISION=_precision(q.dtype),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return o, lse


def _bwd(q, k, v, se, o, lse, do, scale):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    cfg = _blocks(d)
    do = do.contiguous()
    # delta_i = sum_d dO_i O_i, the softmax-backward row term, [B, HQ, T] in fp32.
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    common = dict(
        BLOCK_M=cfg["bwd_m"], BLOCK_N=cfg["bwd_n"], BLOCK_D=triton.next_power_of_2(max(d, 16)),
        IS_INTERPRET=_interpret(), PRECISION=_precision(q.dtype),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    tree_attention_bwd_dkdv_kernel[(triton.cdiv(t, cfg["bwd_n"]), b * hkv)](
        q, k, v, se, do, lse, delta, dk, dv, *strides,
        t, hq, hkv, hq // hkv, d, scale, scale * _LOG2E, **common,
    )
    tree_attention_bwd_dq_kernel[(triton.cdiv(t, cfg["bwd_m"]), b * hq)](
        q, k, v, se, do, lse, delta, dq, *strides,
        t, hq, hq // hkv, d, scale, scale * _LOG2E, **common,
    )
    return dq, dk, dv


class TreeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, subtree_end, scale):
        se = subtree_end.to(torch.int32).contiguous()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _fwd(q, k, v, se, scale)
        ctx.save_for_backward(q, k, v, se, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, se, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, se, o, lse, do, ctx.scale)
        return dq, dk, dv, None, None


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention through the Triton kernels, differentiable in q, k and v.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq a multiple of Hkv), fp16, bf16 or fp32;
    subtree_end: [B, T] integer, each entry in (index, T]. Returns [B, T, Hq, D] in q's dtype.
    Positions (RoPE) are the caller's: the kernel sees only flat order and `subtree_end`.
    """
    _check(q, k, v, subtree_end)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return TreeAttentionFunction.apply(q, k, v, subtree_end, float(scale))
