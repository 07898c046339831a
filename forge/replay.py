"""Train on kept rollouts without Ray: the trainer's logic as plain processes under torchrun.

    torchrun --nproc_per_node 2 -m forge.replay RECIPE --rollouts runs/<run>/rollouts [a.b=c ...]

Each step reads one kept batch (`rollouts/step-NNNNNN.parquet`, as `forge train` writes them),
gives rank r the groups r, r + world, ... (whole groups, as the Ray loop does) and runs one
`Trainer.train_step`; rank 0 prints each step's metrics as a JSON line. It replays batches
offline, and it is how several GPUs are tested against one without a Ray cluster: the same
global batch must give the same loss and, within rounding, the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from forge.config import ConfigError, RecipeConfig, init_seed, load_recipe, trainer_algorithm
from forge.middleware.arrow import read_parquet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forge.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rollouts", required=True, help="a run's rollouts/ folder of step-*.parquet files")
    parser.add_argument("--steps", type=int, default=None, help="replay at most this many batches")
    parser.add_argument("--save", default=None, help="rank 0 writes the final weights here (torch.save)")
    parser.add_argument("--save-initial", default=None, help="rank 0 writes the weights before the first step here")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
        files = sorted(Path(args.rollouts).glob("step-*.parquet"))[: args.steps]
        if not files:
            raise ConfigError(f"--rollouts {args.rollouts}: no step-*.parquet files; run forge train with "
                              "train.keep_rollouts=true first")
    except ConfigError as exc:
        print(f"forge.replay: error: {exc}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    import torch

    from forge.trainer.trainer import Trainer

    cfg.trainer.num_ranks = world
    trainer = Trainer(cfg.model, cfg.trainer, trainer_algorithm(cfg), seed=init_seed(cfg), rank=rank, world_size=world)
    def save(path: str) -> None:
        # Every rank takes part: under ZeRO-3 the gather is a collective; rank 0 writes.
        weights = trainer.weights(keep=rank == 0)
        if rank == 0:
            torch.save(weights, path)

    try:
        if args.save_initial:
            save(args.save_initial)
        for step, path in enumerate(files, start=1):
            groups = read_parquet(path)
            if len(groups) % world:
                print(f"forge.replay: error: {path.name} holds {len(groups)} groups, not a multiple of {world} "
                      "ranks", file=sys.stderr)
                return 2
            metrics = trainer.train_step(groups[rank::world])
            if rank == 0:
                print(json.dumps({"step": step, **metrics}), flush=True)
        if args.save:
            save(args.save)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank leaves while another still talks to it
        return 0
    finally:
        # Exiting with the process group alive let a rank abort at exit ("terminate called
        # without an active exception", exit -6) once in a CI run after both steps had finished.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
