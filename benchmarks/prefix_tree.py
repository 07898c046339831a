"""Prefix-tree merging, side by side: unmerged training vs FlexAttention vs Forge's Triton kernel.

Three batches (issue 5): (a) a GRPO group of 16 sharing an 8K prompt with 1K responses; (b)
an agent conversation of 64 turns where each turn is its own sample sharing the history before
it; (c) little sharing, 8 samples of a 1K prompt with 4K responses. For each: token and
attention-pair ratios, then time (median, fwd+bwd, bf16) and peak memory of
- unmerged: every sequence on its own, batched by length, causal flash attention through
  scaled_dot_product_attention (and torch's varlen attention over the packed batch, where the
  installed torch has it; the faster of the two is the baseline);
- flex: the merged tree through FlexAttention with the tree mask (block mask built once, its
  build time reported apart);
- forge: the merged tree through `forge.kernels.tree_attention`, what the policy calls (the
  pieces on cuDNN or flash attention where the cost rule says they pay, else the Triton kernel);
  attention alone also times each path forced (forge_triton, forge_pieces_<backend>_<layout>,
  layout split or fused) and the forward alone;
first attention alone, then a full transformer layer with MoE (forge.policy's Block).
`--backends` times torch's dense attention backends on (a)'s pieces (and a response with the
prompt's keys, bottom-right causal) and checks how cuDNN aligns a causal mask of unequal
lengths, `--profile` lists the CUDA kernels of forge's attention alone and of one forge and one
unmerged layer on (a), `--ratio-sweep` times the layer against the token ratio (where merging
starts to pay), `--sweep` the Triton kernel's tiles.

Run on a GPU: `PYTHONPATH=. python benchmarks/prefix_tree.py --json out.json`. `--tiny` runs
small sizes for a smoke test (the CPU runs the kernel through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# Triton reads this when first imported: on a machine without CUDA the kernel runs interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from forge.prefix_tree import FlatTree, build_tree


@dataclass
class Shape:
    """Attention and layer shape of the benchmark."""

    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    hidden_size: int = 2048
    num_experts: int = 64
    top_k: int = 4
    expert_width: int = 512


@dataclass
class Scenario:
    name: str
    sequences: list[list[int]]
    tree: FlatTree = field(init=False)

    def __post_init__(self) -> None:
        self.tree = build_tree(self.sequences)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 50000) for _ in range(n)]


def scenarios(tiny: bool) -> list[Scenario]:
    rng = random.Random(0)
    k = 1 if not tiny else 64  # tiny divides every length by 64
    prompt = _tokens(rng, 8192 // k)
    grpo = [prompt + _tokens(rng, 1024 // k) for _ in range(16)]
    history, agent = _tokens(rng, 256 // k), []
    for _ in range(64):
        # Each turn appends a tool result and an assistant reply; each turn is one sample.
        history = history + _tokens(rng, 256 // k)
        agent.append(list(history))
    prompt = _tokens(rng, 1024 // k)
    little = [prompt + _tokens(rng, 4096 // k) for _ in range(8)]
    return [Scenario("a_grpo_16x(8K+1K)", grpo), Scenario("b_agent_64_turns", agent),
            Scenario("c_little_8x(1K+4K)", little)]


def by_length(seqs: list[list[int]]) -> list[tuple[int, int]]:
    """(length, count) groups: sequences of one length run as one causal batch."""
    counts: dict[int, int] = {}
    for s in seqs:
        counts[len(s)] = counts.get(len(s), 0) + 1
    return sorted(counts.items())


def timed(fn: Callable[[], None], dev: str, grads: list[torch.Tensor]) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) of fn."""
    def run() -> None:
        for g in grads:
            g.grad = None
        fn()

    if dev == "cuda":
        import triton

        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        return ms, peak
    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3, float("nan")


def one_stream(fn: Callable[[], None]) -> Callable[[], None]:
    """fn with the tree's extra pieces after the base call on the same stream, not beside it."""
    import forge.kernels.tree_attention.decomposed as dec

    def run() -> None:
        dec.OVERLAP_EXTRA = False
        try:
            fn()
        finally:
            dec.OVERLAP_EXTRA = True

    return run


def attention_variants(sc: Scenario, shape: Shape, dev: str, bm) -> dict[str, tuple[Callable, list]]:
    from forge.kernels.tree_attention import tree_attention
    from forge.kernels.tree_attention.decomposed import plan_tree, tree_attention_pieces
    from forge.kernels.tree_attention.piece_backends import BACKENDS, TOP_LEFT
    from forge.kernels.tree_attention.flex import tree_attention_flex
    from forge.kernels.tree_attention.triton_tree import tree_attention_triton

    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    dt = torch.bfloat16
    t = sc.tree
    n = t.num_tokens
    se = t.subtree_end[None].to(dev)

    def leaf(*s):
        return torch.randn(*s, device=dev, dtype=dt).requires_grad_()

    q, k, v = leaf(1, n, hq, d), leaf(1, n, hkv, d), leaf(1, n, hkv, d)
    do = torch.randn(1, n, hq, d, device=dev, dtype=dt)
    out: dict[str, tuple[Callable, list]] = {}
    groups = [(leaf(c, hq, L, d), leaf(c, hkv, L, d), leaf(c, hkv, L, d)) for L, c in by_length(sc.sequences)]

    def unmerged_sdpa():
        for gq, gk, gv in groups:
            o = F.scaled_dot_product_attention(gq, gk, gv, is_causal=True, enable_gqa=True)
            o.backward(torch.ones_like(o))

    out["unmerged_sdpa"] = (unmerged_sdpa, [x for g in groups for x in g])
    try:
        from torch.nn.attention.varlen import varlen_attn

        lens = torch.tensor([len(s) for s in sc.sequences], device=dev)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        total, mx = int(lens.sum()), int(lens.max())
        # The signature moved between torch releases: causal as a flag or as a window.
        params = inspect.signature(varlen_attn).parameters
        kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        hk = hkv if "enable_gqa" in params else hq
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        pq, pk, pv = leaf(total, hq, d), leaf(total, hk, d), leaf(total, hk, d)

        def unmerged_varlen():
            o = varlen_attn(pq, pk, pv, cu, cu, mx, mx, **kw)
            o.backward(torch.ones_like(o))

        out["unmerged_varlen"] = (unmerged_varlen, [pq, pk, pv])
    except ImportError:
        pass

    if dev == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def unmerged_cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                unmerged_sdpa()

        out["unmerged_cudnn"] = (unmerged_cudnn, [x for g in groups for x in g])

    def flex():
        tree_attention_flex(q, k, v, se, block_mask=bm, compile=dev == "cuda").backward(do)

    def forge():
        tree_attention(q, k, v, se).backward(do)

    def forge_triton():
        tree_attention_triton(q, k, v, se).backward(do)

    out["flex"] = (flex, [q, k, v])
    out["forge"] = (forge, [q, k, v])
    out["forge_serial"] = (one_stream(forge), [q, k, v])
    out["forge_triton"] = (forge_triton, [q, k, v])
    # Forward alone (inference, old/reference logprobs), for the split of the time.
    out["forge_fwd_only"] = (lambda: tree_attention(q.detach(), k.detach(), v.detach(), se), [])
    out["forge_triton_fwd_only"] = (lambda: tree_attention_triton(q.detach(), k.detach(), v.detach(), se), [])
    if dev == "cuda":
        # Each backend on the split pieces, and those with a top-left causal mask on the fused ones.
        for layout in ("split", "fused"):
            plan = plan_tree(t.subtree_end[None], fused=layout == "fused").to(dev)
            for backend in BACKENDS:
                if backend != "reference" and (layout == "split" or backend in TOP_LEFT):
                    out[f"forge_pieces_{backend}_{layout}"] = (
                        lambda b=backend, p=plan: tree_attention_pieces(q, k, v, se, plan=p, backend=b).backward(do),
                        [q, k, v])
    return out


def layer_variants(sc: Scenario, shape: Shape, dev: str, bm) -> dict[str, tuple[Callable, list]]:
    import forge.policy.model as pm
    from forge.kernels.tree_attention.flex import tree_attention_flex
    from forge.policy.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=16, hidden_size=shape.hidden_size, num_layers=1, num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, rotary_dim=shape.head_dim // 2,
        qk_norm=True, num_experts=shape.num_experts, top_k=shape.top_k, expert_width=shape.expert_width,
    )
    model = pm.Transformer(cfg)
    block = model.layers[0].to(dev, torch.bfloat16).train()
    params = list(block.parameters())
    t = sc.tree
    n = t.num_tokens
    x = torch.randn(1, n, shape.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    # What the model's forward hands every layer: rotary tables, the tree, the multiplicities.
    tree_pass = model._pass(t.position[None].to(dev), subtree_end=t.subtree_end[None].to(dev),
                            token_weight=t.multiplicity[None].to(dev, torch.float32))
    groups = []
    for L, c in by_length(sc.sequences):
        gx = torch.randn(c, L, shape.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
        groups.append((gx, model._pass(torch.arange(L, device=dev).expand(c, L), plain_causal=True)))

    def unmerged():
        for gx, gp in groups:
            block(gx, gp).sum().backward()

    def merged():
        block(x, tree_pass).sum().backward()

    def flex():
        real = pm.tree_attention
        pm.tree_attention = lambda q, k, v, s, scale=None: tree_attention_flex(
            q, k, v, s, scale=scale, block_mask=bm, compile=dev == "cuda")
        try:
            merged()
        finally:
            pm.tree_attention = real

    return {"unmerged_sdpa": (unmerged, params + [g[0] for g in groups]),
            "flex": (flex, params + [x]), "forge": (merged, params + [x]),
            "forge_serial": (one_stream(merged), params + [x])}


def check(sc: Scenario, shape: Shape, dev: str, bm) -> dict[str, float]:
    """Relative difference of Forge's tree attention from FlexAttention (output and dq), full size."""
    from forge.kernels.tree_attention import tree_attention
    from forge.kernels.tree_attention.flex import tree_attention_flex

    torch.manual_seed(1)
    n = sc.tree.num_tokens
    se = sc.tree.subtree_end[None].to(dev)
    q = torch.randn(1, n, shape.num_heads, shape.head_dim, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, shape.num_kv_heads, shape.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
    res = {}
    outs = []
    for fn in (lambda a, b, c: tree_attention(a, b, c, se),
               lambda a, b, c: tree_attention_flex(a, b, c, se, block_mask=bm, compile=dev == "cuda")):
        qq = q.clone().requires_grad_()
        o = fn(qq, k, v)
        o.float().square().sum().backward()
        outs.append((o.float(), qq.grad.float()))
    for i, name in enumerate(["out", "dq"]):
        a, b = outs[0][i], outs[1][i]
        res[name] = ((a - b).norm() / b.norm()).item()
        if torch.isnan(a).any():
            res[name] = float("nan")
    return res


# (fwd_m, fwd_n, bwd_m, bwd_n, warps, stages[, pack_gqa]); the first is the default.
SWEEP = [(64, 64, 64, 64, 4, 3), (128, 64, 128, 64, 8, 3),
         # GQA packed: a program holds the tokens of all query heads of a K/V head.
         (64, 64, 64, 64, 4, 3, True), (128, 64, 128, 64, 8, 3, True), (128, 64, 64, 64, 8, 3, True)]


def sweep(sc: Scenario, shape: Shape, dev: str) -> dict[str, float]:
    """Forge's kernel fwd+bwd ms for each tile setting in SWEEP, on one scenario."""
    from forge.kernels.tree_attention.triton_tree import TreeAttentionBlocks, tree_attention_triton

    n = sc.tree.num_tokens
    se = sc.tree.subtree_end[None].to(dev)
    q = torch.randn(1, n, shape.num_heads, shape.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, n, shape.num_kv_heads, shape.head_dim, device=dev, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    out = {}
    for cfg in SWEEP:
        blocks = TreeAttentionBlocks(*cfg)
        try:
            out[str(cfg)] = timed(lambda: tree_attention_triton(q, k, v, se, blocks=blocks).backward(do),
                                  dev, [q, k, v])[0]
        except Exception as e:  # noqa: BLE001 - a setting that fails to compile is reported
            out[str(cfg)] = repr(e)[:200]
        print("tile sweep:", cfg, out[str(cfg)])
    return out


def ratio_sweep(shape: Shape, dev: str) -> list[dict]:
    """Full layer, forge vs unmerged, on groups of 8 whose prompt share sets the token ratio."""
    rng = random.Random(1)
    points = []
    for prompt_len, resp_len in ((512, 4608), (1024, 4096), (2048, 3072), (3072, 2048), (4096, 1024)):
        prompt = _tokens(rng, prompt_len)
        sc = Scenario(f"sweep_{prompt_len}+{resp_len}", [prompt + _tokens(rng, resp_len) for _ in range(8)])
        res = {"token_ratio": sc.tree.token_ratio(), "attention_pair_ratio": sc.tree.attention_pair_ratio()}
        variants = layer_variants(sc, shape, dev, None)
        for name in ("unmerged_sdpa", "forge"):
            fn, grads = variants[name]
            res[name + "_ms"] = timed(fn, dev, grads)[0]
        points.append(res)
        print("ratio sweep:", {k: round(v, 3) for k, v in res.items()})
    return points


def _profile(fn: Callable[[], None], grads: list[torch.Tensor], label: str, top: int) -> list[dict]:
    """CUDA kernel time of fn by kernel, from torch.profiler (mean of 3 calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for g in grads:
                g.grad = None
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append({"kernel": e.key[:90], "ms": us / 3e3, "calls": e.count / 3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    print(f"profile {label}: {total:.2f} ms of kernels")
    for r in rows[:top]:
        print(f"  {r['ms']:8.3f} ms {r['calls']:5.0f}x  {r['kernel']}")
    return [{"total_ms": total}] + rows[:top]


def profile_layer(sc: Scenario, shape: Shape, dev: str, variant: str = "forge", top: int = 25) -> list[dict]:
    """Kernels of one fwd+bwd of the layer (`layer_variants`)."""
    fn, grads = layer_variants(sc, shape, dev, None)[variant]
    return _profile(fn, grads, f"{sc.name} layer {variant}", top)


def profile_attention(sc: Scenario, shape: Shape, dev: str, bm, variant: str = "forge", top: int = 40) -> list[dict]:
    """Kernels of one fwd+bwd of attention alone (`attention_variants`), every small one listed."""
    fn, grads = attention_variants(sc, shape, dev, bm)[variant]
    return _profile(fn, grads, f"{sc.name} attention {variant}", top)


def _cudnn_fwd_bwd(q, k, v, causal: bool, bias=None):
    """One forward and backward through ATen's cuDNN attention op, as decomposed.py calls it."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False)
    o, lse = res[0], res[1]
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        torch.ones_like(o), q, k, v, o, lse, res[6], res[7], bias, None, None, q.shape[2], k.shape[2], 0.0, causal)


def cudnn_causal_alignment(dev: str) -> dict[str, str]:
    """How ATen's cuDNN op aligns `is_causal` when a piece has fewer or more queries than keys:
    the fused pieces (more queries) need top-left, a leaf with its ancestors' keys (fewer
    queries) bottom-right."""
    torch.manual_seed(0)
    res = {}
    for lq, lk in ((64, 192), (192, 64)):
        q = torch.randn(1, 4, lq, 64, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, lk, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
        got = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[0].float()
        err = {}
        for name, diag in (("top_left", 0), ("bottom_right", lk - lq)):
            mask = torch.ones(lq, lk, dtype=torch.bool, device=dev).tril(diag)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).nan_to_num()
            err[name] = ((got.nan_to_num() - ref).norm() / ref.norm()).item()
        best = min(err, key=err.get)
        res[f"{lq}x{lk}"] = best if err[best] < 2e-2 else f"neither {err}"
    return res


def dense_backends(shape: Shape, dev: str) -> dict[str, float]:
    """fwd+bwd ms of (a)'s pieces through each dense backend: which kernel is fastest, and what a
    leaf response with the prompt's keys (bottom-right causal, 16 x 1K queries x 9K keys) costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    out: dict = {"cudnn_causal_alignment": cudnn_causal_alignment(dev)}
    pieces = {"causal_8K": (1, 8192, 8192, True), "dense_16Kx8K": (1, 16384, 8192, False),
              "causal_16x1K": (16, 1024, 1024, True), "fused_24Kx8K": (1, 24576, 8192, True),
              "path_16x(1Kx9K)": (16, 1024, 9216, True)}
    for piece, (n, lq, lk, causal) in pieces.items():
        # Token-major storage as in decomposed.py: [n, L, H, D] seen as [n, H, L, D].
        q = torch.randn(n, lq, hq, d, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(n, lk, hkv, d, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                for _ in range(2))
        # Fewer queries than keys: a leaf with its ancestors' keys, bottom-right causal; more:
        # the fused piece, top-left causal (SDPA's is_causal).
        mask = causal_lower_right(lq, lk) if causal and lq < lk else None
        runs = {}
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fn(be=be):
                with sdpa_kernel(be):
                    if mask is not None:
                        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                    else:
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                o.backward(torch.ones_like(o))
            runs[name] = (fn, [q, k, v])
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        runs["aten_cudnn"] = (lambda: _cudnn_fwd_bwd(qd, kd, vd, causal), [])
        if mask is not None:
            # Bottom-right causal as an additive bias broadcast over batch and heads.
            bias = torch.zeros(lq, lk, device=dev, dtype=torch.bfloat16).masked_fill(
                ~torch.ones(lq, lk, dtype=torch.bool, device=dev).tril(lk - lq), float("-inf"))
            runs["aten_cudnn_bias"] = (
                lambda: _cudnn_fwd_bwd(qd, kd, vd, False, bias[None, None].expand(n, hq, lq, lk)), [])
        for name, (fn, grads) in runs.items():
            try:
                out[f"{piece}_{name}"] = timed(fn, dev, grads)[0]
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is reported
                out[f"{piece}_{name}"] = repr(e)[:120]
    # The copies a path piece adds: gather the prompt's keys and values for 16 leaves, sum their
    # key/value gradients back.
    kv = torch.randn(24576, hkv, d, device=dev, dtype=torch.bfloat16)
    rows = torch.cat([torch.cat([torch.arange(8192), 8192 + i * 1024 + torch.arange(1024)]) for i in range(16)]).to(dev)
    out["gather_kv_16x9K"] = timed(lambda: (kv.index_select(0, rows), kv.index_select(0, rows)), dev, [])[0]
    g = torch.randn(16, 9216, hkv, d, device=dev, dtype=torch.bfloat16)
    acc = torch.zeros(24576, hkv, d, device=dev, dtype=torch.float32)
    out["reduce_dkv_16x9K_index_add"] = timed(lambda: acc.index_add_(0, rows, g.view(-1, hkv, d).float()), dev, [])[0]
    out["reduce_dkv_16x9K_sum"] = timed(lambda: g[:, :8192].sum(0, dtype=torch.float32), dev, [])[0]
    print("dense backends (ms):", out)
    return out


def plan_stats(sc: Scenario) -> dict:
    """How the pieces path splits the tree, and the cost rule's two estimates."""
    from forge.kernels.tree_attention.decomposed import plan_tree

    plan = plan_tree(sc.tree.subtree_end[None])
    return {"fused": plan.fused, "base_groups": plan.base.seg.groups,
            "extra_groups": None if plan.extra is None else plan.extra.seg.groups, "backend": plan.backend,
            "cost_pieces": plan.cost_pieces, "cost_triton": plan.cost_triton, "pays": plan.pays}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="prefix_tree_bench.json", help="where to write the results")
    ap.add_argument("--tiny", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tile settings on (a)")
    ap.add_argument("--ratio-sweep", action="store_true", help="layer time vs token ratio (break-even)")
    ap.add_argument("--variants", default="", help="comma-separated variants to time (default all)")
    ap.add_argument("--only", default="", help="comma-separated scenario prefixes to run (a,b,c)")
    ap.add_argument("--backends", action="store_true", help="time SDPA backends on (a)'s dense pieces")
    ap.add_argument("--profile", action="store_true", help="profile the forge layer's kernels on (a)")
    ap.add_argument("--parts", default="attention,layer_moe", help="which of attention,layer_moe to time")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, interleaved; report medians and per-round ratios")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = Shape() if not args.tiny else Shape(4, 2, 16, 64, 8, 2, 32)
    start = time.time()
    report: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                    "torch": torch.__version__, "shape": shape.__dict__, "scenarios": {}}
    from forge.kernels.tree_attention.flex import tree_block_mask

    if args.backends and dev == "cuda":
        report["dense_backends_ms"] = dense_backends(shape, dev)
    for sc in scenarios(args.tiny):
        if args.only and sc.name[0] not in args.only.split(","):
            continue
        t = sc.tree
        entry = {"unique_tokens": t.num_tokens, "unmerged_tokens": sum(len(s) for s in sc.sequences),
                 "token_ratio": t.token_ratio(), "attention_pair_ratio": t.attention_pair_ratio()}
        report["scenarios"][sc.name] = entry
        entry["plan"] = plan_stats(sc)
        t0 = time.perf_counter()
        bm = tree_block_mask(t.subtree_end[None].to(dev))
        entry["flex_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
        try:
            if args.variants and "flex" not in args.variants.split(","):
                raise RuntimeError("flex not among --variants")
            entry["check_forge_vs_flex"] = check(sc, shape, dev, bm)
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the rest still runs
            entry["check_forge_vs_flex"] = {"error": repr(e)[:300]}
        for part, make in (("attention", attention_variants), ("layer_moe", layer_variants)):
            if part not in args.parts.split(","):
                continue
            res = entry.setdefault(part, {})
            variants = {name: v for name, v in make(sc, shape, dev, bm).items()
                        if not args.variants or name in args.variants.split(",")}
            # Rounds interleave the variants, so a drift of the machine's speed reaches them all
            # alike; each variant's figure is its median over the rounds.
            for _ in range(args.rounds):
                for name, (fn, grads) in variants.items():
                    if "error" in res.get(name, {}):
                        continue
                    if time.time() - start > args.budget_s:
                        res.setdefault(name, {"skipped": "time budget"})
                        continue
                    try:
                        ms, mib = timed(fn, dev, grads)
                        r = res.setdefault(name, {"peak_mib": mib, "ms_rounds": []})
                        r["ms_rounds"].append(ms)
                        r["ms"] = statistics.median(r["ms_rounds"])
                    except Exception as e:  # noqa: BLE001
                        res[name] = {"error": repr(e)[:300]}
                    if dev == "cuda":
                        torch.cuda.empty_cache()
            base = min((r["ms"] for k, r in res.items() if k.startswith("unmerged") and "ms" in r), default=None)
            for r in res.values():
                if base and "ms" in r:
                    r["speedup_vs_unmerged"] = base / r["ms"]
            fl, fo = res.get("flex", {}), res.get("forge", {})
            if "ms" in fl and "ms" in fo:
                fo["speedup_vs_flex"] = fl["ms"] / fo["ms"]
                # Paired per round: how far the ratio moves between rounds of the same run.
                paired = [a / b for a, b in zip(fl["ms_rounds"], fo["ms_rounds"])]
                fo["speedup_vs_flex_rounds"] = paired
            ub, fo = res.get("unmerged_sdpa", {}), res.get("forge", {})
            if "ms" in ub and "ms" in fo:
                fo["speedup_vs_unmerged_rounds"] = [a / b for a, b in zip(ub["ms_rounds"], fo["ms_rounds"])]
        if args.profile and sc.name.startswith("a") and dev == "cuda":
            entry["profile_attention"] = {v: profile_attention(sc, shape, dev, bm, v)
                                         for v in ("forge", "forge_pieces_cudnn_split")}
            entry["profile_layer"] = {v: profile_layer(sc, shape, dev, v) for v in ("forge", "unmerged_sdpa")}
        if args.sweep and sc.name.startswith("a") and dev == "cuda":
            entry["forge_tile_sweep_ms"] = sweep(sc, shape, dev)
            print("tile sweep (fwd_m, fwd_n, bwd_m, bwd_n, warps, stages) -> ms:", entry["forge_tile_sweep_ms"])
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print_table(report)
    if args.ratio_sweep:
        report["layer_ratio_sweep"] = ratio_sweep(shape, dev)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['torch']}")
    print(f"{'scenario':22} {'ratio tok/attn':>15} {'part':10} {'variant':16} {'ms':>9} {'MiB':>8} {'x unmerged':>10} {'x flex':>7}")
    for sname, e in report["scenarios"].items():
        ratios = f"{e['token_ratio']:.1f}/{e['attention_pair_ratio']:.1f}"
        for part in ("attention", "layer_moe"):
            for v, r in e.get(part, {}).items():
                if "ms" in r:
                    print(f"{sname:22} {ratios:>15} {part:10} {v:16} {r['ms']:9.2f} {r['peak_mib']:8.0f} "
                          f"{r.get('speedup_vs_unmerged', float('nan')):10.2f} {r.get('speedup_vs_flex', float('nan')):7.2f}")
                    for key in ("speedup_vs_flex_rounds", "speedup_vs_unmerged_rounds"):
                        if len(r.get(key, [])) > 1:
                            print(f"{'':22} {'':>15} {part:10} {v:16} {key}: min {min(r[key]):.3f} "
                                  f"median {statistics.median(r[key]):.3f} max {max(r[key]):.3f}")
                else:
                    print(f"{sname:22} {ratios:>15} {part:10} {v:16} {str(r)[:60]}")
        print(f"{sname:22} check forge vs flex: {e.get('check_forge_vs_flex')}")


if __name__ == "__main__":
    main()
