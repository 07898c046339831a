"""`forge train` end to end on a local Ray cluster: the run folder, a stop mid-way and a resume
that repeats the interrupted steps and loses none, and `forge inspect` on the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "data" / "tiny_recipe.yaml"

pytestmark = pytest.mark.timeout(900)


def forge(*args: str, cwd: Path, wait: bool = True, **kw):
    env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "forge.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def only_run(out: Path) -> Path:
    runs = sorted(out.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_stop_midway_and_resume_loses_no_step(tmp_path):
    out = tmp_path / "runs"
    # Evaluation samples at the rollout temperature and also runs greedily (eval.greedy_too);
    # generators keep the conversations' keys between turns (rollout.prefix_cache_tokens) and
    # record each token's experts for the trainer to impose (rollout.routing_replay).
    args = ("train", str(RECIPE), f"run.output_dir={out}", "train.steps=4", "eval.temperature=1.0",
            "eval.greedy_too=true", "rollout.prefix_cache_tokens=4096", "rollout.routing_replay=true")
    proc = forge(*args, cwd=tmp_path, wait=False)
    deadline = time.time() + 400
    run = None
    # Stop the run hard once its second checkpoint is complete.
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if out.is_dir() and any(out.iterdir()):
            run = only_run(out)
            latest = run / "checkpoints" / "latest"
            if latest.is_file() and latest.read_text().strip() >= "step-000002":
                break
    assert run is not None and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = (run / "checkpoints" / "latest").read_text().strip()

    resumed = forge(*args, "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "eval/reward_mean:" in resumed.stdout

    metrics = rows(run)
    steps = [r["step"] for r in metrics]
    assert steps == sorted(set(steps)), "metrics.jsonl holds a step twice"
    rl_steps = [int(r["train/rl_step"]) for r in metrics if "train/rl_step" in r]
    assert rl_steps == [1, 2, 3, 4]
    # Warm-start steps 1..2 come first; evaluation after warm-start and at the end.
    assert [r["step"] for r in metrics if "warmstart/loss" in r] == [1, 2]
    evals = [r for r in metrics if "eval/reward_mean" in r]
    assert evals[0]["step"] == 2 and evals[-1]["step"] == 6
    assert all("eval/greedy_reward_mean" in r and r["eval/greedy_tasks"] == r["eval/tasks"] for r in evals)
    # The greedy evaluations before the stop come back with the checkpoint: the summary's first
    # one is still the one after warm-start.
    assert "eval/greedy_reward_mean: " in resumed.stdout and " at step 0 -> " in resumed.stdout.split("greedy")[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    # Histograms leave their summary in metrics.jsonl: advantages and the MoE layer's expert load.
    last = [r for r in metrics if "train/rl_step" in r][-1]
    assert "train/advantages/max" in last and "router/load_layer1/max" in last
    assert int(stopped_at.split("-")[1]) >= 2
    log = (run / "forge.log").read_text()
    assert f"from {stopped_at}" in log
    assert (run / "config.yaml").is_file() and list((run / "wandb").glob("offline-run-*"))
    assert len(list((run / "rollouts").glob("step-*.parquet"))) >= 4
    # The kept rollouts carry the sampler's records, which the trainer imposed: known from the
    # prompt through every token the generator ran (the last sampled token and a closing
    # observation may never have run).
    from forge.middleware.arrow import read_parquet
    from forge.policy.choices import unpack
    from forge.policy.config import ModelConfig
    from forge.config import load_recipe

    model_cfg = load_recipe(RECIPE).model
    for group in read_parquet(sorted((run / "rollouts").glob("step-*.parquet"))[-1]):
        for traj in group.trajectories:
            rec = unpack(model_cfg, traj.choice_experts, traj.choice_blocks, len(traj.token_ids))
            known = int((rec.experts[:, 0, 0] >= 0).sum())
            assert len(traj.prompt_ids) + len(traj.turns[0].sampled_ids) - 1 <= known <= len(traj.token_ids)

    # Every group scheduled before or after the kill has one fate: nothing lost, nothing twice.
    ledger = forge("inspect", str(run), "--ledger", cwd=tmp_path)
    assert ledger.returncode == 0 and "ledger OK" in ledger.stdout, ledger.stdout + ledger.stderr
    assert (run / "ledger.discarded.jsonl").is_file() or "scheduled" in (run / "ledger.jsonl").read_text()

    shown = forge("inspect", str(run), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "eval at step" in shown.stdout and "--- prompt ---" in shown.stdout and "rewards [" in shown.stdout


def test_a_killed_trainer_ends_the_run_with_one_line_and_resume_restores_it(tmp_path):
    """SIGKILL trainer rank 0's process (placement.json names it) after the first checkpoint:
    the driver stops with one line naming --resume, and the resumed run ends with a ledger in
    which no group is lost, trained twice or trained short."""
    out = tmp_path / "runs"
    args = ("train", str(RECIPE), f"run.output_dir={out}", "train.steps=4", "train.rollout_schedule=fixed_lag",
            "pool.max_staleness=1")
    proc = forge(*args, cwd=tmp_path, wait=False)
    deadline, run = time.time() + 400, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if out.is_dir() and any(out.iterdir()):
            run = only_run(out)
            latest = run / "checkpoints" / "latest"
            if latest.is_file() and (run / "placement.json").is_file():
                break
    assert run is not None and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    pid = json.loads((run / "placement.json").read_text())["pids"]["trainer-0"]
    os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("forge: error:")]
    assert len(errors) == 1 and "an actor of the run died" in errors[0] and f"--resume {run}" in errors[0], output[-3000:]
    resumed = forge(*args, "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [int(r["train/rl_step"]) for r in rows(run) if "train/rl_step" in r] == [1, 2, 3, 4]
    ledger = forge("inspect", str(run), "--ledger", cwd=tmp_path)
    assert ledger.returncode == 0 and "ledger OK" in ledger.stdout and "scheduled 8 = trained 8" in ledger.stdout, \
        ledger.stdout + ledger.stderr


def test_bad_resume_target_is_one_line(tmp_path):
    out = forge("train", str(RECIPE), "--resume", str(tmp_path / "nope"), cwd=tmp_path)
    assert out.returncode == 2 and "is not a run folder" in out.stderr and "Traceback" not in out.stderr
