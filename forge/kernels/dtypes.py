"""Precision helpers shared by the kernels' references and the policy."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is: numerically sensitive steps (norms, the
    router, the head, sums over experts) run in at least fp32 without cutting an fp64 run,
    whose exactness tests (merged against unmerged to 1e-10) would otherwise fail."""
    return x if x.dtype == torch.float64 else x.float()
