"""`forge env list` / `forge env check`, Forge's env checker, and Gymnasium registration."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import pytest

from envs import BUILTIN_ENVS
from envs.reverse import ReverseEnv
from forge.agent_side import tool
from forge.agent_side.checker import check_tool_env
from forge.agent_side.commands import env_check, env_check_arguments, env_check_command, env_list
from forge.agent_side.registry import registered_envs


class UnseededEnv(ReverseEnv):
    def make_task(self, rng):
        # The global generator, not the seeded rng: two resets with one seed differ.
        word = "".join(random.choice("abcdef") for _ in range(8)) + str(time.perf_counter_ns())
        return f"Reverse the word {word}.", word[::-1]


class ConstantEnv(ReverseEnv):
    def make_task(self, rng):
        return "Reverse the word abcde.", "edcba"


class NeedsArgsEnv(ReverseEnv):
    def __init__(self, path: str, difficulty: int = 0) -> None:
        super().__init__(difficulty)


class BadScoreEnv(ReverseEnv):
    def score(self, answer, expected):
        return None


class FragileStepEnv(ReverseEnv):
    def step(self, action):
        if "{" in action:
            raise ValueError("cannot handle braces")
        return super().step(action)


class NoToolsEnv(ReverseEnv):
    reverse = None


@pytest.mark.parametrize("cls, check, fix", [
    (UnseededEnv, "reset is deterministic under a seed", "from its rng argument"),
    (ConstantEnv, "reset is deterministic under a seed", "draw the task from its rng"),
    (NeedsArgsEnv, "builds with defaults", "give every __init__ argument a default"),
    (BadScoreEnv, "score returns a finite number", "return a finite float"),
    (FragileStepEnv, "random and malformed turns do not crash step", "keep ToolEnv's handling"),
    (NoToolsEnv, "has tools with schemas", "decorate each tool method with @tool"),
], ids=["unseeded", "constant", "needs-args", "bad-score", "fragile-step", "no-tools"])
def test_checker_finds_each_fault_and_names_the_fix(cls, check, fix):
    failed = {r.name: r for r in check_tool_env(cls) if not r.ok}
    assert check in failed, [r.name for r in check_tool_env(cls)]
    assert fix in failed[check].fix and failed[check].problem


def test_checker_passes_the_builtins():
    for env_id, entry in registered_envs().items():
        cls = gymnasium.spec(env_id).entry_point
        assert entry == cls
        assert env_check(env_id) == 0


def test_env_check_output(capsys):
    assert env_check("tests.test_agent_commands:UnseededEnv") == 1
    out = capsys.readouterr().out
    assert "FAIL  reset is deterministic under a seed: two resets with seed=0 gave different tasks" in out
    assert "      fix: draw all randomness in make_task from its rng argument" in out
    assert "ok    gymnasium check_env" in out
    assert env_check("envs.reverse:ReverseEnvv") == 1
    assert "did you mean 'envs.reverse:ReverseEnv'" in capsys.readouterr().out
    assert env_check("forge/NoSuch-v0") == 1
    assert "forge env list" in capsys.readouterr().out


def test_env_list_shows_the_builtins(capsys):
    assert env_list() == 0
    out = capsys.readouterr().out
    for env_id in ("forge/Calculator-v0", "forge/Needle-v0", "forge/Maze-v0", "forge/Python-v0", "forge/Reverse-v0"):
        assert env_id in out
    assert "run_python" in out and "search" in out


def test_the_registry_imports_envs_lazily_and_make_works_after():
    # A fresh interpreter, so that nothing else has imported `envs` already.
    code = (
        "import sys, gymnasium\n"
        "import forge.agent_side.registry as r\n"
        "assert 'envs' not in sys.modules and 'forge/Calculator-v0' not in gymnasium.registry\n"
        "n = len(r.registered_envs())\n"
        "assert 'envs' in sys.modules\n"
        "env = gymnasium.make('forge/Calculator-v0', difficulty=2)\n"
        "print(type(env.unwrapped).__name__, env.unwrapped.difficulty, n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"CalculatorEnv 2 {len(BUILTIN_ENVS)}", out.stderr


def test_tool_decorator_options():
    class Options(ReverseEnv):
        @tool(name="shout", timeout_s=1.5)
        def loud(self, text: str) -> str:
            """Upper-case a string."""
            return text.upper()

    env = Options()
    assert env.tools["shout"].timeout_s == 1.5
    env.reset(seed=0)
    obs = env.step('<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>')[0]
    assert obs == '<tool_result name="shout">HI</tool_result>\n'


def test_the_example_in_docs_envs_md_passes_every_check(tmp_path, monkeypatch):
    docs = (Path(__file__).parent.parent / "docs" / "envs.md").read_text()
    code = docs.split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 40
    (tmp_path / "docs_example_env.py").write_text(code)
    # Registered the way the page says, under an id only this test uses.
    (tmp_path / "docs_example_pkg.py").write_text(
        "import gymnasium\n"
        "gymnasium.register(id='forge/DocsUnits-v0', entry_point='docs_example_env:UnitsEnv')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert env_check("docs_example_env:UnitsEnv") == 0
        assert env_check("docs_example_pkg:forge/DocsUnits-v0") == 0
        assert env_check("no_such_pkg:forge/DocsUnits-v0") == 1
    finally:
        gymnasium.registry.pop("forge/DocsUnits-v0", None)
        for name in ("docs_example_env", "docs_example_pkg"):
            sys.modules.pop(name, None)


def test_argparse_adapters_leave_the_cli_its_target_attribute(capsys):
    # forge/cli.py stores each subcommand's function as `target` on the parsed arguments.
    parser = argparse.ArgumentParser()
    env_check_arguments(parser)
    parser.set_defaults(target="forge.agent_side.commands:env_check_command")
    args = parser.parse_args(["envs.reverse:ReverseEnv"])
    assert args.target == "forge.agent_side.commands:env_check_command"
    assert env_check_command(args) == 0
    assert "6 of 6 checks passed" in capsys.readouterr().out
