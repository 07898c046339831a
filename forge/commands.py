"""Subcommands that belong to the foundation itself (`forge config`)."""

from __future__ import annotations

import argparse

from forge.config import RecipeConfig, dump_yaml, load_recipe


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides, parsed to each field's type")


def config_show(args: argparse.Namespace) -> int:
    """Print the recipe as it resolves: defaults, file and overrides together, checked."""
    cfg = load_recipe(args.recipe, args.overrides, RecipeConfig)
    print(dump_yaml(cfg), end="")
    return 0
