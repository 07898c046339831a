"""The one-kernel RMSNorm (forge.kernels.norm) against the model's PyTorch expression: through
Triton's interpreter on the CPU at small odd sizes, on a GPU at the model's sizes, and in the
model on a GPU (inference uses it; the decoding step's logits are unchanged within rounding)."""

from __future__ import annotations

import pytest
import torch

from forge.kernels.norm import fused_rms_norm, fused_rms_norm_ok
from forge.policy.model import RMSNorm


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _check(device: str, shape: tuple[int, ...], dtype: torch.dtype, wdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, wdtype)
    got, want = fused_rms_norm(x, w, 1e-6), _reference(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32 and wdtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        # The fp32 sum of squares is taken in another order: the rounded row may land one unit of
        # the low precision apart, on a few entries.
        ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1e-3)
        assert ((got.float() - want.float()).abs() <= 2 * ulp).all()
        assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (1, 64), (33, 24)])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)])
def test_fused_rms_norm_equals_the_pytorch_expression_interpreted(shape, dtype, wdtype):
    _check("cpu", shape, dtype, wdtype)


def test_fused_rms_norm_refuses_what_it_cannot_take():
    x = torch.randn(2, 8)
    assert not fused_rms_norm_ok(x.double(), torch.ones(8))
    assert not fused_rms_norm_ok(x, torch.ones(7))
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        fused_rms_norm(x.double(), torch.ones(8), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 1, 512), (64, 8, 64), (4096, 512), (7, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_rms_norm_equals_the_pytorch_expression(shape, dtype):
    _check("cuda", shape, dtype, dtype)


@pytest.mark.gpu
def test_gpu_rms_norm_module_uses_the_kernel_only_without_grad():
    norm = RMSNorm(512, 1e-6).to("cuda", torch.bfloat16)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = norm(x)
    slow = norm(x)  # grad enabled: the PyTorch expression, which autograd differentiates
    assert slow.requires_grad and not fast.requires_grad
    assert ((fast.float() - slow.float()).abs() <= 2 * torch.finfo(torch.bfloat16).eps * slow.float().abs().clamp_min(1e-3)).all()
