"""The tree indexer (triton_tree_indexer.py) against tree.kept_keys, each sequence alone, and the chain indexer.

On the CPU the kernel runs through Triton's interpreter on trees of ~120-140 flat tokens,
blocks of 16 and top_k 2-3, so selection drops blocks; the `gpu` test repeats the comparisons
at the training shape. Trees come from build_tree: a branch point inside a block (the block is
split over far-apart tiles), a sequence that ends at a branch point, a duplicate, nested
branches and a second independent tree in the same flattened row.
"""

from __future__ import annotations

import functools

import pytest
import torch

from forge.kernels.msa.tree import kept_keys
from forge.kernels.msa.triton_indexer import select_blocks_triton
from forge.kernels.msa.triton_tree_indexer import TreeIndexBlocks, select_blocks_tree_triton
from forge.prefix_tree import FlatTree, build_tree

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HKV, DI = 2, 16
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# A value the kernel never writes: a slot left as it was fails the range check.
UNWRITTEN = 12345


def _trunk(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# Blocks of 16: the trunk ends at position 40, inside block 2, so block 2 of the second branch
# is split between the trunk and tiles after the whole first branch.
BRANCH_IN_BLOCK = [
    _trunk(100, 40) + _trunk(1, 50),  # 90 positions, 6 blocks
    _trunk(100, 40) + [7] * 30,
    _trunk(100, 40),  # ends at the branch point
    _trunk(100, 40) + _trunk(1, 50),  # a duplicate
]
# Nested branches (at positions 18 and 32) and a second tree with another first token.
FOREST = [
    _trunk(300, 18) + _trunk(1, 14) + _trunk(60, 20),
    _trunk(300, 18) + _trunk(1, 14) + [9] * 17,
    _trunk(300, 18) + [8] * 28,
    _trunk(500, 40),
]
# (sequences, block_size, top_k, tiles): the interpreter's default tiles (32 queries, keys
# capped at the block); programs of 16 queries, so many tiles are skipped; blocks of 32 streamed
# in tiles of 16 (every block spans two tiles even on a chain) and programs of 64 queries.
CASES = {
    "branch-in-block": (BRANCH_IN_BLOCK, 16, 3, None),
    "forest-nested-q16": (FOREST, 16, 2, TreeIndexBlocks(block_q=16, block_n=16)),
    "bs32-tiles16-q64": (BRANCH_IN_BLOCK, 32, 2, TreeIndexBlocks(block_q=64, block_n=16)),
}


def _select(iq, ik, se, pos, *, block_size, top_k, tiles=None):
    """The kernel's slots, with the output buffer prefilled so an unwritten slot is caught."""
    empty = torch.empty

    def prefilled(*args, **kw):
        return empty(*args, **kw).fill_(UNWRITTEN)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "empty", prefilled)
        sel = select_blocks_tree_triton(iq, ik, se, pos, block_size=block_size, top_k=top_k, blocks=tiles)
    n_blocks = int(pos.max()) // block_size + 1
    assert sel.dtype == torch.int32 and sel.shape == (*iq.shape[:3], top_k)
    assert ((sel >= -1) & (sel < n_blocks)).all(), "a slot was left unwritten or out of range"
    assert torch.equal(sel[..., -1].long(), (pos // block_size)[:, :, None].expand(sel.shape[:3]))
    return sel


def _visible(se: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool, query q sees key k iff k <= q < subtree_end[k]."""
    t = se.shape[1]
    idx = torch.arange(t, device=se.device)
    return (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < se[:, None, :])


def _kept(iq, ik, se, pos, block_size, top_k, selected=None):
    kb = pos // block_size
    dense = torch.zeros(kb.shape, dtype=torch.bool, device=kb.device)
    return kept_keys(iq, ik, _visible(se), kb, kb, dense, top_k=top_k, selected=selected)


def _inputs(b: int, t: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    iq = torch.randn(b, t, HKV, DI, generator=gen).to(device=DEV, dtype=dtype)
    ik = torch.randn(b, t, DI, generator=gen).to(device=DEV, dtype=dtype)
    return iq, ik


def _chain(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((b, t), t, device=DEV), torch.arange(t, device=DEV).expand(b, t)


@functools.cache
def _tree_case(name: str, dtype: torch.dtype):
    """(tree, iq, ik, slots) of one case, computed once for the tests that share it."""
    seqs, block_size, top_k, tiles = CASES[name]
    tree = build_tree(seqs)
    iq, ik = _inputs(1, tree.num_tokens, dtype, seed=sorted(CASES).index(name))
    se, pos = tree.subtree_end[None].to(DEV), tree.position[None].to(DEV)
    return tree, iq, ik, _select(iq, ik, se, pos, block_size=block_size, top_k=top_k, tiles=tiles)


def _canonical(sel: torch.Tensor) -> torch.Tensor:
    """Ascending block indices with -1 at the end."""
    big = 1 << 30
    s = torch.where(sel < 0, big, sel.long()).sort(-1).values
    return torch.where(s == big, -1, s)


def _assert_slots_equal_each_sequence_alone(tree: FlatTree, iq, ik, sel, block_size, top_k, tiles):
    for s, ix in enumerate(tree.seq_index):
        ix = ix.to(DEV)
        se, pos = _chain(1, len(ix))
        alone = _select(iq[:, ix], ik[:, ix], se, pos, block_size=block_size, top_k=top_k, tiles=tiles)
        assert torch.equal(sel[:, ix], alone), f"sequence {s}: tree slots differ from the sequence alone"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_tree_selection_equals_kept_keys(name, dtype):
    _, block_size, top_k, _ = CASES[name]
    tree, iq, ik, sel = _tree_case(name, dtype)
    se, pos = tree.subtree_end[None].to(DEV), tree.position[None].to(DEV)
    # kept_keys computes bf16 inputs in fp32: the reference sees the same rounded values.
    ref = _kept(iq, ik, se, pos, block_size, top_k)
    got = _kept(iq, ik, se, pos, block_size, top_k, selected=sel)
    assert torch.equal(got, ref)
    # The cases are built so that selection drops blocks some query sees.
    assert (_kept(iq, ik, se, pos, block_size, 10**6) & ~ref).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_tree_slots_equal_each_sequence_alone_bitwise(name, dtype):
    """Same blocks in the same slots, whatever the branch, block split or program layout."""
    _, block_size, top_k, tiles = CASES[name]
    tree, iq, ik, sel = _tree_case(name, dtype)
    _assert_slots_equal_each_sequence_alone(tree, iq, ik, sel, block_size, top_k, tiles)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,top_k,tiles",
                         [(16, 3, None), (16, 1, None), (32, 2, TreeIndexBlocks(block_q=64, block_n=16))],
                         ids=["bs16-top3", "own-block-only", "bs32-tiles16-q64"])
def test_chain_keeps_the_chain_indexers_blocks(block_size, top_k, tiles, dtype):
    b, t = 2, 16 * 5 + 7
    iq, ik = _inputs(b, t, dtype, seed=11)
    se, pos = _chain(b, t)
    sel = _select(iq, ik, se, pos, block_size=block_size, top_k=top_k, tiles=tiles)
    chain = select_blocks_triton(iq, ik, block_size=block_size, top_k=top_k)
    assert torch.equal(_canonical(sel), _canonical(chain))
    ref = _kept(iq, ik, se, pos, block_size, top_k)
    assert torch.equal(_kept(iq, ik, se, pos, block_size, top_k, selected=sel), ref)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_ties_go_to_the_lower_block(shape):
    """Every key of block j scores value[j] for every query: ties among blocks 1, 3 and 4."""
    block_size, top_k = 16, 3
    tree = build_tree(BRANCH_IN_BLOCK if shape == "tree" else BRANCH_IN_BLOCK[:1])
    se, pos = tree.subtree_end[None].to(DEV), tree.position[None].to(DEV)
    value = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.0], device=DEV)
    iq = torch.ones(1, tree.num_tokens, HKV, DI, device=DEV)
    ik = (value[pos // block_size] / DI)[..., None].expand(1, tree.num_tokens, DI).contiguous()
    sel = _canonical(_select(iq, ik, se, pos, block_size=block_size, top_k=top_k))
    # The last token of the longest sequence (own block 5) keeps 1 and 3, not 4, of the three 3s.
    last = tree.seq_index[0][-1]
    assert sel[0, last, 0].tolist() == [1, 3, 5]
    # Own block 3: blocks 1 and 2 (3 beats 2 beats 1 among 0..2).
    assert sel[0, tree.seq_index[0][50], 0].tolist() == [1, 2, 3]
    assert torch.equal(_kept(iq, ik, se, pos, block_size, top_k, selected=sel.int()),
                       _kept(iq, ik, se, pos, block_size, top_k))


def test_batch_rows_are_independent():
    """Two trees in two batch rows (the shorter one padded with one-token trees) give what each row gives alone."""
    a, b = build_tree(FOREST[:3]), build_tree(BRANCH_IN_BLOCK[1:3])
    t, m = a.num_tokens, b.num_tokens
    pad = torch.arange(m, t)
    se = torch.stack([a.subtree_end, torch.cat([b.subtree_end, pad + 1])]).to(DEV)
    pos = torch.stack([a.position, torch.cat([b.position, torch.zeros_like(pad)])]).to(DEV)
    iq, ik = _inputs(2, t, torch.float32, seed=7)
    sel = _select(iq, ik, se, pos, block_size=16, top_k=3)
    for r in range(2):
        row = slice(r, r + 1)
        assert torch.equal(sel[row], _select(iq[row], ik[row], se[row], pos[row], block_size=16, top_k=3)), r
    assert torch.equal(_kept(iq, ik, se, pos, 16, 3, selected=sel), _kept(iq, ik, se, pos, 16, 3))


def _bad(**kw):
    t = 20
    args = {"iq": torch.zeros(1, t, HKV, DI), "ik": torch.zeros(1, t, DI), "subtree_end": torch.full((1, t), t),
            "position": torch.arange(t)[None], "block_size": 16, "top_k": 2}
    args.update(kw)
    return args


@pytest.mark.parametrize("args,match", [
    (_bad(iq=torch.zeros(20, HKV, DI)), r"must be \[B, T, Hkv, Di\]"),
    (_bad(ik=torch.zeros(1, 19, DI)), r"must be \[B, T, Hkv, Di\]"),
    (_bad(iq=torch.zeros(1, 20, HKV, 24), ik=torch.zeros(1, 20, 24)), "power of two >= 16"),
    (_bad(iq=torch.zeros(1, 20, HKV, 8), ik=torch.zeros(1, 20, 8)), "pad iq and ik"),
    (_bad(block_size=24), "block_size 24 must be a power of two >= 16"),
    (_bad(block_size=8), "block_size 8 must be a power of two >= 16"),
    (_bad(subtree_end=torch.full((20,), 20)), r"subtree_end must be an integer tensor \[B, T\].*x\[None\]"),
    (_bad(position=torch.arange(20.0)[None]), "position must be an integer tensor"),
    (_bad(ik=torch.zeros(1, 20, DI, dtype=torch.bfloat16)), "share one dtype"),
    (_bad(top_k=0), "at least 1"),
], ids=["iq-3d", "ik-length", "di-24", "di-8", "bs-24", "bs-8", "subtree-end-1d", "float-position",
        "mixed-dtypes", "top-k-0"])
def test_bad_inputs_name_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        select_blocks_tree_triton(args.pop("iq"), args.pop("ik"), args.pop("subtree_end"), args.pop("position"),
                                  **args)


def _assert_near_best(sel, iq, ik, se, pos, block_size, top_k, chunk=1024):
    """Kept blocks are seen, as many as there are (up to top_k - 1), and none left scores above a
    kept one by more than rounding: at thousands of rows, a reference that sums in another order
    may rank two blocks within an ulp of each other differently (the chain test's tolerance)."""
    b, t, hkv, _ = iq.shape
    kb = pos // block_size
    nb = int(kb.max()) + 1
    vis = _visible(se)
    for c0 in range(0, t, chunk):
        c = slice(c0, c0 + chunk)
        scores = torch.einsum("bcgd,bsd->bgcs", iq[:, c].float(), ik.float())
        scores = scores.masked_fill(~vis[:, None, c], float("-inf"))  # [B, Hkv, C, T]
        n = scores.shape[2]
        blocks = torch.full((b, hkv, n, nb), float("-inf"), device=iq.device).scatter_reduce(
            -1, kb[:, None, None, :].expand(b, hkv, n, t), scores, reduce="amax")  # [B, Hkv, C, NB]
        own = kb[:, None, c, None]  # [B, 1, C, 1]
        earlier = (torch.arange(nb, device=iq.device) < own) & (blocks > float("-inf"))
        chosen = sel[:, c, :, :-1].long().permute(0, 2, 1, 3)  # [B, Hkv, C, K-1]
        kept = torch.zeros(b, hkv, n, nb + 1, dtype=torch.bool, device=iq.device)
        kept = kept.scatter(-1, torch.where(chosen < 0, nb, chosen), True)[..., :nb]
        assert not (kept & ~earlier).any(), f"queries {c0}..: a kept block is not an earlier seen block"
        assert torch.equal(kept.sum(-1), earlier.sum(-1).clamp(max=top_k - 1)), f"queries {c0}..: slots missing"
        worst_kept = torch.where(kept, blocks, float("inf")).amin(-1)
        best_left = torch.where(earlier & ~kept, blocks, float("-inf")).amax(-1)
        tol = 1e-5 * blocks[blocks > float("-inf")].abs().max()
        assert (worst_kept >= best_left - tol).all(), f"queries {c0}..: a better block was left"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tree_at_training_shape(dtype):
    """A prompt of 2000 tokens and 8 answers of 300-650, blocks of 64, top 8, Di 64."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 1000, (2000,), generator=gen).tolist()
    seqs = [prompt + [1000 + i] + torch.randint(0, 1000, (300 + 50 * i,), generator=gen).tolist() for i in range(8)]
    tree = build_tree(seqs)
    t, block_size, top_k, di = tree.num_tokens, 64, 8, 64
    iq = torch.randn(1, t, HKV, di, generator=gen).to(DEV, dtype)
    ik = torch.randn(1, t, di, generator=gen).to(DEV, dtype)
    se, pos = tree.subtree_end[None].to(DEV), tree.position[None].to(DEV)
    sel = select_blocks_tree_triton(iq, ik, se, pos, block_size=block_size, top_k=top_k)
    assert torch.equal(sel[..., -1].long(), (pos // block_size)[:, :, None].expand(sel.shape[:3]))
    _assert_near_best(sel, iq, ik, se, pos, block_size, top_k)
    # The same kernel on each sequence alone: exact, whatever the reference's rounding.
    for s, ix in enumerate(tree.seq_index):
        ix = ix.to(DEV)
        se1, pos1 = _chain(1, len(ix))
        alone = select_blocks_tree_triton(iq[:, ix], ik[:, ix], se1, pos1, block_size=block_size, top_k=top_k)
        assert torch.equal(sel[:, ix], alone), f"sequence {s}"
