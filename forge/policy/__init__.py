"""The policy: one model definition shared by the trainer, the generator and the kernels.

Names load on first use, so that `forge.policy.tokenizer` and `forge.policy.config` (which the
agent side and the recipe loader import) do not pull in torch and the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "forge.policy.config",
    "ModelGenerator": "forge.policy.generation",
    "RouterLayerStats": "forge.policy.moe",
    "Transformer": "forge.policy.model",
    "count_parameters": "forge.policy.model",
    "load_checkpoint": "forge.policy.checkpoint",
    "load_hf": "forge.policy.checkpoint",
    "router_stats": "forge.policy.moe",
    "save_checkpoint": "forge.policy.checkpoint",
    "save_hf": "forge.policy.checkpoint",
    "update_expert_bias": "forge.policy.moe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'forge.policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
