"""Versioned weight publication: the trainer publishes, rollout workers pull between turns.

The store holds only the latest version and an opaque handle to its payload (in a Ray run,
the ObjectRef of a state dict put once into the object store, so every worker on a node maps
the same shared memory instead of receiving its own copy). A worker asks for the version
first, a cheap call, and fetches the payload only when it is newer than what it holds.
"""

from __future__ import annotations

import time
from typing import Any


class WeightStore:
    """The latest published weights and their version; plain Python (wrapped as a Ray actor)."""

    def __init__(self) -> None:
        self._version = -1
        self._payload: Any = None
        self._published_at = 0.0

    def publish(self, version: int, payload: Any) -> None:
        """Make `payload` the weights of `version`; versions only move forward."""
        if version <= self._version:
            raise ValueError(f"weights version {version} is not newer than the published {self._version}")
        self._version, self._payload, self._published_at = version, payload, time.time()

    def version(self) -> int:
        """The latest published version, -1 before the first."""
        return self._version

    def latest(self, newer_than: int) -> tuple[int, Any] | None:
        """(version, payload) if a version newer than `newer_than` exists, else None."""
        if self._version > newer_than:
            return self._version, self._payload
        return None
