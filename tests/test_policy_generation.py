"""The KV-cached generator: its logprobs are the training forward's, rows do not depend on
their neighbours, groups share one prefill, and temperature / top-p / stop tokens behave."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator, sample_next
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.policy.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny()).eval()


def _forward_logprobs(model: Transformer, prompt: list[int], completion: list[int],
                      temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(ids)[0] / temperature, dim=-1)  # [T, V]
    targets = torch.tensor(completion)
    return logprobs[len(prompt) - 1 : -1].gather(-1, targets[:, None]).squeeze(-1)


def test_generator_logprobs_equal_training_forward_logprobs(model):
    """Prompts of lengths 3, 7 and 5 with a group of three samples of one prompt, sampled with
    temperature and top-p, batched: every reported logprob equals the plain forward's at that
    temperature (the distribution drawn from, before top-p truncation)."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 7, 5))
    prompts = [a, b, b, c, b]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12)
    completions = ModelGenerator(model, ByteTokenizer(), seed=0).generate(prompts, params)
    for prompt, done in zip(prompts, completions):
        assert len(done.token_ids) == 12 and done.finish_reason == "length"
        expected = _forward_logprobs(model, prompt, done.token_ids, temperature=0.8)
        torch.testing.assert_close(torch.tensor(done.logprobs), expected, rtol=0, atol=1e-5)
    # The three samples of prompt b share a prefill but are sampled independently.
    assert len({tuple(completions[i].token_ids) for i in (1, 2, 4)}) > 1


def test_group_prompt_is_prefilled_once(model, monkeypatch):
    calls = []
    original = model.forward_cached

    def counting(ids, *args, **kwargs):
        calls.append(tuple(ids.shape))
        return original(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward_cached", counting)
    ModelGenerator(model, seed=0).generate([[1, 2, 3]] * 4 + [[4, 5]], SamplingParams(max_new_tokens=3))
    # One prefill of the two unique prompts, then one single-token step per new token for all 5 rows.
    assert calls == [(2, 3), (5, 1), (5, 1)]


def test_greedy_rows_do_not_depend_on_their_batch(model):
    prompts = [[7, 8, 9, 10, 11, 12], [40], [100, 3, 3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    together = ModelGenerator(model).generate(prompts, params)
    for prompt, row in zip(prompts, together):
        alone = ModelGenerator(model).generate([prompt], params)[0]
        assert alone.token_ids == row.token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(row.logprobs), rtol=0, atol=1e-5)
        logits = model(torch.tensor([prompt]))[0, -1]
        assert row.token_ids[0] == int(logits.argmax())


def test_stop_tokens_end_a_row_and_are_kept(model):
    # Greedy continuation of this prompt, then stop on its third token.
    prompt = [1, 2, 3]
    free = ModelGenerator(model).generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,))
    stopped, other = ModelGenerator(model).generate([prompt, [9, 9]], params)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-6)
    assert other.finish_reason in ("stop", "length")


def test_top_p_keeps_the_nucleus_and_logprobs_stay_the_models():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, SamplingParams(top_p=0.7), g) for _ in range(300)]
    seen = {int(t) for t, _ in draws}
    assert seen == {0, 1}
    for token, logprob in draws:
        assert float(logprob) == pytest.approx(float(torch.log_softmax(logits, -1)[0, token]))
    hot = [int(sample_next(logits, SamplingParams(temperature=5.0), g)[0]) for _ in range(300)]
    assert 3 in hot


def test_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ModelGenerator(model).generate([[1], []], SamplingParams())

    class Big:
        vocab_size = 10_000

    with pytest.raises(ValueError, match="vocab_size"):
        ModelGenerator(model, Big())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fixed_shape_decoding_step_equals_the_eager_one(model, temperature):
    """decode="static" (the step a CUDA graph captures: one cache-wide masked attention, slots and
    positions advanced on the device) gives the eager loop's tokens and logprobs, with left
    padding, a shared group prompt and rows that stop early."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 9, 5))
    prompts = [a, b, b, c]
    params = SamplingParams(temperature=temperature, max_new_tokens=16, stop_token_ids=(7, 200))
    eager = ModelGenerator(model, seed=1, decode="eager").generate(prompts, params)
    static = ModelGenerator(model, seed=1, decode="static").generate(prompts, params)
    for e, s, prompt in zip(eager, static, prompts):
        assert s.token_ids == e.token_ids and s.finish_reason == e.finish_reason
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(s.logprobs), _forward_logprobs(model, prompt, s.token_ids),
                                   rtol=0, atol=1e-5)


def test_decode_mode_is_checked(model):
    with pytest.raises(ValueError, match="decode must be one of"):
        ModelGenerator(model, decode="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        ModelGenerator(model, decode="graph")


def test_reseed_makes_a_call_depend_only_on_its_seed(model):
    gen = ModelGenerator(model, seed=0, prefix_cache_tokens=4096)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5]] * 3
    gen.reseed(7)
    first = [c.token_ids for c in gen.generate(prompts, params)]
    gen.generate(prompts, params)  # moves the sampler on and fills the prefix cache
    gen.reseed(7)
    assert [c.token_ids for c in gen.generate(prompts, params)] == first
    gen.reseed(8)
    assert [c.token_ids for c in gen.generate(prompts, params)] != first


@pytest.mark.parametrize("msa", [False, True], ids=["moe", "moe+msa"])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_prompts_prefilled_in_parts_sample_what_one_call_samples(msa, decode):
    """The gateway's engine prefills requests batch by batch as they arrive, then samples them
    in one call (`prefill` / `generate_prefilled`). With batch-invariant numerics (each row
    computes the same whatever its batch) that is bitwise the call over all prompts: parts of
    different widths (shifted in the dense slots), a prompt repeated within and across parts,
    the prefix cache reused by a later part, MSA with block selection engaged."""
    import dataclasses

    from forge.kernels.msa import MSAConfig

    cfg = dataclasses.replace(ModelConfig.tiny(), batch_invariant=True, init_std=0.3)
    if msa:
        cfg = dataclasses.replace(cfg, msa=MSAConfig(enabled=True, block_size=4, top_k=2, index_dim=8, dense_layers=1,
                                                     dense_below_tokens=8))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(5)
    a, b, c, d = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 30, 17, 4))
    parts = [[a, b, a], [c], [b, d + c, a]]
    flat = [p for part in parts for p in part]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, top_logprobs=2)
    one = ModelGenerator(model, seed=3, decode=decode).generate(flat, params)
    gen = ModelGenerator(model, seed=3, decode=decode)
    prefilled = [gen.prefill(part) for part in parts]
    assert [p.valid.shape[1] for p in prefilled] == [30, 17, 30]
    many = gen.generate_prefilled(prefilled, params)
    assert [(x.token_ids, x.logprobs, x.extra) for x in many] == [(x.token_ids, x.logprobs, x.extra) for x in one]
    assert len({tuple(x.token_ids) for x in many}) == len(flat)  # every row sampled on its own

    # A later part reusing the prefix cache (the sessions' earlier turns) joins the same way:
    # two generators make the same draws, one keeps keys between calls, the other has none.
    cached = ModelGenerator(model, seed=3, decode=decode, prefix_cache_tokens=4096)
    plain = ModelGenerator(model, seed=3, decode=decode)
    first = cached.generate([a, b], replace(params, max_new_tokens=6))
    assert [x.token_ids for x in plain.generate([a, b], replace(params, max_new_tokens=6))] == [x.token_ids for x in first]
    turn2 = [a + first[0].token_ids + c, b + first[1].token_ids + d]
    joined = cached.generate_prefilled([cached.prefill([c]), cached.prefill(turn2)], params)
    assert cached.prefix_cache.hits > 0
    expected = plain.generate([c] + turn2, params)
    assert [(x.token_ids, x.logprobs) for x in joined] == [(x.token_ids, x.logprobs) for x in expected]


def test_a_part_prefilled_under_old_weights_is_prefilled_again(model):
    gen = ModelGenerator(model, seed=0)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    stale = gen.prefill([[1, 2, 3]])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    try:
        gen.policy_version = 1
        (done,) = gen.generate_prefilled([stale], params)
        assert done.policy_version == 1
        (fresh,) = ModelGenerator(model, seed=0).generate([[1, 2, 3]], params)
        assert done.token_ids == fresh.token_ids and done.logprobs == fresh.logprobs
    finally:
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05)
    with pytest.raises(ValueError, match="at least one prompt"):
        gen.prefill([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.prefill([[1], []])


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("heads", [(4, 2), (8, 2), (2, 2)])
def test_folded_masked_gqa_equals_sdpa_with_gqa(t, heads):
    """Cached attention with a mask, query heads folded into rows of their group (the CUDA path,
    which the memory-efficient kernel takes), equals SDPA's own GQA call."""
    from forge.policy.model import _masked_gqa

    hq, hkv = heads
    g = torch.Generator().manual_seed(t)
    q = torch.randn(3, hq, t, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, hkv, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, t, 11, generator=g) < 0.6
    mask[..., 0] = True  # no empty row
    want = _masked_gqa(q, k, v, mask, fold=False)
    got = _masked_gqa(q, k, v, mask, fold=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if t == 1:  # decoding's [B, 1, 1, S] mask
        torch.testing.assert_close(_masked_gqa(q, k, v, mask[:, :, :1], fold=True), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generation_with_folded_cache_attention_is_the_forward(model, monkeypatch, decode):
    """The generator with the fold forced (as on CUDA): prefills after a cached prefix and
    decoding steps give the plain forward's logprobs."""
    import forge.policy.model as policy_model

    plain = policy_model._masked_gqa
    calls = []

    def folded(q, k, v, mask, fold=None):
        calls.append(q.shape[2])
        return plain(q, k, v, mask, fold=True)

    monkeypatch.setattr(policy_model, "_masked_gqa", folded)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 9, 9)]
    done = ModelGenerator(model, seed=2, decode=decode).generate(prompts, SamplingParams(max_new_tokens=6))
    assert calls
    for prompt, c in zip(prompts, done):
        torch.testing.assert_close(torch.tensor(c.logprobs), _forward_logprobs(model, prompt, c.token_ids),
                                   rtol=0, atol=1e-5)
