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
