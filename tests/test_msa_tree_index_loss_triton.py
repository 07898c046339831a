"""The Triton MSA index loss over a prefix tree (triton_tree_index_loss.py) against tree.py.

The reference is `tree.msa_tree(..., with_attention=False, with_index_loss=True, selected=...)`
run in fp64 on the same values; the kernels are compared on the loss and the gradients of iq
and ik, and q and k must get none. Shapes are interpreter-sized (16-wide tiles, a few dozen
tokens); every fresh kernel output starts as NaN, so an element left unwritten fails.
"""

from __future__ import annotations

import pytest
import torch

from forge.kernels.msa import triton_tree_index_loss as tli
from forge.kernels.msa.tree import kept_keys, msa_tree
from forge.kernels.msa.triton_tree_attention import tile_pairs
from forge.kernels.msa.triton_tree_index_loss import msa_tree_index_loss_triton
from forge.prefix_tree import build_tree, concat_trees

SEQS = [
    list(range(10, 27)) + [1, 2, 3, 4, 5, 6],
    list(range(10, 27)) + [1, 2, 3, 9, 9, 9, 9, 9, 9, 9, 9],  # branches inside a block
    list(range(10, 27)) + [1, 2, 3],  # ends at the branch point
    list(range(10, 22)) + [7] * 14,  # branches earlier
    list(range(10, 27)) + [1, 2, 3, 4, 5, 6],  # a duplicate
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209],  # a second tree
]
SEQS_B = [list(range(30, 52)) + [1] * 9, list(range(30, 52)) + [2] * 4, list(range(30, 40)),
          [300 + i for i in range(7)]]


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    def empty(*shape, **kw):
        return torch.full(shape, float("nan"), **kw)

    monkeypatch.setattr(tli, "_empty", empty)


def _inputs(b, t, hq=4, hkv=2, d=16, di=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, t, hq, d) * 1.5, mk(b, t, hkv, d), mk(b, t, hkv, di) * 2, mk(b, t, di)


def _selection(pos, hkv, top_k, block_size, seed=1):
    # Random block ids in any order, with -1 slots, repeats and blocks a row cannot see (up to
    # one past the last block, the most tree.py takes).
    g = torch.Generator().manual_seed(seed)
    n_blocks = int(pos.max()) // block_size + 1
    return torch.randint(-1, n_blocks + 1, (*pos.shape, hkv, top_k), generator=g, dtype=torch.int32)


def _chain(b, t):
    return torch.full((b, t), t), torch.arange(t).expand(b, t)


def _forest_batch():
    """Two forests in one batch: SEQS and SEQS_B padded with a separate filler sequence."""
    first = build_tree(SEQS)
    n = first.num_tokens
    short = n - build_tree(SEQS_B).num_tokens
    second = build_tree(SEQS_B + [[900 + i for i in range(short)]])
    assert second.num_tokens == n
    stack = lambda name: torch.stack([getattr(first, name), getattr(second, name)])  # noqa: E731
    return first, stack("subtree_end"), stack("position"), stack("multiplicity")


def _reference(q, k, iq, ik, sel, se, pos, weight, **kw):
    """Loss and the gradients of iq and ik through tree.py, in fp64."""
    iq, ik = iq.double().requires_grad_(), ik.double().requires_grad_()
    _, loss = msa_tree(q.double(), k.double(), None, iq, ik, se, pos, top_k=sel.shape[-1], selected=sel,
                       token_weight=None if weight is None else weight.double(), with_attention=False,
                       with_index_loss=True, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (iq, ik)))


def _triton(q, k, iq, ik, sel, se, pos, weight, dtype, **kw):
    """Loss and the gradients of iq and ik through the kernels on inputs cast to dtype; q and k get none."""
    q, k, iq, ik = (x.to(dtype).requires_grad_() for x in (q, k, iq, ik))
    loss = msa_tree_index_loss_triton(q, k, iq, ik, sel, se, pos, token_weight=weight, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grads = torch.autograd.grad(loss, (q, k, iq, ik), allow_unused=True)
    assert grads[0] is None and grads[1] is None, "q and k must get no gradient from the index loss"
    assert grads[2].dtype == dtype and grads[3].dtype == dtype
    return (loss, grads[2], grads[3]), (q, k, iq, ik)


def _assert_close(got, ref, rtol, name):
    assert ref.abs().amax() > 0, name
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().amax()), msg=name)


def _compare(inputs, sel, se, pos, weight, dtype=torch.float32, rtol=1e-5, grad_rtol=None, **kw):
    (loss, g_iq, g_ik), cast = _triton(*inputs, sel, se, pos, weight, dtype, **kw)
    # The reference sees the values the kernels saw (after rounding to dtype), in fp64.
    ref = _reference(*cast, sel, se, pos, weight, **kw)
    _assert_close(loss, ref[0], rtol, "loss")
    _assert_close(g_iq, ref[1], grad_rtol or rtol, "gradient of iq")
    _assert_close(g_ik, ref[2], grad_rtol or rtol, "gradient of ik")


@pytest.mark.parametrize(
    "b,t,hq,hkv,d,di,block_size,top_k",
    [(2, 37, 4, 2, 16, 16, 16, 3), (1, 53, 6, 2, 24, 16, 8, 2), (1, 29, 2, 2, 16, 32, 32, 1)],
    ids=["t37-bs16-top3", "t53-bs8-group3-d24", "t29-bs32-mha-top1"],
)
def test_chain_matches_reference(b, t, hq, hkv, d, di, block_size, top_k):
    se, pos = _chain(b, t)
    sel = _selection(pos, hkv, top_k, block_size)
    _compare(_inputs(b, t, hq, hkv, d, di), sel, se, pos, None, block_size=block_size)


@pytest.mark.parametrize(
    "block_size,dense_below,dense",
    [(8, 0, False), (4, 10, False), (8, 0, True)],
    ids=["bs8-sparse", "bs4-dense-below-10", "bs8-dense"],
)
def test_forest_batch_matches_reference(block_size, dense_below, dense):
    """Two forests in one batch (branches inside blocks, a sequence ending at a branch point,
    a duplicate), weighted by multiplicity."""
    _, se, pos, mult = _forest_batch()
    b, t = se.shape
    sel = _selection(pos, 2, 2, block_size, seed=block_size)
    _compare(_inputs(b, t, seed=3), sel, se, pos, mult.float(), block_size=block_size, dense_below=dense_below,
             dense=dense, scale=0.3)


def test_tiles_spanning_many_blocks_match_reference():
    """Blocks of one token: a 16-key tile spans 16 blocks in a chain; where a packed sequence
    starts, the tile of flat keys 32-47 spans blocks 0-31 (the bit-word test's last bit) and the
    tile 80-95 spans 44 (the slot-by-slot test)."""
    flat = concat_trees([build_tree([[9] * 8]), build_tree([[7] * 32]), build_tree([[5] * 44]),
                         build_tree([[8] * 20, [8] * 10 + [6] * 9])])
    se, pos = flat.subtree_end[None], flat.position[None]
    t = se.shape[1]
    sel = _selection(pos, 2, 5, 1, seed=5)
    _compare(_inputs(1, t, seed=5), sel, se, pos, flat.multiplicity[None].float(), block_size=1, scale=0.3)


@pytest.mark.parametrize(
    "block_size,dense_below,dense,dtype",
    [(8, 0, False, torch.float32), (4, 10, False, torch.float32), (8, 0, True, torch.float32),
     (8, 0, False, torch.bfloat16)],
    ids=["bs8-sparse", "bs4-dense-below-10", "bs8-dense", "bs8-bf16"],
)
def test_the_attentions_log_sum_exps_serve_as_the_teachers(block_size, dense_below, dense, dtype):
    """`main_lse` from the sparse attention's forward (what msa_tree_triton passes on): the first
    kernel then computes only the student's statistics, and the loss and gradients still match
    the reference and the kernels' own statistics."""
    from forge.kernels.msa.triton_tree_attention import msa_tree_sparse_attention_triton

    _, se, pos, mult = _forest_batch()
    b, t = se.shape
    sel = _selection(pos, 2, 2, block_size, seed=block_size + 1)
    kw = dict(block_size=block_size, dense_below=dense_below, dense=dense, scale=0.3)
    own, cast = _triton(*_inputs(b, t, seed=5), sel, se, pos, mult.float(), dtype, **kw)
    q, k, iq, ik = (x.detach() for x in cast)
    _, lse = msa_tree_sparse_attention_triton(q, k, k, sel, se, pos, return_lse=True, **kw)
    iq, ik = iq.requires_grad_(), ik.requires_grad_()
    loss = msa_tree_index_loss_triton(q, k, iq, ik, sel, se, pos, token_weight=mult.float(), main_lse=lse, **kw)
    shared = (loss, *torch.autograd.grad(loss, (iq, ik)))
    ref = _reference(q, k, iq.detach(), ik.detach(), sel, se, pos, mult.float(), **kw)
    grad_rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, mine, want, rtol in zip(("loss", "d iq", "d ik"), shared, own, ref, (1e-5, grad_rtol, grad_rtol)):
        _assert_close(got, want, rtol, name)
        _assert_close(got, mine.double(), rtol, f"{name} against the kernels' own statistics")
    with pytest.raises(ValueError, match="main_lse must be fp32"):
        msa_tree_index_loss_triton(q, k, iq, ik, sel, se, pos, main_lse=lse[:, :1], **kw)


def test_msa_tree_triton_matches_the_reference_with_attention_and_loss_together():
    """The model's call: attention and index loss in one `msa_tree_triton` call (the loss reads
    the attention's statistics), against tree.msa_tree in fp64: output, loss and every gradient."""
    from forge.kernels.msa.tree_triton import msa_tree_triton

    _, se, pos, mult = _forest_batch()
    b, t = se.shape
    sel = _selection(pos, 2, 2, 8, seed=7)
    q, k, iq, ik = _inputs(b, t, seed=6)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kw = dict(block_size=8, top_k=2, dense_below=10, scale=0.3, token_weight=mult.float(), with_index_loss=True,
              selected=sel)
    results = []
    for dtype, fn in ((torch.float32, msa_tree_triton), (torch.float64, msa_tree)):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, iq, ik)]
        out, loss = fn(*xs[:5], se, pos, **kw)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype)).sum() + loss, xs)
        results.append((out, loss, *grads))
    for name, got, want in zip(("out", "loss", "d q", "d k", "d v", "d iq", "d ik"), *results):
        _assert_close(got, want.detach(), 1e-5, name)


def test_bf16_matches_reference():
    """bf16 inputs: the loss keeps fp32 accuracy (the scores are exact products); the gradients
    go through bf16 twice (the probability differences fed to the last product, and the result)."""
    _, se, pos, mult = _forest_batch()
    b, t = se.shape
    sel = _selection(pos, 2, 2, 8)
    _compare(_inputs(b, t, seed=4), sel, se, pos, mult.float(), dtype=torch.bfloat16, rtol=1e-5, grad_rtol=1e-2,
             block_size=8)


def test_tree_equals_its_sequences_alone():
    """Weighted by multiplicity, the tree's loss and gradients are the sum over its sequences,
    run here as one batch of chains padded with zero-weight tokens (which see only themselves)."""
    tree = build_tree(SEQS)
    n = tree.num_tokens
    block_size = 8
    q, k, iq, ik = _inputs(1, n, seed=5)
    sel = _selection(tree.position[None], 2, 2, block_size, seed=6)
    iq, ik = iq.float().requires_grad_(), ik.float().requires_grad_()
    kw = dict(block_size=block_size, dense_below=5)
    loss = msa_tree_index_loss_triton(q.float(), k.float(), iq, ik, sel, tree.subtree_end[None], tree.position[None],
                                      token_weight=tree.multiplicity[None].float(), **kw)
    grads = torch.autograd.grad(loss, (iq, ik))

    longest = max(tree.seq_lengths())
    flat = torch.zeros(len(SEQS), longest, dtype=torch.long)  # padding reads token 0
    weight = torch.zeros(len(SEQS), longest)
    for s, ix in enumerate(tree.seq_index):
        flat[s, : len(ix)] = ix
        weight[s, : len(ix)] = 1
    se, pos = _chain(len(SEQS), longest)
    alone = msa_tree_index_loss_triton(q.float()[0, flat], k.float()[0, flat], iq[0, flat], ik[0, flat], sel[0, flat],
                                       se, pos, token_weight=weight, **kw)
    grads_alone = torch.autograd.grad(alone, (iq, ik))
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=0)
    for name, a, b in zip(("iq", "ik"), grads, grads_alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().amax()), msg=f"gradient of {name}")


def test_deterministic_and_no_grad():
    """Two runs give the same bits; under no_grad (no gradient kernels) the loss is the same."""
    t = 41
    se, pos = _chain(1, t)
    q, k, iq, ik = (x.float() for x in _inputs(1, t, seed=7))
    sel = _selection(pos, 2, 2, 8, seed=8)
    runs = []
    for _ in range(2):
        a, b = iq.clone().requires_grad_(), ik.clone().requires_grad_()
        loss = msa_tree_index_loss_triton(q, k, a, b, sel, se, pos, block_size=8)
        runs.append((loss, *torch.autograd.grad(loss, (a, b))))
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    with torch.no_grad():
        loss = msa_tree_index_loss_triton(q, k, iq.requires_grad_(), ik, sel, se, pos, block_size=8)
    assert torch.equal(loss, runs[0][0]) and loss.grad_fn is None


@pytest.mark.parametrize("dense_below", [0, 12], ids=["sparse", "dense-below-12"])
def test_tile_pairs_cover_every_kept_pair_and_skip_the_rest(dense_below):
    """The host work lists are conservative (every kept (query, key) lies in a listed tile pair)
    and sparse (a tree with a small selection leaves tile pairs out)."""
    _, se, pos, _ = _forest_batch()
    b, t = se.shape
    block_size, block_m, block_n = 4, 4, 8
    sel = _selection(pos, 2, 1, block_size, seed=9)
    iq, ik = torch.randn(b, t, 2, 8), torch.randn(b, t, 8)
    rows = torch.arange(t)
    visible = (rows[None, None, :] <= rows[None, :, None]) & (rows[None, :, None] < se[:, None, :])
    kept = kept_keys(iq, ik, visible, pos // block_size, pos // block_size, pos < dense_below, top_k=1,
                     selected=sel)  # [B, Hkv, T, T]
    pairs = tile_pairs(se, pos // block_size, pos, sel, n_blocks=-(-t // block_size), dense_below=dense_below,
                       dense=False, block_m=block_m, block_n=block_n)
    tile_of = pairs[:, :, rows // block_m][:, :, :, rows // block_n]  # [B, Hkv, T, T]
    assert not (kept & ~tile_of).any(), "a kept pair lies in a skipped tile pair"
    assert pairs.float().mean() < 0.5


def test_empty_batch_and_errors():
    q, k, iq, ik = (x.float() for x in _inputs(1, 5))
    se, pos = _chain(1, 5)
    sel = _selection(pos, 2, 2, 4)
    zero = msa_tree_index_loss_triton(q[:, :0], k[:, :0], iq[:, :0], ik[:, :0], sel[:, :0], se[:, :0], pos[:, :0],
                                      block_size=4)
    assert zero.item() == 0
    bad = [
        (dict(k=k[:, :, :1].expand(1, 5, 3, 16)), "multiple of key/value heads"),
        (dict(iq=iq[:, :, :1]), "one index head per KV group"),
        (dict(ik=ik[:, :, :8]), "ik must be"),
        (dict(selected=sel[:, :4]), "selected must be"),
        (dict(selected=sel.float()), "integer tensor"),
        (dict(subtree_end=se[:, :4]), "subtree_end must be"),
        (dict(q=q.double(), k=k.double()), "msa_tree for fp64"),
        (dict(ik=ik.bfloat16()), "cast them"),
        (dict(token_weight=torch.ones(5)), "token_weight must be"),
    ]
    for change, message in bad:
        args = dict(q=q, k=k, iq=iq, ik=ik, selected=sel, subtree_end=se, position=pos, token_weight=None) | change
        with pytest.raises(ValueError, match=message):
            msa_tree_index_loss_triton(**args, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        msa_tree_index_loss_triton(q, k, iq, ik, sel, se, pos, block_size=0)


@pytest.mark.gpu
def test_gpu_target_size_matches_reference():
    """H100 sizes: a 6144-token tree (a 2048-token prompt, 4 branches of 1024), D = Di = 64, 8/2 heads,
    blocks of 64, top 8."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (2048,)).tolist()
    tree = build_tree([prompt + torch.randint(1000, 2000, (1024,)).tolist() for _ in range(4)])
    t, dev = tree.num_tokens, "cuda"
    q, k, iq, ik = (x.to(dev) for x in _inputs(1, t, 8, 2, 64, 64, seed=10))
    sel = _selection(tree.position[None], 2, 8, 64, seed=11).to(dev)
    se, pos, mult = (x[None].to(dev) for x in (tree.subtree_end, tree.position, tree.multiplicity))
    for dtype, rtol, grad_rtol in ((torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)):
        _compare((q, k, iq, ik), sel, se, pos, mult.float(), dtype=dtype, rtol=rtol, grad_rtol=grad_rtol,
                 block_size=64, dense_below=256)


@pytest.mark.parametrize("case", ["fp32", "dense-below", "dense", "bf16"])
def test_one_node_equals_attention_and_loss_apart(case):
    """Attention and index loss as one autograd node (the dK/dV kernel gives d ik) against the
    two functions called apart (the loss's own d ik kernel): outputs, loss and every gradient."""
    _, se, pos, mult = _forest_batch()
    b, t = se.shape
    sel = _selection(pos, 2, 2, 8, seed=3)
    q, k, iq, ik = _inputs(b, t, seed=9)
    kw = dict(block_size=8, dense_below=10 if case == "dense-below" else 0, dense=case == "dense", scale=0.3)
    _one_node_against_apart((q, k, iq, ik), sel, se, pos, mult.float(), torch.bfloat16 if case == "bf16" else
                            torch.float32, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_one_node_equals_attention_and_loss_apart_at_target_size(dtype):
    """The same at H100 sizes: a 6144-token tree, D = Di = 64, 8/2 heads, blocks of 64, top 8."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (2048,)).tolist()
    tree = build_tree([prompt + torch.randint(1000, 2000, (1024,)).tolist() for _ in range(4)])
    inputs = tuple(x.cuda() for x in _inputs(1, tree.num_tokens, 8, 2, 64, 64, seed=12))
    sel = _selection(tree.position[None], 2, 8, 64, seed=13).cuda()
    se, pos, mult = (x[None].cuda() for x in (tree.subtree_end, tree.position, tree.multiplicity))
    _one_node_against_apart(inputs, sel, se, pos, mult.float(), dtype, block_size=64, dense_below=256)


def _one_node_against_apart(inputs, sel, se, pos, w, dtype, **kw):
    from forge.kernels.msa.triton_tree_attention import msa_tree_sparse_attention_triton
    from forge.kernels.msa.triton_tree_index_loss import msa_tree_attention_index_loss_triton

    q, k, iq, ik = inputs
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(2), dtype=k.dtype).to(k.device)
    weight = torch.linspace(-1, 1, q.numel(), device=q.device).view(q.shape)
    results = []
    for fused in (True, False):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, iq, ik)]
        if fused:
            got = msa_tree_attention_index_loss_triton(*xs, sel, se, pos, token_weight=w, **kw)
            assert got is not None, "the fused node applies to 16-token query steps"
            out, lse, loss = got
        else:
            out, lse = msa_tree_sparse_attention_triton(*xs[:3], sel, se, pos, return_lse=True, **kw)
            loss = msa_tree_index_loss_triton(xs[0].detach(), xs[1].detach(), xs[3], xs[4], sel, se, pos,
                                              token_weight=w, main_lse=lse, **kw)
        grads = torch.autograd.grad((out.float() * weight).sum() + loss, xs)
        results.append((out, lse, loss, *grads))
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, e in zip(("out", "lse", "loss", "d q", "d k", "d v", "d iq", "d ik"), *results):
        _assert_close(a.double(), e.double(), rtol, name)


def test_one_node_declines_where_it_does_not_apply():
    """No gradient wanted for ik, or query steps under 16 tokens (4 heads a group in the
    interpreter's 32-row tiles): the caller is told to call the two functions."""
    from forge.kernels.msa.triton_tree_index_loss import msa_tree_attention_index_loss_triton

    se, pos = _chain(1, 24)
    sel = _selection(pos, 2, 2, 8)
    q, k, iq, ik = (x.float() for x in _inputs(1, 24))
    kw = dict(block_size=8)
    assert msa_tree_attention_index_loss_triton(q, k, k, iq, ik, sel, se, pos, **kw) is None  # no grad asked
    q4, k4, iq4, ik4 = (x.float() for x in _inputs(1, 24, hq=8, hkv=2))
    ik4.requires_grad_()
    assert msa_tree_attention_index_loss_triton(q4, k4, k4, iq4, ik4, sel, se, pos, **kw) is None
    ik.requires_grad_()
    assert msa_tree_attention_index_loss_triton(q, k, k, iq, ik, sel, se, pos, **kw) is not None
