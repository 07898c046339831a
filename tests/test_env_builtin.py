"""The built-in environments: Gymnasium registration and checker, seeded tasks, and an oracle per env.

Each env's `oracle` reads only what the agent sees (the prompt and the tool results) and plays
through the tools, so reward 1 shows the task is solvable through the env's interface.
"""

from __future__ import annotations

import json
import re

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.calculator import safe_eval
from envs.maze import carve


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def play(env, seed: int) -> float:
    obs, _ = env.reset(seed=seed)
    policy = env.unwrapped.oracle(obs)
    action = next(policy)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["errors"] == [], (obs, info)
        total += reward
        if terminated or truncated:
            return total
        action = policy.send(obs)


def test_every_builtin_env_is_registered_with_an_oracle():
    assert all(env_id in gymnasium.registry for env_id in envs.BUILTIN_ENVS)
    assert all(callable(getattr(gymnasium.make(i).unwrapped, "oracle", None)) for i in envs.BUILTIN_ENVS)


@pytest.mark.parametrize("env_id", sorted(envs.BUILTIN_ENVS))
def test_check_env_passes(env_id):
    check_env(gymnasium.make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id, difficulty, seeds", [
    ("forge/Calculator-v0", 0, range(6)),
    ("forge/Calculator-v0", 3, range(6)),
    ("forge/Needle-v0", 0, range(4)),
    ("forge/Needle-v0", 2, range(2)),
    ("forge/Maze-v0", 0, range(3)),
    ("forge/Maze-v0", 2, range(2)),
    ("forge/Python-v0", 0, range(4)),
    ("forge/Python-v0", 2, range(4)),
    ("forge/Reverse-v0", 0, range(3)),
])
def test_oracle_reaches_reward_one(env_id, difficulty, seeds):
    env = gymnasium.make(env_id, difficulty=difficulty)
    for seed in seeds:
        assert play(env, seed) == 1.0, f"{env_id} seed {seed}"


@pytest.mark.parametrize("env_id", sorted(envs.BUILTIN_ENVS))
def test_tasks_follow_the_seed_and_wrong_answers_score_zero(env_id):
    env = gymnasium.make(env_id)
    first = env.reset(seed=11)[0]
    assert env.reset(seed=11)[0] == first
    assert env.reset(seed=12)[0] != first
    assert env.step("<answer>surely wrong</answer>")[1] == 0.0


def test_needle_length_grows_with_difficulty():
    sizes = []
    for level in range(4):
        env = gymnasium.make("forge/Needle-v0", difficulty=level).unwrapped
        env.reset(seed=0)
        sizes.append(sum(len(line) + 1 for line in env.document))
    assert all(b > 3 * a for a, b in zip(sizes, sizes[1:]))
    assert sizes[3] > 100_000


def test_maze_moves_respect_walls_and_the_code_needs_the_exit():
    env = gymnasium.make("forge/Maze-v0").unwrapped
    env.reset(seed=0)
    walls = [d for d in ("north", "south", "east", "west") if d not in env._open(*env.start)]
    obs = env.step(call("move", direction=walls[0]))[0]
    assert "a wall blocks the way" in obs and env.pos == env.start
    # The right code from the wrong cell scores nothing.
    assert env.step(f"<answer>{env.code}</answer>")[1] == 0.0


def test_maze_is_perfect():
    import random

    rows = carve(random.Random(0), 6)
    open_cells = sum(row.count(" ") for row in rows)
    # A perfect maze on n cells has n - 1 passages: 36 cells + 35 passages.
    assert open_cells == 36 + 35


@pytest.mark.parametrize("expression, value", [
    ("(12 + 3) * 4", 60), ("7 // 2", 3), ("2 ** 10", 1024), ("-3 + 1.5", -1.5), ("10 % 4", 2),
])
def test_safe_eval_computes(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize("expression, fragment", [
    ("__import__('os').system('true')", "is not allowed"),
    ("9 ** 9 ** 9", "too large"),
    ("1 / 0", "division by zero"),
    ("(1,)", "is not allowed"),
    ("x + 1", "is not allowed"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 400, "at most"),
])
def test_safe_eval_refuses(expression, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        safe_eval(expression)


@pytest.mark.parametrize("env_id", sorted(envs.BUILTIN_ENVS))
def test_brief_prompts_keep_the_task_and_the_oracle_still_wins(env_id):
    full = gymnasium.make(env_id).unwrapped
    brief = gymnasium.make(env_id, prompt_style="brief")
    long_prompt, short_prompt = full.reset(seed=5)[0], brief.reset(seed=5)[0]
    assert len(short_prompt) < len(long_prompt) and "Tools: " in short_prompt
    assert all(name in short_prompt for name in brief.unwrapped.tools)
    assert play(brief, 5) == 1.0


def test_unknown_prompt_style_is_refused():
    with pytest.raises(ValueError, match="prompt_style 'terse' is not one of full, brief"):
        gymnasium.make("forge/Calculator-v0", prompt_style="terse")
