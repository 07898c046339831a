"""One MoE layer, forward and backward, bf16: Forge's Triton kernels against torch._grouped_mm and a loop.

The layer is the MiniMax-M2 feed-forward by default: 256 SwiGLU experts of width 1536, top-8,
hidden 3072, on 16K tokens. Each variant computes the router logits (x @ W_r), routes (sigmoid,
bias, top-k, renormalise), runs the experts and returns; the backward reaches x, the router and
all expert weights. Variants:

- triton:            forge.kernels.moe (fused router, device-side permutation, grouped SwiGLU
                     GEMMs), row tile 128; triton_bm64: the same with 64-row tiles
- grouped_mm:        the torch router, a stable argsort, torch._grouped_mm for gate, up and
                     down, a gather-and-sum return (only where torch has _grouped_mm);
                     grouped_mm_kmajor: the same with the weights stored K-major
                     ([E, out, in], passed transposed), the layout torchtitan keeps
- loop:              forge.kernels.moe.naive, a Python loop over experts

TFLOP/s count the expert GEMMs only (6 N k H F forward, 18 N k H F forward and backward);
times are medians of CUDA-event timings. The same routing (same logits) feeds every variant.

    PYTHONPATH=. python benchmarks/moe.py --out moe.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.nn.functional as F
import triton
from _timing import timed

from forge.kernels.moe.naive import moe_experts_naive, route_naive
from forge.kernels.moe.triton_experts import moe_experts_triton
from forge.kernels.moe.triton_router import route_triton


def grouped_mm_experts(x, weights, experts, w_gate, w_up, w_down):
    """The expert layer on torch._grouped_mm: sort pairs by expert, three grouped GEMMs, return."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [N*k]
    counts = torch.zeros(w_gate.shape[0], device=x.device, dtype=torch.int32)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] group ends
    xs = x[order // k]  # [N*k, H]
    act = F.silu(torch._grouped_mm(xs, w_gate, offs=offs)) * torch._grouped_mm(xs, w_up, offs=offs)
    ys = torch._grouped_mm(act, w_down, offs=offs)  # [N*k, H]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    back = ys[inverse].view(n, k, -1).float()  # [N, k, H]
    return (back * weights[..., None]).sum(dim=1).to(x.dtype)


def triton_bm64(x, weights, experts, w_gate, w_up, w_down):
    return moe_experts_triton(x, weights, experts, w_gate, w_up, w_down, block_m=64)


# name -> (router, expert layer, whether it takes K-major weights)
VARIANTS = {
    "triton": (route_triton, moe_experts_triton, False),
    "triton_bm64": (route_triton, triton_bm64, False),
    "grouped_mm": (route_naive, grouped_mm_experts, False),
    "grouped_mm_kmajor": (route_naive, grouped_mm_experts, True),
    "loop": (route_naive, moe_experts_naive, False),
}


def kmajor(w: torch.Tensor) -> torch.Tensor:
    """The same [E, in, out] values stored as [E, out, in] and viewed back: a K-major leaf."""
    return w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def profile(layer, params, dout, out_path: str) -> None:
    """Per-kernel GPU time of two forward+backward steps, printed and written to out_path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            for t in params:
                t.grad = None
            layer().backward(dout)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
    print(table)
    with open(out_path, "w") as fh:
        fh.write(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--ffn", type=int, default=1536, help="expert width")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="moe.json", help="where to write the JSON results")
    p.add_argument("--profile", default="", help="also write the triton variant's per-kernel times here")
    a = p.parse_args()
    n, h, f, e, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
    w_router = (torch.randn(h, e, device=dev, dtype=dt) / h**0.5).requires_grad_()
    bias = 0.01 * torch.randn(e, device=dev)
    w_gate = (torch.randn(e, h, f, device=dev, dtype=dt) / h**0.5).requires_grad_()
    w_up = (torch.randn(e, h, f, device=dev, dtype=dt) / h**0.5).requires_grad_()
    w_down = (torch.randn(e, f, h, device=dev, dtype=dt) / f**0.5).requires_grad_()
    dout = torch.randn(n, h, device=dev, dtype=dt)
    kmajor_weights = [kmajor(w) for w in (w_gate, w_up, w_down)] if "grouped_mm_kmajor" in a.variants else []
    params = [x, w_router, w_gate, w_up, w_down, *kmajor_weights]
    flop = 6 * n * k * h * f
    rows, results = [], {}
    for name in a.variants:
        if name.startswith("grouped_mm") and not hasattr(torch, "_grouped_mm"):
            print(f"skipping grouped_mm: torch {torch.__version__} has no torch._grouped_mm")
            continue
        router, experts_fn, use_kmajor = VARIANTS[name]
        expert_weights = kmajor_weights if use_kmajor else [w_gate, w_up, w_down]

        def layer(router=router, experts_fn=experts_fn, expert_weights=expert_weights):
            weights, experts, _ = router(x @ w_router, bias, k)
            return experts_fn(x, weights, experts, *expert_weights)

        def fwd_bwd(layer=layer):
            for t in params:
                t.grad = None
            layer().backward(dout)

        with torch.no_grad():
            fwd_ms = timed(layer, a.reps, warmup=2)
        step_ms = timed(fwd_bwd, a.reps, warmup=2)
        results[name] = dict(fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, fwd_tflops=flop / fwd_ms / 1e9,
                             fwd_bwd_tflops=3 * flop / step_ms / 1e9)
        print(f"{name}: fwd {fwd_ms:.2f} ms, fwd+bwd {step_ms:.2f} ms", flush=True)
        if name == "triton" and a.profile:
            profile(layer, params, dout, a.profile)
        torch.cuda.empty_cache()
    print(f"\nMoE layer, {torch.cuda.get_device_name()}, bf16, N={n} H={h} F={f} E={e} top-{k}")
    print(f"{'variant':<19}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'vs loop':>9}{'vs grouped_mm':>15}")
    for name, r in results.items():
        vs_loop = results["loop"]["fwd_bwd_ms"] / r["fwd_bwd_ms"] if "loop" in results else float("nan")
        vs_gmm = results["grouped_mm"]["fwd_bwd_ms"] / r["fwd_bwd_ms"] if "grouped_mm" in results else float("nan")
        r.update(speedup_vs_loop=vs_loop, speedup_vs_grouped_mm=vs_gmm)
        print(f"{name:<19}{r['fwd_ms']:>9.2f}{r['fwd_tflops']:>9.0f}{r['fwd_bwd_ms']:>12.2f}"
              f"{r['fwd_bwd_tflops']:>9.0f}{vs_loop:>8.1f}x{vs_gmm:>14.2f}x")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), tokens=n, hidden=h, ffn=f, experts=e, top_k=k,
                dtype="bf16", reps=a.reps)
    with open(a.out, "w") as fh:
        json.dump(dict(meta=meta, results=results), fh, indent=2)


if __name__ == "__main__":
    main()
