"""The Triton MSA tree-attention kernels against `tree.msa_tree` given the same kept blocks.

On the CPU the kernels run under Triton's interpreter at tiny sizes (block_size 8 or 16, head
dim 16, under 100 tokens a row). Every case checks the output, the log-sum-exp and dq, dk, dv
against an fp64 reference: fp32 to 1e-5 relative, bf16 within a small multiple of what the
reference itself loses when run in bf16. Fresh outputs are NaN-filled, so an unwritten element
fails. Selections are random subsets of each query's visible blocks (the blocks up to its own)
with empty (-1) slots in random places, as an indexer may give them.
"""

from __future__ import annotations

import pytest
import torch

from forge.kernels.msa import tree, triton_tree_attention
from forge.kernels.msa.triton_tree_attention import msa_tree_sparse_attention_triton
from forge.prefix_tree import build_tree, concat_trees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 16

PROMPT = list(range(100, 135))  # 35 tokens: the first branch is at position 35, inside block 2
TREE_SEQS = [
    PROMPT + [1] * 12,
    PROMPT + [2] * 6,  # a sibling branching inside a block
    PROMPT,  # ends at the branch point
    PROMPT[:21] + [3] * 9,  # branches earlier, inside block 1
    PROMPT + [1] * 12,  # a duplicate
    [500 + i for i in range(6)],  # a second tree in the same row
]
# Row 1: a 17-token chain (its last query opens the second 16-token tile of the interpreter's
# tiles and alone sees the first key tile from there: an off-by-one in a visibility skip shows),
# then another tree branching at position 18, filling the row to the length of row 0.
SECOND_ROW_SEQS = [list(range(200, 218)) + [4] * 16, list(range(200, 218)) + [5] * 17]


def _tree_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """subtree_end, position [2, T]: two rows of flattened trees of one length."""
    first = build_tree(TREE_SEQS)
    second = concat_trees([build_tree([[7] * 17]), build_tree(SECOND_ROW_SEQS)])
    assert second.num_tokens == first.num_tokens
    return (torch.stack([first.subtree_end, second.subtree_end]),
            torch.stack([first.position, second.position]))


def _chain(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((b, t), t), torch.arange(t).expand(b, t).contiguous()


def _selection(position: torch.Tensor, hkv: int, top_k: int, block_size: int, seed: int,
               empty: float = 0.25) -> torch.Tensor:
    """[B, T, Hkv, top_k] int32: per (query, group) up to top_k random blocks it can see (its own
    one included at times), a fraction `empty` of the slots emptied to -1, slots shuffled."""
    g = torch.Generator().manual_seed(seed)
    b, t = position.shape
    n_blocks = int(position.max()) // block_size + 1
    own = position // block_size  # [B, T]
    scores = torch.rand(b, t, hkv, n_blocks, generator=g)
    scores = scores.masked_fill(torch.arange(n_blocks) > own[..., None, None], -1.0)
    top = scores.topk(min(top_k, n_blocks), dim=-1)
    sel = torch.where(top.values >= 0, top.indices, -1)
    sel = torch.nn.functional.pad(sel, (0, top_k - sel.shape[-1]), value=-1)
    sel = sel.masked_fill(torch.rand(sel.shape, generator=g) < empty, -1)
    order = torch.rand(sel.shape, generator=g).argsort(-1)
    return sel.gather(-1, order).to(torch.int32)


def _reference(q, k, v, sel, se, pos, kw):
    """tree.msa_tree's output with the given selection (iq, ik only give shapes)."""
    b, t, hkv = k.shape[:3]
    iq, ik = q.new_zeros(b, t, hkv, 4), q.new_zeros(b, t, 4)
    out, _ = tree.msa_tree(q, k, v, iq, ik, se, pos, top_k=sel.shape[-1], selected=sel, **kw)
    return out


def _reference_lse(q, k, sel, se, pos, kw) -> torch.Tensor:
    """[B, Hq, T] fp64 logsumexp of the scaled scores over the kept keys."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    keys = torch.arange(t)
    visible = (keys[None, None, :] <= keys[None, :, None]) & (keys[None, :, None] < se[:, None, :])
    dense = (pos < kw.get("dense_below", 0)) | kw.get("dense", False)
    kept = tree.kept_keys(q.new_zeros(b, t, hkv, 4), q.new_zeros(b, t, 4), visible, pos // kw["block_size"],
                          pos // kw["block_size"], dense, top_k=sel.shape[-1], selected=sel)  # [B, Hkv, T, T]
    s = torch.einsum("btgrd,bsgd->bgrts", q.double().view(b, t, hkv, hq // hkv, d), k.double()) * d**-0.5
    return torch.logsumexp(s.masked_fill(~kept[:, :, None], float("-inf")), -1).reshape(b, hq, t)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every output the kernels allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(triton_tree_attention, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    monkeypatch.setattr(triton_tree_attention, "_empty", lambda *s, **kw: torch.full(s, float("nan"), **kw))


CASES = {
    # id: (layout, Hq, Hkv, block_size, top_k, fraction of empty slots, dense_below, dense)
    "tree-gqa-4q2kv": ("tree", 4, 2, 16, 2, 0.25, 0, False),
    "tree-dense-below-20": ("tree", 4, 2, 16, 2, 0.25, 20, False),
    "chain-61-bs8-rep3": ("chain61", 6, 2, 8, 3, 0.25, 0, False),
    "chain-61-bs8-own-block-only": ("chain61", 6, 2, 8, 2, 1.0, 0, False),
    "chain-37-dense": ("chain37", 2, 1, 16, 1, 0.25, 0, True),
    # Blocks of one token, so a 16-key tile spans 16 blocks in a chain; where a packed sequence
    # starts, one tile spans exactly 32 (the bit-word test's last bit) and one 44 (the
    # slot-by-slot test): see _wide_rows.
    "wide-bs1-top5": ("wide", 4, 2, 1, 5, 0.25, 0, False),
}


def _wide_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """subtree_end, position [1, T]: chains of 8, 32 and 44 tokens, then a tree. The tile of
    flat keys 32-47 holds positions 24-31 and 0-7 (blocks 0-31 at block_size 1: bit 31 of the
    word), the tile 80-95 positions 40-43 and 0-11 (44 blocks: the slot loop)."""
    flat = concat_trees([build_tree([[9] * 8]), build_tree([[7] * 32]), build_tree([[5] * 44]),
                         build_tree([[8] * 20, [8] * 10 + [6] * 9])])
    return flat.subtree_end[None], flat.position[None]


def run_case(case: str, dtype: torch.dtype, seed: int = 0) -> None:
    layout, hq, hkv, block_size, top_k, empty, dense_below, dense = CASES[case]
    if layout == "tree":
        se, pos = _tree_rows()
    elif layout == "wide":
        se, pos = _wide_rows()
    else:
        se, pos = _chain(1, int(layout[len("chain"):]))
    b, t = se.shape
    sel = _selection(pos, hkv, top_k, block_size, seed, empty)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, D, generator=g, dtype=torch.float64).to(dtype) for h in (hq, hkv, hkv))
    do = torch.randn(b, t, hq, D, generator=g, dtype=torch.float64).to(dtype)
    kw = {"block_size": block_size, "dense_below": dense_below, "dense": dense}

    dev = [x.to(DEVICE) for x in (q, k, v, sel, se, pos, do)]
    xs = [x.clone().requires_grad_() for x in dev[:3]]
    out, lse = msa_tree_sparse_attention_triton(*xs, *dev[3:6], return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, hq, t)
    got = [out, *torch.autograd.grad(out, xs, dev[6])]

    # fp64 reference, and the reference run at the tested dtype to scale the bf16 tolerance.
    x64 = [x.double().requires_grad_() for x in (q, k, v)]
    o64 = _reference(*x64, sel, se, pos, kw)
    ref = [o64, *torch.autograd.grad(o64, x64, do.double())]
    xlo = [x.clone().requires_grad_() for x in (q, k, v)]
    olo = _reference(*xlo, sel, se, pos, kw)
    low = [olo, *torch.autograd.grad(olo, xlo, do)]
    for name, a, lo, r in zip(["out", "dq", "dk", "dv"], got, low, ref):
        a = a.cpu()
        assert not torch.isnan(a).any(), f"{name} has NaN: an element was not written"
        # The interpreter truncates fp32 to bf16 where the GPU rounds: about 2x the reference's
        # error there, hence 3x.
        tol = 1e-5 if dtype == torch.float32 else 3 * rel(lo, r) + 1e-6
        assert rel(a, r) <= tol, f"{name}: kernel {rel(a, r):.2e} from fp64, allowed {tol:.2e}"
    torch.testing.assert_close(lse.cpu().double(), _reference_lse(q, k, sel, se, pos, kw), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_matches_reference(dtype, nan_outputs):
    # Two rows; branch points inside blocks, a sequence ending at a branch point, a duplicate,
    # two trees in one row, 4 query heads on 2 KV heads.
    run_case("tree-gqa-4q2kv", dtype)


@pytest.mark.parametrize("case", ["tree-dense-below-20", "chain-61-bs8-rep3", "chain-61-bs8-own-block-only",
                                  "wide-bs1-top5",
                                  "chain-37-dense"])
def test_variants_match_reference(case, nan_outputs):
    # dense_below; an odd chain whose 16-key tiles span two blocks of 8, with 3 query heads a
    # group (a padded head row), and 8-token query tiles that straddle key tiles; the same with
    # every slot empty (own blocks only); every row dense.
    run_case(case, torch.float32)


def test_tree_equals_each_sequence_alone(nan_outputs):
    """A token's output and lse in the tree are those of every sequence through it run alone."""
    flat = build_tree(TREE_SEQS)
    t = flat.num_tokens
    block_size, hkv = 16, 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, t, h, D, generator=g).to(DEVICE) for h in (4, hkv, hkv))
    sel = _selection(flat.position[None], hkv, 2, block_size, seed=3).to(DEVICE)
    kw = {"block_size": block_size, "dense_below": 5}
    out, lse = msa_tree_sparse_attention_triton(q, k, v, sel, flat.subtree_end[None].to(DEVICE),
                                                flat.position[None].to(DEVICE), return_lse=True, **kw)
    # The sequences as a batch of chains, each padded at its end (later tokens change no
    # earlier row of a chain).
    seqs = [ix.to(DEVICE) for ix in flat.seq_index]
    n = max(len(ix) for ix in seqs)
    index = torch.stack([torch.cat([ix, ix.new_full((n - len(ix),), int(ix[-1]))]) for ix in seqs])  # [S, n]
    se, pos = (x.to(DEVICE) for x in _chain(len(seqs), n))
    out_s, lse_s = msa_tree_sparse_attention_triton(q[0, index], k[0, index], v[0, index], sel[0, index], se, pos,
                                                    return_lse=True, **kw)
    for s, ix in enumerate(seqs):
        m = len(ix)
        torch.testing.assert_close(out_s[s, :m], out[0, ix], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_s[s, :, :m], lse[0, :, ix], rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_fix():
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    sel = torch.zeros(1, 8, 2, 2, dtype=torch.int32)
    se, pos = _chain(1, 8)
    f = msa_tree_sparse_attention_triton
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        f(torch.randn(1, 8, 3, 16), k, k, sel, se, pos, block_size=4)
    with pytest.raises(ValueError, match="use tree.msa_tree for fp64"):
        f(q.double(), k.double(), k.double(), sel, se, pos, block_size=4)
    with pytest.raises(ValueError, match="cast k and v"):
        f(q, k.half(), k.half(), sel, se, pos, block_size=4)
    with pytest.raises(ValueError, match=r"selected must be \[B, T, Hkv, K\]"):
        f(q, k, k, sel[:, :, :1], se, pos, block_size=4)
    with pytest.raises(ValueError, match="selected must be an integer tensor"):
        f(q, k, k, sel.float(), se, pos, block_size=4)
    with pytest.raises(ValueError, match="position must be"):
        f(q, k, k, sel, se, pos[0], block_size=4)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        f(q, k, k, sel, se, pos, block_size=0)


def test_empty_sequence_gives_empty_outputs():
    q, k = torch.randn(1, 0, 4, 16), torch.randn(1, 0, 2, 16)
    out, lse = msa_tree_sparse_attention_triton(q, k, k, torch.zeros(1, 0, 2, 2, dtype=torch.int32),
                                                *_chain(1, 0), block_size=16, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 4, 0)
