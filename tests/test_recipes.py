"""Every shipped recipe loads strictly (keys, types, the env class) and names an env that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_one_recipe_per_shipped_environment():
    import envs

    classes = {load_recipe(p).env.cls for p in RECIPES}
    shipped = set(envs.BUILTIN_ENVS.values())
    assert shipped <= classes, f"no recipe for {sorted(shipped - classes)}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_its_env_resets(path):
    cfg = load_recipe(path)
    env = cfg.env.make()
    obs, _ = env.reset(seed=0)
    assert obs and cfg.rollout.max_context_tokens > 0
