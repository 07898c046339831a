"""Grouped GEMMs over expert-sorted rows for the MoE, forward and backward, in Triton.

Rows come from `triton_permute.plan_routes`: sorted by expert, each expert's segment padded to
a multiple of BLOCK_M, so each row tile belongs to one expert (`tile_expert`). Tiles past the
real count, marked with expert E, exit at once; padded rows (sorted_token -1) load as zeros and
are never stored. Products accumulate in float32; operands are the model's dtype.

- `moe_gate_up_fwd_kernel`: act = silu(x[tok] @ Wg[e]) * (x[tok] @ Wu[e]), gathering token rows
  straight from x (no permuted copy of x), both products sharing each loaded x tile; saves the
  pre-activations g and u when a backward will need them.
- `moe_grouped_mm_kernel`: C = A @ B[e] (+ A2 @ B2[e]) over padded rows, with B given by strides
  so that transposed weights need no copy. Used for y = act @ Wd (forward), for
  d_act = dy @ Wd^T with the SwiGLU backward in the epilogue (giving dg, du), and for
  dx_rows = dg @ Wg^T + du @ Wu^T.
- `moe_wgrad_kernel`: dW[e] = A[rows of e]^T @ B[rows of e] (+ a second B sharing A), one
  program per (expert, output tile), looping over the expert's rows.

Under Triton's interpreter `tl.dot` on bf16 is wrong, so IS_INTERPRET upcasts to fp32 first, and
stores round through `cast_out` (the interpreter truncates to bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge.kernels.moe.triton_permute import RoutePlan
from forge.kernels.moe.triton_common import cast_out, is_interpret
from forge.kernels.precision import dot_precision

# Default row tile of the grouped GEMMs; the route plan pads every expert's segment to it.
BLOCK_M = 16 if is_interpret() else 128


def _configs(gpu: list[dict], tiny: dict, small: dict) -> list[triton.Config]:
    """Autotune candidates. `small` fits fp32 tiles in shared memory: in fp32 every tuned
    config over-asks (seen on an H100: 294912 bytes wanted, 232448 there) and the autotuner
    skips those, so without it an fp32 call had nothing left to run. Autotune keys include
    the tensors' dtypes, so bf16 still picks among all of them."""
    if is_interpret():
        return [triton.Config(tiny, num_warps=4, num_stages=1)]
    return [triton.Config({k: v for k, v in c.items() if k not in ("w", "s")}, num_warps=c["w"], num_stages=c["s"])
            for c in [*gpu, small]]


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


@triton.autotune(
    configs=_configs(
        [dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3), dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
         dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4)],
        dict(BLOCK_N=16, BLOCK_K=16),
        dict(BLOCK_N=64, BLOCK_K=32, w=4, s=2),
    ),
    key=["N_OUT", "K", "BLOCK_M"],
)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def moe_gate_up_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, act_ptr, g_ptr, u_ptr, sorted_token_ptr, tile_expert_ptr,
    N_OUT, K, E, stride_xn, stride_we, stride_wk, stride_wn,
    SAVE_GU: tl.constexpr, IS_INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    # Output-column tiles vary fastest: the tiles of one expert run together and share its weights in L2.
    pid_m = pid // num_n
    pid_n = pid % num_n
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    tok = tl.load(sorted_token_ptr + rows)  # [BLOCK_M]
    valid = tok >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    nmask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = x_ptr + tl.where(valid, tok, 0).to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    bg_ptrs = wg_ptr + w_off
    bu_ptrs = wu_ptr + w_off
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            bg = tl.load(bg_ptrs, mask=nmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            bu = tl.load(bu_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = offs_k + k < K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(bg_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            bu = tl.load(bu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IS_INTERPRET:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K * stride_wk
        bu_ptrs += BLOCK_K * stride_wk
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # [BLOCK_M, BLOCK_N]
    out_off = rows.to(tl.int64)[:, None] * N_OUT + offs_n[None, :]
    out_mask = valid[:, None] & nmask[None, :]
    tl.store(act_ptr + out_off, cast_out(act, act_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)
    if SAVE_GU:
        tl.store(g_ptr + out_off, cast_out(acc_g, g_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)
        tl.store(u_ptr + out_off, cast_out(acc_u, u_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)


@triton.jit
def _mm_rows(acc, a_ptr, b_ptr, e, rows, valid, offs_n, nmask, K, stride_am, stride_be, stride_bk, stride_bn,
             IS_INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    """acc += A[rows, :K] @ B[e][:K, offs_n] for contiguous padded rows of A."""
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        else:
            kmask = offs_k + k < K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IS_INTERPRET:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(
    configs=_configs(
        [dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4), dict(BLOCK_N=256, BLOCK_K=64, w=8, s=3),
         dict(BLOCK_N=128, BLOCK_K=64, w=4, s=4)],
        dict(BLOCK_N=16, BLOCK_K=16),
        dict(BLOCK_N=64, BLOCK_K=32, w=4, s=2),
    ),
    key=["N_OUT", "K", "HAS_SECOND", "USE_SWIGLU_BWD", "BLOCK_M"],
)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def moe_grouped_mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, c2_ptr, g_ptr, u_ptr, sorted_token_ptr, tile_expert_ptr,
    N_OUT, K, E, stride_am, stride_be, stride_bk, stride_bn,
    HAS_SECOND: tl.constexpr, USE_SWIGLU_BWD: tl.constexpr, IS_INTERPRET: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    valid = tl.load(sorted_token_ptr + rows) >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    nmask = offs_n < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mm_rows(acc, a_ptr, b_ptr, e, rows, valid, offs_n, nmask, K, stride_am, stride_be, stride_bk,
                   stride_bn, IS_INTERPRET, EVEN_K, BLOCK_K, PRECISION)
    if HAS_SECOND:
        acc = _mm_rows(acc, a2_ptr, b2_ptr, e, rows, valid, offs_n, nmask, K, stride_am, stride_be, stride_bk,
                       stride_bn, IS_INTERPRET, EVEN_K, BLOCK_K, PRECISION)
    out_off = rows.to(tl.int64)[:, None] * N_OUT + offs_n[None, :]
    out_mask = valid[:, None] & nmask[None, :]
    if USE_SWIGLU_BWD:
        # acc is d(act); act = silu(g) * u, silu'(g) = sig(g) * (1 + g * (1 - sig(g))).
        g = tl.load(g_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = acc * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(c_ptr + out_off, cast_out(dg, c_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)
        tl.store(c2_ptr + out_off, cast_out(acc * g * sig, c2_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)
    else:
        tl.store(c_ptr + out_off, cast_out(acc, c_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)


@triton.autotune(
    configs=_configs(
        [dict(BLOCK_K=128, BLOCK_N=128, BLOCK_R=64, w=8, s=3), dict(BLOCK_K=128, BLOCK_N=128, BLOCK_R=32, w=8, s=4),
         dict(BLOCK_K=64, BLOCK_N=128, BLOCK_R=64, w=4, s=4), dict(BLOCK_K=128, BLOCK_N=128, BLOCK_R=128, w=8, s=2),
         dict(BLOCK_K=128, BLOCK_N=64, BLOCK_R=128, w=4, s=3)],
        # Twice the interpreter's row tile, so the tests step past segment ends.
        dict(BLOCK_K=16, BLOCK_N=16, BLOCK_R=32),
        dict(BLOCK_K=64, BLOCK_N=64, BLOCK_R=32, w=4, s=2),
    ),
    key=["K", "N_OUT", "GATHER_A", "HAS_SECOND", "BLOCK_M"],
)
@triton.jit
def moe_wgrad_kernel(
    a_ptr, b_ptr, b2_ptr, dw_ptr, dw2_ptr, sorted_token_ptr, seg_start_ptr, seg_tiles_ptr,
    K, N_OUT, stride_am, stride_bm,
    GATHER_A: tl.constexpr, HAS_SECOND: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dW[e][K, N_OUT] = A[rows of e, :K]^T @ B[rows of e, :N_OUT].
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_k = pid // num_n
    pid_n = pid % num_n
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    kmask = offs_k < K
    nmask = offs_n < N_OUT
    start = tl.load(seg_start_ptr + e)
    end = start + tl.load(seg_tiles_ptr + e) * BLOCK_M
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r in range(start, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        # A step may run past the segment when BLOCK_R does not divide its padded length.
        tok = tl.load(sorted_token_ptr + rows, mask=rows < end, other=-1)
        valid = tok >= 0
        if GATHER_A:
            a_rows = tl.where(valid, tok, 0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & kmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_bm + offs_n[None, :],
                    mask=valid[:, None] & nmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        if IS_INTERPRET:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if HAS_SECOND:
            b2 = tl.load(b2_ptr + rows.to(tl.int64)[:, None] * stride_bm + offs_n[None, :],
                         mask=valid[:, None] & nmask[None, :], other=0.0)
            if IS_INTERPRET:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(tl.trans(a), b2, acc2, input_precision=PRECISION)
    out_off = e * K * N_OUT + offs_k.to(tl.int64)[:, None] * N_OUT + offs_n[None, :]
    out_mask = kmask[:, None] & nmask[None, :]
    tl.store(dw_ptr + out_off, cast_out(acc, dw_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)
    if HAS_SECOND:
        tl.store(dw2_ptr + out_off, cast_out(acc2, dw2_ptr.dtype.element_ty, IS_INTERPRET), mask=out_mask)


def _grid_rows(plan: RoutePlan, n_out: int):
    return lambda meta: (plan.num_tiles_max * triton.cdiv(n_out, meta["BLOCK_N"]),)


def gate_up_fwd(x, w_gate, w_up, plan: RoutePlan, save_gu: bool):
    """act, g, u [P, F] (g, u None unless save_gu) for the padded rows of the plan."""
    rows = plan.sorted_token.shape[0]
    f = w_gate.shape[2]
    act = torch.empty(rows, f, device=x.device, dtype=x.dtype)
    g = torch.empty_like(act) if save_gu else act
    u = torch.empty_like(act) if save_gu else act
    moe_gate_up_fwd_kernel[_grid_rows(plan, f)](
        x, w_gate, w_up, act, g, u, plan.sorted_token, plan.tile_expert,
        f, x.shape[1], plan.num_experts, x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
        SAVE_GU=save_gu, IS_INTERPRET=is_interpret(), PRECISION=dot_precision(x.dtype), BLOCK_M=plan.block_m,
    )
    return act, (g if save_gu else None), (u if save_gu else None)


def grouped_mm(a, b, plan: RoutePlan, *, transpose_b: bool = False, second=None, swiglu=None):
    """C [P, n_out] = A @ B[e] per row tile, with B [E, K, n_out] (or [E, n_out, K] read
    transposed); `second=(a2, b2)` adds a2 @ b2[e]; `swiglu=(g, u)` turns C = d(act) into
    (dg, du) through the SwiGLU backward and returns the pair."""
    stride_be, stride_bk, stride_bn = b.stride(0), b.stride(1), b.stride(2)
    if transpose_b:
        stride_bk, stride_bn = stride_bn, stride_bk
    n_out = b.shape[1] if transpose_b else b.shape[2]
    k = a.shape[1]
    c = torch.empty(a.shape[0], n_out, device=a.device, dtype=a.dtype)
    c2 = torch.empty_like(c) if swiglu is not None else c
    a2, b2 = second if second is not None else (a, b)
    g, u = swiglu if swiglu is not None else (c, c)
    moe_grouped_mm_kernel[_grid_rows(plan, n_out)](
        a, b, a2, b2, c, c2, g, u, plan.sorted_token, plan.tile_expert,
        n_out, k, plan.num_experts, a.stride(0), stride_be, stride_bk, stride_bn,
        HAS_SECOND=second is not None, USE_SWIGLU_BWD=swiglu is not None, IS_INTERPRET=is_interpret(),
        PRECISION=dot_precision(a.dtype), BLOCK_M=plan.block_m,
    )
    return (c, c2) if swiglu is not None else c


def wgrad(a, b, plan: RoutePlan, out_dtype, *, gather_a: bool, b2=None):
    """dW [E, K, n_out] = A[rows of e]^T @ B[rows of e] (and the same with b2); A's rows are
    token rows gathered through the plan when gather_a, else padded rows like B's."""
    k, n_out = a.shape[1], b.shape[1]
    dw = torch.empty(plan.num_experts, k, n_out, device=a.device, dtype=out_dtype)
    dw2 = torch.empty_like(dw) if b2 is not None else dw

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n_out, meta["BLOCK_N"]), plan.num_experts)

    moe_wgrad_kernel[grid](
        a, b, b2 if b2 is not None else b, dw, dw2, plan.sorted_token, plan.seg_start, plan.seg_tiles,
        k, n_out, a.stride(0), b.stride(0),
        GATHER_A=gather_a, HAS_SECOND=b2 is not None, IS_INTERPRET=is_interpret(),
        PRECISION=dot_precision(a.dtype), BLOCK_M=plan.block_m,
    )
    return (dw, dw2) if b2 is not None else dw
