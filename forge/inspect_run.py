"""`forge inspect RUN`: a run's evaluations, one step's groups and rewards, one trajectory rendered.

Rewards are listed per episode; a group with an episode split into context segments also lists
each episode's number of segments, and `--trajectory` counts segments (each is a sequence).
"""

from __future__ import annotations

from pathlib import Path

from forge.config import ConfigError
from forge.middleware.arrow import read_parquet
from forge.middleware.types import Trajectory
from forge.monitoring import read_metrics
from forge.policy.tokenizer import ByteTokenizer


def render_run(path: Path, *, step: int | None = None, trajectory: int = 0) -> str:
    """A text report of the run folder `path`. A step not kept, a trajectory out of range or a
    rollout file that cannot be read is a ConfigError naming the file and what to pass instead."""
    lines = [f"run {path}", *_metric_lines(path / "metrics.jsonl")]
    files = sorted((path / "rollouts").glob("step-*.parquet"))
    if not files:
        lines.append("  no rollouts kept (train.keep_rollouts was false, or no step finished)")
        return "\n".join(lines)
    chosen = files[-1] if step is None else path / "rollouts" / f"step-{step:06d}.parquet"
    if not chosen.is_file() and (chosen.exists() or chosen.is_symlink()):
        raise ConfigError(f"{chosen} is not a file (a folder, or a link to nothing); delete it, "
                          "or pass --step with another kept step")
    if not chosen.is_file():
        have = ", ".join(f.stem.split("-")[-1].lstrip("0") or "0" for f in files[-5:])
        raise ConfigError(f"no rollouts kept for step {step} in {path}; the last kept steps are {have}: pass one to --step")
    try:
        groups = read_parquet(chosen)
    except ValueError as exc:
        raise ConfigError(f"{exc}; delete it, or pass --step with another kept step") from None
    lines.append(f"\n{chosen.stem}: {len(groups)} groups")
    for g in groups:
        rewards = " ".join(f"{r:.2f}" for r in g.episode_rewards)
        lengths = [len(segs) for segs in g.episodes]
        segments = f"  segments [{' '.join(map(str, lengths))}]" if max(lengths, default=1) > 1 else ""
        lines.append(f"  {g.task_id:<28} attempts {g.attempts}  rewards [{rewards}]{segments}")
    trajs = [t for g in groups for t in g.trajectories]
    if not trajs:
        raise ConfigError(f"{chosen} has no trajectories; pass --step with another kept step")
    if not 0 <= trajectory < len(trajs):
        raise ConfigError(f"--trajectory {trajectory} is out of range: {chosen} has {len(trajs)} trajectories; "
                          f"pass 0 to {len(trajs) - 1}")
    try:
        lines.append("\n" + render_trajectory(trajs[trajectory]))
    except ValueError as exc:
        # A token id outside the vocabulary: the file's values were damaged in a way Parquet cannot see.
        raise ConfigError(f"{chosen}: trajectory {trajectory} cannot be shown ({exc}); the file is damaged: delete it, "
                          "or pass --step with another kept step") from None
    return "\n".join(lines)


def _metric_lines(metrics: Path) -> list[str]:
    """The run's evaluations and train-inference mismatch from metrics.jsonl; if it cannot be read
    (a run killed mid-write leaves half a line), one line saying so, since the rollouts still can."""
    try:
        rows = read_metrics(metrics) if metrics.is_file() else []
        lines = []
        evals = [(r["step"], r["eval/reward_mean"]) for r in rows if "eval/reward_mean" in r]
        train_steps = [r for r in rows if "train/loss" in r]
        lines.append(f"  {len(train_steps)} RL steps logged, {len(evals)} evaluations")
        for s, reward in evals:
            lines.append(f"  eval at step {s:>5}: reward {reward:.3f}")
        gaps = [r for r in train_steps if "mismatch/logprob_abs_mean" in r]
        if gaps:
            worst = max(gaps, key=lambda r: r["mismatch/logprob_abs_max"])
            lines.append(f"  train-inference mismatch (sampler vs trainer logprobs on loss tokens): last step "
                         f"|diff| mean {gaps[-1]['mismatch/logprob_abs_mean']:.2e} max {gaps[-1]['mismatch/logprob_abs_max']:.2e} "
                         f"kl {gaps[-1]['mismatch/kl']:.2e}; largest max {worst['mismatch/logprob_abs_max']:.2e} at step {worst['step']}")
        return lines
    except (OSError, ValueError, KeyError, TypeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        return [f"  {metrics} could not be read ({type(exc).__name__}: {detail}); fix or delete its bad lines"]


def render_trajectory(traj: Trajectory) -> str:
    """The conversation as text: prompt, each sampled turn (with its version), each observation."""
    tok = ByteTokenizer()
    segment = f", context segment {traj.segment}" if traj.segment else ""
    out = [f"trajectory of {traj.task_id} (group {traj.group_id}{segment}): reward {traj.reward:.3f}, "
           f"{len(traj.token_ids)} tokens, status {traj.status}"]
    out.append("--- prompt ---\n" + tok.decode(traj.prompt_ids))
    for i, turn in enumerate(traj.turns):
        out.append(f"--- turn {i} (policy v{turn.policy_version}, {len(turn.sampled_ids)} tokens, "
                   f"mean logprob {sum(turn.logprobs) / max(1, len(turn.logprobs)):.3f}) ---")
        out.append(tok.decode(turn.sampled_ids))
        if turn.observation_ids:
            out.append("--- observation ---\n" + tok.decode(turn.observation_ids))
    return "\n".join(out)
