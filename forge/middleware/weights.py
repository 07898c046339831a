"""Versioned weight publication: the trainer publishes, rollout workers pull between turns.

The store holds the last `keep` versions and an opaque handle to each payload (in a Ray run,
the ObjectRef of a state dict put once into the object store, so every worker on a node maps
the same shared memory instead of receiving its own copy). A worker asks for the version
first, a cheap call, and fetches the payload only when it is newer than what it holds. Under
the fixed-lag rollout schedule (`train.rollout_schedule: fixed_lag`) each worker call names
the version it must sample with, so the store keeps as many versions as the lag spans.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


class WeightStore:
    """The last `keep` published weights and their versions; plain Python (wrapped as a Ray actor)."""

    def __init__(self, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"WeightStore keeps at least one version, got keep={keep}")
        self.keep = keep
        self._versions: OrderedDict[int, Any] = OrderedDict()
        self._published_at = 0.0

    def publish(self, version: int, payload: Any) -> None:
        """Make `payload` the weights of `version`; versions only move forward."""
        if version <= self.version():
            raise ValueError(f"weights version {version} is not newer than the published {self.version()}")
        self._versions[version] = payload
        while len(self._versions) > self.keep:
            self._versions.popitem(last=False)
        self._published_at = time.time()

    def version(self) -> int:
        """The latest published version, -1 before the first."""
        return next(reversed(self._versions)) if self._versions else -1

    def latest(self, newer_than: int) -> tuple[int, Any] | None:
        """(version, payload) if a version newer than `newer_than` exists, else None."""
        if self.version() > newer_than:
            return self.version(), self._versions[self.version()]
        return None

    def get(self, version: int) -> Any:
        """The payload of `version`, which must be one of the kept ones."""
        if version not in self._versions:
            kept = f"{next(iter(self._versions))}..{self.version()}" if self._versions else "none yet"
            raise KeyError(f"weights version {version} is not kept (kept: {kept}); a WeightStore(keep=n) keeps "
                           "the last n versions, so build it with a keep that covers the oldest version still asked for")
        return self._versions[version]
