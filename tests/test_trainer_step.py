"""The trainer's RL step on DeepSpeed (gloo, CPU): it learns, and micro-batching and prefix-tree
merging leave the update unchanged."""

from __future__ import annotations

import os
import random

import pytest
import torch

from forge.middleware.types import Group, Trajectory, Turn
from forge.policy.config import ModelConfig
from forge.prefix_tree.fallback import MergeConfig
from forge.trainer.config import AlgorithmConfig, TrainerConfig

pytest.importorskip("deepspeed")
os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))


def groups_of(seed: int, n_groups: int = 2, g: int = 3) -> list[Group]:
    rng = random.Random(seed)
    out = []
    for gi in range(n_groups):
        prompt = [256] + [rng.randrange(256) for _ in range(12)]
        trajs = []
        for k in range(g):
            first = [rng.randrange(256) for _ in range(rng.randint(2, 6))]
            second = [rng.randrange(256) for _ in range(rng.randint(1, 4))]
            turns = [Turn(first, [-1.0 - 0.1 * i for i in range(len(first))], 0, observation_ids=[rng.randrange(256)]),
                     Turn(second, [-2.0] * len(second), 0)]
            trajs.append(Trajectory(f"t{gi}", f"g{gi}", prompt, turns, reward=float(k == 0)))
        out.append(Group(f"t{gi}", f"g{gi}", trajs))
    return out


def make_trainer(**overrides):
    from forge.trainer.trainer import Trainer

    algo = AlgorithmConfig(loss=overrides.pop("loss", "grpo"), kl_coef=overrides.pop("kl_coef", 0.0),
                           reduction=overrides.pop("reduction", "default"),
                           mismatch_weights=overrides.pop("mismatch_weights", "current"))
    cfg = TrainerConfig(lr=1e-2, **overrides)
    torch.manual_seed(0)
    from forge.policy.model import Transformer

    init = Transformer(ModelConfig.tiny()).state_dict()
    return Trainer(ModelConfig.tiny(), cfg, algo, seed=0, init_weights=init)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def summed_grads(trainer) -> dict[str, torch.Tensor]:
    """Gradients of every parameter summed over the micro-batches of the next step."""
    grads: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(g):
            grads[name] = grads.get(name, 0) + g.detach().clone()
        return add

    for name, p in trainer.model.named_parameters():
        p.register_hook(hook(name))
    return grads


def close(a: dict, b: dict, rel: float) -> bool:
    scale = max(v.abs().max().item() for v in a.values())
    return set(a) == set(b) and all((a[k] - b[k]).abs().max().item() <= rel * scale for k in a)


@pytest.mark.parametrize(
    "loss,reduction",
    [("grpo", "default"), ("cispo", "default"), ("grpo", "token_mean"), ("ppo_clip", "seq_mean"), ("cispo", "dr_grpo")],
)
def test_micro_batching_and_merging_do_not_change_the_gradient(loss, reduction):
    batch = groups_of(1)
    runs = {}
    for name, kw in {"whole": {}, "split": {"micro_batch_tokens": 40}, "unmerged": {"merge": MergeConfig(enabled=False)}}.items():
        trainer = make_trainer(loss=loss, reduction=reduction, **kw)
        grads = summed_grads(trainer)
        before = trainer.weights()
        runs[name] = (trainer.train_step(batch), grads, max_diff(before, trainer.weights()))
    (m_whole, g_whole, moved), (m_split, g_split, _), (m_flat, g_flat, _) = runs.values()
    assert m_split["train/micro_batches"] > 1 and m_whole["train/micro_batches"] == 1
    assert m_whole["train/token_ratio"] > 1.2 and m_flat["train/token_ratio"] == 1.0
    assert moved > 1e-3
    # Rewarded and unrewarded samples pull differently: the gradient is not zero.
    assert max(v.abs().max().item() for v in g_whole.values()) > 1e-4
    assert close(g_whole, g_split, 1e-5) and close(g_whole, g_flat, 1e-5)
    assert m_whole["train/entropy"] == pytest.approx(m_flat["train/entropy"], rel=1e-5)


def test_steps_raise_the_likelihood_of_rewarded_samples():
    from forge.trainer.logprobs import sequence_logprobs

    trainer = make_trainer(loss="ppo_clip", kl_coef=0.01)
    batch = groups_of(2)
    good = [t.token_ids for g in batch for t in g.trajectories if t.reward > 0]
    masks = [torch.tensor(t.loss_mask[1:]).bool() for g in batch for t in g.trajectories if t.reward > 0]

    def score() -> float:
        with torch.no_grad():
            lps = sequence_logprobs(trainer.model, good)
        return sum(lp[m].sum().item() for lp, m in zip(lps, masks))

    start = score()
    for _ in range(5):
        metrics = trainer.train_step(batch)
    assert score() > start + 1.0
    assert trainer.version == 5
    assert metrics["train/kl"] > 0 and 0 <= metrics["train/clip_fraction"] <= 1
    assert any(k.startswith("router/layer") for k in metrics)
    assert metrics["train/grad_norm"] > 0


def test_the_step_reports_where_its_time_went():
    import time

    trainer = make_trainer(kl_coef=0.01)
    step = trainer.engine.step

    def slow_step(*args, **kwargs):
        time.sleep(0.3)
        return step(*args, **kwargs)

    trainer.engine.step = slow_step
    metrics = trainer.train_step(groups_of(3))
    phases = {k: v for k, v in metrics.items() if k.startswith("train/time_")}
    assert set(phases) == {"train/time_batch_s", "train/time_scoring_s", "train/time_forward_backward_s",
                           "train/time_optimizer_s"}
    assert all(v >= 0 for v in phases.values())
    assert metrics["train/time_optimizer_s"] >= 0.3 > metrics["train/time_forward_backward_s"] > 0
    assert sum(phases.values()) <= metrics["train/step_s"]


def _sampled_groups(model, temperature: float, n_groups: int = 2, g: int = 3) -> list[Group]:
    """Groups whose turns the trainer's own weights sampled, with the sampler's logprobs."""
    from forge.policy.generation import ModelGenerator
    from forge.policy.sampling import SamplingParams

    gen = ModelGenerator(model, seed=0)
    rng = random.Random(1)
    out = []
    for gi in range(n_groups):
        prompt = [256] + [rng.randrange(256) for _ in range(10)]
        done = gen.generate([prompt] * g, SamplingParams(temperature=temperature, max_new_tokens=6))
        trajs = [Trajectory(f"t{gi}", f"g{gi}", prompt, [Turn(c.token_ids, c.logprobs, 0)], reward=float(k == 0))
                 for k, c in enumerate(done)]
        out.append(Group(f"t{gi}", f"g{gi}", trajs))
    return out


@pytest.mark.parametrize("temperature", [1.0, 1.4], ids=["T1", "T1.4"])
def test_on_policy_mismatch_is_fp32_rounding_and_corrections_log(temperature):
    """Samples of the trainer's own weights: the logged gap is rounding (issue 15, item 4); a
    correction leaves such a batch's weights at 1."""
    from forge.trainer.trainer import Trainer
    from forge.policy.model import Transformer

    torch.manual_seed(0)
    init = Transformer(ModelConfig.tiny()).state_dict()
    algo = AlgorithmConfig(temperature=temperature, is_correction="tis", is_threshold=2.0)
    trainer = Trainer(ModelConfig.tiny(), TrainerConfig(lr=1e-2), algo, seed=0, init_weights=init)
    metrics = trainer.train_step(_sampled_groups(trainer.model, temperature))
    assert metrics["mismatch/logprob_abs_max"] <= 1e-5
    assert 0 <= metrics["mismatch/kl"] <= 1e-9
    assert metrics["mismatch/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["mismatch/is_reduced_fraction"] == 0
    assert len(trainer.mismatch_log_ratios()) == metrics["train/loss_tokens"]


def test_ratio_against_the_sampler_lets_the_clip_act():
    """Recomputed old logprobs make the first update's ratio 1 (nothing clipped); against the
    sampler's logprobs (here far from the model's) the ratio is the behaviour ratio and clips."""
    from forge.trainer.trainer import Trainer
    from forge.policy.model import Transformer

    torch.manual_seed(0)
    init = Transformer(ModelConfig.tiny()).state_dict()
    clipped = {}
    for against in ("recomputed", "sampler"):
        algo = AlgorithmConfig(ratio_against=against)
        trainer = Trainer(ModelConfig.tiny(), TrainerConfig(lr=1e-2), algo, seed=0, init_weights=init)
        clipped[against] = trainer.train_step(groups_of(0))["train/clip_fraction"]
    assert clipped["recomputed"] == 0
    assert clipped["sampler"] > 0.5


def sampled_groups(weights: dict, version: int, seed: int) -> list[Group]:
    """Groups sampled by a ModelGenerator with `weights`, stamped `version`: real sampler logprobs."""
    from forge.policy.generation import ModelGenerator
    from forge.policy.model import Transformer
    from forge.policy.sampling import SamplingParams
    from forge.policy.tokenizer import ByteTokenizer

    model = Transformer(ModelConfig.tiny())
    model.load_state_dict(weights)
    gen = ModelGenerator(model, ByteTokenizer(), seed=seed, policy_version=version)
    rng = random.Random(seed)
    groups = []
    for gi in range(2):
        prompt = [256] + [rng.randrange(256) for _ in range(10)]
        done = gen.generate([prompt] * 3, SamplingParams(max_new_tokens=8, temperature=1.0))
        trajs = [Trajectory(f"t{gi}", f"g{gi}", prompt, [Turn(c.token_ids, c.logprobs, version)], reward=float(k == 0))
                 for k, c in enumerate(done)]
        groups.append(Group(f"t{gi}", f"g{gi}", trajs))
    return groups


@pytest.mark.parametrize("mode", ["current", "sampling"])
def test_mismatch_at_the_sampling_weights_is_the_numerics_alone(mode):
    """Groups sampled one version behind (as under the fixed-lag schedule): scored at the current
    weights, the logged gap includes the policy's change; at a kept copy of the weights that
    sampled them, it is only the sampler's and trainer's numerics (fp32: <= 1e-5)."""
    trainer = make_trainer(mismatch_weights=mode)
    trainer.published(7)
    behind = sampled_groups(trainer.weights(), 7, seed=3)
    trainer.train_step(groups_of(5))  # the weights move on
    metrics = trainer.train_step(behind)
    if mode == "sampling":
        assert metrics["mismatch/at_sampling_weights"] == 1.0
        assert metrics["mismatch/logprob_abs_max"] <= 1e-5, metrics["mismatch/logprob_abs_max"]
    else:
        assert "mismatch/at_sampling_weights" not in metrics
        assert metrics["mismatch/logprob_abs_max"] > 1e-3


@pytest.mark.parametrize("loss", ["grpo", "ppo_clip", "cispo"])
def test_old_logprobs_come_from_the_training_forward_without_a_pass_of_their_own(loss, monkeypatch):
    """One update per step: the trainer's logprobs at the start of the step are the training
    forward's own, so the default step runs no separate no-grad scoring pass. The step equals
    the one that scores the batch first (mismatch_weights 'sampling' still does, and with no kept
    version falls back on those logprobs): the same loss, metrics and updated weights."""
    from forge.trainer.trainer import Trainer

    batch = groups_of(3)
    passes = []
    real = Trainer._scores
    monkeypatch.setattr(Trainer, "_scores", lambda self, *a: passes.append(1) or real(self, *a))
    steps = {}
    for mode in ("current", "sampling"):
        passes.clear()
        trainer = make_trainer(loss=loss, mismatch_weights=mode, micro_batch_tokens=40)
        metrics = trainer.train_step(batch)
        steps[mode] = (metrics, trainer.weights(), len(passes))
    (fused, w_fused, n_fused), (separate, w_separate, n_separate) = steps.values()
    assert fused["train/micro_batches"] > 1
    assert n_fused == 0 and n_separate == 1
    for key in ("train/loss", "train/entropy", "train/clip_fraction", "mismatch/logprob_abs_mean",
                "mismatch/logprob_abs_max"):
        assert fused[key] == separate[key], key
    assert max_diff(w_fused, w_separate) == 0.0


def test_the_trainer_step_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/trainer_step.py on a shrunken recipe: its table's phases come from the step."""
    import json
    import runpy
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "trainer_step.json"
    monkeypatch.setattr(sys, "argv", [
        "trainer_step.py", "--recipe", str(root / "recipes/needle_msa_100m.yaml"), "--steps", "2", "--groups", "2",
        "--same-batch", "--profile", "2", "--group-size", "2", "--turns", "1", "--prompt", "20", "--response", "8", "--observation", "4-6",
        "--out", str(out), "model.num_layers=3", "model.hidden_size=64", "model.expert_width=32",
        "model.dense_width=64", "trainer.precision=fp32"])
    runpy.run_path(str(root / "benchmarks/trainer_step.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["steps"]] == [1, 2]
    for row in result["steps"]:
        assert row["tokens"] == pytest.approx(2 * 2 * (20 + 8 + 5), abs=2)
        assert 0 < sum(row[f"{p}_ms"] for p in ("batch", "scoring", "forward_backward", "optimizer")) <= row["ms"]
    # --same-batch: step 2 trains step 1's tokens again; --profile 2: step 2 alone names its ops.
    assert result["same_batch"] and result["steps"][0]["tokens"] == result["steps"][1]["tokens"]
    assert "kernels_ms" not in result["steps"][0]
    top = result["steps"][1]["kernels_ms"]
    assert 0 < len(top) <= 12 and all(ms >= 0 for ms in top.values())
    assert sum(top.values()) <= result["steps"][1]["ms"]


@pytest.mark.parametrize("carried", [True, False], ids=["replayed", "not_carried"])
def test_the_trainer_imposes_the_sampler_s_recorded_choices(carried):
    """Routing replay through the batch: trajectories carry a record of other choices than the
    trainer's own router makes (a perturbed router's), and sampler logprobs computed under them.
    The trainer imposes the record (the prefix tree keyed on it): its logprobs equal the
    sampler's; without the record they do not."""
    from forge.policy.choices import pack, record_alone
    from forge.policy.model import Transformer
    from forge.trainer.logprobs import sequence_scores

    trainer = make_trainer(micro_batch_tokens=40)
    model = Transformer(ModelConfig.tiny())
    model.load_state_dict(trainer.weights())
    other = Transformer(ModelConfig.tiny())
    other.load_state_dict(trainer.weights())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "router" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3 * p.std())
    groups = groups_of(4)
    for group in groups:
        for traj in group.trajectories:
            ids = traj.token_ids
            (record,) = record_alone(other, [ids])
            with torch.no_grad():
                lps = sequence_scores(model, [ids], choices=[record]).logprobs[0]
            pos = len(traj.prompt_ids) - 1
            for turn in traj.turns:
                turn.logprobs = lps[pos : pos + len(turn.sampled_ids)].tolist()
                pos += len(turn.sampled_ids) + len(turn.observation_ids)
            if carried:
                traj.choice_experts, traj.choice_blocks = pack(record)
    metrics = trainer.train_step(groups)
    assert metrics["train/micro_batches"] > 1
    if carried:
        assert metrics["mismatch/logprob_abs_max"] <= 1e-6
        assert metrics["replay/known_fraction"] == 1.0  # the records cover every token here
    else:
        assert metrics["mismatch/logprob_abs_max"] > 1e-3
        assert "replay/known_fraction" not in metrics


def test_the_reference_policy_routes_on_its_own_under_replay(monkeypatch):
    """With routing-replay records in the batch and a KL penalty, the reference pass does not
    impose the sampler's records (they are the policy's choices, not the reference's)."""
    from forge.policy.choices import pack, record_alone
    from forge.trainer import trainer as trainer_module

    trainer = make_trainer(kl_coef=0.1)
    groups = groups_of(4)
    for group in groups:
        for traj in group.trajectories:
            traj.choice_experts, traj.choice_blocks = pack(record_alone(trainer.model, [traj.token_ids])[0])
    seen = []
    real = trainer_module.sequence_scores
    monkeypatch.setattr(trainer_module, "sequence_scores",
                        lambda model, *a, **kw: seen.append((model is trainer.reference, kw.get("choices") is not None))
                        or real(model, *a, **kw))
    trainer.train_step(groups)
    assert (True, False) in seen and (True, True) not in seen  # the reference: never imposed
    assert (False, True) in seen  # the policy: imposed
