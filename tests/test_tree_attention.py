"""The Triton tree-attention kernels and the FlexAttention path against `naive.py`.

On the CPU the kernels run under Triton's interpreter at tiny sizes; the GPU-marked tests
repeat the comparison at full size. Errors are measured against an fp64 reference and must stay
within a small multiple of what the reference itself loses at the tested dtype.
"""

from __future__ import annotations

import random

import pytest
import torch

from forge.kernels.tree_attention import tree_attention, tree_attention_naive
from forge.kernels.tree_attention import triton_tree
from forge.kernels.tree_attention.triton_tree import tree_attention_triton
from forge.prefix_tree import build_tree, concat_trees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tree_subtree_end(t: int, seed: int, *, prompt: int, branch: int) -> torch.Tensor:
    """`subtree_end [t]` of a group (a shared prompt, branches at two levels, a duplicate, a
    sequence ending at a branch point) followed by an independent chain filling up to t."""
    rng = random.Random(seed)
    p = [1] * prompt
    seqs = [p, p + [2] * branch, p + [2] * branch]
    for i in range(3, 6):
        mid = [3] * rng.randrange(1, branch + 1)
        seqs += [p + mid + [i] * rng.randrange(1, branch + 1), p + mid + [i + 10] * rng.randrange(1, branch + 1)]
    tree = build_tree(seqs)
    if tree.num_tokens > t:
        raise ValueError(f"test tree has {tree.num_tokens} tokens, more than t={t}")
    if tree.num_tokens < t:
        tree = concat_trees([tree, build_tree([[9] * (t - tree.num_tokens)])])
    return tree.subtree_end


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def run_case(b, t, hq, hkv, d, dtype, *, prompt, branch, seed=0, blocks=None):
    torch.manual_seed(seed)
    se = torch.stack([tree_subtree_end(t, seed + i, prompt=prompt, branch=branch) for i in range(b)]).to(DEVICE)
    q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(b, t, hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    do = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype)
    o = tree_attention_triton(q, k, v, se, blocks=blocks)
    grads = torch.autograd.grad(o, (q, k, v), do)
    # fp64 reference, and the reference run at the tested dtype to scale the tolerance.
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o64 = tree_attention_naive(*x64, se)
    g64 = torch.autograd.grad(o64, x64, do.double())
    xlo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    olo = tree_attention_naive(*xlo, se)
    glo = torch.autograd.grad(olo, xlo, do)
    for name, got, low, ref in zip(["out", "dq", "dk", "dv"], (o, *grads), (olo, *glo), (o64, *g64)):
        assert not torch.isnan(got).any(), f"{name} has NaN: an element was not written"
        ref_err = rel(low, ref)
        assert rel(got, ref) <= 3 * ref_err + 1e-6, f"{name}: kernel {rel(got, ref):.2e} vs reference {ref_err:.2e}"


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every output the kernels allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(triton_tree, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    monkeypatch.setattr(triton_tree, "_empty", lambda *s, **kw: torch.full(s, float("nan"), **kw))


CASES = {
    # id: (b, t, hq, hkv, d, prompt, branch)
    "gqa-odd-t": (1, 61, 4, 2, 16, 20, 5),
    "two-rows-mha-d24": (2, 53, 2, 2, 24, 17, 4),
    "long-prompt-full-blocks": (1, 77, 2, 1, 16, 40, 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_naive(case, dtype, nan_outputs):
    b, t, hq, hkv, d, prompt, branch = CASES[case]
    run_case(b, t, hq, hkv, d, dtype, prompt=prompt, branch=branch)


@pytest.mark.parametrize("case", ["gqa-odd-t", "long-prompt-full-blocks"])
def test_triton_packed_gqa_matches_naive(case, nan_outputs):
    # Forward and dQ programs holding the tokens of every query head of a K/V head.
    b, t, hq, hkv, d, prompt, branch = CASES[case]
    base = triton_tree.default_blocks(d)
    blocks = triton_tree.TreeAttentionBlocks(**{**base.__dict__, "pack_gqa": True})
    assert blocks.pack(hq // hkv) == hq // hkv > 1
    run_case(b, t, hq, hkv, d, torch.float32, prompt=prompt, branch=branch, blocks=blocks)


def test_causal_is_a_special_case(nan_outputs):
    # subtree_end = T everywhere is plain causal attention.
    torch.manual_seed(1)
    t = 37
    q, k, v = (torch.randn(1, t, 2, 16, device=DEVICE) for _ in range(3))
    se = torch.full((1, t), t, device=DEVICE)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(tree_attention_triton(q, k, v, se), ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_fix():
    q = torch.randn(1, 8, 3, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        tree_attention_triton(q, k, k, torch.full((1, 8), 8))
    with pytest.raises(ValueError, match="use tree_attention_naive"):
        tree_attention_triton(q.double(), q.double(), q.double(), torch.full((1, 8), 8))


def test_flex_matches_naive():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from forge.kernels.tree_attention.flex import tree_attention_flex

    torch.manual_seed(0)
    se = tree_subtree_end(70, 0, prompt=20, branch=5)[None].to(DEVICE)
    q = torch.randn(1, 70, 4, 16, device=DEVICE)
    k, v = (torch.randn(1, 70, 2, 16, device=DEVICE) for _ in range(2))
    # Eager: the test is about the mask_mod; the benchmark runs the compiled path at full size.
    got = tree_attention_flex(q, k, v, se, compile=False)
    torch.testing.assert_close(got, tree_attention_naive(q, k, v, se), rtol=1e-4, atol=1e-4)


def test_entry_point_dispatch():
    torch.manual_seed(0)
    se = tree_subtree_end(40, 0, prompt=10, branch=4)[None].to(DEVICE)
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE) for _ in range(3))
    got = tree_attention(q, k, v, se)
    want = tree_attention_triton(q, k, v, se) if DEVICE == "cuda" else tree_attention_naive(q, k, v, se)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("pack", [False, True], ids=["per-head", "packed-gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_triton_full_size(d, dtype, pack, nan_outputs):
    blocks = triton_tree.TreeAttentionBlocks(**{**triton_tree.default_blocks(d).__dict__, "pack_gqa": pack})
    run_case(2, 4099, 8, 2, d, dtype, prompt=1200, branch=250, blocks=blocks)


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 32)], ids=["16x16", "32x16", "16x32"])
def test_block_lists_classify_every_tile_and_block(bm, bn):
    from forge.kernels.tree_attention import tree_mask
    from forge.kernels.tree_attention.triton_tree import block_lists

    se = torch.stack([tree_subtree_end(131, s, prompt=70, branch=6) for s in range(2)])
    lists = block_lists(se.to(torch.int32), bm, bn)
    mask = tree_mask(se)  # [B, T, T]
    t = se.shape[1]
    for b in range(2):
        for i in range((t + bm - 1) // bm):
            full = set(lists.full_idx[b, i, : lists.full_cnt[b, i]].tolist())
            part = set(lists.part_idx[b, i, : lists.part_cnt[b, i]].tolist())
            assert not full & part
            for j in range((t + bn - 1) // bn):
                tile = mask[b, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                rows_full = tile.shape[0] == bm and tile.shape[1] == bn and bool(tile.all())
                if j in full:
                    assert rows_full, f"tile {i} block {j} listed full but not fully visible"
                elif j not in part:
                    assert not tile.any(), f"tile {i} block {j} skipped but visible"
    # The classification pays: some blocks are full, and fewer are listed than the causal
    # triangle holds (some are skipped).
    causal = sum(min(((i + 1) * bm - 1) // bn + 1, (t + bn - 1) // bn) for i in range((t + bm - 1) // bm))
    assert lists.full_cnt.sum() > 0
    assert (lists.full_cnt + lists.part_cnt).sum(-1).max() < causal


@pytest.mark.parametrize("split_below", [2, 5, 16, 256])
def test_the_cpu_path_walks_the_tree_and_equals_the_whole_mask(monkeypatch, split_below):
    """`tree_attention_split` (the CPU path of `tree_attention`): forests of random groups,
    roots and chains, against one [T, T] mask, values and gradients in fp64."""
    from forge.kernels.tree_attention import naive

    monkeypatch.setattr(naive, "SPLIT_BELOW_TOKENS", split_below)
    rng = random.Random(split_below)
    for trial in range(12):
        groups = []
        for _ in range(rng.randrange(1, 4)):
            base = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
            groups.append([base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
                           for _ in range(rng.randrange(1, 6))])
        tree = concat_trees([build_tree(g) for g in groups])
        se = torch.stack([tree.subtree_end, tree.subtree_end])  # two rows
        t = se.shape[1]
        torch.manual_seed(trial)
        x = [torch.randn(2, t, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2)]
        want = tree_attention_naive(*x, se)
        got = tree_attention(*x, se)  # the CPU dispatch
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        do = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, x, do), torch.autograd.grad(want, x, do)):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_the_cpu_path_names_a_malformed_tree():
    q = torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"subtree_end\[0, 1\] = 1 is not in \(1, 3\]"):
        tree_attention(q, q[:, :, :1], q[:, :, :1], torch.tensor([[3, 1, 3]]))
