"""The one-kernel RMSNorm and RMSNorm + rotary embedding (forge.kernels.norm) against the model's
PyTorch expressions: through Triton's interpreter on the CPU at small odd sizes, on a GPU at the
model's sizes, and in the model on a GPU (generation uses them; the trainer never does)."""

from __future__ import annotations

import pytest
import torch

from forge.kernels.norm import fused_rms_norm, fused_rms_norm_ok, fused_rms_norm_rope, fused_rms_norm_rope_ok
from forge.policy.model import RMSNorm, apply_rope, rope_tables


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


def _close_in_low_precision(got: torch.Tensor, want: torch.Tensor, units: int = 2) -> None:
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1e-3)
    assert ((got.float() - want.float()).abs() <= units * ulp).all()
    assert (got == want).float().mean() > 0.95


def _check_rope(device: str, shape: tuple[int, int, int, int], rotary: int, dtype: torch.dtype) -> None:
    b, t, h, d = shape
    g = torch.Generator().manual_seed(sum(shape) + rotary)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    positions = torch.randint(0, 5000, (b, t), generator=g).to(device)
    cos, sin = rope_tables(positions, rotary, 10000.0)
    got = fused_rms_norm_rope(x, w, 1e-6, cos, sin)
    want = apply_rope(_reference(x, w, 1e-6), cos, sin)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=2e-6)
    else:
        _close_in_low_precision(got, want, units=3)
    # The dims past `rotary` pass through as the norm left them.
    torch.testing.assert_close(got[..., rotary:], _reference(x, w, 1e-6)[..., rotary:],
                               rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("shape,rotary", [((2, 3, 2, 8), 8), ((1, 5, 3, 12), 6), ((3, 1, 1, 16), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_rope_equals_norm_then_apply_rope_interpreted(shape, rotary, dtype):
    _check_rope("cpu", shape, rotary, dtype)


def test_fused_rms_norm_rope_refuses_what_it_cannot_take():
    x, w = torch.randn(2, 3, 2, 8), torch.ones(8)
    cos, sin = rope_tables(torch.arange(3).expand(2, 3), 8, 10000.0)
    assert fused_rms_norm_rope_ok(x, w, cos, sin)
    assert not fused_rms_norm_rope_ok(x, w, cos[..., :7], sin[..., :7])  # odd rotary dims
    assert not fused_rms_norm_rope_ok(x, w, cos.double(), sin.double())
    assert not fused_rms_norm_rope_ok(x[:, :2], w, cos, sin)  # tables of another length
    with pytest.raises(ValueError, match="cos, sin"):
        fused_rms_norm_rope(x, w, 1e-6, cos[:1], sin[:1])


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
@pytest.mark.parametrize("shape,rotary", [((64, 1, 8, 64), 64), ((64, 1, 1, 64), 64), ((2, 300, 2, 64), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_rms_norm_rope_equals_norm_then_apply_rope(shape, rotary, dtype):
    _check_rope("cuda", shape, rotary, dtype)


@pytest.mark.gpu
def test_gpu_rms_norm_module_uses_the_kernel_only_in_generation_without_grad(monkeypatch):
    import forge.policy.model as model

    calls = []
    monkeypatch.setattr(model, "fused_rms_norm", lambda *a: calls.append(1) or fused_rms_norm(*a))
    norm = RMSNorm(512, 1e-6).to("cuda", torch.bfloat16)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = norm(x, generating=True)
        assert len(calls) == 1
        norm(x)  # the trainer's no-grad pass keeps the PyTorch expression
        norm.float()(x.float(), generating=True)  # so does fp32 generation (within 1e-5 of the trainer)
        norm.to(torch.bfloat16)
        assert len(calls) == 1
    slow = norm(x, generating=True)  # grad enabled: the PyTorch expression, which autograd differentiates
    assert len(calls) == 1 and slow.requires_grad and not fast.requires_grad
    _close_in_low_precision(fast, slow)
