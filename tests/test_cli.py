"""The `forge` command: help, version, and user errors as one line with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import forge

ROOT = Path(__file__).resolve().parents[1]


def forge_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_subcommands():
    out = forge_cli("--help")
    assert out.returncode == 0
    assert "usage: forge" in out.stdout and "config" in out.stdout


def test_version():
    out = forge_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"forge {forge.__version__}"


def test_config_prints_the_resolved_recipe():
    out = forge_cli("config", "recipes/quickstart.yaml", "run.seed=7")
    assert out.returncode == 0, out.stderr
    assert "seed: 7" in out.stdout and "mode: offline" in out.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("run:\n  sed: 1\n")
    cases = [
        (("config", str(tmp_path / "r.yaml")), "unknown key 'run.sed'; did you mean 'run.seed'?"),
        (("config", "recipes/quickstart.yaml", "run.seed=abc"), "run.seed: expected an integer, got 'abc'"),
        (("config", "recipes/quickstrat.yaml"), "did you mean 'recipes/quickstart.yaml'?"),
    ]
    for args, expected in cases:
        out = forge_cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("forge: error: ") and expected in lines[0], out.stderr


def test_overrides_may_follow_options():
    from forge.cli import main

    assert main(["config", "recipes/quickstart.yaml", "run.seed=4"]) == 0
    out = forge_cli("train", "recipes/quickstart.yaml", "--resume", "nowhere", "run.seed=4")
    assert out.returncode == 2 and "'nowhere' is not a run folder" in out.stderr
    out = forge_cli("config", "recipes/quickstart.yaml", "--bogus")
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


def test_unknown_subcommand_is_refused():
    out = forge_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
