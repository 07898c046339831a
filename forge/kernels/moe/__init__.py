"""Mixture-of-Experts kernels: the router (sigmoid, bias, top-k, renormalise, load) and the
SwiGLU experts over tokens routed to them. `route` and `moe_experts` are the entry points the
policy calls: the Triton path for CUDA tensors, the plain-PyTorch reference elsewhere (Triton
runs on the CPU only through its slow interpreter, which the tests call directly)."""

from __future__ import annotations

import torch

from forge.kernels.moe.all_experts import moe_experts_all
from forge.kernels.moe.naive import ScoreFunc, moe_experts_naive, route_given, route_naive


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    *,
    score_func: ScoreFunc = "sigmoid",
    renormalize: bool = True,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to experts. Shapes as in `route_naive`: logits [N, E], bias [E],
    token_weight [N] or None -> weights [N, k] float32, experts [N, k] int64, load [E] float32."""
    if logits.is_cuda:
        from forge.kernels.moe.triton_router import route_triton

        return route_triton(
            logits, bias, top_k, score_func=score_func, renormalize=renormalize, token_weight=token_weight
        )
    return route_naive(
        logits, bias, top_k, score_func=score_func, renormalize=renormalize, token_weight=token_weight
    )


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts weighted by the routing. x [N, H], weights [N, k], experts [N, k],
    w_gate/w_up [E, H, F], w_down [E, F, H] -> [N, H] in x's dtype."""
    if x.is_cuda:
        # Imported here so that the policy imports on machines without triton.
        from forge.kernels.moe.triton_experts import moe_experts_triton

        return moe_experts_triton(x, weights, experts, w_gate, w_up, w_down)
    return moe_experts_naive(x, weights, experts, w_gate, w_up, w_down)


__all__ = ["ScoreFunc", "moe_experts", "moe_experts_all", "moe_experts_naive", "route", "route_given", "route_naive"]
