"""benchmarks/model_step.py's host-side pieces (the timing itself needs a GPU)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_step  # noqa: E402

from forge.policy.config import ModelConfig  # noqa: E402
from forge.policy.model import Transformer  # noqa: E402
from forge.prefix_tree import build_tree  # noqa: E402


def test_varied_batches_change_lengths_and_keep_prefixes():
    seqs = model_step.workload("issue")
    rng = random.Random(0)
    a, b = model_step.varied(seqs, rng), model_step.varied(seqs, rng)
    assert [len(s) for s in a] != [len(s) for s in b]
    for s, x in zip(seqs, a):
        assert len(s) - model_step.VARY_TOKENS < len(x) <= len(s) and x == s[:len(x)]
    # Only response tails go: the prompts' sharing stays (2 groups of 8 on 3,000-token prompts).
    assert build_tree(a).num_tokens - build_tree(seqs).num_tokens == sum(map(len, a)) - sum(map(len, seqs))


def test_step_with_vary_trains_new_lengths_at_every_call(monkeypatch):
    seen = []
    real = model_step.sequence_scores

    def recording(model, seqs, **kw):
        seen.append(tuple(len(s) for s in seqs))
        return real(model, seqs, **kw)

    monkeypatch.setattr(model_step, "sequence_scores", recording)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny())
    g = random.Random(3)
    prompt = [g.randrange(200) for _ in range(40)]
    seqs = [prompt + [g.randrange(200) for _ in range(80)] for _ in range(3)]
    run = model_step.step(model, seqs, merge=True, vary=True)
    run()
    run()
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    seen.clear()
    fixed = model_step.step(model, seqs, merge=True)
    fixed()
    fixed()
    assert seen == [(120, 120, 120)] * 2


def test_recorded_choices_make_merged_equal_unmerged():
    """model_step's `--replay` pieces on the CPU: each sequence's own record, imposed on both
    layouts, gives the same logprobs and gradients (fp64)."""
    import dataclasses

    from forge.kernels.msa import MSAConfig

    cfg = dataclasses.replace(ModelConfig.tiny(), msa=MSAConfig(enabled=True, block_size=4, top_k=2, index_dim=8,
                                                                dense_layers=1, dense_below_tokens=0))
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    g = random.Random(5)
    prompt = [g.randrange(200) for _ in range(20)]
    seqs = [prompt + [g.randrange(200) for _ in range(g.randint(3, 9))] for _ in range(4)]
    choices = model_step.record_alone(model, seqs)
    assert len(choices) == 4 and choices[0].blocks.shape[0] == len(seqs[0])
    lp_m, g_m = model_step._scores(model, seqs, True, choices)
    lp_u, g_u = model_step._scores(model, seqs, False, choices)
    assert float((lp_m - lp_u).abs().max()) < 1e-10
    for name in g_u:
        assert float((g_m[name] - g_u[name]).norm() / g_u[name].norm().clamp_min(1e-30)) < 1e-9, name
