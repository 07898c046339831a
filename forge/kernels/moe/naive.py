"""Plain-PyTorch definition of the MoE router and expert layer, the reference for the Triton path.

The router follows the auxiliary-loss-free balancing of DeepSeek-V3 as MiniMax-M2 uses it:
scores are sigmoid(logits) (softmax for imported checkpoints that route that way), a per-expert
bias is added to the scores only to choose the top-k, and the routing weights are the unbiased
scores of the chosen experts, renormalised to sum to one. The experts are SwiGLU MLPs. These
functions are written for clarity (a Python loop over experts), not speed.
"""

from __future__ import annotations

from typing import Literal

import torch

from forge.kernels.dtypes import at_least_fp32
import torch.nn.functional as F

ScoreFunc = Literal["sigmoid", "softmax"]


def router_scores(logits: torch.Tensor, score_func: ScoreFunc) -> torch.Tensor:
    """Router scores in float32 from logits [N, E]."""
    if score_func == "sigmoid":
        return torch.sigmoid(at_least_fp32(logits))
    if score_func == "softmax":
        return torch.softmax(at_least_fp32(logits), dim=-1)
    raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")


def route_naive(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    *,
    score_func: ScoreFunc = "sigmoid",
    renormalize: bool = True,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token and their routing weights.

    logits: [N, E] (any float dtype); bias: [E], added to the scores only to choose;
    token_weight: [N] or None, what each token adds to the load of its experts (a prefix-tree
    token's multiplicity; default 1). Returns weights [N, k] float32 (differentiable with respect
    to logits), experts [N, k] int64, load [E] float32 (no gradient).
    """
    n, e = logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}] for {e} experts, got {top_k}")
    if bias.shape != (e,):
        raise ValueError(f"bias must have shape [{e}] (one per expert), got {list(bias.shape)}")
    scores = router_scores(logits, score_func)  # [N, E]
    # The bias only steers the choice; it must never reach the weights or get a gradient.
    experts = torch.topk(scores.detach() + bias.float(), top_k, dim=-1).indices  # [N, k]
    return _weigh(scores, experts, renormalize, token_weight)


def route_given(
    logits: torch.Tensor,
    experts: torch.Tensor,
    *,
    score_func: ScoreFunc = "sigmoid",
    renormalize: bool = True,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route_naive` with the experts given instead of chosen (routing replay: the trainer
    imposes what the sampler chose). logits [N, E]; experts [N, k] integer, each in [0, E) (the
    caller checks: a check here would read the device back once per layer).
    The weights are this router's own scores of the given experts, so its gradient is the one
    `route_naive` would give had it chosen them. Returns weights, experts (int64), load."""
    return _weigh(router_scores(logits, score_func), experts.long(), renormalize, token_weight)


def _weigh(scores: torch.Tensor, experts: torch.Tensor, renormalize: bool,
           token_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing weights [N, k] of the chosen experts and the load [E] they add."""
    n, e = scores.shape
    top_k = experts.shape[1]
    weights = scores.gather(1, experts)  # [N, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if token_weight is None:
        token_weight = torch.ones(n, device=scores.device)
    tw = token_weight.detach().float()[:, None].expand(n, top_k)  # [N, k]
    load = torch.zeros(e, device=scores.device, dtype=torch.float32)
    load.index_add_(0, experts.reshape(-1), tw.reshape(-1))
    return weights, experts, load


def moe_experts_naive(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of SwiGLU experts, a loop over experts.

    x: [N, H]; weights: [N, k] (float32 or x's dtype); experts: [N, k] int64;
    w_gate, w_up: [E, H, F]; w_down: [E, F, H]. Returns [N, H] in x's dtype:
    out[n] = sum_j weights[n, j] * (silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e],
    with e = experts[n, j]. Matmuls run in x's dtype; the weighted sum accumulates in float32.
    """
    n, h = x.shape
    num_experts = w_gate.shape[0]
    out = torch.zeros(n, h, device=x.device, dtype=at_least_fp32(x[:0]).dtype)
    flat_experts = experts.reshape(-1)  # [N * k]
    flat_tokens = torch.arange(n, device=x.device).repeat_interleave(experts.shape[1])  # [N * k]
    flat_weights = weights.reshape(-1)  # [N * k]
    for e in range(num_experts):
        sel = (flat_experts == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        tok = flat_tokens[sel]
        xe = x[tok]  # [n_e, H]
        act = F.silu(xe @ w_gate[e]) * (xe @ w_up[e])  # [n_e, F]
        ye = act @ w_down[e]  # [n_e, H]
        out.index_add_(0, tok, at_least_fp32(ye) * at_least_fp32(flat_weights[sel])[:, None])
    return out.to(x.dtype)
