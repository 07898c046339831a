"""`model.batch_invariant` (forge.policy.invariant): the sampler's logprobs equal the
trainer's to the bit, through decoding steps, prefills, a prefix cache across turns, merged and
unmerged scoring, MoE and MSA; without it the same weights disagree (so the tests can fail)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from forge.kernels.msa import MSAConfig
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.trainer.logprobs import sequence_logprobs

MSA = MSAConfig(enabled=True, block_size=4, top_k=2, index_dim=8, dense_layers=1, dense_below_tokens=8)


def _model(invariant: bool, msa: bool = False) -> Transformer:
    cfg = dataclasses.replace(ModelConfig.tiny(), batch_invariant=invariant, init_std=0.3,
                              **({"msa": MSA} if msa else {}))
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def _rollouts(model: Transformer, turns: int = 2, decode: str = "eager", lengths=(5, 13, 22),
              new_tokens: int = 7) -> tuple[list[list[int]], list[list[tuple[int, int, float]]]]:
    """Multi-turn conversations of prompts of several lengths, 3 samples each: each turn's
    prompt extends the last with the completion and an observation, through a prefix cache.
    Returns the full sequences and, per sequence, (position, token, sampler logprob) of every
    sampled token."""
    gen = ModelGenerator(model, seed=0, decode=decode, prefix_cache_tokens=4096)
    rng = random.Random(0)
    prompts = [[256] + [rng.randrange(256) for _ in range(n)] for n in lengths for _ in range(3)]
    sampled: list[list[tuple[int, int, float]]] = [[] for _ in prompts]
    for _ in range(turns):
        done = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens))
        for i, c in enumerate(done):
            start = len(prompts[i])
            sampled[i] += [(start + j, t, lp) for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs))]
            prompts[i] = prompts[i] + c.token_ids + [rng.randrange(256) for _ in range(3)]
    return prompts, sampled


def _gaps(model: Transformer, merge: bool) -> list[float]:
    seqs, sampled = _rollouts(model)
    with torch.no_grad():
        scored = sequence_logprobs(model, seqs, merge=merge)
    return [abs(scored[i][pos - 1].item() - lp) for i, toks in enumerate(sampled) for pos, tok, lp in toks
            if seqs[i][pos] == tok]


@pytest.mark.parametrize("msa", [False, True], ids=["moe", "moe+msa"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_sampler_and_trainer_agree_to_the_bit(msa, merge):
    gaps = _gaps(_model(True, msa), merge)
    assert len(gaps) == 9 * 2 * 7
    assert max(gaps) == 0.0


def test_without_it_the_same_weights_disagree():
    # The property is not free: the default numerics round differently in the two paths.
    assert max(_gaps(_model(False), merge=True)) > 0.0


def test_merged_equals_unmerged_and_the_static_decode_equals_the_eager_one():
    model = _model(True, msa=True)
    seqs, eager = _rollouts(model)
    _, static = _rollouts(model, decode="static")
    assert static == eager
    with torch.no_grad():
        merged, alone = sequence_logprobs(model, seqs), sequence_logprobs(model, seqs, merge=False)
    assert all(torch.equal(a, b) for a, b in zip(merged, alone))


def test_gradients_flow_and_keep_the_parameter_dtype():
    model = _model(True, msa=True).train()
    seqs, _ = _rollouts(model.eval())
    model.train()
    loss = sum(lp.sum() for lp in sequence_logprobs(model, seqs))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_the_trainer_logs_zero_mismatch():
    from forge.middleware.types import Group, Trajectory, Turn
    from forge.trainer.config import AlgorithmConfig, TrainerConfig
    from forge.trainer.trainer import Trainer

    cfg = dataclasses.replace(ModelConfig.tiny(), batch_invariant=True, init_std=0.3)
    torch.manual_seed(0)
    trainer = Trainer(cfg, TrainerConfig(lr=1e-2), AlgorithmConfig(), seed=0, init_weights=Transformer(cfg).state_dict())
    gen = ModelGenerator(trainer.model, seed=0)
    groups = []
    for gi in range(2):
        prompt = [256] + [gi + 3 * j for j in range(9)]
        done = gen.generate([prompt] * 3, SamplingParams(temperature=1.0, max_new_tokens=6))
        trajs = [Trajectory(f"t{gi}", f"g{gi}", prompt, [Turn(c.token_ids, c.logprobs, 0)], reward=float(k == 0))
                 for k, c in enumerate(done)]
        groups.append(Group(f"t{gi}", f"g{gi}", trajs))
    metrics = trainer.train_step(groups)
    assert metrics["mismatch/logprob_abs_max"] == 0.0 and metrics["mismatch/kl"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("msa", [False, True], ids=["dense-attention", "msa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_sampler_and_trainer_agree_to_the_bit(dtype, msa):
    """Issue 15, item 3: on a GPU, a multi-turn rollout's logprobs from the generator equal the
    trainer's, merged and unmerged (padded), for an MoE model with dense attention and with MSA
    whose selection engages."""
    sparse = MSAConfig(enabled=True, block_size=16, top_k=2, index_dim=32, dense_layers=1, dense_below_tokens=32)
    cfg = ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, rotary_dim=32,
                      qk_norm=True, num_experts=8, top_k=2, expert_width=64, num_shared_experts=1, dense_layers=1,
                      dense_width=256, init_std=0.1, batch_invariant=True, **({"msa": sparse} if msa else {}))
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", dtype).eval()
    seqs, sampled = _rollouts(model, turns=3, lengths=(40, 75, 110), new_tokens=16)
    with torch.no_grad():
        for merge in (True, False):
            scored = sequence_logprobs(model, seqs, merge=merge)
            got = [scored[i][pos - 1].item() for i, toks in enumerate(sampled) for pos, _, _ in toks]
            want = [lp for toks in sampled for _, _, lp in toks]
            assert got == want, f"merge={merge}: max gap {max(abs(a - b) for a, b in zip(got, want))}"


@pytest.mark.timeout(600)
def test_the_quickstart_recipe_logs_no_mismatch(tmp_path):
    """Issue 15, item 4: the default recipe (shortened) logs a sampler/trainer gap of zero at
    every RL step, its groups scored at the weights that sampled them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from forge.monitoring import read_metrics

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "runs"
    args = ["train", str(root / "recipes" / "quickstart.yaml"), f"run.output_dir={out}", "warm_start.steps=20",
            "warm_start.target_reward=null", "train.steps=3", "train.checkpoint_every=3", "eval.every=3",
            "eval.num_tasks=8", "eval.greedy_too=false"]
    done = subprocess.run([sys.executable, "-m", "forge.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=500, env=dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = out.iterdir()
    rl = [r for r in read_metrics(run / "metrics.jsonl") if "train/rl_step" in r]
    assert len(rl) == 3 and all(r["train/loss_tokens"] > 0 for r in rl)
    assert [r["mismatch/at_sampling_weights"] for r in rl] == [1.0, 1.0, 1.0]
    assert [r["mismatch/logprob_abs_max"] for r in rl] == [0.0, 0.0, 0.0]
