"""The ledger: every scheduled group's fate, written once, so a run can prove nothing was lost.

`runs/<run>/ledger.jsonl` is append-only JSON lines, written by the driver:

- `{"group", "status": "scheduled", "step"}` when the driver hands a task to a rollout worker;
- `{"group", "status": "trained", "step", "trajectories"}` when an optimizer step used it, with
  its episodes (an episode split into context segments counts once);
- `{"group", "status": "dropped", "step", "reason"}` when it will never be trained: `env_error`
  or `timeout` (failed after its retries), `stale` (the data pool dropped it), `run_ended`;
- `{"status": "checkpoint", "step", "held"}` when a checkpoint is saved, with the groups the
  data pool held then (finished, not yet trained).

`step` is the number of RL steps done when the line was written. A resumed run trims the lines
written after its checkpoint (to `ledger.discarded.jsonl`) and goes on appending. `check`
reads a ledger and reports groups trained twice, trained short (fewer trajectories than the
group size) and vanished (scheduled, but neither trained, dropped nor held at the last
checkpoint); `forge inspect RUN --ledger` prints it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("scheduled", "trained", "dropped", "checkpoint")


class Ledger:
    """Appends a run's group fates to `path`; keeps enough in memory to write each fate once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._scheduled: dict[str, int] = {}
        self._fated: set[str] = set()
        self._held: set[str] = set()
        if self.path.is_file():
            for entry in read_ledger(self.path):
                self._remember(entry)

    def scheduled(self, groups: list[str], step: int) -> None:
        """Groups handed to rollout workers; one already scheduled and not yet fated is skipped
        (a resumed fixed-lag run schedules the same batches again)."""
        new = [g for g in groups if g not in self._scheduled]
        self._write([{"group": g, "status": "scheduled", "step": step} for g in new])

    def trained(self, group: str, step: int, trajectories: int) -> None:
        self._write([{"group": group, "status": "trained", "step": step, "trajectories": trajectories}])

    def dropped(self, group: str, step: int, reason: str) -> None:
        if group not in self._fated:
            self._write([{"group": group, "status": "dropped", "step": step, "reason": reason}])

    def checkpoint(self, step: int, held: list[str]) -> None:
        self._write([{"status": "checkpoint", "step": step, "held": sorted(held)}])

    def end_run(self, step: int) -> None:
        """At the end of a run, every open group not held by the last checkpoint's data pool is
        dropped (`run_ended`): still running, or delivered to the live pool after that checkpoint
        was saved (workers keep delivering while it saves), so no checkpoint will bring it back."""
        for group in self.open_groups():
            if group not in self._held:
                self.dropped(group, step, "run_ended")

    def open_groups(self) -> list[str]:
        """Scheduled groups without a fate yet, in scheduling order."""
        return [g for g in self._scheduled if g not in self._fated]

    def trim(self, after_step: int) -> int:
        """Move the lines written after RL step `after_step` (past the checkpoint a resume starts
        from) to ledger.discarded.jsonl; returns how many moved."""
        if not self.path.is_file():
            return 0
        keep, drop = [], []
        checkpoint_seen = False
        for entry in read_ledger(self.path):
            # Lines of the checkpoint's own step written after its checkpoint line go too.
            late = entry["step"] > after_step or (checkpoint_seen and entry["step"] == after_step)
            if entry.get("status") == "checkpoint" and entry["step"] == after_step:
                checkpoint_seen = True
                late = False
            (drop if late else keep).append(entry)
        if drop:
            with open(self.path.with_name("ledger.discarded.jsonl"), "a") as f:
                f.writelines(json.dumps(e) + "\n" for e in drop)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in keep))
        self._scheduled, self._fated, self._held = {}, set(), set()
        for entry in keep:
            self._remember(entry)
        return len(drop)

    def _remember(self, entry: dict) -> None:
        status = entry.get("status")
        if status == "scheduled":
            self._scheduled.setdefault(entry["group"], entry["step"])
        elif status in ("trained", "dropped"):
            self._fated.add(entry["group"])
        elif status == "checkpoint":
            self._held = set(entry.get("held", []))

    def _write(self, entries: list[dict]) -> None:
        if not entries:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in entries)
            f.flush()
        for entry in entries:
            self._remember(entry)


def read_ledger(path: str | Path) -> list[dict]:
    """The entries of a ledger file; ValueError (one line) naming the line that is not JSON."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n} is not a JSON line; the ledger is damaged (a crash mid-write leaves "
                             "a partial last line: delete that line)") from None
        if not isinstance(entry, dict) or entry.get("status") not in STATUSES or not isinstance(entry.get("step"), int):
            raise ValueError(f"{path}:{n} is not a ledger entry (status one of {', '.join(STATUSES)}, an integer step)")
        out.append(entry)
    return out


@dataclass
class LedgerCheck:
    """What `check` found; `ok` when nothing was lost, trained twice or trained short."""

    scheduled: int = 0
    trained: int = 0
    dropped: Counter = field(default_factory=Counter)
    held: int = 0
    trained_twice: list[str] = field(default_factory=list)
    trained_short: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    fated_unscheduled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.trained_twice or self.trained_short or self.vanished or self.fated_unscheduled)

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        lines = [f"scheduled {self.scheduled} = trained {self.trained} + dropped {sum(self.dropped.values())} "
                 f"({dropped}) + held in the pool at the last checkpoint {self.held}"
                 f"{'' if not self.vanished else f' + vanished {len(self.vanished)}'}"]
        for name in ("trained_twice", "trained_short", "vanished", "fated_unscheduled"):
            groups = getattr(self, name)
            if groups:
                lines.append(f"{name.replace('_', ' ')}: {len(groups)} ({', '.join(groups[:5])}{', ...' if len(groups) > 5 else ''})")
        lines.append("ledger OK: no group lost, trained twice or trained short" if self.ok else "ledger NOT OK")
        return "\n".join(lines)


def check(entries: list[dict], group_size: int) -> LedgerCheck:
    """Account for every scheduled group of a ledger (see the module docstring)."""
    out = LedgerCheck()
    scheduled: dict[str, None] = {}
    trained: Counter = Counter()
    dropped: dict[str, str] = {}
    held: set[str] = set()
    for e in entries:
        status = e["status"]
        if status == "scheduled":
            scheduled.setdefault(e["group"], None)
        elif status == "trained":
            trained[e["group"]] += 1
            if e.get("trajectories", 0) < group_size:
                out.trained_short.append(e["group"])
        elif status == "dropped":
            dropped.setdefault(e["group"], e.get("reason", "?"))
        elif status == "checkpoint":
            held = set(e.get("held", []))
    out.scheduled = len(scheduled)
    out.trained = len(trained)
    out.dropped = Counter(reason for g, reason in dropped.items() if g not in trained)
    out.trained_twice = sorted(g for g, n in trained.items() if n > 1)
    fated = set(trained) | set(dropped)
    out.held = len(held - fated)
    out.vanished = [g for g in scheduled if g not in fated and g not in held]
    out.fated_unscheduled = sorted(g for g in fated if g not in scheduled)
    return out
