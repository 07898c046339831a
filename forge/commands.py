"""The bodies of the `forge` subcommands that belong to no single package: config, train, inspect."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
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
    # Actors are named (trainer-0, rollout-0, ...) in a namespace of the run's own.
    _init_ray(cfg, namespace=f"forge-{run.path.name}")
    import ray

    from forge.loop import train as train_loop

    with Monitor(run, config=to_dict(cfg), wandb_config=cfg.wandb, run_name=run.path.name) as monitor:
        try:
            state = train_loop(cfg, run, monitor, state, checkpointer)
        except ray.exceptions.RayActorError as exc:
            # A trainer rank, the data pool or the weight store died: the run cannot go on, but
            # its last checkpoint can.
            raise ConfigError(f"an actor of the run died ({str(exc).splitlines()[0][:200]}); continue from the "
                              f"last checkpoint with: forge train {args.recipe} --resume {run.path}") from None
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


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: a free one); default 8000")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="serve the latest checkpoint of run folder RUN (default: the recipe's initial weights)")


def serve(args: argparse.Namespace) -> int:
    """Serve the recipe's policy over OpenAI's Chat Completions API on 127.0.0.1, and write every
    closed session to the run folder as training data (docs/agents.md)."""
    import threading

    from forge.middleware.arrow import write_parquet
    from forge.middleware.gateway.app import GatewayConfig, create_app
    from forge.middleware.gateway.engine import BatchingEngine
    from forge.middleware.gateway.server import GatewayServer
    from forge.middleware.gateway.sessions import SessionStore, session_group
    from forge.monitoring import RunDir, attach_log_file, create_run_dir
    from forge.policy.generation import ModelGenerator
    from forge.policy.tokenizer import ByteTokenizer

    cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a port is 0-65535 (0 picks a free one)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model, version, run = _serving_model(cfg, args.resume)
    if run is None:
        run = create_run_dir(cfg.run.output_dir, f"{cfg.run.name}-serve", dump_yaml(cfg))
    else:
        run = RunDir(run)
        attach_log_file(run.log_file)
    sessions_dir = run.path / "sessions"
    sessions_dir.mkdir(parents=True, exist_ok=True)
    written = threading.Lock()

    def write(session) -> None:
        # One Parquet file per closed session, in the trajectory schema `forge train` writes.
        with written:
            path = write_parquet([session_group(session)], sessions_dir / f"session-{_safe_name(session.id)}.parquet")
        log.info("session %s closed (reward %s, %d calls): %s", session.id, session.reward, len(session.calls), path)

    tokenizer = ByteTokenizer()
    generator = ModelGenerator(model, tokenizer, seed=cfg.run.seed, policy_version=version)
    engine = BatchingEngine(generator)
    store = SessionStore(on_close=write)
    gateway = GatewayConfig(model_name=cfg.agent.model_name, max_context_tokens=cfg.rollout.max_context_tokens,
                            default_max_tokens=cfg.rollout.max_new_tokens, tool_style=cfg.agent.tool_style)
    server = GatewayServer(create_app(engine, tokenizer, store, gateway, lambda: generator.policy_version),
                           port=args.port)
    try:
        server.start()
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    print(f"forge: serving '{gateway.model_name}' (policy version {version}) at {server.base_url}; "
          f"closed sessions go to {sessions_dir}; Ctrl-C stops", flush=True)
    try:
        # Short sleeps, not one long wait: Linux may deliver Ctrl-C's SIGINT to another thread
        # (uvicorn's, the engine's), and Python raises KeyboardInterrupt only when the main
        # thread next runs bytecode; a wait of an hour would then hold the stop for an hour.
        while True:
            time.sleep(0.25)
    finally:
        server.stop()
        engine.close()


def _serving_model(cfg: RecipeConfig, resume: str | None):
    """(model, policy version, run folder or None): a run's latest checkpoint, else the recipe's
    initial weights (trainer.init_seed), in the trainer's precision on a GPU."""
    import torch

    from forge.config import init_seed
    from forge.policy.model import Transformer
    from forge.run_state import Checkpointer

    torch.manual_seed(init_seed(cfg))
    model = Transformer(cfg.model)
    version, run = 0, None
    if resume:
        run = _run_folder(resume)
        checkpoints = Checkpointer(run / "checkpoints")
        tag = checkpoints.latest()
        if tag is None:
            raise ConfigError(f"--resume {resume}: the run has no complete checkpoint yet; serve without --resume")
        saved = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        try:
            model.load_state_dict(saved["module"])
        except RuntimeError as exc:
            raise ConfigError(f"--resume {resume}: checkpoint {tag} does not fit this recipe's model "
                              f"({str(exc).splitlines()[0]}); serve it with the run's own config.yaml") from None
        version = int(saved.get("driver", {}).get("version", 0))
        log.info("serving %s of %s", tag, run)
    if torch.cuda.is_available():
        model = model.cuda().to(torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32)
    return model.eval(), version, run


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder, e.g. runs/quickstart-20261127-101500")
    parser.add_argument("--step", type=int, default=None, help="show the groups of this RL step (default: the last kept)")
    parser.add_argument("--trajectory", type=int, default=0, help="which trajectory of the step to render")
    parser.add_argument("--ledger", action="store_true",
                        help="check the run's ledger: every scheduled group trained once, dropped or held; exit 1 if not")


def inspect(args: argparse.Namespace) -> int:
    """Show a run: its evaluations, a step's groups and rewards, and one rendered trajectory."""
    from forge.inspect_run import render_run

    if args.ledger:
        return _inspect_ledger(_run_folder(args.run))

    print(render_run(_run_folder(args.run), step=args.step, trajectory=args.trajectory))
    return 0


def _inspect_ledger(run: Path) -> int:
    """Print the ledger's account of the run's groups; 1 if a group was lost, trained twice or short."""
    from forge.middleware.ledger import check, read_ledger

    path = run / "ledger.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; runs started before the ledger (2026-12-07) have none")
    try:
        entries = read_ledger(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_recipe(run / "config.yaml", (), RecipeConfig)
    report = check(entries, cfg.rollout.group_size)
    print(f"{path}:")
    print(report.summary())
    return 0 if report.ok else 1


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
    try:
        if not path.is_dir() and (Path("runs") / name).is_dir():
            path = Path("runs") / name
        is_run = (path / "config.yaml").is_file()
    except OSError as exc:  # a name too long for the file system, say
        raise ConfigError(f"'{name}' is not a run folder ({exc.strerror}); runs live under runs/<name>-<timestamp>/") from None
    if not is_run:
        raise ConfigError(f"'{name}' is not a run folder (no config.yaml in it); runs live under runs/<name>-<timestamp>/")
    return path


def _init_ray(cfg: RecipeConfig, namespace: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers of a local cluster import user env modules from where `forge train` was started.
    paths = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths), "FORGE_NO_PROGRESS": "1"}}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=False, namespace=namespace)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                 namespace=namespace)
