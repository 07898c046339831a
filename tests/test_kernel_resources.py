"""benchmarks/kernel_resources.py: the trainer's Triton kernels compiled for sm_90 without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "kernel_resources.py"


def _run(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1", **({"TRITON_INTERPRET": "1"} if interpret else {}))
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=600)


def test_reports_the_registers_of_a_kernel_compiled_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "resources.json"
    done = _run("--presets", "msa_100m", "--kernels", "msa_tree_fwd_kernel", "--tokens", "512", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["preset"] == "msa_100m" and row["kernel"] == "msa_tree_fwd_kernel"
    # An H100 thread has at most 255 registers; the kernel's tiles take some shared memory.
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0 and row["shared_bytes"] > 0
    assert row["num_warps"] == 8
    assert "msa_tree_fwd_kernel" in done.stdout


def test_bad_arguments_name_the_fix():
    done = _run("--presets", "small")
    assert done.returncode != 0 and "not a ModelConfig preset with MSA" in done.stderr
    done = _run("--presets", "msa_100m", "--kernels", "no_such_kernel", "--tokens", "256")
    assert done.returncode != 0 and "not launched: ['no_such_kernel']" in done.stderr
    done = _run(interpret=True)
    assert done.returncode != 0 and "unset TRITON_INTERPRET" in done.stderr
