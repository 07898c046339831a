"""MSA over a flattened prefix tree (forge.kernels.msa.tree) against the definition (naive.py).

A causal row is a tree with one path: there the tree functions must be naive.py. In a real
tree, every token must get what it gets in its own sequence run through naive.py: outputs,
index loss (weighted by multiplicity) and the gradients of every input. Small blocks (4) and
top_k 2 make the selection drop blocks on sequences of a few dozen tokens.
"""

from __future__ import annotations

import pytest
import torch

from forge.kernels.msa.naive import msa_attention_naive, msa_index_loss_naive
from forge.kernels.msa.tree import msa_cache_attention, msa_tree, msa_tree_attention, msa_tree_index_loss
from forge.prefix_tree import build_tree

HQ, HKV, D, DI = 4, 2, 8, 8


def _inputs(b: int, t: int, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(b, t, HQ, D), mk(b, t, HKV, D), mk(b, t, HKV, D), mk(b, t, HKV, DI), mk(b, t, DI)


def _chain(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((b, t), t), torch.arange(t).expand(b, t)


@pytest.mark.parametrize("t,block_size,top_k", [(37, 4, 2), (53, 8, 3), (40, 4, 1), (29, 4, 8)],
                         ids=["bs4-top2", "bs8-top3", "own-block-only", "top-k-covers-all"])
def test_a_causal_row_is_the_definition(t, block_size, top_k):
    q, k, v, iq, ik = _inputs(2, t, torch.float32)
    se, pos = _chain(2, t)
    out = msa_tree_attention(q, k, v, iq, ik, se, pos, block_size=block_size, top_k=top_k)
    torch.testing.assert_close(out, msa_attention_naive(q, k, v, iq, ik, block_size=block_size, top_k=top_k),
                               rtol=1e-5, atol=1e-6)
    for dense in (False, True):
        loss = msa_tree_index_loss(q, k, iq, ik, se, pos, block_size=block_size, top_k=top_k, dense=dense)
        ref = msa_index_loss_naive(q, k, iq, ik, block_size=block_size, top_k=top_k, dense=dense)
        torch.testing.assert_close(loss / (2 * t), ref, rtol=1e-5, atol=1e-7)


def test_dense_below_makes_early_queries_dense_and_leaves_the_rest():
    t, block_size, top_k = 40, 4, 2
    q, k, v, iq, ik = _inputs(1, t)
    se, pos = _chain(1, t)
    sparse = msa_tree_attention(q, k, v, iq, ik, se, pos, block_size=block_size, top_k=top_k)
    dense = msa_tree_attention(q, k, v, iq, ik, se, pos, block_size=block_size, top_k=top_k, dense=True)
    mixed = msa_tree_attention(q, k, v, iq, ik, se, pos, block_size=block_size, top_k=top_k, dense_below=21)
    torch.testing.assert_close(mixed[:, :21], dense[:, :21], rtol=0, atol=0)
    torch.testing.assert_close(mixed[:, 21:], sparse[:, 21:], rtol=0, atol=0)
    # Selection really drops blocks past the first top_k * block_size positions.
    assert (sparse[:, 8:] - dense[:, 8:]).abs().amax() > 1e-2


SEQS = [
    list(range(10, 27)) + [1, 2, 3, 4, 5, 6],
    list(range(10, 27)) + [1, 2, 3, 9, 9, 9, 9, 9, 9, 9, 9],  # branches inside a block
    list(range(10, 27)) + [1, 2, 3],  # ends at the branch point
    list(range(10, 22)) + [7] * 14,  # branches earlier
    list(range(10, 27)) + [1, 2, 3, 4, 5, 6],  # a duplicate
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209],  # a second tree
]


@pytest.mark.parametrize("dense_below", [0, 10], ids=["sparse", "dense-below-10"])
def test_tree_equals_each_sequence_alone(dense_below):
    """Outputs, multiplicity-weighted index loss and every input gradient, in fp64."""
    block_size, top_k = 4, 2
    tree = build_tree(SEQS)
    n = tree.num_tokens
    q, k, v, iq, ik = (x.requires_grad_() for x in _inputs(1, n))
    kw = dict(block_size=block_size, top_k=top_k, dense_below=dense_below)
    out, loss = msa_tree(q, k, v, iq, ik, tree.subtree_end[None], tree.position[None], with_index_loss=True,
                         token_weight=tree.multiplicity[None].double(), **kw)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads_tree = torch.autograd.grad((out * g_out).sum() + loss, (q, k, v, iq, ik))

    outs, total = [], 0.0
    for ix in tree.seq_index:
        args = [x[:, ix] for x in (q, k, v, iq, ik)]
        se, pos = _chain(1, len(ix))
        o, part = msa_tree(*args, se, pos, with_index_loss=True, **kw)
        if dense_below == 0:
            # naive.py computes in fp32.
            torch.testing.assert_close(o, msa_attention_naive(*args, block_size=block_size, top_k=top_k),
                                       rtol=1e-5, atol=1e-6)
            ref = msa_index_loss_naive(args[0], args[1], args[3], args[4], block_size=block_size, top_k=top_k)
            torch.testing.assert_close(part / len(ix), ref.double(), rtol=1e-5, atol=1e-7)
        outs.append((o, ix))
        total = total + part
    alone = torch.zeros_like(out)
    for o, ix in outs:
        # Each flat row appears in several sequences with the same value; write it once per row.
        alone[:, ix] = o
    torch.testing.assert_close(out, alone, rtol=1e-12, atol=1e-12)
    # Upstream gradients: the tree's per-row gradient, split across the sequences through it.
    loss_alone = total + sum((o * g_out[:, ix] / tree.multiplicity[ix].double()[None, :, None, None]).sum()
                             for o, ix in outs)
    grads_alone = torch.autograd.grad(loss_alone, (q, k, v, iq, ik))
    torch.testing.assert_close(loss, total, rtol=1e-12, atol=0)
    for name, a, b in zip("q k v iq ik".split(), grads_tree, grads_alone):
        assert b.abs().amax() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_tree_blocks_are_counted_in_position_space():
    """A branch point inside a block: the two children's tokens of one block are different keys
    of the same position block, and neither child ever sees the other's."""
    tree = build_tree([[5, 6, 7, 1, 1, 1, 1, 1, 1, 1], [5, 6, 7, 2, 2, 2, 2, 2, 2, 2]])
    n = tree.num_tokens
    q, k, v, iq, ik = _inputs(1, n)
    # Make the second child's keys huge: a leak into the first child would dominate its output.
    k = k.clone()
    v = v.clone()
    second = tree.seq_index[1][3:]
    v[:, second] = 1e3
    out = msa_tree_attention(q, k, v, iq, ik, tree.subtree_end[None], tree.position[None], block_size=4, top_k=2)
    first = tree.seq_index[0]
    assert out[:, first].abs().amax() < 10


def test_cache_attention_equals_the_causal_row():
    t, block_size, top_k = 45, 4, 3
    q, k, v, iq, ik = _inputs(2, t)
    se, pos = _chain(2, t)
    full = msa_tree_attention(q, k, v, iq, ik, se, pos, block_size=block_size, top_k=top_k, dense_below=9)
    # The last 5 queries against a cache of all keys (slot = position), as generation runs them.
    tail = slice(t - 5, t)
    out = msa_cache_attention(q[:, tail], iq[:, tail], k, v, ik, pos[:, tail], block_size=block_size,
                              top_k=top_k, dense_below=9)
    torch.testing.assert_close(out, full[:, tail], rtol=1e-12, atol=1e-12)
