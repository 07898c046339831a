"""The DeepSpeed engine: process group, ZeRO stage and precision from the recipe.

gloo on the CPU, NCCL on GPUs. The optimizer is torch's AdamW handed to DeepSpeed as a client
optimizer: DeepSpeed's fused and CPU Adam compile for 30-50 s on first use, and on the small
models Forge trains on the CPU they buy nothing. DeepSpeed's shared-memory all-reduce for the
CPU is switched off for the same reason (a multi-minute compile on first use; gloo suffices).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from forge.trainer.config import TrainerConfig


def init_process_group(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500) -> str:
    """Join (or create) the trainer's process group; returns the backend. Idempotent."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return dist.get_backend()
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.setdefault("LOCAL_RANK", "0" if not torch.cuda.is_available() else str(rank % torch.cuda.device_count()))
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return backend


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for this trainer config."""
    out: dict[str, Any] = {
        # Forge drives accumulation itself (set_gradient_accumulation_boundary), so the
        # engine sees one micro-batch per step and never rescales the loss.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        out["gradient_clipping"] = cfg.grad_clip
    return out


def make_engine(model: torch.nn.Module, cfg: TrainerConfig):
    """Wrap `model` in a DeepSpeed engine with torch's AdamW; the process group must exist."""
    import deepspeed

    if torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over data-parallel ranks (a no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks (a no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
