"""Every expert on every token, for the few tokens of a decoding step.

The grouped-GEMM path (triton_experts.py) builds a routing plan on the host for each call: about
1.1 ms of host time per MoE layer on an H100, against microseconds of GPU work when a decoding
step routes a few dozen tokens (docs/benchmarks.md, "One H100"). With N tokens and E experts,
running all N x E expert evaluations costs E / top_k times the routed FLOPs but reads the same
weights (a decoding batch touches nearly every expert anyway), launches a handful of kernels and
never syncs with the host, so a decoding step that uses it can be captured in a CUDA graph.
The routing weights of unselected experts are zero, so the result is the routed sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge.kernels.dtypes import at_least_fp32

ALL_EXPERTS_MAX_PAIRS = 4096
"""The policy's MoE layer takes this path in generation (a KV-cached pass, no gradients) on
CUDA when tokens x experts is at most this; training keeps the grouped GEMM, so that the
trainer's old and new logprobs come from the same kernels."""


def moe_experts_all(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `moe_experts_naive`: x [N, H], weights/experts [N, k], w_gate/w_up
    [E, H, F], w_down [E, F, H] -> [N, H] in x's dtype; matmuls in x's dtype, the weighted sum
    in at least float32."""
    n, h = x.shape
    acc = at_least_fp32(x[:0]).dtype
    dense = torch.zeros(n, w_gate.shape[0], device=x.device, dtype=acc)
    dense.scatter_add_(1, experts, weights.to(acc))  # [N, E], zero where not routed
    xe = x.unsqueeze(0).expand(w_gate.shape[0], n, h)  # [E, N, H]
    act = F.silu(torch.bmm(xe, w_gate)) * torch.bmm(xe, w_up)  # [E, N, F]
    y = torch.bmm(act, w_down)  # [E, N, H]
    return torch.einsum("ne,enh->nh", dense, y.to(acc)).to(x.dtype)
