"""Batch-invariant numerics (`model.batch_invariant`): a token's logits do not depend
on what else runs beside it, so the sampler's logprobs equal the trainer's.

The sampler and the trainer compute the same function through different shapes: a decoding step
multiplies one row per sequence against a KV cache, a prefill a left-padded batch, the trainer
the flattened prefix tree of many sequences. BLAS libraries pick their kernels by shape (on the
CPU one row takes a matrix-vector path, a few rows another), and attention sums a query's keys
at the lanes where the layout puts them, so the two round differently: on the quickstart's
trained weights in fp32 the logprobs of the same tokens differed by up to 3e-5
(docs/architecture.md).

With `batch_invariant`, every reduction whose order depends on the shape (the projections and
the head, attention with its index branch, the router and the experts, the norms and the
log-softmax) accumulates in fp64 and rounds once to the model's dtype, and so do the
elementwise transcendental functions (silu, the rotary cos and sin), whose vectorised kernels
and scalar tails round differently. Two fp64 sums of the
same terms in different orders differ by about 1e-16 of their size, far below one fp32 (or
bf16) rounding step, so they round to the same value unless the exact sum lies within that
distance of a rounding boundary: the results agree bitwise except in such rare ties (none in the
tests), and where a tie flips one rounding the gap is one ulp. The activations, the weights, the
caches and the gradients keep the model's dtype.

On a GPU the same fp64 accumulation runs through cuBLAS's fp64 GEMMs and torch's reference
attention, MSA and MoE paths instead of Forge's Triton kernels, and decoding runs eagerly (no
CUDA graph): a correctness mode, about 25x slower than the default on an H100, whose GPU test
(tests/test_batch_invariant.py, marked gpu) passes there in bf16 and fp32. Issue 15 asks for the
same end by another means, kernels that reduce in a fixed order whatever the batch; fp64
accumulation gets there with no new kernel, at the price of speed (docs/architecture.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float64 (a no-op for fp64): the accumulation dtype of batch-invariant numerics."""
    return x if x.dtype == torch.float64 else x.double()


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear accumulated in fp64, rounded to x's dtype; its gradients are F.linear's at x's
    dtype (only the forward must not depend on the batch)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return F.linear(wide(x), wide(weight), None if bias is None else wide(bias)).to(x.dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(wide(x), wide(weight), None if bias is None else wide(bias)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def wide_call(fn, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) computed on fp64 copies of the inputs and rounded to inputs[0]'s dtype. Its
    gradients, when asked, are fn's own at the inputs' dtype, recomputed in the backward pass:
    attention's fp64 backward would cost three times its fp32 one."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _WideForward.apply(fn, *inputs)
    return fn(*(wide(x) for x in inputs)).to(inputs[0].dtype)


class _WideForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*(wide(x) for x in inputs)).to(inputs[0].dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(grads) if x.requires_grad else None for x in inputs))


class Linear(nn.Linear):
    """nn.Linear that accumulates in fp64 when `invariant` is set (Transformer sets it from
    `model.batch_invariant`); the same parameters and state-dict keys either way."""

    invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.invariant:
            return super().forward(x)
        return invariant_linear(x, self.weight, self.bias)
