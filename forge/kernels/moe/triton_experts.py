"""The MoE expert layer on Triton kernels: permute, grouped SwiGLU GEMMs, return, and backward.

Forward: plan the expert-sorted layout (`plan_routes`), act = SwiGLU over tokens gathered from
x (`gate_up_fwd`), y = act @ Wd (`grouped_mm`), then out[n] = sum_j w[n, j] y[pos[n, j]] as the
rows return (`combine`). Backward, all on the saved sorted rows: dy and d(weights) from the
return; dWd = act^T dy; (dg, du) = SwiGLU' of dy @ Wd^T; dx_rows = dg Wg^T + du Wu^T summed back
per token; dWg, dWu = x^T (dg, du). Every step runs on the device without host synchronisation.

Departure from `naive.moe_experts_naive`: the SwiGLU is computed in float32 from the float32
accumulators and rounded once, where the reference rounds g, u and silu(g) to the input dtype
first; in bf16 the two differ by bf16 rounding, which the tests' tolerances allow.
"""

from __future__ import annotations

import torch

from forge.kernels.moe.triton_grouped_gemm import BLOCK_M, gate_up_fwd, grouped_mm, wgrad
from forge.kernels.moe.triton_permute import RoutePlan, combine, combine_bwd, gather_sum, plan_routes


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, experts, w_gate, w_up, w_down, block_m):
        plan = plan_routes(experts, w_gate.shape[0], block_m)
        need_grad = any(ctx.needs_input_grad)
        act, g, u = gate_up_fwd(x, w_gate, w_up, plan, save_gu=need_grad)
        y = grouped_mm(act, w_down, plan)  # [P, H], unweighted expert outputs
        out = combine(y, plan, weights, x.dtype)
        if need_grad:
            ctx.save_for_backward(x, weights, w_gate, w_up, w_down, act, g, u, y, *_plan_tensors(plan))
            ctx.plan_meta = (plan.num_experts, plan.block_m)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weights, w_gate, w_up, w_down, act, g, u, y, *plan_tensors = ctx.saved_tensors
        plan = RoutePlan(*plan_tensors, *ctx.plan_meta)
        dy, dweights = combine_bwd(dout, y, plan, weights)  # dy [P, H] = w * dout[tok]
        dw_down = wgrad(act, dy, plan, w_down.dtype, gather_a=False)  # [E, F, H]
        dg, du = grouped_mm(dy, w_down, plan, transpose_b=True, swiglu=(g, u))  # [P, F] each
        dx_rows = grouped_mm(dg, w_gate, plan, transpose_b=True, second=(du, w_up))  # [P, H]
        dx = gather_sum(dx_rows, plan, weights.shape[1], x.dtype)
        dw_gate, dw_up = wgrad(x, dg, plan, w_gate.dtype, gather_a=True, b2=du)  # [E, H, F] each
        return dx, dweights.to(weights.dtype), None, dw_gate, dw_up, dw_down, None


def _plan_tensors(plan: RoutePlan) -> tuple[torch.Tensor, ...]:
    return plan.sorted_token, plan.position, plan.tile_expert, plan.seg_start, plan.seg_tiles


def _check(x, weights, experts, w_gate, w_up, w_down) -> None:
    n, h = x.shape
    e, _, f = w_gate.shape
    if w_gate.shape != (e, h, f) or w_up.shape != (e, h, f) or w_down.shape != (e, f, h):
        raise ValueError(
            f"expert weights must be w_gate, w_up [E, H, F] and w_down [E, F, H] with H={h} (x's last dim); "
            f"got {list(w_gate.shape)}, {list(w_up.shape)}, {list(w_down.shape)}"
        )
    if weights.shape != experts.shape or weights.shape[0] != n:
        raise ValueError(f"weights and experts must both be [N={n}, k]; got {list(weights.shape)}, {list(experts.shape)}")
    if len({x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype}) != 1:
        raise ValueError(
            f"x and the expert weights must share a dtype (got {x.dtype}, {w_gate.dtype}, {w_up.dtype}, "
            f"{w_down.dtype}); cast the expert weights to x's dtype, e.g. model.to(torch.bfloat16)"
        )
    if experts.dtype != torch.int64:
        raise ValueError(f"experts must be int64 (as `route` returns), got {experts.dtype}")


def moe_experts_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    block_m: int = BLOCK_M,
) -> torch.Tensor:
    """SwiGLU experts weighted by the routing, on Triton kernels; same contract as
    `moe_experts_naive`. `block_m` (rows per GEMM tile, a power of two >= 16) trades
    padding per expert against GEMM efficiency; the default suits ~512 rows per expert.

    x: [N, H]; weights: [N, k] float32 (or x's dtype); experts: [N, k] int64 in [0, E);
    w_gate, w_up: [E, H, F]; w_down: [E, F, H], all of x's dtype. Returns [N, H] in x's dtype.
    Gradients flow to x, weights and the three expert weights.
    """
    _check(x, weights, experts, w_gate, w_up, w_down)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot's smallest tile), got {block_m}")
    return MoEExpertsFunction.apply(
        x.contiguous(), weights.contiguous(), experts.contiguous(),
        w_gate.contiguous(), w_up.contiguous(), w_down.contiguous(), block_m,
    )
