"""The MSA definition (naive.py) and the chunked index loss, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forge.kernels.msa import msa_attention, msa_index_loss
from forge.kernels.msa.naive import (
    block_scores_naive,
    msa_attention_naive,
    msa_index_loss_naive,
    select_blocks_naive,
)


def _inputs(b=2, t=53, hq=4, hkv=2, d=16, di=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), mk(b, t, hkv, di), mk(b, t, di)


def _dense_causal(q, k, v):
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


@pytest.mark.parametrize("t", [16 * 3, 16 * 3 + 5], ids=["three-blocks", "odd-tail"])
def test_equals_dense_causal_when_top_k_covers_every_block(t):
    q, k, v, iq, ik = _inputs(t=t)
    out = msa_attention(q, k, v, iq, ik, block_size=16, top_k=math.ceil(t / 16))
    torch.testing.assert_close(out, _dense_causal(q, k, v), atol=1e-5, rtol=1e-5)


def test_queries_that_see_at_most_top_k_blocks_get_dense_rows_the_rest_do_not():
    q, k, v, iq, ik = _inputs(t=16 * 5 + 3)
    out = msa_attention_naive(q, k, v, iq, ik, block_size=16, top_k=2)
    dense = _dense_causal(q, k, v)
    torch.testing.assert_close(out[:, :32], dense[:, :32], atol=1e-5, rtol=1e-5)
    assert (out[:, 32:] - dense[:, 32:]).abs().amax() > 1e-2


def test_selection_is_own_block_plus_best_scoring_earlier_blocks():
    _, _, _, iq, ik = _inputs(t=16 * 6 + 9, hkv=3)
    top_k = 3
    sel = select_blocks_naive(iq, ik, block_size=16, top_k=top_k)
    scores = torch.einsum("btgd,bjd->bgtj", iq, ik)
    for b, t, g in [(0, 5, 0), (1, 40, 2), (0, 70, 1), (1, 104, 0), (0, 16, 2)]:
        own = t // 16
        # Brute force: score each earlier block by its max token score, rank by (-score, index).
        ranked = sorted(range(own), key=lambda n: (-scores[b, g, t, n * 16:(n + 1) * 16].max().item(), n))
        expected = sorted(ranked[: top_k - 1] + [own])
        got = sel[b, t, g].tolist()
        assert got[: len(expected)] == expected and all(x == -1 for x in got[len(expected):])


def test_block_scores_mask_future_tokens_inside_the_own_block():
    _, _, _, iq, ik = _inputs(t=40)
    scores = block_scores_naive(iq, ik, 16)  # [B, Hkv, T, 3]
    t = 20
    expected = (iq[0, t, 0] @ ik[0, 16:t + 1].T).max()
    torch.testing.assert_close(scores[0, 0, t, 1], expected)
    assert torch.isinf(scores[0, 0, t, 2]) and scores[0, 0, t, 2] < 0


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense-warmup"])
def test_chunked_index_loss_matches_naive_value_and_index_gradients(dense):
    q, k, v, iq, ik = _inputs(t=16 * 4 + 7)
    for x in (q, k, iq, ik):
        x.requires_grad_(True)
    ref = msa_index_loss_naive(q, k, iq, ik, block_size=16, top_k=2, dense=dense)
    ref_grads = torch.autograd.grad(ref, (iq, ik))
    from forge.kernels.msa.index_loss import msa_index_loss_chunked

    sel = select_blocks_naive(iq, ik, block_size=16, top_k=2)
    got = msa_index_loss_chunked(q, k, iq, ik, sel, block_size=16, scale=16**-0.5, dense=dense, chunk=24)
    grads = torch.autograd.grad(got, (iq, ik))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-4)
    assert ref.item() > 0 and ref_grads[0].abs().sum() > 0


def test_index_loss_trains_only_the_index_branch_and_vanishes_when_it_matches():
    q, k, _, iq, ik = _inputs(b=1, t=40, hq=2, hkv=2, d=16, di=16)
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = msa_index_loss(q, k, iq.requires_grad_(), ik.requires_grad_(), block_size=16, top_k=2)
    loss.backward()
    assert q.grad is None and k.grad is None and iq.grad is not None
    # One query head per group, every group sharing one key head, and the index branch equal
    # to the main branch (same dimension, so the same scale): the two distributions agree.
    qs = q.detach()
    kk = k.detach()[:, :, :1].expand(-1, -1, 2, -1).contiguous()
    zero = msa_index_loss(qs, kk, qs, kk[:, :, 0], block_size=16, top_k=2, dense=True)
    assert abs(zero.item()) < 1e-6


def _kept_attention_mass(q, k, selected, block_size):
    """Mean over queries and heads of the dense attention mass that falls in the kept blocks."""
    from forge.kernels.msa.naive import kept_token_mask

    t = q.shape[1]
    pos = torch.arange(t)
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(q.shape[2] // k.shape[2], 2))
    p = torch.softmax(s.masked_fill(pos[None, :] > pos[:, None], float("-inf")), dim=-1)
    mask = kept_token_mask(selected, block_size).repeat_interleave(q.shape[2] // k.shape[2], 1)
    return (p * mask).sum(-1).mean().item()


def test_dense_warmup_kl_teaches_the_index_branch_to_keep_the_attended_blocks():
    torch.manual_seed(0)
    b, t, hq, hkv, d, di, bs, top_k = 1, 128, 2, 1, 16, 16, 16, 3
    # A peaky main branch: each query attends mostly to a few tokens.
    q, k = torch.randn(b, t, hq, d) * 2.0, torch.randn(b, t, hkv, d)
    iq = torch.nn.Parameter(torch.randn(b, t, hkv, di) * 0.1)
    ik = torch.nn.Parameter(torch.randn(b, t, di) * 0.1)
    before = _kept_attention_mass(q, k, select_blocks_naive(iq, ik, block_size=bs, top_k=top_k), bs)
    opt = torch.optim.Adam([iq, ik], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        msa_index_loss(q, k, iq, ik, block_size=bs, top_k=top_k, dense=True).backward()
        opt.step()
    after = _kept_attention_mass(q, k, select_blocks_naive(iq, ik, block_size=bs, top_k=top_k), bs)
    # Random index weights keep about 0.66 of the mass; 40 steps of the dense KL reach about 0.89.
    assert after > before + 0.1, (before, after)
    assert after > 0.85, after
