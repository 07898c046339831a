"""The `forge` command. Every subcommand is one row of `COMMANDS`, the one place to add one.

A subcommand arrives with the capability behind it. User errors (a bad recipe, a bad class
reference, a W&B set-up to fix) print one line naming the fix and exit with status 2; a bug
still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from dataclasses import dataclass
from typing import Callable, Sequence

from forge import __version__
from forge.config import ConfigError
from forge.monitoring import MonitorError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, MonitorError)


@dataclass(frozen=True)
class Command:
    """One subcommand: `path` is its words ('env check'), `target` the 'module:function' it runs."""

    path: str
    help: str
    arguments: str
    """'module:function' that adds the subcommand's arguments to its parser."""
    target: str
    """'module:function' that runs it and returns the exit status."""


def _load(ref: str) -> Callable:
    module_name, func_name = ref.split(":")
    return getattr(importlib.import_module(module_name), func_name)


COMMANDS: list[Command] = [
    Command("config", "print a recipe as it resolves (defaults, file, overrides), checked strictly",
            "forge.commands:config_arguments", "forge.commands:config_show"),
    Command("train", "run a recipe: warm-start, RL on a Ray cluster, evaluation, checkpoints",
            "forge.commands:train_arguments", "forge.commands:train"),
    Command("env list", "show the environments registered under forge/",
            "forge.agent_side.commands:env_list_arguments", "forge.agent_side.commands:env_list_command"),
    Command("env check", "run Gymnasium's and Forge's checks on an environment; says how to fix each failure",
            "forge.agent_side.commands:env_check_arguments", "forge.agent_side.commands:env_check_command"),
    Command("serve", "serve a recipe's policy over OpenAI's Chat Completions API on 127.0.0.1; record sessions",
            "forge.commands:serve_arguments", "forge.commands:serve"),
    Command("bench", "run a speed benchmark of benchmarks/ (prints a table, writes JSON; most need a GPU)",
            "forge.commands:bench_arguments", "forge.commands:bench"),
    Command("inspect", "show a run: evaluations, a step's groups and rewards, a rendered trajectory",
            "forge.commands:inspect_arguments", "forge.commands:inspect"),
]


class _Parser(argparse.ArgumentParser):
    """argparse with Forge's error style: one line, naming where the usage is, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forge",
        description="Forge: reinforcement learning for tool-using language-model agents.",
    )
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups[""] = top
    for cmd in COMMANDS:
        words = cmd.path.split()
        parent_key = ""
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                sub = groups[parent_key].add_parser(word, help=f"{word} commands")
                groups[key] = sub.add_subparsers(dest=f"command_{depth + 1}", metavar="COMMAND", required=True,
                                                 parser_class=_Parser)
            parent_key = key
        leaf = groups[parent_key].add_parser(words[-1], help=cmd.help, description=cmd.help)
        _load(cmd.arguments)(leaf)
        leaf.set_defaults(target=cmd.target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (`forge train R --resume RUN a.b=c`); argparse
    # cannot intermix positionals with subcommands, so gather the stragglers here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "target", None) is None:
        parser.print_help()
        return 0
    # Recipes name user modules (env classes, agents) relative to where forge is started, as
    # `python -m` would import them; Ray's workers get the same folder (commands._init_ray).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return int(_load(args.target)(args) or 0)
    except USER_ERRORS as exc:
        print(f"forge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
