"""Tree attention as causal and dense pieces combined by log-sum-exp (`decomposed.py`).

On the CPU the pieces run through `ReferenceBackend` in fp64, so the split of the mask, the
log-sum-exp combination and the backward with the final output and log-sum-exp are checked
against `naive.py` to fp64 rounding. Marked `gpu`: torch's flash attention at full size in bf16,
within a small multiple of the error of the reference run in bf16.
"""

from __future__ import annotations

import pytest
import torch

from forge.kernels.tree_attention import tree_attention, tree_attention_naive, tree_mask
from forge.kernels.tree_attention.decomposed import plan_tree, tree_attention_pieces
from forge.kernels.tree_attention.piece_backends import (
    CudnnBackend,
    ReferenceBackend,
    Segments,
    _single_key_bwd,
    _single_key_fwd,
)
from forge.prefix_tree import build_tree, concat_trees
from test_tree_attention import rel, tree_subtree_end

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grpo(prompt: int, resp: int, n: int) -> list[list[int]]:
    return [[1] * prompt + [10 + i] * resp for i in range(n)]


def chain(turns: int, step: int) -> list[list[int]]:
    return [[7] * (step * (i + 1)) for i in range(turns)]


def one_token_runs(prompt: int, resp: int, pairs: int) -> list[list[int]]:
    """Pairs of responses that share one token after the prompt, then part: runs of length 1."""
    return [[1] * prompt + [50 + i // 2] + [100 + i] * resp for i in range(2 * pairs)]


def trees() -> dict[str, torch.Tensor]:
    """subtree_end [B, T] cases: id -> tensor."""
    two_groups = concat_trees([build_tree(grpo(9, 4, 3)), build_tree(grpo(5, 6, 2))]).subtree_end
    return {
        # Branching at two levels, a duplicate, a sequence ending at a branch point, an
        # independent chain after it; two rows.
        "nested-two-rows": torch.stack([tree_subtree_end(61, s, prompt=20, branch=5) for s in range(2)]),
        "grpo-one-piece": build_tree(grpo(13, 5, 4)).subtree_end[None],
        "chain-no-piece": build_tree(chain(6, 5)).subtree_end[None],
        "two-trees-gathered": two_groups[None],
        # Pairs of responses that share a single token: runs of length 1, pieces of one key.
        "one-token-runs": build_tree(one_token_runs(9, 4, 3)).subtree_end[None],
    }


def pieces_vs_naive(se: torch.Tensor, hq: int, hkv: int, d: int, dtype, device, backend=None, seed=0, plan=None):
    torch.manual_seed(seed)
    b, t = se.shape
    se = se.to(device)
    x = [torch.randn(b, t, h, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv)]
    do = torch.randn(b, t, hq, d, device=device, dtype=dtype)
    o = tree_attention_pieces(*x, se, backend=backend, plan=None if plan is None else plan.to(device))
    got = (o, *torch.autograd.grad(o, x, do))
    x64 = [y.detach().double().requires_grad_() for y in x]
    o64 = tree_attention_naive(*x64, se)
    ref = (o64, *torch.autograd.grad(o64, x64, do.double()))
    xlo = [y.detach().clone().requires_grad_() for y in x]
    olo = tree_attention_naive(*xlo, se)
    low = (olo, *torch.autograd.grad(olo, xlo, do))
    return got, ref, low


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("case", list(trees()), ids=list(trees()))
def test_pieces_match_naive_fp64(case, fused):
    se = trees()[case]
    plan = plan_tree(se, fused=fused)
    got, ref, _ = pieces_vs_naive(se, 4, 2, 8, torch.float64, "cpu", backend=ReferenceBackend(), plan=plan)
    for name, g, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert rel(g, r) < 1e-12, f"{name}: {rel(g, r):.2e}"


def _rows(r) -> torch.Tensor:
    return torch.arange(*r) if isinstance(r, tuple) else r


def coverage(plan, n: int) -> torch.Tensor:
    """[n, n] count of the pieces that hold each (query, key) pair of the flattened rows."""
    cover = torch.zeros(n, n, dtype=torch.int64)
    for call in (plan.base, plan.extra):
        if call is None:
            continue
        qs, ks = _rows(call.q), _rows(call.k)
        cq, ck = call.seg.cu_q.tolist(), call.seg.cu_k.tolist()
        for i in range(len(cq) - 1):
            qi, ki = qs[cq[i]:cq[i + 1]], ks[ck[i]:ck[i + 1]]
            seen = torch.ones(len(qi), len(ki), dtype=torch.int64)
            cover[qi[:, None], ki[None, :]] += seen.tril() if call.causal else seen
    return cover


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_plan_covers_every_visible_pair_once(fused):
    for case, se in trees().items():
        plan = plan_tree(se, fused=fused)
        assert plan.fused == fused
        # The base call holds every query row once, in order.
        assert plan.base.q == (0, se.numel())
        want = torch.block_diag(*tree_mask(se).to(torch.int64))
        assert torch.equal(coverage(plan, se.numel()), want), case


def test_plan_shapes_of_the_benchmark_batches():
    se = build_tree(grpo(64, 16, 4)).subtree_end[None]
    # Split: one causal call over prompt and responses, one dense responses x prompt.
    plan = plan_tree(se, fused=False)
    assert plan.base.seg.cu_q.tolist() == [0, 64, 80, 96, 112, 128]
    assert (plan.extra.q, plan.extra.k, plan.extra.causal) == ((64, 128), (0, 64), False)
    # The four equal responses form one group (one batched call for backends without varlen).
    assert plan.base.seg.groups == [(0, 0, 1, 64, 64), (64, 64, 4, 16, 16)]
    # Fused: the prompt's causal and dense parts as one top-left causal call of all 128 queries
    # against its 64 keys, then the responses' causal self-attention combined into it.
    plan = plan_tree(se, fused=True)
    assert (plan.base.q, plan.base.k, plan.base.seg.groups) == ((0, 128), (0, 64), [(0, 0, 1, 128, 64)])
    assert (plan.extra.q, plan.extra.k, plan.extra.seg.groups) == ((64, 128), (64, 128), [(0, 0, 4, 16, 16)])
    # Nested turns of one conversation are one chain: a single causal piece either way.
    for fused in (False, True):
        plan = plan_tree(build_tree(chain(64, 4)).subtree_end[None], fused=fused)
        assert plan.base.seg.cu_q.tolist() == [0, 256] and plan.extra is None


def test_cost_rule_prefers_triton_for_tiny_runs():
    # Long runs pay; a tree that branches every couple of tokens wastes flash tiles.
    assert plan_tree(build_tree(grpo(4096, 512, 8)).subtree_end[None]).pays
    assert plan_tree(build_tree(chain(32, 128)).subtree_end[None]).pays
    seqs, prefix = [], []
    for i in range(600):
        seqs.append(prefix + [1000 + i] * 2)
        prefix = prefix + [i] * 3
    plan = plan_tree(build_tree(seqs).subtree_end[None])
    assert plan.extra.seg.cu_q.numel() > 500 and not plan.pays


def test_cudnn_is_offered_only_when_chosen(monkeypatch):
    """cuDNN builds a plan per new shape (seconds a step when lengths change every step), so the
    cost rule takes it only with FORGE_CUDNN_ATTENTION=1, even where it would win on tiles."""
    import forge.kernels.tree_attention.decomposed as decomposed

    monkeypatch.setattr(decomposed, "cudnn_usable", lambda: True)
    monkeypatch.setattr(decomposed, "cudnn_top_left", lambda: True)
    se = build_tree(grpo(4096, 512, 8)).subtree_end[None]
    monkeypatch.delenv("FORGE_CUDNN_ATTENTION", raising=False)
    default = plan_tree(se)
    assert default.backend == "flash" and not default.fused and default.pays
    monkeypatch.setenv("FORGE_CUDNN_ATTENTION", "1")
    chosen = plan_tree(se)
    assert chosen.backend == "cudnn" and chosen.cost_pieces < default.cost_pieces


def test_padded_training_attention_leaves_cudnn_out(monkeypatch):
    """The model's causal SDPA (unmerged, padded batches) runs without cuDNN on CUDA unless chosen."""
    from types import SimpleNamespace

    from forge.policy.model import _without_cudnn

    monkeypatch.delenv("FORGE_CUDNN_ATTENTION", raising=False)
    cuda_q = SimpleNamespace(is_cuda=True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _without_cudnn(cuda_q):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    monkeypatch.setenv("FORGE_CUDNN_ATTENTION", "1")
    with _without_cudnn(cuda_q):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with _without_cudnn(torch.zeros(1)):  # the CPU: untouched
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_single_key_pieces_match_reference():
    # cuDNN refuses a causal piece of one query and one key; CudnnBackend does those in closed
    # form, and its backward must use the whole row's o and lse like every other piece.
    torch.manual_seed(0)
    n, hq, hkv, d, scale = 5, 4, 2, 8, 0.3
    q, do, o = (torch.randn(n, hq, d, dtype=torch.float64) for _ in range(3))
    k, v = (torch.randn(n, hkv, d, dtype=torch.float64) for _ in range(2))
    seg = Segments.of(torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
    ref_o, ref_lse, _ = ReferenceBackend().fwd(q, k, v, seg, True, scale)
    got_o, got_lse = _single_key_fwd(q, k, v, scale)
    torch.testing.assert_close(got_o, ref_o)
    torch.testing.assert_close(got_lse, ref_lse.float())
    lse = ref_lse + torch.rand(hq, n, dtype=torch.float64)  # the row also sees other pieces
    ref = ReferenceBackend().bwd(do, q, k, v, o, lse, seg, True, scale, None)
    got = _single_key_bwd(do, q, k, v, o, lse, scale)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lqs", [[1, 1, 3, 3, 3], [4, 4]], ids=["groups", "one-group"])
def test_cudnn_backend_one_key_segments_on_cpu(lqs):
    # Segments of one key never reach cuDNN (it refuses s_q = s_kv = 1), so CudnnBackend runs
    # them on any device: compare it with the reference, one group and several.
    torch.manual_seed(1)
    lq = torch.tensor(lqs)
    seg = Segments.of(lq, torch.ones_like(lq))
    q, do, o = (torch.randn(int(lq.sum()), 4, 8, dtype=torch.float64) for _ in range(3))
    k, v = (torch.randn(len(lqs), 2, 8, dtype=torch.float64) for _ in range(2))
    for causal in (True, False):
        ref_o, ref_lse, _ = ReferenceBackend().fwd(q, k, v, seg, causal, 0.5)
        got_o, got_lse, states = CudnnBackend().fwd(q, k, v, seg, causal, 0.5)
        torch.testing.assert_close(got_o, ref_o)
        torch.testing.assert_close(got_lse, ref_lse.float())
        lse = ref_lse + 0.3
        ref = ReferenceBackend().bwd(do, q, k, v, o, lse, seg, causal, 0.5, None)
        got = CudnnBackend().bwd(do, q, k, v, o, lse, seg, causal, 0.5, states)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_one_token_runs_make_one_key_pieces(fused):
    # The "one-token-runs" case of trees() exercises them through the whole path.
    plan = plan_tree(trees()["one-token-runs"], fused=fused)
    groups = plan.base.seg.groups + (plan.extra.seg.groups if plan.extra is not None else [])
    assert any(lk == 1 for *_, lk in groups)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,fused", [("flash", False), ("cudnn", False), ("cudnn", True),
                                           ("cudnn_expand", True)])
@pytest.mark.parametrize("case", ["nested-two-rows", "grpo-full", "chain-full", "two-groups-full", "one-token-runs"])
def test_pieces_full_size(case, backend, fused):
    if case == "one-token-runs":
        se = build_tree(one_token_runs(1000, 300, 4)).subtree_end[None]
    elif case == "nested-two-rows":
        se = torch.stack([tree_subtree_end(4099, s, prompt=1200, branch=250) for s in range(2)])
    elif case == "grpo-full":
        se = build_tree(grpo(2048, 512, 6)).subtree_end[None]
    elif case == "chain-full":
        se = build_tree(chain(16, 256)).subtree_end[None]
    else:
        se = concat_trees([build_tree(grpo(1500, 300, 4)), build_tree(grpo(700, 400, 3))]).subtree_end[None]
    got, ref, low = pieces_vs_naive(se, 8, 2, 128, torch.bfloat16, "cuda", backend=backend,
                                    plan=plan_tree(se, fused=fused))
    for name, g, r, lo in zip(["out", "dq", "dk", "dv"], got, ref, low):
        assert not torch.isnan(g).any(), name
        assert rel(g, r) <= 3 * rel(lo, r) + 1e-6, f"{name}: pieces {rel(g, r):.2e} vs reference {rel(lo, r):.2e}"


@pytest.mark.gpu
def test_entry_point_takes_pieces_when_they_pay():
    se = build_tree(grpo(1024, 256, 4)).subtree_end[None].cuda()
    q = torch.randn(1, se.shape[1], 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, se.shape[1], 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(tree_attention(q, k, v, se), tree_attention_pieces(q, k, v, se), rtol=0, atol=0)


@pytest.mark.parametrize("rows", ["span", "gathered"])
def test_triton_combine_matches_logaddexp(rows):
    # Under the interpreter on the CPU, at full size on a GPU: the fused in-place combination
    # of two pieces against the same formula in PyTorch.
    from forge.kernels.tree_attention.triton_combine import lse_combine_

    torch.manual_seed(0)
    n, nq, h, d = 50, 19, 3, 24
    o = torch.randn(n, h, d, device=DEVICE)
    lse = torch.randn(h, n, device=DEVICE) * 3
    o_d = torch.randn(nq, h, d, device=DEVICE)
    lse_d = torch.randn(h, nq, device=DEVICE) * 3
    idx = torch.randperm(n, device=DEVICE)[:nq] if rows == "gathered" else torch.arange(7, 7 + nq, device=DEVICE)
    want_l = lse.clone()
    want_l[:, idx] = torch.logaddexp(lse[:, idx], lse_d)
    want_o = o.clone()
    want_o[idx] = (o[idx] * torch.exp(lse[:, idx] - want_l[:, idx]).t()[..., None]
                   + o_d * torch.exp(lse_d - want_l[:, idx]).t()[..., None])
    lse_combine_(o, lse, o_d, lse_d, idx if rows == "gathered" else None, 7)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_l, rtol=1e-5, atol=1e-5)


def test_plan_cache_follows_the_tensor_and_its_contents():
    from forge.kernels.tree_attention import _plan

    se = build_tree(grpo(13, 5, 4)).subtree_end[None].clone()
    p1 = _plan(se, se.device)
    assert _plan(se, se.device) is p1
    # Modified in place: the version counter moves, the plan is rebuilt from the new contents.
    se.copy_(build_tree(chain(3, 11)).subtree_end[None][:, : se.shape[1]].clamp(max=se.shape[1]))
    p2 = _plan(se, se.device)
    assert p2 is not p1 and p2.extra is None
    # Another tensor with equal contents shares the plan.
    assert _plan(se.clone(), se.device) is p2


@pytest.mark.gpu
def test_cudnn_aligns_fused_pieces_top_left():
    # The fused pieces rely on it; the planner checks it once and falls back to the split pieces.
    from forge.kernels.tree_attention.piece_backends import cudnn_top_left

    assert cudnn_top_left()
