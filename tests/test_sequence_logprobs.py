"""Merged prefix-tree training equals unmerged training on the real tiny policy (RoPE, GQA, MoE).

The batch has a shared prompt, a shared assistant segment inside the loss region, branches at
several levels, a sequence that ends at a branch point, a duplicated sequence, and a second,
independent tree in the same pack.
"""

from __future__ import annotations

import functools

import pytest
import torch

from forge.policy.config import ModelConfig
from forge.policy.model import Transformer
from forge.policy.moe import moe_layers, router_stats
from forge.prefix_tree import build_tree, pack_groups
from forge.trainer.logprobs import sequence_logprobs, sequence_scores
from forge.trainer.losses import LOSSES

PROMPT = list(range(40, 57))  # 17 prompt tokens, outside the loss region
SHARED = list(range(60, 67))  # an assistant segment every sequence of the group continues


def batch() -> tuple[list[list[int]], list[int]]:
    """Sequences and, per sequence, its prompt length (the loss region starts after it)."""
    g = PROMPT + SHARED
    seqs = [
        g + [1, 2, 3, 4],
        g + [1, 2, 5, 6, 7],  # branches after a shared [1, 2]
        g + [1, 2, 5, 8],  # and again after [1, 2, 5]
        g + [9, 9],
        g,  # ends at the branch point
        PROMPT + [11, 12, 13],  # branches before the shared segment
        g + [1, 2, 3, 4],  # a duplicate
        [200, 201, 202, 203, 204, 205],  # an independent tree
        [200, 201, 210],
    ]
    prompt_len = [len(PROMPT)] * 7 + [2, 2]
    return seqs, prompt_len


def model(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig.tiny()).to(dtype)
    # Non-zero expert biases so routing depends on them, as after some balancing steps.
    for _, moe in moe_layers(m):
        moe.expert_bias.normal_(0, 0.05)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_logprobs_and_entropies_match(dtype):
    m = model(dtype)
    seqs, _ = batch()
    assert build_tree(seqs).token_ratio() > 2
    merged = sequence_scores(m, seqs, with_entropy=True)
    alone = sequence_scores(m, seqs, merge=False, with_entropy=True)
    for s, a, b, ea, eb in zip(seqs, merged.logprobs, alone.logprobs, merged.entropies, alone.entropies):
        assert a.shape == (len(s) - 1,)
        assert rel(a, b) <= TOL[dtype]
        assert rel(ea, eb) <= TOL[dtype]
    # Tensor input gives the same as lists.
    as_tensors = sequence_logprobs(m, [torch.tensor(s) for s in seqs])
    assert all(torch.equal(a, b) for a, b in zip(as_tensors, merged.logprobs))


@functools.cache
def merged_and_unmerged(dtype: torch.dtype, loss_name: str):
    """(loss, {parameter: gradient}) of the merged and of the unmerged batch."""
    m = model(dtype)
    seqs, prompt_len = batch()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = sequence_logprobs(m, seqs, merge=False)
    # Old logprobs off by up to +-0.5 so that some ratios are clipped and some are not.
    old = [b + (torch.rand(b.shape, generator=gen, dtype=b.dtype) - 0.5) for b in base]
    masks = [(torch.arange(len(s) - 1) >= p - 1).to(dtype) for s, p in zip(seqs, prompt_len)]
    adv = torch.randn(len(seqs), generator=gen, dtype=dtype)
    results = []
    for merge in (True, False):
        m.zero_grad(set_to_none=True)
        loss = LOSSES[loss_name](sequence_logprobs(m, seqs, merge=merge), old, masks, adv)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loss_matches(dtype, loss_name):
    (loss_m, _), (loss_u, _) = merged_and_unmerged(dtype, loss_name)
    assert loss_u.abs() > 0
    assert rel(loss_m, loss_u) <= TOL[dtype]


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_every_gradient_matches(dtype, loss_name):
    (_, grads_m), (_, grads_u) = merged_and_unmerged(dtype, loss_name)
    assert grads_m.keys() == grads_u.keys() and len(grads_u) > 10
    for name, g in grads_u.items():
        if g.norm() == 0:
            assert grads_m[name].norm() == 0, name
        else:
            assert rel(grads_m[name], g) <= TOL[dtype], f"gradient of {name}"


def loads(m: Transformer) -> list[torch.Tensor]:
    return [torch.tensor(s.tokens_per_expert) for s in router_stats(m)]


def test_router_load_weighted_by_multiplicity_matches_unmerged():
    m = model(torch.float64).train()
    seqs, _ = batch()
    for _, moe in moe_layers(m):
        moe.load.zero_()
    sequence_logprobs(m, seqs, merge=False)
    unmerged = loads(m)
    for _, moe in moe_layers(m):
        moe.load.zero_()
    sequence_logprobs(m, seqs)
    merged = loads(m)
    assert len(unmerged) == 2 and unmerged[0].sum() > 0
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # Without the weights the merged pass counts each unique token once: the loads differ.
    for _, moe in moe_layers(m):
        moe.load.zero_()
    tree = build_tree(seqs)
    m(tree.token_ids[None], position_ids=tree.position[None], subtree_end=tree.subtree_end[None])
    unweighted = loads(m)
    assert sum(u.sum() for u in unweighted) < sum(b.sum() for b in unmerged)
    assert any(not torch.allclose(u, b) for u, b in zip(unweighted, unmerged))


def test_micro_batches_under_a_token_budget_match():
    m = model(torch.float32)
    seqs, _ = batch()
    whole = build_tree(seqs).num_tokens
    # Room for the longest sequence but not the whole tree: it splits with its prompt repeated.
    budget = max(len(s) for s in seqs) + 2
    assert budget < whole and len(pack_groups([seqs], budget)) > 1
    packed = sequence_scores(m, seqs, with_entropy=True, token_budget=budget)
    alone = sequence_scores(m, seqs, merge=False, with_entropy=True)
    for a, b, ea, eb in zip(packed.logprobs, alone.logprobs, packed.entropies, alone.entropies):
        assert rel(a, b) <= TOL[torch.float32] and rel(ea, eb) <= TOL[torch.float32]


def test_single_token_and_empty_batch():
    m = model(torch.float32)
    out = sequence_logprobs(m, [[5], [5, 6]])
    assert out[0].shape == (0,) and out[1].shape == (1,)
    assert sequence_logprobs(m, []) == []


def test_length_batches_bound_the_padding_and_cover_every_sequence():
    from forge.trainer.logprobs import PAD_WASTE, _length_batches

    lengths = [12, 3, 11, 5, 10, 1, 30, 29, 4]
    batches = _length_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= (1 + PAD_WASTE) * sum(lengths[i] for i in b)
    assert [tuple(b) for b in batches] == [(6, 7), (0, 2, 4), (3, 8, 1), (5,)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_padded_unmerged_batches_equal_one_sequence_at_a_time(dtype, monkeypatch):
    """merge=False with padded=True (the CUDA default) runs sequences of similar length as one
    right-padded batch: logprobs, entropies, every gradient and the MoE loads are those of one
    forward per sequence."""
    m = model(dtype).train()
    seqs, _ = batch()
    calls = []
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda ids, **kw: calls.append(ids.shape[0]) or real(ids, **kw))

    def run(padded: bool):
        for _, moe in moe_layers(m):
            moe.load.zero_()
        m.zero_grad()
        calls.clear()
        sc = sequence_scores(m, seqs, merge=False, with_entropy=True, padded=padded)
        loss = sum((lp * (i + 1)).sum() + e.sum() for i, (lp, e) in enumerate(zip(sc.logprobs, sc.entropies)))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return sc, grads, loads(m), list(calls)

    alone, g_alone, l_alone, c_alone = run(False)
    padded, g_padded, l_padded, c_padded = run(True)
    assert c_alone == [1] * len(seqs) and len(c_padded) < len(seqs) and max(c_padded) > 1
    for a, b, ea, eb in zip(padded.logprobs, alone.logprobs, padded.entropies, alone.entropies):
        assert a.shape == b.shape and rel(a, b) <= TOL[dtype] and rel(ea, eb) <= TOL[dtype]
    assert g_alone.keys() == g_padded.keys()
    for name in g_alone:
        assert rel(g_padded[name], g_alone[name]) <= TOL[dtype], name
    for a, b in zip(l_padded, l_alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_a_temperature_scores_the_tempered_distribution(merge):
    """temperature=T gives log_softmax(logits / T) of each token, and the entropy of that distribution."""
    m = model(torch.float64)
    seqs, _ = batch()
    got = sequence_scores(m, seqs, merge=merge, with_entropy=True, temperature=1.7)
    for s, lp, ent in zip(seqs, got.logprobs, got.entropies):
        logits = m(torch.tensor([s]))[0, :-1] / 1.7
        ref = torch.log_softmax(logits, -1)
        torch.testing.assert_close(lp, ref.gather(-1, torch.tensor(s[1:])[:, None])[:, 0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), rtol=1e-10, atol=1e-10)
    plain = sequence_scores(m, seqs, merge=merge)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(got.logprobs, plain.logprobs) if a.numel())
    with pytest.raises(ValueError, match="greedy rollouts score at 1"):
        sequence_scores(m, seqs, merge=merge, temperature=0.0)
