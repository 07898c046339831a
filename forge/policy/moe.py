"""The Mixture-of-Experts feed-forward and its auxiliary-loss-free load balancing.

Routing follows DeepSeek-V3 as MiniMax-M2 uses it: sigmoid scores, an expert-specific bias
added only to choose the top-k, weights from the unbiased scores of the chosen experts,
renormalised. The bias is a buffer with no gradient; `update_expert_bias` moves it by a fixed
step after each optimizer step, up for experts that got less than the mean load and down for
those that got more. Departures from the paper: loads are counted with each token's
multiplicity (a prefix-tree token stands for every sequence that contains it), and the update
uses the loads accumulated over all micro-batches since the last update, summed across
data-parallel ranks through a caller-supplied all-reduce (so this module needs no
torch.distributed set-up). If activation checkpointing re-runs a forward in training mode, its
tokens are counted twice; the sign update is unchanged when every layer is recomputed alike.
Forwards under torch.no_grad() are not counted, even in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from forge.kernels.dtypes import at_least_fp32
import torch.nn.functional as F
from torch import nn

from forge.kernels.moe import moe_experts, moe_experts_all, moe_experts_naive, route, route_given, route_naive
from forge.kernels.moe.all_experts import ALL_EXPERTS_MAX_PAIRS
from forge.policy.config import ModelConfig
from forge.policy.invariant import Linear, wide, wide_call


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP: down(silu(gate(x)) * up(x)). Under `model.batch_invariant` the
    activation is taken in fp64 too: a vectorised silu and its scalar tail round differently, so
    in fp32 a row's activation would depend on where the batch's layout puts it."""

    invariant = False

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, width, bias=False)
        self.up_proj = Linear(hidden_size, width, bias=False)
        self.down_proj = Linear(width, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(wide_call(_swiglu, gate, up) if self.invariant else _swiglu(gate, up))


class MoE(nn.Module):
    """Routed SwiGLU experts (plus an optional shared expert) with a balancing bias.

    Parameters: `router` [E, H], `w_gate`/`w_up` [E, H, F], `w_down` [E, F, H], `shared`
    (a SwiGLU or None). Buffers: `expert_bias` [E] (saved with the weights), `load` [E]
    (token-weighted count of routed tokens since the last bias update, counted in training
    mode with gradients enabled; not saved). Under `model.batch_invariant` the router and the
    experts accumulate in fp64 (forge.policy.invariant).
    """

    invariant = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, f = config.num_experts, config.hidden_size, config.expert_width
        self.top_k = config.top_k
        self.score_func = config.score_func
        self.renormalize = config.renormalize
        self.bias_update_rate = config.bias_update_rate
        self.router = nn.Parameter(torch.empty(e, h))
        self.w_gate = nn.Parameter(torch.empty(e, h, f))
        self.w_up = nn.Parameter(torch.empty(e, h, f))
        self.w_down = nn.Parameter(torch.empty(e, f, h))
        self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(e, dtype=torch.float32), persistent=False)
        self.moe_slot = 0
        """This layer's index among the MoE layers (its slot in a `Choices.experts` record); set by the model."""
        width = config.num_shared_experts * config.expert_width
        self.shared = SwiGLU(h, width) if width else None

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def forward(
        self, x: torch.Tensor, token_weight: torch.Tensor | None = None, *, generating: bool = False,
        imposed: torch.Tensor | None = None, record: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, H], token_weight [B, T] or None -> [B, T, H]. `generating` (a KV-cached pass)
        lets a CUDA decoding step run every expert on its few tokens (kernels/moe/all_experts.py).
        Routing replay (forge.policy.choices): `imposed` [B, T, top_k] experts replace the
        router's choice where a token's first slot is >= 0 (weights: this router's scores of
        them); `record` gets the experts used, [B, T, top_k], under key `self.moe_slot`."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)  # [N, H]
        # The router runs in fp32: in bf16, near-tied scores flip the top-k choice between the
        # generator and the trainer, and that mismatch is what RL on an MoE is most sensitive to.
        wider = wide if self.invariant else at_least_fp32
        logits = wider(flat) @ wider(self.router).t()  # [N, E]
        tw = None if token_weight is None else token_weight.reshape(b * t)
        # Batch-invariant numerics take the plain-PyTorch references on any device (fp64).
        weights, experts, load = (route_naive if self.invariant else route)(
            logits, self.expert_bias, self.top_k, score_func=self.score_func,
            renormalize=self.renormalize, token_weight=tw,
        )
        if imposed is not None:
            given = imposed.reshape(b * t, self.top_k).long()
            given = torch.where(given[:, :1] >= 0, given, experts)
            weights, experts, load = route_given(logits, given, score_func=self.score_func,
                                                 renormalize=self.renormalize, token_weight=tw)
        if record is not None:
            record[self.moe_slot] = experts.view(b, t, self.top_k)
        # Count only the tokens a step trains on: no-grad forwards in training mode (the
        # trainer's old-policy logprobs, a reference pass) would otherwise count them again.
        if self.training and torch.is_grad_enabled():
            self.load += load
        if generating and flat.is_cuda and not self.invariant and not torch.is_grad_enabled() and b * t * self.num_experts <= ALL_EXPERTS_MAX_PAIRS:
            out = moe_experts_all(flat, weights, experts, self.w_gate, self.w_up, self.w_down)
        elif self.invariant:
            out = moe_experts_naive(wide(flat), weights, experts, wide(self.w_gate), wide(self.w_up),
                                    wide(self.w_down)).to(x.dtype)
        else:
            out = moe_experts(flat, weights, experts, self.w_gate, self.w_up, self.w_down)  # [N, H]
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(b, t, h)


@dataclass
class RouterLayerStats:
    """Load statistics of one MoE layer."""

    layer: int
    """Index of the transformer block."""
    tokens_per_expert: list[float]
    """Token-weighted count routed to each expert (each token counts top_k times in total)."""
    bias: list[float]
    """Each expert's routing bias."""
    imbalance: float
    """Max over mean of tokens_per_expert; 1.0 is perfectly balanced, 0.0 when nothing was routed."""

    def metrics(self, prefix: str = "router") -> dict[str, float]:
        """Flat scalars for the metrics sink."""
        return {
            f"{prefix}/layer{self.layer}/imbalance": self.imbalance,
            f"{prefix}/layer{self.layer}/bias_min": min(self.bias),
            f"{prefix}/layer{self.layer}/bias_max": max(self.bias),
            f"{prefix}/layer{self.layer}/tokens": sum(self.tokens_per_expert),
        }


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block index, MoE) for every MoE layer of a `Transformer`, in order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            # Names look like 'layers.<i>.mlp'; the block index is the first integer component.
            index = next(int(p) for p in name.split(".") if p.isdigit())
            found.append((index, module))
    return found


def _stats(layer: int, load: torch.Tensor, bias: torch.Tensor) -> RouterLayerStats:
    mean = load.mean().item()
    imbalance = load.max().item() / mean if mean > 0 else 0.0
    return RouterLayerStats(layer, load.tolist(), bias.tolist(), imbalance)


def router_stats(model: nn.Module) -> list[RouterLayerStats]:
    """Per MoE layer: the load accumulated since the last bias update, the bias, the imbalance."""
    return [_stats(i, m.load.detach().float().cpu(), m.expert_bias.detach().cpu()) for i, m in moe_layers(model)]


@torch.no_grad()
def update_expert_bias(
    model: nn.Module,
    *,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[RouterLayerStats]:
    """Move every expert bias by its layer's `bias_update_rate` towards balanced load, then
    reset the load counters.

    Call after each optimizer step. `all_reduce` takes the stacked loads [L, E] of this rank and
    returns their sum over data-parallel ranks (e.g. wrapping torch.distributed.all_reduce);
    one collective per step for all layers. Experts under the mean load move up by the rate,
    those over it move down, those exactly at it stay. Returns the statistics of the loads used
    (with the bias after the update), so the caller can log the step that was just balanced.
    """
    layers = moe_layers(model)
    if not layers:
        return []
    loads = torch.stack([m.load.float() for _, m in layers])  # [L, E]
    if all_reduce is not None:
        loads = all_reduce(loads)
    stats = []
    for (index, module), load in zip(layers, loads):
        if load.sum() > 0:
            step = module.bias_update_rate * torch.sign(load.mean() - load)
            module.expert_bias += step.to(module.expert_bias.dtype)
        module.load.zero_()
        stats.append(_stats(index, load.cpu(), module.expert_bias.cpu()))
    return stats
