"""MoE kernels against naive.py: the router, the permutation, the expert layer and every gradient.

On the CPU these run through Triton's interpreter at tiny, odd sizes; the tests marked gpu run
at the MiniMax-M2 layer size. Fresh outputs are NaN-filled (`nan_empty`) so that an element a
kernel forgets to write fails the comparison instead of passing by luck.
"""

from __future__ import annotations

import pytest
import torch

from forge.kernels.moe import moe_experts, moe_experts_all, route
from forge.kernels.moe.all_experts import ALL_EXPERTS_MAX_PAIRS
from forge.kernels.moe.naive import moe_experts_naive, route_naive
from forge.kernels.moe.triton_experts import moe_experts_triton
from forge.kernels.moe.triton_grouped_gemm import BLOCK_M
from forge.kernels.moe.triton_permute import plan_routes
from forge.kernels.moe.triton_router import route_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN (floats) or a huge sentinel (integers)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the 2-norm; inf when `a` holds a NaN (an unwritten element)."""
    err = ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    return err if err == err else float("inf")


ROUTE_CASES = [
    pytest.param(37, 13, 3, "sigmoid", True, torch.float32, id="N37-E13-k3-sigmoid-renorm-fp32"),
    pytest.param(37, 13, 3, "sigmoid", False, torch.float32, id="N37-E13-k3-sigmoid-raw-fp32"),
    pytest.param(21, 20, 8, "softmax", True, torch.float32, id="N21-E20-k8-softmax-renorm-fp32"),
    pytest.param(21, 20, 8, "softmax", False, torch.float32, id="N21-E20-k8-softmax-raw-fp32"),
    pytest.param(70, 64, 6, "sigmoid", True, torch.bfloat16, id="N70-E64-k6-sigmoid-renorm-bf16"),
    pytest.param(5, 7, 1, "sigmoid", True, torch.bfloat16, id="N5-E7-k1-sigmoid-renorm-bf16"),
]


@pytest.mark.parametrize("n,e,k,score_func,renorm,dtype", ROUTE_CASES)
def test_route_matches_naive(nan_empty, n, e, k, score_func, renorm, dtype):
    torch.manual_seed(0)
    logits = torch.randn(n, e, device=DEVICE).to(dtype)
    bias = 0.3 * torch.randn(e, device=DEVICE)
    token_weight = torch.randint(1, 5, (n,), device=DEVICE).float()
    dw = torch.randn(n, k, device=DEVICE)
    ref_in = logits.clone().requires_grad_()
    tri_in = logits.clone().requires_grad_()
    w_ref, e_ref, load_ref = route_naive(ref_in, bias, k, score_func=score_func, renormalize=renorm,
                                         token_weight=token_weight)
    w_tri, e_tri, load_tri = route_triton(tri_in, bias, k, score_func=score_func, renormalize=renorm,
                                          token_weight=token_weight)
    (w_ref * dw).sum().backward()
    (w_tri * dw).sum().backward()
    assert torch.equal(e_tri, e_ref)
    torch.testing.assert_close(w_tri, w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(load_tri, load_ref, atol=0, rtol=0)
    # The logits' gradient is computed in fp32 and rounded once to the logits' dtype.
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(tri_in.grad, ref_in.grad, **tol)


def test_route_bias_steers_choice_not_weights():
    torch.manual_seed(0)
    logits = torch.randn(9, 6, device=DEVICE)
    bias = torch.zeros(6, device=DEVICE)
    bias[4] = 10.0
    weights, experts, load = route_triton(logits, bias, 2, renormalize=False)
    assert (experts == 4).any(dim=1).all() and load[4] == 9
    # The weight of the boosted expert is its plain sigmoid score: the bias never reaches it.
    w4 = (weights * (experts == 4)).sum(dim=1)
    torch.testing.assert_close(w4, torch.sigmoid(logits[:, 4]))


@pytest.mark.parametrize("n,k,e", [(29, 2, 3), (13, 3, 40), (1, 1, 4)], ids=["many-rows", "many-experts", "one-token"])
def test_plan_routes_sorts_stably_and_pads(nan_empty, n, k, e):
    torch.manual_seed(0)
    experts = torch.stack([torch.randperm(e, device=DEVICE)[:k] for _ in range(n)])  # [N, k]
    plan = plan_routes(experts, e, BLOCK_M)
    flat = experts.reshape(-1).cpu()
    pos = plan.position.long().cpu()
    sorted_token = plan.sorted_token.long().cpu()
    # Every pair lands in its expert's segment, in token order, and the row names its token.
    assert torch.equal(sorted_token[pos], torch.arange(n * k) // k)
    for ex in range(e):
        rows = pos[flat == ex]
        start, tiles = int(plan.seg_start[ex]), int(plan.seg_tiles[ex])
        assert start % BLOCK_M == 0 and tiles == -(-rows.numel() // BLOCK_M)
        assert torch.equal(rows, torch.arange(start, start + rows.numel()))
        assert (sorted_token[start + rows.numel():start + tiles * BLOCK_M] == -1).all()
        assert (plan.tile_expert[start // BLOCK_M:start // BLOCK_M + tiles].cpu() == ex).all()
    used = int(plan.seg_tiles.sum())
    assert (plan.tile_expert[used:].cpu() == e).all()


def _expert_inputs(n, h, f, e, k, dtype, *, skip_expert=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    logits = torch.randn(n, e, generator=g)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e4
    weights, experts, _ = route_naive(logits, torch.zeros(e), k)
    w_gate = torch.randn(e, h, f, generator=g) / h**0.5
    w_up = torch.randn(e, h, f, generator=g) / h**0.5
    w_down = torch.randn(e, f, h, generator=g) / f**0.5
    dout = torch.randn(n, h, generator=g)
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return (to(x), weights.to(DEVICE), experts.to(DEVICE), to(w_gate), to(w_up), to(w_down)), to(dout)


def _run(fn, inputs, dout):
    """Output and the gradients of x, weights, w_gate, w_up, w_down."""
    x, weights, experts, w_gate, w_up, w_down = [
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs
    ]
    out = fn(x, weights, experts, w_gate, w_up, w_down)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in (x, weights, w_gate, w_up, w_down)]


NAMES = ["out", "dx", "dweights", "dw_gate", "dw_up", "dw_down"]


def _compare(inputs, dout, dtype):
    if dtype == torch.float32:
        tri = _run(moe_experts_triton, inputs, dout)
        ref = _run(moe_experts_naive, inputs, dout)
        for name, a, b in zip(NAMES, tri, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        return
    # bf16: the kernel must be no further from the fp32 truth than twice the bf16 reference is.
    # One run's results are alive at a time, so the full-size GPU test fits in memory.
    truth = _run(moe_experts_naive, [t.float() if t.is_floating_point() else t for t in inputs], dout.float())
    err_tri = [rel_err(a, t) for a, t in zip(_run(moe_experts_triton, inputs, dout), truth)]
    err_ref = [rel_err(b, t) for b, t in zip(_run(moe_experts_naive, inputs, dout), truth)]
    for name, a, b in zip(NAMES, err_tri, err_ref):
        assert a <= 2 * b + 1e-3, (name, a, b)


EXPERT_CASES = [
    pytest.param(13, 32, 48, 6, 2, None, id="N13-H32-F48-E6-k2"),
    pytest.param(29, 40, 24, 3, 2, None, id="N29-H40-F24-E3-k2-multitile-oddK"),
    pytest.param(11, 32, 16, 8, 3, 5, id="N11-H32-F16-E8-k3-idle-expert"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,f,e,k,skip", EXPERT_CASES)
def test_moe_experts_matches_naive(nan_empty, n, h, f, e, k, skip, dtype):
    inputs, dout = _expert_inputs(n, h, f, e, k, dtype, skip_expert=skip)
    if skip is not None:
        assert not (inputs[2] == skip).any()
    _compare(inputs, dout, dtype)


def test_moe_experts_with_a_larger_row_tile(nan_empty):
    inputs, dout = _expert_inputs(29, 32, 16, 3, 2, torch.float32)
    tri = _run(lambda *t: moe_experts_triton(*t, block_m=2 * BLOCK_M), inputs, dout)
    for name, a, b in zip(NAMES, tri, _run(moe_experts_naive, inputs, dout)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_empty_batch_routes_and_runs(nan_empty):
    # A rollout step can hand the policy no tokens for a layer; the kernels must not launch garbage.
    logits = torch.randn(0, 6, device=DEVICE, requires_grad=True)
    weights, experts, load = route_triton(logits, torch.zeros(6, device=DEVICE), 2)
    assert weights.shape == (0, 2) and torch.equal(load, torch.zeros(6, device=DEVICE))
    inputs, dout = _expert_inputs(0, 16, 16, 6, 2, torch.float32)
    out, dx, dweights, dw_gate, dw_up, dw_down = _run(moe_experts_triton, inputs, dout)
    assert out.shape == (0, 16)
    for g in (dw_gate, dw_up, dw_down):
        assert torch.equal(g, torch.zeros_like(g))


def test_entry_points_take_the_reference_on_cpu():
    inputs, _ = _expert_inputs(5, 16, 16, 4, 2, torch.float32)
    torch.testing.assert_close(moe_experts(*inputs).cpu(), moe_experts_naive(*inputs).cpu())
    logits = torch.randn(5, 4)
    assert torch.equal(route(logits, torch.zeros(4), 2)[1], route_naive(logits, torch.zeros(4), 2)[1])


@pytest.mark.parametrize("n,h,f,e,k,skip", EXPERT_CASES)
def test_all_experts_path_matches_naive(n, h, f, e, k, skip):
    # The decoding path runs every expert on every token with zero weight where not routed.
    inputs, _ = _expert_inputs(n, h, f, e, k, torch.float64, skip_expert=skip)
    torch.testing.assert_close(moe_experts_all(*inputs), moe_experts_naive(*inputs), rtol=1e-12, atol=1e-12)
    # bf16: no further from the fp32 truth than twice the bf16 loop is.
    low, _ = _expert_inputs(n, h, f, e, k, torch.bfloat16, skip_expert=skip)
    truth = moe_experts_naive(*[t.float() if t.is_floating_point() else t for t in low])
    assert rel_err(moe_experts_all(*low), truth) <= 2 * rel_err(moe_experts_naive(*low), truth) + 1e-6


@pytest.mark.gpu
def test_all_experts_path_never_synchronises_with_the_host():
    inputs, _ = _expert_inputs(32, 512, 192, 32, 4, torch.bfloat16)
    assert 32 * 32 <= ALL_EXPERTS_MAX_PAIRS
    with torch.no_grad():
        moe_experts_all(*inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = moe_experts_all(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    truth = moe_experts_naive(*[t.float() if t.is_floating_point() else t for t in inputs])
    assert rel_err(out, truth) <= 2 * rel_err(moe_experts_naive(*inputs), truth) + 1e-6


def test_moe_experts_names_the_fix_for_mixed_dtypes():
    inputs, _ = _expert_inputs(5, 16, 16, 4, 2, torch.float32)
    x, weights, experts, w_gate, w_up, w_down = inputs
    with pytest.raises(ValueError, match="share a dtype"):
        moe_experts_triton(x.bfloat16(), weights, experts, w_gate, w_up, w_down)


@pytest.mark.gpu
def test_route_full_size_gpu():
    torch.manual_seed(0)
    logits = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16)
    bias = 0.01 * torch.randn(256, device="cuda")
    w_ref, e_ref, load_ref = route_naive(logits, bias, 8)
    w_tri, e_tri, load_tri = route_triton(logits, bias, 8)
    # sigmoid may differ by an ulp between torch and Triton, which can swap a near-tie at the
    # k-th place; such rows must be rare, and every other row must agree exactly.
    same = (e_tri == e_ref).all(dim=1)
    assert same.float().mean() > 0.999
    torch.testing.assert_close(w_tri[same], w_ref[same], atol=1e-6, rtol=1e-5)
    assert (load_tri - load_ref).abs().sum() <= 2 * (~same).sum() * 8


@pytest.mark.gpu
def test_moe_experts_full_size_gpu():
    # The MiniMax-M2 layer (hidden 3072, 256 experts of width 1536, top-8) on 4096 tokens.
    inputs, dout = _expert_inputs(4096, 3072, 1536, 256, 8, torch.bfloat16)
    _compare(inputs, dout, torch.bfloat16)


@pytest.mark.gpu
def test_moe_layer_never_synchronises_with_the_host():
    inputs, dout = _expert_inputs(2048, 256, 128, 64, 8, torch.bfloat16)
    logits = torch.randn(2048, 64, device="cuda", requires_grad=True)
    bias = torch.zeros(64, device="cuda")
    for sync_mode in (0, "error"):
        # The first pass autotunes (which synchronises); the second must not synchronise at all.
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            weights, experts, _ = route(logits, bias, 8)
            x, _, _, w_gate, w_up, w_down = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            moe_experts(x, weights, experts, w_gate, w_up, w_down).backward(dout)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_moe_experts_fp32_gpu():
    # fp32 tiles take twice the shared memory of bf16: the autotuner must still find a config
    # that fits (every bf16-tuned config over-asked on an H100 once).
    # On a GPU an fp32 tl.dot runs in tf32 (2.3e-3 on the output, H100, 2026-11-27), so the
    # check is by norm against the fp32 loop.
    inputs, dout = _expert_inputs(1024, 512, 256, 16, 4, torch.float32)
    tri, ref = _run(moe_experts_triton, inputs, dout), _run(moe_experts_naive, inputs, dout)
    for name, a, b in zip(NAMES, tri, ref):
        assert rel_err(a, b) < 5e-3, (name, rel_err(a, b))
