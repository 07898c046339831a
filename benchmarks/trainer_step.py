"""The trainer's RL step alone, on batches shaped like a recipe's, and where its time goes.

The recipe's metrics time a step while rollout workers may share the card; this runs the same
`Trainer.train_step` with nothing else on the device (no Ray, no rollouts), so the two together
separate the trainer's own cost from the cost of sharing (issue 14, point 6). Each batch has
`--groups` groups of `--group-size` multi-turn trajectories: one prompt per group, then
`--turns` turns of `--response` sampled tokens, each followed by an observation of a random
length in `--observation` (the needle environment's pattern: trajectories share their prompt
and nothing after). Every step gets fresh random tokens. Per step it prints the wall time,
tokens per second over the tokens trained (every sequence's, as `train/tokens_per_s`), the
token ratio, the micro-batches, the phases of `train/time_*` (batch building, passes without
gradients, forward and backward, optimizer) and, on a GPU, the peak memory; the summary is the
median over the steps after the first (which compiles kernels).

Two switches look for why steps differ: `--same-batch` trains step 1's batch again every step
(a step that still changes speed then does so because the weights changed, e.g. MSA block
choices spreading or gathering; `trainer.lr=0` holds the weights too), and `--profile 2,5`
runs those steps under torch.profiler, prints their busiest kernels and keeps the top ones,
in ms, in the JSON row.

    PYTHONPATH=. python benchmarks/trainer_step.py [--recipe recipes/needle_msa_100m.yaml]
        [--steps 4] [--same-batch] [--profile 2,4] [--out trainer_step.json] [key=value overrides ...]

Needs DeepSpeed (the trainer's engine); runs on a GPU if one is visible, else on the CPU
(shrink the batch there: `--groups 2 --turns 2`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics

import torch

from forge.config import RecipeConfig, init_seed, load_recipe, trainer_algorithm
from forge.middleware.types import Group, Trajectory, Turn

PHASES = ("batch", "scoring", "forward_backward", "optimizer")
TOP_KERNELS = 12


def batch(seed: int, args: argparse.Namespace, vocab: int) -> list[Group]:
    """`args.groups` groups of `args.group_size` trajectories, rewards alternating 0 and 1."""
    rng = random.Random(seed)
    lo, hi = (int(x) for x in args.observation.split("-"))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    out = []
    for g in range(args.groups):
        prompt = tokens(args.prompt)
        trajectories = []
        for k in range(args.group_size):
            turns = [Turn(tokens(args.response), [-1.5] * args.response, 0, observation_ids=tokens(rng.randint(lo, hi)))
                     for _ in range(args.turns)]
            trajectories.append(Trajectory(f"t{g}", f"g{g}", prompt, turns, reward=float(k % 2)))
        out.append(Group(f"t{g}", f"g{g}", trajectories))
    return out


def profile_step(trainer, groups: list[Group], cuda: bool) -> tuple[dict, dict[str, float]]:
    """One step under torch.profiler: its metrics and its TOP_KERNELS busiest device kernels (CPU
    ops on the CPU), by own time in ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        m = trainer.train_step(groups)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=own, reverse=True)
    return m, {e.key[:60]: own(e) / 1e3 for e in events[:TOP_KERNELS]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/needle_msa_100m.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--groups", type=int, default=None, help="default: the recipe's trainer.groups_per_step")
    parser.add_argument("--group-size", type=int, default=None, help="default: the recipe's rollout.group_size")
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--observation", default="150-250", help="observation lengths, lo-hi")
    parser.add_argument("--same-batch", action="store_true", help="train step 1's batch at every step")
    parser.add_argument("--profile", default="", help="steps to profile, comma-separated (e.g. 2,5)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step compiles kernels and is left out of the median")
    try:
        profiled = {int(x) for x in args.profile.split(",") if x.strip()}
    except ValueError:
        parser.error(f"--profile takes step numbers separated by commas, e.g. 2,5; got {args.profile!r}")
    if not profiled <= set(range(1, args.steps + 1)):
        parser.error(f"--profile {args.profile}: steps run from 1 to --steps ({args.steps})")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    from forge.trainer.trainer import Trainer  # needs DeepSpeed

    cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
    args.groups = args.groups or cfg.trainer.groups_per_step
    args.group_size = args.group_size or cfg.rollout.group_size
    trainer = Trainer(cfg.model, cfg.trainer, trainer_algorithm(cfg), seed=init_seed(cfg))
    cuda = torch.cuda.is_available()
    rows = []
    print(f"{'step':>4} {'ms':>9} {'tokens':>8} {'tokens/s':>9} {'ratio':>6} {'mb':>3} "
          + " ".join(f"{p:>16}" for p in PHASES))
    for step in range(args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        groups = batch(0 if args.same_batch else step, args, cfg.model.vocab_size)
        if step + 1 in profiled:
            m, kernels = profile_step(trainer, groups, cuda)
        else:
            m, kernels = trainer.train_step(groups), None
        row = {"step": step + 1, "ms": m["train/step_s"] * 1e3, "tokens": m["train/tokens_per_s"] * m["train/step_s"],
               "tokens_per_s": m["train/tokens_per_s"], "token_ratio": m["train/token_ratio"],
               "micro_batches": int(m["train/micro_batches"]),
               **{f"{p}_ms": m[f"train/time_{p}_s"] * 1e3 for p in PHASES},
               **({"peak_gib": torch.cuda.max_memory_allocated() / 2**30} if cuda else {}),
               **({"kernels_ms": kernels} if kernels is not None else {})}
        rows.append(row)
        print(f"{row['step']:>4} {row['ms']:>9.1f} {row['tokens']:>8.0f} {row['tokens_per_s']:>9.0f} "
              f"{row['token_ratio']:>6.2f} {row['micro_batches']:>3} " + " ".join(f"{row[f'{p}_ms']:>13.1f} ms" for p in PHASES)
              + (f" {row['peak_gib']:6.1f} GiB" if cuda else ""), flush=True)
        if kernels is not None:
            print(f"     busiest {'kernels' if cuda else 'ops'} of step {row['step']}: "
                  + ", ".join(f"{name} {ms:.1f} ms" for name, ms in kernels.items()), flush=True)
    later = rows[1:]
    summary = {k: statistics.median(r[k] for r in later) for k in ("ms", "tokens_per_s", *(f"{p}_ms" for p in PHASES))}
    print("median of steps 2..: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    if args.out:
        result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "torch": torch.__version__, "recipe": args.recipe, "overrides": args.overrides,
                  "shape": {k: getattr(args, k) for k in ("groups", "group_size", "prompt", "turns", "response",
                                                           "observation")},
                  "same_batch": args.same_batch, "steps": rows, "median_after_first": summary}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
