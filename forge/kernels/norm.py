"""RMSNorm, and RMSNorm followed by rotary embedding, in one Triton kernel each, for generation on
a GPU.

`forge.policy.model.RMSNorm` computes x / rms(x) in fp32, rounds to x's dtype and multiplies by
the weight: in PyTorch that is seven or eight kernels (a cast, the square, the mean, the add,
rsqrt, the product, the cast back, the weight), and the 100M MoE + MSA model runs about 57 norms
in every decoding step (four per layer with qk-norm, the MSA index norms, the last norm), most of
the step's launches. This kernel does the same arithmetic in one pass over each row: fp32
square-and-sum, the mean as the sum times 1/D, rsqrt, the normalised row rounded to x's dtype,
then times the weight rounded to the output's dtype. It differs from the PyTorch expression only
in the order of the fp32 sum of squares.

`fused_rms_norm_rope` also applies the rotary embedding that follows the per-head q, k and MSA
index norms (`forge.policy.model.apply_rope`, another eight or nine kernels each, 36 calls a
decoding step): it normalises each head's row, rounds it as the norm's output is rounded, and
rotates its leading dims in fp32. Triton may contract the rotation's multiply-add into one fused
multiply-add, so an entry can differ from PyTorch's separate products by one fp32 rounding.

Forward only, and used only by the KV-cached passes of generation (`Transformer.forward_cached`
and `forward_decode`): the trainer, its no-grad old-logprob pass included, keeps the PyTorch
expressions, so the trainer's old and new logprobs come from the same arithmetic.
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
def _normed(x, inv, w, X_TY: tl.constexpr, Y_TY: tl.constexpr, IS_INTERPRET: tl.constexpr):
    """RMSNorm's output for fp32 rows x [M, D] with 1/rms inv [M, 1] and weight w [D], rounded as
    the PyTorch expression rounds it: the normalised row to x's dtype, times the weight to the
    output's dtype."""
    return cast_out(cast_out(x * inv, X_TY, IS_INTERPRET).to(tl.float32) * w[None, :], Y_TY, IS_INTERPRET)


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_fwd(X, W, Y, rows, D, inv_d, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  IS_INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    offs = r[:, None].to(tl.int64) * D + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) * inv_d + eps)[:, None]  # [BLOCK_M, 1]
    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
    tl.store(Y + offs, _normed(x, inv, w, X.dtype.element_ty, Y.dtype.element_ty, IS_INTERPRET), mask=mask)


def _blocks(rows: int, d: int) -> tuple[int, int, tuple[int]]:
    """(BLOCK_M, BLOCK_D, grid) for `rows` rows of width d: whole rows, at most 4096 entries a program."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(64, 4096 // block_d, triton.next_power_of_2(rows)))
    return block_m, block_d, (triton.cdiv(rows, block_m),)


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
    block_m, block_d, grid = _blocks(rows, d)
    _rms_norm_fwd[grid](xc, weight.contiguous(), out, rows, d, 1.0 / d, eps, BLOCK_M=block_m, BLOCK_D=block_d,
                        IS_INTERPRET=is_interpret())
    return out


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_rope_fwd(X, W, COS, SIN, Y, rows, heads, D, R, inv_d, eps, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, IS_INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    half = R // 2
    row_ok = r[:, None] < rows
    mask = row_ok & (c[None, :] < D)
    base = r[:, None].to(tl.int64) * D
    x = tl.load(X + base + c[None, :], mask=mask, other=0.0).to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) * inv_d + eps)[:, None]  # [BLOCK_M, 1]
    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
    n = _normed(x, inv, w, X.dtype.element_ty, Y.dtype.element_ty, IS_INTERPRET).to(tl.float32)
    # The partner of each rotated entry: c + half below half (negated), c - half above.
    rotated = c < R
    partner = tl.where(c < half, c + half, c - half)
    xp = tl.load(X + base + partner[None, :], mask=row_ok & rotated[None, :], other=0.0).to(tl.float32)
    wp = tl.load(W + partner, mask=rotated, other=0.0).to(tl.float32)
    np_ = _normed(xp, inv, wp, X.dtype.element_ty, Y.dtype.element_ty, IS_INTERPRET).to(tl.float32)
    np_ = tl.where(c[None, :] < half, -np_, np_)
    token = (r // heads)[:, None].to(tl.int64) * R
    tab_mask = row_ok & rotated[None, :]
    cos = tl.load(COS + token + c[None, :], mask=tab_mask, other=1.0)
    sin = tl.load(SIN + token + c[None, :], mask=tab_mask, other=0.0)
    y = tl.where(rotated[None, :], n * cos + np_ * sin, n)
    tl.store(Y + base + c[None, :], cast_out(y, Y.dtype.element_ty, IS_INTERPRET), mask=mask)


def fused_rms_norm_rope_ok(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `fused_rms_norm_rope` takes these inputs (the caller falls back to PyTorch if not)."""
    return (x.dim() == 4 and fused_rms_norm_ok(x, weight) and cos.dtype == torch.float32
            and sin.dtype == torch.float32 and cos.shape == sin.shape and cos.dim() == 3
            and tuple(cos.shape[:2]) == tuple(x.shape[:2]) and cos.shape[-1] % 2 == 0
            and 0 < cos.shape[-1] <= x.shape[-1] and cos.device == x.device and sin.device == x.device)


def fused_rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope(weight * (x / rms(x)).to(x.dtype), cos, sin)` for x [B, T, H, D] normalised per
    head (weight [D]) and cos, sin [B, T, R] fp32, R <= D even: the leading R dims of each head
    rotated, the rest passed through. Output dtype as `fused_rms_norm`'s."""
    if not fused_rms_norm_rope_ok(x, weight, cos, sin):
        raise ValueError(f"fused_rms_norm_rope takes fp32/bf16/fp16 x [B, T, H, D] with weight [D] (D <= {MAX_DIM}) "
                         f"and fp32 cos, sin [B, T, R] with R even and <= D, on one device; got x {x.dtype} "
                         f"{list(x.shape)}, weight {weight.dtype} {list(weight.shape)}, cos {cos.dtype} "
                         f"{list(cos.shape)}, sin {sin.dtype} {list(sin.shape)}")
    b, t, h, d = x.shape
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = b * t * h
    if rows == 0:
        return out
    block_m, block_d, grid = _blocks(rows, d)
    _rms_norm_rope_fwd[grid](xc, weight.contiguous(), cos.contiguous(), sin.contiguous(), out, rows, h, d,
                             cos.shape[-1], 1.0 / d, eps, BLOCK_M=block_m, BLOCK_D=block_d,
                             IS_INTERPRET=is_interpret())
    return out
