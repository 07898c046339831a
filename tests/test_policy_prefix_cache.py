"""The generator's prefix cache: a conversation's next turn prefills only its new tokens and
samples exactly what a generator without the cache samples."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge.kernels.msa import MSAConfig
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.prefix_cache import PrefixCache
from forge.policy.sampling import SamplingParams


def tiny(msa: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    if msa:
        cfg = dataclasses.replace(cfg, head_dim=16, rotary_dim=16, msa=MSAConfig(
            enabled=True, block_size=16, top_k=2, index_dim=16, dense_layers=1, dense_below_tokens=40))
    return Transformer(cfg).eval()


def forward_logprobs(model: Transformer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + completion]))[0], dim=-1)
    return logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("msa", [False, True], ids=["dense", "msa"])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_second_turn_reuses_the_first_and_samples_the_same(msa, decode, monkeypatch):
    model = tiny(msa)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 33))
    turn1 = [a, b, b]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    cached = ModelGenerator(model, seed=0, decode=decode, prefix_cache_tokens=10_000)
    plain = ModelGenerator(model, seed=0, decode=decode)
    first = cached.generate(turn1, greedy)
    assert [c.token_ids for c in first] == [c.token_ids for c in plain.generate(turn1, greedy)]
    assert len(cached.prefix_cache) == 2 and cached.prefix_cache.hits == 0  # b's two rows are one sequence
    # Turn 2: each conversation's history, the tool's answer, different lengths per row.
    turn2 = [p + c.token_ids + list(range(100, 100 + 3 * i + 2)) for i, (p, c) in enumerate(zip(turn1, first))]
    widths = []
    real = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda ids, *rest, **kw: widths.append(ids.shape[1]) or real(ids, *rest, **kw))
    second = cached.generate(turn2, SamplingParams(temperature=1.0, max_new_tokens=10))
    # The prefill ran only the new tokens: at most the longest answer plus one sampled token.
    assert widths[0] <= 3 * 2 + 2 + 1 < min(len(p) for p in turn2)
    assert cached.prefix_cache.hits >= sum(len(p) for p in turn2) - 3 * (8 + 3 * 2 + 2)
    monkeypatch.undo()
    again = ModelGenerator(model, seed=0, decode=decode).generate(turn2, SamplingParams(temperature=1.0, max_new_tokens=10))
    for c, p, prompt in zip(second, again, turn2):
        assert c.token_ids == p.token_ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(p.logprobs), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(c.logprobs), forward_logprobs(model, prompt, c.token_ids),
                                   rtol=0, atol=1e-5)


def test_new_weights_empty_the_cache():
    model = tiny()
    gen = ModelGenerator(model, seed=0, prefix_cache_tokens=10_000)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    done = gen.generate([[1, 2, 3, 4, 5]], params)
    gen.policy_version += 1  # what the weight sync does after loading new weights
    gen.generate([[1, 2, 3, 4, 5] + done[0].token_ids + [9]], params)
    assert gen.prefix_cache.hits == 0 and len(gen.prefix_cache) == 1


def test_prefix_cache_keeps_the_longest_common_prefix_and_evicts_the_oldest():
    cache = PrefixCache(budget_tokens=10)
    keys = [torch.arange(n)[:, None].float() for n in (4, 5)]
    cache.store([1, 2, 3, 4], [keys[0]], [keys[0]], [None])
    cache.store([1, 2, 7, 8, 9], [keys[1]], [keys[1]], [None])
    entry, n = cache.lookup([1, 2, 7, 8, 9, 6])
    assert n == 5 and entry.tokens.tolist() == [1, 2, 7, 8, 9]
    entry, n = cache.lookup([1, 2, 3, 4])  # the last token always runs
    assert n == 3 and entry.tokens.tolist() == [1, 2, 3, 4]
    assert cache.lookup([5, 1, 2]) == (None, 0)
    cache.store([6, 6, 6], [keys[0][:3]], [keys[0][:3]], [None])  # 12 > 10: the least recent goes
    assert len(cache) == 2 and cache.tokens == 7 and cache.lookup([1, 2, 7, 8, 0])[1] == 2
    cache.store(list(range(11)), [torch.zeros(11, 1)], [torch.zeros(11, 1)], [None])  # over the budget alone
    assert cache.tokens == 7
    with pytest.raises(ValueError, match="budget_tokens must be at least 1"):
        PrefixCache(0)
