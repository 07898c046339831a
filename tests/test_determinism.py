"""Two runs of one recipe and seed under `train.rollout_schedule: fixed_lag` log the same
metrics, apart from wall-clock ones (`forge.monitoring.is_wall_clock`): docs/quickstart.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge.monitoring import is_wall_clock, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "data" / "tiny_recipe.yaml"

pytestmark = pytest.mark.timeout(900)

# The tiny model on an env where any digit earns 0.5 and the right one 1: warm-start stops once
# the greedy policy answers with digits (its target_reward), rewards then differ within groups,
# so every RL step changes the weights and a difference anywhere upstream would show in the
# later steps' metrics.
ARGS = ("env.cls=tests.data.guess_env:GuessEnv", "train.rollout_schedule=fixed_lag", "pool.max_staleness=1",
        "warm_start.steps=60", "warm_start.target_reward=0.5",
        "warm_start.check_every=10", "warm_start.check_tasks=8", "warm_start.batch_size=8", "warm_start.lr=0.01", "rollout.group_size=4",
        "rollout.concurrency=8", "rollout.max_new_tokens=8", "trainer.groups_per_step=4", "trainer.lr=0.003",
        "train.steps=5", "train.checkpoint_every=5", "eval.every=5", "eval.num_tasks=8", "eval.temperature=1.0",
        "eval.greedy_too=true")


def train(tmp_path: Path, name: str) -> list[dict]:
    out = tmp_path / name
    env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "forge.cli", "train", str(RECIPE), f"run.output_dir={out}", *ARGS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = out.iterdir()
    return read_metrics(run / "metrics.jsonl")


def test_fixed_lag_runs_repeat_exactly_and_warm_start_stops_at_its_target(tmp_path):
    first, second = train(tmp_path, "a"), train(tmp_path, "b")
    checks = [r for r in first if "warmstart/check_reward" in r]
    assert checks[-1]["warmstart/check_reward"] >= 0.5 > checks[0]["warmstart/check_reward"]
    assert max(r["step"] for r in first if "warmstart/loss" in r) == checks[-1]["step"] < 60
    rl = [r for r in first if "train/rl_step" in r]
    assert rl[0]["step"] == 61
    assert [int(r["train/rl_step"]) for r in rl] == [1, 2, 3, 4, 5]
    # The test can fail: RL really moves the weights, from groups sampled one version behind.
    assert all(r["train/grad_norm"] > 0 for r in rl[1:])
    assert [r["train/staleness_mean"] for r in rl] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert len({r["train/entropy"] for r in rl}) == len(rl) and 0 < rl[-1]["train/reward_mean"] < 1
    assert len(first) == len(second)
    for a, b in zip(first, second):
        same = {k for k in a if not is_wall_clock(k)}
        assert same == {k for k in b if not is_wall_clock(k)}, f"step {a['step']} logged other keys"
        differ = {k: (a[k], b[k]) for k in same if a[k] != b[k]}
        assert not differ, f"step {a['step']}: {differ}"


def test_a_pinned_call_needs_a_generator_that_can_pin():
    from forge.agent_side.config import EnvConfig, RolloutConfig
    from forge.agent_side.rollout_actor import RolloutActor
    from forge.policy.sampling import Completion

    class Plain:
        policy_version = 0

        def generate(self, prompts, params):
            return [Completion([], [], finish_reason="stop") for _ in prompts]

    actor = RolloutActor(EnvConfig(cls="envs.reverse:ReverseEnv"), RolloutConfig(group_size=1, concurrency=1), Plain)
    with pytest.raises(TypeError, match=r"pin\(version, seed\) method; Plain has none"):
        actor.run([0], pin=(3, 0))
