"""Packages import only downwards (shared/DESIGN.md), and heavy imports stay where they are used."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the forge packages it may pull in (itself included).
ALLOWED = {
    "forge.kernels": {"forge.kernels"},
    "forge.policy": {"forge.kernels", "forge.policy"},
    "forge.prefix_tree": {"forge.prefix_tree"},
    "forge.middleware": {"forge.middleware", "forge.middleware.gateway"},  # the walk loads the gateway's __init__ only
    # The OpenAI-compatible gateway serves the policy: it samples (policy.generation) and speaks
    # the turn protocol (policy.chat); the rest of the middleware stays free of both.
    "forge.middleware.gateway": {"forge.middleware", "forge.middleware.gateway", "forge.policy", "forge.kernels"},
    "forge.agent_side": {"forge.agent_side", "forge.middleware", "forge.middleware.gateway", "forge.policy", "forge.kernels"},
    "forge.trainer": {"forge.trainer", "forge.prefix_tree", "forge.policy", "forge.kernels", "forge.middleware"},
    "forge.monitoring": {"forge.monitoring"},
}
# Kernels and the model run on GPU machines that have none of these.
HEAVY = ("ray", "deepspeed", "wandb", "gymnasium")
LIGHT_PACKAGES = ("forge.kernels", "forge.policy", "forge.prefix_tree")

PROBE = r"""
import importlib, json, pkgutil, sys
name = sys.argv[1]
SKIP = sys.argv[2:]
mod = importlib.import_module(name)
for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
    if info.name.split(".")[-1].startswith("_") or any(info.name.startswith(s + ".") or info.name == s for s in SKIP):
        continue
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _forge_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "forge" or len(parts) < 2:
        return None
    # Subpackages with their own row in ALLOWED count as packages of their own.
    for depth in range(len(parts), 2, -1):
        if ".".join(parts[:depth]) in ALLOWED:
            return ".".join(parts[:depth])
    return ".".join(parts[:2])


def _loaded(package: str) -> list[str]:
    # Each package in a fresh interpreter, so one test's imports cannot hide another's.
    # A subpackage with its own row is probed on its own, not as part of its parent.
    skip = [p for p in ALLOWED if p.startswith(package + ".")]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, package, *skip], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, f"importing {package} failed:\n{out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downwards(package):
    modules = _loaded(package)
    above = sorted({p for m in modules if (p := _forge_package(m)) and p not in ALLOWED[package] and p != "forge.__init__"})
    assert not above, f"{package} imports {above}; it may import only {sorted(ALLOWED[package])}"
    if package in LIGHT_PACKAGES:
        heavy = sorted({m.split(".")[0] for m in modules if m.split(".")[0] in HEAVY})
        assert not heavy, f"{package} imports {heavy}; it must import on a GPU machine without them"


def test_only_monitoring_imports_wandb():
    offenders = []
    for path in sorted((ROOT / "forge").rglob("*.py")) + sorted((ROOT / "envs").rglob("*.py")):
        if path.name == "monitoring.py" and path.parent.name == "forge":
            continue
        if re.search(r"^\s*(import wandb|from wandb)", path.read_text(), re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"only forge/monitoring.py may import wandb; found in {offenders}"


def test_probe_catches_an_upward_import(tmp_path):
    """The check itself can fail: a module that imports the trainer shows up as above kernels."""
    pkg = tmp_path / "forge_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import forge.trainer\n")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "forge_probe_pkg"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "forge.trainer" in {_forge_package(m) for m in modules}
