"""`forge env list` and `forge env check MODULE:CLASS`: print to stdout, return the exit status.

`env_list()` and `env_check(target)` are the logic; the `*_arguments`/`*_command` pairs adapt
them to the argparse rows of `forge/cli.py`.
"""

from __future__ import annotations

import argparse

from forge.agent_side.checker import check_tool_env
from forge.agent_side.config import EnvLoadError, load_env_class
from forge.agent_side.registry import registered_envs, resolve_target


def env_list() -> int:
    """Print every environment registered under `forge/`: id, class, turn limit and tools."""
    envs = registered_envs()
    if not envs:
        print("no environments are registered under forge/; import a package that registers them")
        return 0
    rows = [("ID", "CLASS", "TURNS", "TOOLS")]
    for env_id, entry in envs.items():
        try:
            cls = load_env_class(entry)
            env = cls()
            rows.append((env_id, entry, str(env.max_turns), ", ".join(sorted(env.tools))))
        except Exception as exc:
            rows.append((env_id, entry, "-", f"(cannot build: {type(exc).__name__}: {exc})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def env_check(target: str) -> int:
    """Run Gymnasium's checker and Forge's own on `target`: 'module:Class', a `forge/` id, or 'package:forge/Id'."""
    try:
        cls = load_env_class(resolve_target(target))
    except (EnvLoadError, KeyError) as exc:
        print(f"FAIL  loads: {exc.args[0]}")
        return 1
    results = check_tool_env(cls)
    for r in results:
        if r.ok:
            print(f"ok    {r.name}")
        else:
            print(f"FAIL  {r.name}: {r.problem}\n      fix: {r.fix}")
    failed = sum(not r.ok for r in results)
    print(f"{target}: {len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


def env_list_arguments(parser: argparse.ArgumentParser) -> None:
    """`forge env list` takes no arguments."""


def env_list_command(args: argparse.Namespace) -> int:
    return env_list()


def env_check_arguments(parser: argparse.ArgumentParser) -> None:
    # Not named 'target': forge/cli.py keeps the subcommand's function under that name.
    parser.add_argument("env", metavar="MODULE:CLASS", help="the env as module.path:ClassName (e.g. my_pkg.my_env:MyEnv), a forge/ id, or my_pkg:forge/MyEnv-v0")


def env_check_command(args: argparse.Namespace) -> int:
    return env_check(args.env)
