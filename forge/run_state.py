"""A run's resumable state: the driver's counters beside the trainer's DeepSpeed checkpoint.

A checkpoint is `checkpoints/step-NNNNNN/`: DeepSpeed's files of every rank (model, optimizer,
router biases, each rank's RNG state) with the driver's state and the data pool's contents in
the client state, and `checkpoints/latest` naming the newest complete one. `latest` is written
last, so a run stopped in the middle of saving resumes from the previous checkpoint.

On resume, metric rows logged after the checkpoint's step are moved from `metrics.jsonl` to
`metrics.discarded.jsonl` (kept, not deleted), because those steps run again: the resumed run
repeats them and `metrics.jsonl` holds each step once.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray


@dataclass
class DriverState:
    """The loop's counters; everything else lives in the trainer's and the pool's state."""

    step: int = 0
    """RL optimizer steps done."""
    version: int = 0
    """Published policy version (warm-start counts one)."""
    next_seed: int = 0
    """Task seeds handed out so far (offset from env.seed)."""
    warm_start_done: bool = False
    """Whether warm-start has run."""
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval/reward_mean) of every evaluation so far."""
    greedy_evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval/greedy_reward_mean) of every evaluation so far, with eval.greedy_too."""

    @property
    def tag(self) -> str:
        return f"step-{self.step:06d}"


class Checkpointer:
    """Saves and finds checkpoints under a run folder."""

    def __init__(self, checkpoints: Path) -> None:
        self.dir = Path(checkpoints)

    def save(self, ranks: list, pool: Any, state: DriverState) -> list[str]:
        """Save a checkpoint; returns the task ids of the groups the saved pool holds (workers
        go on delivering to the live pool meanwhile, so asking it again later may differ)."""
        client = {"driver": asdict(state), "pool": ray.get(pool.state_dict.remote()), "python_rng": random.getstate()}
        ray.get([r.call.remote("save", str(self.dir), state.tag, client) for r in ranks])
        (self.dir / "latest").write_text(state.tag + "\n")
        return [g.task_id for g in client["pool"]["finished"]]

    def latest(self) -> str | None:
        marker = self.dir / "latest"
        return marker.read_text().strip() if marker.is_file() else None

    def driver_state(self, tag: str) -> DriverState:
        """The driver state saved with checkpoint `tag` (read from rank 0's client state)."""
        import torch

        files = sorted((self.dir / tag).glob("mp_rank_00_model_states.pt")) or sorted((self.dir / tag).glob("*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"checkpoint {self.dir / tag} has no model states; it is incomplete")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        driver = saved["driver"]
        state = DriverState(**{**driver, "evals": [tuple(e) for e in driver["evals"]],
                               "greedy_evals": [tuple(e) for e in driver.get("greedy_evals", [])]})
        random.setstate(_as_rng_state(saved["python_rng"]))
        return state


def trim_metrics(metrics: Path, after_step: int) -> int:
    """Move rows with step > after_step to metrics.discarded.jsonl; returns how many moved."""
    if not metrics.is_file():
        return 0
    keep, drop = [], []
    for line in metrics.read_text().splitlines():
        if line.strip():
            (drop if json.loads(line)["step"] > after_step else keep).append(line)
    if drop:
        with open(metrics.with_name("metrics.discarded.jsonl"), "a") as f:
            f.write("\n".join(drop) + "\n")
        metrics.write_text("".join(line + "\n" for line in keep))
    return len(drop)


def _as_rng_state(state: Any) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
