"""Trainer ranks as Ray actors: a thin wrapper around `Trainer`, and their placement.

Ray is imported here only. Each rank is one actor; rank 0's address is the rendezvous of the
DeepSpeed process group. A placement group keeps the ranks' resources reserved together, and
on a cluster spreads them over nodes as Ray sees fit.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from forge.policy.config import ModelConfig
from forge.trainer.config import AlgorithmConfig, TrainerConfig
from forge.trainer.trainer import Trainer


class TrainerActor:
    """One trainer rank in its own process."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainerConfig, algo: AlgorithmConfig, seed: int,
                 rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        self.trainer = Trainer(model_cfg, cfg, algo, seed=seed, rank=rank, world_size=world_size)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a `Trainer` method in this rank; the fan-out stays visible in the caller."""
        return getattr(self.trainer, method)(*args, **kwargs)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray gave this rank (its CUDA_VISIBLE_DEVICES); [] on the CPU."""
        return [str(g) for g in ray.get_gpu_ids()]

    def pid(self) -> int:
        """This rank's process id (placement.json records it; benchmarks/chaos.py kills it)."""
        return os.getpid()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_trainer_ranks(model_cfg: ModelConfig, cfg: TrainerConfig, algo: AlgorithmConfig, seed: int) -> list:
    """`cfg.num_ranks` trainer actors in one placement group; Ray must be initialised."""
    bundle = {"CPU": cfg.cpus_per_rank, **cfg.resources_per_rank}
    if cfg.gpus_per_rank:
        bundle["GPU"] = cfg.gpus_per_rank
    pg = placement_group([bundle] * cfg.num_ranks, strategy="PACK")
    ray.get(pg.ready())
    # Rank 0 runs on the node of the first bundle; its address is the rendezvous.
    remote = ray.remote(TrainerActor)
    master = ray.util.get_node_ip_address() if cfg.num_ranks == 1 else None
    actors = []
    port = _free_port()
    for rank in range(cfg.num_ranks):
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
        options = {"num_cpus": cfg.cpus_per_rank, "num_gpus": cfg.gpus_per_rank, "scheduling_strategy": strategy,
                   "resources": cfg.resources_per_rank or None}
        if rank == 0 and master is None:
            probe = ray.remote(num_cpus=0, scheduling_strategy=strategy)(lambda: ray.util.get_node_ip_address())
            master = ray.get(probe.remote())
        actors.append(remote.options(name=f"trainer-{rank}", **options).remote(
            model_cfg, cfg, algo, seed, rank, cfg.num_ranks, master, port))
    return actors
