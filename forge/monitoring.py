"""The one metrics sink: console progress, `metrics.jsonl` in the run folder, Weights & Biases.

Every number Forge reports goes through a `Monitor`. Scalars land in `metrics.jsonl` (one JSON
object per step, with `step`) and in W&B; histograms and tables go to W&B, with a summary of
each histogram (mean, min, max) in `metrics.jsonl` so the file alone tells the story. W&B runs
offline unless the recipe asks for online; nothing else in Forge imports wandb.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

log = logging.getLogger("forge")


class MonitorError(RuntimeError):
    """A monitoring set-up the user must fix (the message says how)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging; offline unless asked for online."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """'offline' writes a local run folder (sync it later with `wandb sync`); 'online' needs `wandb login`."""
    project: str = "forge"
    """W&B project name."""
    entity: str | None = None
    """W&B entity (user or team); None uses the logged-in default."""
    tags: list[str] = field(default_factory=list)
    """Tags attached to the W&B run."""


@dataclass(frozen=True)
class RunDir:
    """A run's folder: `runs/<name>-<timestamp>/` with config, metrics, logs and checkpoints."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_file(self) -> Path:
        return self.path / "forge.log"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def create_run_dir(output_dir: str | Path, name: str, config_yaml: str) -> RunDir:
    """Make a fresh run folder, write the resolved config (YAML text) and start the log file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, n = base, 1
    # Two runs started in the same second get distinct folders rather than sharing one.
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    run = RunDir(path)
    run.checkpoints.mkdir(parents=True)
    run.config.write_text(config_yaml)
    attach_log_file(run.log_file)
    return run


def attach_log_file(path: Path) -> None:
    """Send the `forge` logger's records to `path` as well as the console."""
    logger = logging.getLogger("forge")
    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path.resolve():
            return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)


class Monitor:
    """Writes a run's metrics to the console, `metrics.jsonl` and W&B.

    `log(metrics, step)` takes scalars; `histogram` and `table` take richer values. Call
    `close()` (or use it as a context manager) so W&B finishes its files.
    """

    def __init__(
        self,
        run_dir: RunDir,
        *,
        config: Mapping[str, Any] | None = None,
        wandb_config: WandbConfig | None = None,
        run_name: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir.metrics, "a", buffering=1)
        # Rows of one step are merged and written when the next step starts (or at close),
        # so metrics.jsonl holds one object per step.
        self._row_step: int | None = None
        self._row: dict[str, Any] = {}
        self._summary: dict[str, Any] = {}
        self._bar = None
        self._wandb_run = None
        cfg = wandb_config or WandbConfig()
        if cfg.mode != "disabled":
            self._wandb_run = _start_wandb(cfg, run_dir, config, run_name or run_dir.path.name)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run folder (under the run folder), or None when W&B is disabled."""
        return Path(self._wandb_run.dir).parent if self._wandb_run is not None else None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics for `step` in metrics.jsonl and W&B; calls for one step merge."""
        row = {k: _scalar(k, v) for k, v in metrics.items()}
        self._write_line(step, row)
        if self._wandb_run is not None:
            self._wandb_run.log(row, step=step)
        if self._bar is not None:
            shown = {k: row[k] for k in list(row)[:4]}
            self._bar.set_postfix({k.split("/")[-1]: _short(v) for k, v in shown.items()}, refresh=False)

    def histogram(self, name: str, values: Sequence[float] | Any, step: int) -> None:
        """A distribution (advantages, expert load): a W&B histogram, its summary in metrics.jsonl."""
        flat = [float(v) for v in _flatten(values)]
        if not flat:
            return
        summary = {
            f"{name}/mean": sum(flat) / len(flat),
            f"{name}/min": min(flat),
            f"{name}/max": max(flat),
        }
        self._write_line(step, summary)
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Histogram(flat)}, step=step)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (sample trajectories) for W&B; metrics.jsonl records only its size."""
        self._write_line(step, {f"{name}/rows": len(rows)})
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final values of the run (W&B summary; also `summary.json` in the run folder)."""
        self._summary.update(values)
        (self.run_dir.path / "summary.json").write_text(json.dumps(self._summary, indent=2, default=str))
        if self._wandb_run is not None:
            for k, v in values.items():
                self._wandb_run.summary[k] = v

    def progress(self, total: int | None, desc: str, *, initial: int = 0) -> "Progress":
        """A console progress bar with rate and ETA; metrics logged meanwhile show beside it."""
        return Progress(self, total, desc, initial)

    def close(self) -> None:
        self._flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._metrics.closed:
            self._metrics.close()
        if self._wandb_run is not None:
            folder = self.wandb_dir
            self._wandb_run.finish()
            self._wandb_run = None
            # wandb 0.31 has been seen, rarely, to leave an empty transaction log; say so
            # rather than let the run look synced. metrics.jsonl is unaffected.
            if folder is not None and all(f.stat().st_size == 0 for f in folder.glob("*.wandb")):
                log.warning("W&B left an empty transaction log in %s; metrics.jsonl holds every step", folder)

    def _write_line(self, step: int, row: Mapping[str, Any]) -> None:
        if self._row_step is not None and int(step) != self._row_step:
            self._flush()
        self._row_step = int(step)
        self._row.update(row)

    def flush(self) -> None:
        """Write the current step's row now (before a checkpoint, so a resume finds it)."""
        self._flush()
        self._metrics.flush()

    def _flush(self) -> None:
        if self._row_step is not None and not self._metrics.closed:
            self._metrics.write(json.dumps({"step": self._row_step, **self._row}) + "\n")
        self._row_step, self._row = None, {}


class Progress:
    """A tqdm bar tied to a Monitor, so logged metrics appear beside the rate and ETA."""

    def __init__(self, monitor: Monitor, total: int | None, desc: str, initial: int) -> None:
        from tqdm import tqdm

        self._monitor = monitor
        # A bar redraws in place on a terminal; in CI logs it prints sparse lines instead.
        self._bar = tqdm(
            total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=os.environ.get("FORGE_NO_PROGRESS") == "1",
        )

    def __enter__(self) -> "Progress":
        self._monitor._bar = self._bar
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()
        self._monitor._bar = None

    def update(self, n: int = 1) -> None:
        self._bar.update(n)


def is_wall_clock(key: str) -> bool:
    """Whether a metric measures wall-clock time: seconds or a rate per second, named `*_s`.

    These are the only metrics of a `train.rollout_schedule: fixed_lag` run that differ between
    two runs of one recipe and seed on one machine; everything else repeats exactly
    (docs/quickstart.md, tests/test_determinism.py). Name any new timing metric `*_s`.
    """
    return key.endswith("_s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _start_wandb(cfg: WandbConfig, run_dir: RunDir, config: Mapping[str, Any] | None, name: str):
    import wandb

    if cfg.mode == "online" and not _wandb_logged_in():
        raise MonitorError(
            "wandb.mode is 'online' but no W&B API key is configured; run `wandb login` "
            "or set WANDB_API_KEY, or use wandb.mode=offline"
        )
    # The recipe decides the mode; an inherited WANDB_MODE would silently override it.
    os.environ.pop("WANDB_MODE", None)
    return wandb.init(
        dir=str(run_dir.path),
        mode=cfg.mode,
        project=cfg.project,
        entity=cfg.entity,
        tags=list(cfg.tags) or None,
        name=name,
        config=dict(config) if config is not None else None,
        settings=wandb.Settings(console="off", silent=True),
    )


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _scalar(key: str, value: Any) -> float | int:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__}; use histogram() or table()")
    return value


def _short(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0 or math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3g}"


def _flatten(values: Any) -> Iterable[Any]:
    if hasattr(values, "detach"):
        return values.detach().float().flatten().tolist()
    if hasattr(values, "ravel"):
        return values.ravel().tolist()
    return values
