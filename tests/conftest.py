"""Shared test set-up: Triton's interpreter on the CPU, GPU-only tests skipped, one Ray session."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Triton reads this when it is first imported: set it before any test module imports it.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (ray.init costs ~3 s and ~1 GiB)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray
    ray.shutdown()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
