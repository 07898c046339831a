"""On a GPU in bf16: the generator's logprobs equal the training forward's within bf16 noise.

The noise scale is measured, not assumed: the same tokens scored by the dense bf16 forward and
by an fp32 copy of the same weights (on the CPU, through the plain-PyTorch MoE reference, so
that the yardstick does not share the GPU kernels under test). The generator (KV cache, left-padded batch, shared group
prefill, the MoE layer's all-experts path at one token per step and its Triton kernels in the
prefill) must stay within twice that, on average and at the worst token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def _scored(model: Transformer, prompts, completions) -> torch.Tensor:
    """Forward logprobs of every completion token, one sequence at a time, concatenated."""
    device = model.embed.weight.device
    out = []
    for prompt, done in zip(prompts, completions):
        ids = torch.tensor([prompt + done.token_ids], device=device)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids)[0], dim=-1)
        targets = torch.tensor(done.token_ids, device=device)
        out.append(logprobs[len(prompt) - 1 : -1].gather(-1, targets[:, None]).squeeze(-1))
    return torch.cat(out).float().cpu()


def test_bf16_generator_logprobs_within_bf16_noise_of_forward(monkeypatch):
    import forge.policy.moe as moe_module

    calls = []
    real = moe_module.moe_experts_all
    monkeypatch.setattr(moe_module, "moe_experts_all", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(0)
    reference = Transformer(ModelConfig.small()).eval()
    model = copy.deepcopy(reference).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (17, 64, 5, 33)]
    # Four groups of four samples: shared prefills, rows of different lengths in one batch.
    prompts = [p for p in base for _ in range(4)]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=48)
    completions = ModelGenerator(model, seed=0).generate(prompts, params)
    generated = torch.tensor([lp for c in completions for lp in c.logprobs])

    forward = _scored(model, prompts, completions)
    fp32 = _scored(reference, prompts, completions)
    noise = (forward - fp32).abs()
    gap = (generated - forward).abs()
    print(f"bf16 generator-vs-forward |dlogprob| mean {gap.mean():.2e} max {gap.max():.2e}; "
          f"bf16-vs-fp32 forward mean {noise.mean():.2e} max {noise.max():.2e}; tokens {gap.numel()}")
    assert 16 in calls, "decoding steps (16 rows) did not take the all-experts path"
    assert noise.max() > 0, "the bf16 and fp32 forwards agree exactly: the model did not run in bf16"
    assert gap.mean() <= 2 * noise.mean() and gap.max() <= 2 * noise.max()


def _msa_small() -> ModelConfig:
    """ModelConfig.small with MSA layers whose blocks the Triton decode kernels take."""
    import dataclasses

    from forge.kernels.msa import MSAConfig

    msa = MSAConfig(enabled=True, block_size=16, top_k=2, index_dim=16, dense_layers=1, dense_below_tokens=40)
    return dataclasses.replace(ModelConfig.small(), msa=msa)


def test_cuda_graph_decoding_stops_rows_as_the_static_step_does():
    """The graph loop reads "every row stopped" only every GRAPH_DONE_CHECK_EVERY steps; rows
    that stop early are still cut at their stop, exactly as the per-step check cuts them."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.small()).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 33, 41)]
    free = ModelGenerator(model, seed=0, decode="static").generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40))
    # Stop ids sampled early in one row and late (or never) in the others.
    params = SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=(free[0].token_ids[3], free[1].token_ids[25]))
    graph = ModelGenerator(model, seed=0, decode="graph").generate(prompts, params)
    static = ModelGenerator(model, seed=0, decode="static").generate(prompts, params)
    assert [c.token_ids for c in graph] == [c.token_ids for c in static]
    assert [c.finish_reason for c in graph] == [c.finish_reason for c in static]
    assert len(graph[0].token_ids) <= 4 and graph[0].finish_reason == "stop"


@pytest.mark.parametrize("config", [ModelConfig.small, _msa_small], ids=["dense", "msa"])
def test_cuda_graph_decoding_replays_the_fixed_shape_step(config, monkeypatch):
    """decode="auto" on CUDA captures `forward_decode` once per call (two calls: the warm-up and
    the capture) and replays it for every later token; greedy tokens equal the graph-free
    fixed-shape step's and the eager loop's, with rows crossing MSA's dense threshold."""
    torch.manual_seed(0)
    model = Transformer(config()).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 36, 45, 45)]
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    calls = []
    real = model.forward_decode
    monkeypatch.setattr(model, "forward_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    graph = ModelGenerator(model, seed=0).generate(prompts, params)
    assert len(calls) == 2, f"forward_decode ran {len(calls)} times: the step was not replayed from a graph"
    static = ModelGenerator(model, seed=0, decode="static").generate(prompts, params)
    eager = ModelGenerator(model, seed=0, decode="eager").generate(prompts, params)
    for gr, st, ea in zip(graph, static, eager):
        assert gr.token_ids == st.token_ids
        diff = (torch.tensor(gr.logprobs) - torch.tensor(st.logprobs)).abs().max().item()
        print(f"graph vs static |dlogprob| max {diff:.1e}")
        assert diff <= 1e-3
        # The eager loop's kernels differ (sliced vs masked attention): bf16 noise may flip a near tie.
        same = next((i for i, (a, b) in enumerate(zip(gr.token_ids, ea.token_ids)) if a != b), len(ea.token_ids))
        assert same >= 8, f"graph and eager decoding part after {same} tokens"


@pytest.mark.parametrize("config", [ModelConfig.small, _msa_small], ids=["dense", "msa"])
def test_cuda_graph_decoding_of_prompts_prefilled_in_parts(config):
    """The gateway's engine prefills requests batch by batch and samples them in one graph-decoded
    call (`prefill` / `generate_prefilled`); in fp32 that samples what one call over every
    prompt samples: the same tokens (temperature 1, same seed), logprobs within fp32 noise."""
    torch.manual_seed(0)
    model = Transformer(config()).to("cuda").eval()
    g = torch.Generator().manual_seed(4)
    a, b, c, d = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 61, 45, 12))
    parts = [[a, b, a], [c], [b, d + c]]
    flat = [p for part in parts for p in part]
    params = SamplingParams(temperature=1.0, max_new_tokens=40)
    one = ModelGenerator(model, seed=5, decode="graph").generate(flat, params)
    gen = ModelGenerator(model, seed=5, decode="graph")
    joined = gen.generate_prefilled([gen.prefill(part) for part in parts], params)
    assert [x.token_ids for x in joined] == [x.token_ids for x in one]
    diff = max((torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item() for x, y in zip(joined, one))
    print(f"parts vs one call |dlogprob| max {diff:.1e}")
    assert diff <= 1e-4


_SAMPLER_NOT_EXACT = pytest.mark.xfail(strict=True, reason=(
    "issue 14's 1e-5 contract between sampler and trainer is not met for prompts of different "
    "lengths: 2.91e-5 max (mean 1.9e-6) on an H100 and 3.05e-5 on an H200 (2026-12-07), where "
    "prompts of one length (2,048, benchmarks/model_step.py) gave 1.9e-6. An MSA block choice "
    "near a tie flips between the batched prefill and the trainer's forward (reproduced on the "
    "CPU, where one choice of one prompt token differed), and the token's cached keys carry it "
    "to every sampled token; batch-invariant numerics agree to the bit "
    "(tests/test_batch_invariant.py); docs/benchmarks.md"))


@pytest.mark.parametrize("numerics", [pytest.param("default", marks=_SAMPLER_NOT_EXACT), "replay", "batch_invariant"])
def test_fp32_msa_100m_sampled_logprobs_equal_the_trainers_within_1e_5(monkeypatch, numerics):
    """Issue 14, point 3: in fp32 the logprobs the generator reports (graph decoding, MSA past its
    dense threshold, rows of different lengths) equal what the trainer's `sequence_logprobs`
    computes for the same tokens within 1e-5. fp32 generation keeps the PyTorch norms and rotary
    embeddings (the trainer's arithmetic). Met with `batch_invariant` numerics (0.0 on an H100,
    2026-12-07) and with routing replay (the generator records every token's experts and blocks,
    the trainer imposes them, merged and unmerged; H100, 2026-12-08: 1.4e-6 and 9.5e-7), not by
    the default kernels choosing alone."""
    import dataclasses
    import random

    import forge.policy.model as model_module
    from forge.trainer.logprobs import sequence_scores

    calls = []
    real = model_module.fused_rms_norm_rope
    monkeypatch.setattr(model_module, "fused_rms_norm_rope", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    invariant, replay = numerics == "batch_invariant", numerics == "replay"
    model = Transformer(dataclasses.replace(ModelConfig.msa_100m(), batch_invariant=invariant)).to("cuda").eval()
    rng = random.Random(1)
    # Prompts past dense_below_tokens (1024): decoding runs the sparse MSA path.
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1100, 1180, 1250, 1300)]
    gen = ModelGenerator(model, seed=0, decode="graph", record_choices=replay)
    done = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=48))
    assert not calls, "fp32 generation took the one-kernel norm + rotary embedding"
    seqs = [p + c.token_ids for p, c in zip(prompts, done)]
    for merge in (False, True):
        with torch.no_grad():
            trained = sequence_scores(model, seqs, merge=merge,
                                      choices=[c.choices for c in done] if replay else None).logprobs
        diffs = torch.cat([(t[len(p) - 1:].double().cpu() - torch.tensor(c.logprobs, dtype=torch.float64)).abs()
                           for p, c, t in zip(prompts, done, trained)])
        print(f"fp32 sampled vs trained (merge={merge}) |dlogprob| max {diffs.max():.2e} mean {diffs.mean():.2e} "
              f"over {diffs.numel()} tokens")
        assert diffs.numel() == 4 * 48
        assert float(diffs.max()) <= 1e-5
