"""Chaos on the CPU: the quickstart under injected faults, a killed rollout worker and a killed
trainer, against a clean run of the same seed. Issue 17's proof that nothing is lost.

Two runs of recipes/quickstart.yaml (shortened to `--steps` RL steps) start together:

- clean: the recipe as it is;
- chaos: the same with `env.faults` (resets failing 8%, steps 2%, tools failing, flooding,
  returning garbage or dying 21% and hanging 0.1% of calls); at RL step `--kill-worker-at` the
  benchmark kills rollout worker 0's process with SIGKILL (as the OOM killer would), and at RL
  step `--kill-trainer-at` trainer rank 0's, which ends the run; the benchmark then resumes it
  with `forge train --resume`. The processes are the ones placement.json names.

It prints and writes as JSON: steps, faults injected (counted where they were injected) and the
ways they were caught (episodes failed and rerun, tool errors and timeouts, demonstrations
replaced), groups retried and dropped, the ledger's check (groups lost, trained twice, trained
short: all must be 0), worker restarts, and the final reward beside the clean run's.

    PYTHONPATH=. python benchmarks/chaos.py --out chaos.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = {"reset_error": 0.08, "step_error": 0.02, "tool_error": 0.06, "tool_garbage": 0.08, "tool_crash": 0.07,
          "tool_hang": 0.001, "seed": 1}


def forge(out: Path, name: str, overrides: list[str], resume: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "forge.cli", "train", "recipes/quickstart.yaml", f"run.output_dir={out}",
           f"run.name={name}", *overrides] + (["--resume", str(resume)] if resume else [])
    log = open(out / f"{name}{'-resumed' if resume else ''}.out", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def rl_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("train/rl_step", 0) for line in path.read_text().splitlines() if line.strip()]
    return int(max(steps, default=0))


def run_folder(out: Path, name: str) -> Path | None:
    found = sorted(out.glob(f"{name}-2*"))
    return found[0] if found else None


def kill(run: Path, actor: str) -> int:
    """SIGKILL the process of a run's actor ('rollout-0', 'trainer-0'), as placement.json names it."""
    pid = json.loads((run / "placement.json").read_text())["pids"][actor]
    os.kill(pid, signal.SIGKILL)
    return pid


def summarize(run: Path) -> dict:
    from forge.config import RecipeConfig, load_recipe
    from forge.middleware.ledger import check, read_ledger

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def total(prefix: str) -> float:
        return sum(v for r in rows for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float)))

    evals = [r for r in rows if "eval/reward_mean" in r]
    cfg = load_recipe(run / "config.yaml", (), RecipeConfig)
    ledger = check(read_ledger(run / "ledger.jsonl"), cfg.rollout.group_size)
    return {
        "rl_steps": max((int(r["train/rl_step"]) for r in rows if "train/rl_step" in r), default=0),
        "faults_injected": {"rollouts": total("rollout/faults/"), "warm_start": total("warmstart/faults_injected")},
        "caught": {"episodes_failed_and_rerun": total("rollout/failed/"), "tool_errors": total("rollout/errors/tool_error"),
                   "tool_timeouts": total("rollout/errors/tool_timeout"), "demos_replaced": total("warmstart/demos_failed")},
        "groups_retried": total("rollout/groups_retried"), "groups_dropped": total("rollout/groups_dropped"),
        "workers_restarted": max((r.get("rollout/workers_restarted", 0) for r in rows), default=0),
        "ledger": {"scheduled": ledger.scheduled, "trained": ledger.trained, "dropped": dict(ledger.dropped),
                   "lost": len(ledger.vanished), "trained_twice": len(ledger.trained_twice),
                   "trained_short": len(ledger.trained_short), "ok": ledger.ok},
        "reward_after_warm_start": evals[0]["eval/reward_mean"] if evals else None,
        "reward_final": evals[-1]["eval/reward_mean"] if evals else None,
        "greedy_final": evals[-1].get("eval/greedy_reward_mean") if evals else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="RL steps of both runs")
    parser.add_argument("--kill-worker-at", type=int, default=12)
    parser.add_argument("--kill-trainer-at", type=int, default=27)
    parser.add_argument("--out", default=None)
    parser.add_argument("--dir", default=None, help="where the runs go (default: a fresh folder under /tmp)")
    args = parser.parse_args()

    out = Path(args.dir or f"/tmp/forge-chaos-{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.steps={args.steps}", "train.checkpoint_every=10", "eval.every=30", "eval.num_tasks=128"]
    chaos_overrides = common + [f"env.faults.{k}={v}" for k, v in FAULTS.items()] + ["rollout.max_retries=4"]
    t0 = time.time()
    clean = forge(out, "clean", common)
    chaos = forge(out, "chaos", chaos_overrides)
    events = []
    killed_worker = killed_trainer = False
    while chaos.poll() is None:
        time.sleep(1.0)
        run = run_folder(out, "chaos")
        step = rl_step(run) if run else 0
        if run and not killed_worker and step >= args.kill_worker_at:
            kill(run, "rollout-0")
            killed_worker = True
            events.append({"t_s": round(time.time() - t0, 1), "rl_step": step, "killed": "rollout-0"})
        elif run and killed_worker and not killed_trainer and step >= args.kill_trainer_at:
            kill(run, "trainer-0")
            killed_trainer = True
            events.append({"t_s": round(time.time() - t0, 1), "rl_step": step, "killed": "trainer-0"})
    run = run_folder(out, "chaos")
    first_exit = chaos.returncode
    if killed_trainer:
        resumed = forge(out, "chaos", chaos_overrides, resume=run)
        resumed.wait()
        events.append({"t_s": round(time.time() - t0, 1), "resumed_exit": resumed.returncode,
                       "first_exit": first_exit})
    clean.wait()
    wall = time.time() - t0
    result = {"chaos": summarize(run), "clean": summarize(run_folder(out, "clean")), "events": events,
              "wall_s": round(wall, 1), "faults": FAULTS, "args": vars(args),
              "date": datetime.date.today().isoformat(), "runs": str(out)}
    c, k = result["chaos"], result["clean"]
    print(f"chaos benchmark, {args.steps} RL steps, {wall / 60:.1f} min (both runs at once)")
    print(f"{'':<34} {'chaos':>10} {'clean':>10}")
    rows = [("RL steps", c["rl_steps"], k["rl_steps"]),
            ("faults injected (rollouts)", c["faults_injected"]["rollouts"], k["faults_injected"]["rollouts"]),
            ("faults injected (warm-start)", c["faults_injected"]["warm_start"], k["faults_injected"]["warm_start"]),
            ("episodes failed and rerun", c["caught"]["episodes_failed_and_rerun"], k["caught"]["episodes_failed_and_rerun"]),
            ("tool errors returned to the policy", c["caught"]["tool_errors"], k["caught"]["tool_errors"]),
            ("tool timeouts", c["caught"]["tool_timeouts"], k["caught"]["tool_timeouts"]),
            ("demonstrations replaced", c["caught"]["demos_replaced"], k["caught"]["demos_replaced"]),
            ("groups retried", c["groups_retried"], k["groups_retried"]),
            ("groups dropped", c["groups_dropped"], k["groups_dropped"]),
            ("rollout workers restarted", c["workers_restarted"], k["workers_restarted"]),
            ("groups scheduled", c["ledger"]["scheduled"], k["ledger"]["scheduled"]),
            ("groups lost", c["ledger"]["lost"], k["ledger"]["lost"]),
            ("groups trained twice", c["ledger"]["trained_twice"], k["ledger"]["trained_twice"]),
            ("groups trained short", c["ledger"]["trained_short"], k["ledger"]["trained_short"]),
            ("reward after warm-start (sampled)", c["reward_after_warm_start"], k["reward_after_warm_start"]),
            ("final reward (sampled)", c["reward_final"], k["reward_final"]),
            ("final reward (greedy)", c["greedy_final"], k["greedy_final"])]
    for name, a, b in rows:
        print(f"{name:<34} {a!s:>10} {b!s:>10}")
    print("events:", events)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
