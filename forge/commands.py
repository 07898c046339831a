"""The bodies of the `forge` subcommands that belong to no single package: config, train, inspect."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from forge.config import ConfigError, RecipeConfig, dump_yaml, load_recipe, to_dict

log = logging.getLogger("forge")


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides, parsed to each field's type")


def config_show(args: argparse.Namespace) -> int:
    """Print the recipe as it resolves: defaults, file and overrides together, checked."""
    cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
    print(dump_yaml(cfg), end="")
    return 0


def train_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--ray-address", default=None,
                        help="join a running Ray cluster ('auto', or ray://host:port); default starts a local one")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue the run folder RUN (e.g. runs/quickstart-20261127-101500) from its last checkpoint")


def train(args: argparse.Namespace) -> int:
    """Run a recipe: warm-start, RL with evaluation and checkpoints, then a summary."""
    from forge.monitoring import Monitor, RunDir, attach_log_file, create_run_dir
    from forge.run_state import Checkpointer, DriverState, trim_metrics

    cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
    if args.ray_address:
        cfg.ray.address = args.ray_address
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.resume:
        run = RunDir(_run_folder(args.resume))
        checkpointer = Checkpointer(run.checkpoints)
        tag = checkpointer.latest()
        if tag is None:
            raise ConfigError(f"--resume {args.resume}: the run has no complete checkpoint yet; start it afresh")
        state = checkpointer.driver_state(tag)
        moved = trim_metrics(run.metrics, cfg.warm_start.steps + state.step)
        attach_log_file(run.log_file)
        log.info("resuming %s from %s (%d metric rows after it kept in metrics.discarded.jsonl)", run.path, tag, moved)
    else:
        run = create_run_dir(cfg.run.output_dir, cfg.run.name, dump_yaml(cfg))
        checkpointer, state = Checkpointer(run.checkpoints), DriverState()
        log.info("run folder: %s", run.path)
    _init_ray(cfg)
    from forge.loop import train as train_loop

    with Monitor(run, config=to_dict(cfg), wandb_config=cfg.wandb, run_name=run.path.name) as monitor:
        state = train_loop(cfg, run, monitor, state, checkpointer)
        first, last = state.evals[0], state.evals[-1]
        summary = {"eval/reward_first": first[1], "eval/reward_last": last[1], "rl_steps": state.step}
        if state.greedy_evals:
            summary.update({"eval/greedy_reward_first": state.greedy_evals[0][1],
                            "eval/greedy_reward_last": state.greedy_evals[-1][1]})
        monitor.summary(summary)
    print(f"eval/reward_mean: {first[1]:.3f} at step {first[0]} (after warm-start) -> {last[1]:.3f} at step "
          f"{last[0]} (after RL); run folder {run.path}")
    if state.greedy_evals:
        g0, g1 = state.greedy_evals[0], state.greedy_evals[-1]
        print(f"eval/greedy_reward_mean: {g0[1]:.3f} at step {g0[0]} -> {g1[1]:.3f} at step {g1[0]}")
    return 0


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder, e.g. runs/quickstart-20261127-101500")
    parser.add_argument("--step", type=int, default=None, help="show the groups of this RL step (default: the last kept)")
    parser.add_argument("--trajectory", type=int, default=0, help="which trajectory of the step to render")


def inspect(args: argparse.Namespace) -> int:
    """Show a run: its evaluations, a step's groups and rewards, and one rendered trajectory."""
    from forge.inspect_run import render_run

    print(render_run(_run_folder(args.run), step=args.step, trajectory=args.trajectory))
    return 0


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a script of benchmarks/ without .py: " + ", ".join(_benchmarks()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")


def bench(args: argparse.Namespace) -> int:
    """Run benchmarks/NAME.py with the remaining arguments (most need a GPU)."""
    import runpy

    names = _benchmarks()
    if args.name not in names:
        import difflib

        close = difflib.get_close_matches(args.name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"no benchmark '{args.name}'; {hint}known: {', '.join(names)}")
    sys.argv = [str(BENCHMARKS / f"{args.name}.py"), *args.args]
    # As `python benchmarks/NAME.py` would: the script's folder first, for its shared helpers.
    sys.path.insert(0, str(BENCHMARKS))
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def _benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_")) if BENCHMARKS.is_dir() else []


def _run_folder(name: str) -> Path:
    path = Path(name)
    if not path.is_dir() and (Path("runs") / name).is_dir():
        path = Path("runs") / name
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"'{name}' is not a run folder (no config.yaml in it); runs live under runs/<name>-<timestamp>/")
    return path


def _init_ray(cfg: RecipeConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers of a local cluster import user env modules from where `forge train` was started.
    paths = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths), "FORGE_NO_PROGRESS": "1"}}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
