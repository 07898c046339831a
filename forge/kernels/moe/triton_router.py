"""Fused MoE router in Triton: scores, bias, top-k, renormalisation and per-expert load in one pass.

One program takes BLOCK_N tokens with their whole row of E logits in registers. It computes the
scores (sigmoid, or softmax for checkpoints that route that way), picks the top-k of
scores + bias by k rounds of argmax, keeps the unbiased scores of the winners as weights,
renormalises them, and adds the tokens' weights (their multiplicity in a prefix tree, or 1) to
the per-expert load with one atomic add per expert per program. The backward recomputes the
scores from the logits; nothing of size [N, E] is saved.

Departures from `naive.route_naive`: ties in score + bias go to the lower expert id (argmax's
rule; torch.topk leaves it unspecified). The load is summed with float atomics, so it is exact
while token weights are integers below 2^24 and otherwise its last bit may vary run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge.kernels.moe.triton_common import cast_out, is_interpret


@triton.jit
def _scores(logits, cmask, USE_SOFTMAX: tl.constexpr):
    """Router scores in float32 from a [BLOCK_N, BLOCK_E] logit tile; cmask marks real experts."""
    if USE_SOFTMAX:
        z = tl.where(cmask[None, :], logits, float("-inf"))
        z = tl.exp(z - tl.max(z, axis=1)[:, None])
        return z / tl.sum(z, axis=1)[:, None]
    return tl.sigmoid(logits)


@triton.jit(do_not_specialize=["N"])
def route_fwd_kernel(
    logits_ptr, bias_ptr, tw_ptr, weights_ptr, experts_ptr, load_ptr,
    N, E, stride_ln,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_SOFTMAX: tl.constexpr, USE_RENORM: tl.constexpr, HAS_TW: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    kcols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rmask = rows < N
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_ln + cols[None, :]
    logits = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_E]
    scores = _scores(logits, cmask, USE_SOFTMAX)  # [BLOCK_N, BLOCK_E]
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # [BLOCK_E]
    # Padded experts must never win, whatever the bias of the real ones.
    choice = tl.where(cmask[None, :], scores + bias[None, :], float("-inf"))
    w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    idx = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int64)
    chosen = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1)  # [BLOCK_N]
        hit = cols[None, :] == best[:, None]  # [BLOCK_N, BLOCK_E]
        w_j = tl.sum(tl.where(hit, scores, 0.0), axis=1)  # [BLOCK_N]
        w = tl.where(kcols[None, :] == j, w_j[:, None], w)
        idx = tl.where(kcols[None, :] == j, best.to(tl.int64)[:, None], idx)
        chosen = tl.where(hit, 1.0, chosen)
        choice = tl.where(hit, float("-inf"), choice)
    if USE_RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out_off = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_mask = rmask[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out_off, w, mask=out_mask)
    tl.store(experts_ptr + out_off, idx, mask=out_mask)
    if HAS_TW:
        tw = tl.load(tw_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        tw = tl.where(rmask, 1.0, 0.0)
    load = tl.sum(chosen * tw[:, None], axis=0)  # [BLOCK_E]
    tl.atomic_add(load_ptr + cols, load, mask=cmask)


@triton.jit(do_not_specialize=["N"])
def route_bwd_kernel(
    logits_ptr, experts_ptr, dw_ptr, dlogits_ptr,
    N, E, stride_ln, stride_dn,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_SOFTMAX: tl.constexpr, USE_RENORM: tl.constexpr, IS_INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    rmask = rows < N
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    logits = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_ln + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_E]
    scores = _scores(logits, cmask, USE_SOFTMAX)  # [BLOCK_N, BLOCK_E]
    # Scatter the k weight gradients back onto the dense row; `chosen` marks the winners.
    dw_dense = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e_j = tl.load(experts_ptr + rows.to(tl.int64) * TOP_K + j, mask=rmask, other=-1)
        dw_j = tl.load(dw_ptr + rows.to(tl.int64) * TOP_K + j, mask=rmask, other=0.0)
        hit = cols[None, :] == e_j[:, None]
        dw_dense = tl.where(hit, dw_j[:, None], dw_dense)
        chosen = tl.where(hit, 1.0, chosen)
    if USE_RENORM:
        # w_j = s_j / S with S the sum of the chosen scores: ds_j = (dw_j - sum_i dw_i w_i) / S.
        total = tl.sum(scores * chosen, axis=1)  # [BLOCK_N]
        # Rows past N chose nothing; keep them from dividing 0 by 0.
        total = tl.where(rmask, total, 1.0)
        dot = tl.sum(dw_dense * scores * chosen, axis=1) / total  # sum_i dw_i w_i
        ds = chosen * (dw_dense - dot[:, None]) / total[:, None]
    else:
        ds = dw_dense
    if USE_SOFTMAX:
        dl = scores * (ds - tl.sum(ds * scores, axis=1)[:, None])
    else:
        dl = ds * scores * (1.0 - scores)
    tl.store(dlogits_ptr + rows.to(tl.int64)[:, None] * stride_dn + cols[None, :],
             cast_out(dl, dlogits_ptr.dtype.element_ty, IS_INTERPRET), mask=mask)


def _block_n(block_e: int) -> int:
    # Keep a program's [BLOCK_N, BLOCK_E] tiles near 8K elements so they stay in registers.
    return max(1, min(64, 8192 // block_e))


def route_fwd(logits, bias, top_k, use_softmax, renormalize, token_weight):
    n, e = logits.shape
    logits = logits.contiguous() if logits.stride(1) != 1 else logits
    weights = torch.empty(n, top_k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(n, top_k, device=logits.device, dtype=torch.int64)
    load = torch.zeros(e, device=logits.device, dtype=torch.float32)
    block_e = triton.next_power_of_2(e)
    block_n = _block_n(block_e)
    tw = token_weight.contiguous() if token_weight is not None else weights
    route_fwd_kernel[(triton.cdiv(n, block_n),)](
        logits, bias.contiguous(), tw, weights, experts, load,
        n, e, logits.stride(0),
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_N=block_n, BLOCK_E=block_e,
        USE_SOFTMAX=use_softmax, USE_RENORM=renormalize, HAS_TW=token_weight is not None,
    )
    return weights, experts, load


def route_bwd(logits, experts, dweights, use_softmax, renormalize):
    n, e = logits.shape
    logits = logits.contiguous() if logits.stride(1) != 1 else logits
    dlogits = torch.empty_like(logits)
    block_e = triton.next_power_of_2(e)
    block_n = _block_n(block_e)
    route_bwd_kernel[(triton.cdiv(n, block_n),)](
        logits, experts, dweights.float().contiguous(), dlogits,
        n, e, logits.stride(0), dlogits.stride(0),
        TOP_K=experts.shape[1], BLOCK_N=block_n, BLOCK_E=block_e,
        USE_SOFTMAX=use_softmax, USE_RENORM=renormalize, IS_INTERPRET=is_interpret(),
    )
    return dlogits


class RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, use_softmax, renormalize, token_weight):
        weights, experts, load = route_fwd(logits, bias, top_k, use_softmax, renormalize, token_weight)
        ctx.save_for_backward(logits, experts)
        ctx.use_softmax, ctx.renormalize = use_softmax, renormalize
        ctx.mark_non_differentiable(experts, load)
        return weights, experts, load

    @staticmethod
    def backward(ctx, dweights, _dexperts, _dload):
        logits, experts = ctx.saved_tensors
        dlogits = route_bwd(logits, experts, dweights, ctx.use_softmax, ctx.renormalize)
        return dlogits, None, None, None, None, None


def route_triton(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "sigmoid",
    renormalize: bool = True,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to experts with the fused kernel; same contract as `route_naive`.

    logits: [N, E] float (fp32/bf16/fp16); bias: [E]; token_weight: [N] or None.
    Returns weights [N, k] float32 (gradient flows to logits), experts [N, k] int64,
    load [E] float32. The bias gets no gradient.
    """
    n, e = logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}] for {e} experts, got {top_k}")
    if bias.shape != (e,):
        raise ValueError(f"bias must have shape [{e}] (one per expert), got {list(bias.shape)}")
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if e > 4096:
        raise ValueError(f"the fused router holds a row of experts in registers; {e} > 4096 experts")
    if token_weight is not None and token_weight.shape != (n,):
        raise ValueError(f"token_weight must have shape [{n}] (one per token), got {list(token_weight.shape)}")
    return RouteFunction.apply(
        logits, bias.detach(), top_k, score_func == "softmax", renormalize,
        None if token_weight is None else token_weight.detach(),
    )
