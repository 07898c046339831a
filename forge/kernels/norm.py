"""RMSNorm in one Triton kernel, for inference on a GPU.

`forge.policy.model.RMSNorm` computes x / rms(x) in fp32, rounds to x's dtype and multiplies by
the weight: in PyTorch that is seven or eight kernels (a cast, the square, the mean, the add,
rsqrt, the product, the cast back, the weight), and the 100M MoE + MSA model runs about 57 norms
in every decoding step (four per layer with qk-norm, the MSA index norms, the last norm), most of
the step's launches. This kernel does the same arithmetic in one pass over each row: fp32
square-and-sum, the mean as the sum times 1/D, rsqrt, the normalised row rounded to x's dtype,
then times the weight rounded to the output's dtype. It differs from the PyTorch expression only
in the order of the fp32 sum of squares.

Forward only: the model uses it where no gradient is asked for (generation, scoring without
grad); training keeps the PyTorch expression, whose backward autograd derives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge.kernels.moe.triton_common import cast_out, is_interpret

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 16384
"""Widest row the kernel takes in one block; wider rows go through PyTorch."""


@triton.jit
def _rms_norm_fwd(X, W, Y, rows, D, inv_d, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  IS_INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    offs = r[:, None].to(tl.int64) * D + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) * inv_d  # [BLOCK_M]
    normed = cast_out(x * tl.math.rsqrt(mean_sq + eps)[:, None], X.dtype.element_ty, IS_INTERPRET)
    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
    y = normed.to(tl.float32) * w[None, :]
    tl.store(Y + offs, cast_out(y, Y.dtype.element_ty, IS_INTERPRET), mask=mask)


def fused_rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fused_rms_norm` takes these inputs (the caller falls back to PyTorch if not)."""
    return (x.dtype in SUPPORTED and weight.dtype in SUPPORTED and x.device == weight.device
            and weight.dim() == 1 and x.shape[-1] == weight.shape[0] and 0 < x.shape[-1] <= MAX_DIM)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype), the normalisation in fp32; the output
    has the promoted dtype of x and weight, as the PyTorch expression's has."""
    if not fused_rms_norm_ok(x, weight):
        raise ValueError(f"fused_rms_norm takes fp32/bf16/fp16 x [..., D] and weight [D] on one device with "
                         f"0 < D <= {MAX_DIM}; got x {x.dtype} {list(x.shape)} on {x.device}, weight {weight.dtype} "
                         f"{list(weight.shape)} on {weight.device}")
    d = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = xc.numel() // d
    if rows == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(64, 4096 // block_d, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m),)
    _rms_norm_fwd[grid](xc, weight.contiguous(), out, rows, d, 1.0 / d, eps, BLOCK_M=block_m, BLOCK_D=block_d,
                        IS_INTERPRET=is_interpret())
    return out
