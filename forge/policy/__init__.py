"""The policy: one model definition shared by the trainer, the generator and the kernels."""

from forge.policy.checkpoint import load_checkpoint, load_hf, save_checkpoint, save_hf
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer, count_parameters
from forge.policy.moe import RouterLayerStats, router_stats, update_expert_bias

__all__ = [
    "ModelConfig",
    "ModelGenerator",
    "RouterLayerStats",
    "Transformer",
    "count_parameters",
    "load_checkpoint",
    "load_hf",
    "router_stats",
    "save_checkpoint",
    "save_hf",
    "update_expert_bias",
]
