"""`forge train --ray-address` on a Ray cluster of two nodes on this machine: the trainer rank
lands on one node and the rollout worker on the other (custom resources pin them), and the
run finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "data" / "tiny_recipe.yaml"

pytestmark = pytest.mark.timeout(900)


def _train(tmp_path: Path, address: str, *overrides: str) -> Path:
    """`forge train` of the tiny recipe on the cluster at `address`; its run folder."""
    out = tmp_path / "runs"
    env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli", "train", str(RECIPE), f"run.output_dir={out}", *overrides,
         "--ray-address", address],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list(out.iterdir())
    return run


def test_roles_spread_over_two_nodes(tmp_path):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    # The head node has no CPU to spare, so nothing but the pinned roles runs off its own node.
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"trainer_node": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
        cluster.wait_for_nodes()
        run = _train(tmp_path, cluster.address, "train.steps=2", "warm_start.steps=1",
                     "trainer.resources_per_rank={trainer_node: 1}", "rollout.actor_resources={rollout_node: 1}")
        placement = json.loads((run / "placement.json").read_text())
        nodes = {n.node_id for n in cluster.list_all_nodes()}
        assert set(placement["trainer"]) | set(placement["rollout"]) <= nodes
        assert set(placement["trainer"]).isdisjoint(placement["rollout"]), placement
        # No GPUs in this cluster: every role records an empty list of GPU ids.
        assert placement["gpus"] == {"trainer-0": [], "rollout-0": []}, placement
        rl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/rl_step" in line]
        assert [int(r["train/rl_step"]) for r in rl] == [1, 2]
    finally:
        cluster.shutdown()


def test_trainer_and_rollouts_on_separate_gpus_of_one_node(tmp_path):
    """Issue 20, point 1's placement on one node with two GPUs (Ray's GPU resources, declared:
    this CPU machine has none, so every role computes on the CPU): a whole GPU for the trainer
    rank leaves the rollout workers' and the evaluator's fractional shares to the other card,
    and placement.json names the cards."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    try:
        cluster.wait_for_nodes()
        run = _train(tmp_path, cluster.address, "train.steps=1", "warm_start.steps=0", "trainer.gpus_per_rank=1",
                     "rollout.num_workers=2", "rollout.actor_num_gpus=0.3")
        gpus = json.loads((run / "placement.json").read_text())["gpus"]
        assert len(gpus["trainer-0"]) == 1, gpus
        rollout_cards = set(gpus["rollout-0"]) | set(gpus["rollout-1"])
        assert len(rollout_cards) == 1 and rollout_cards.isdisjoint(gpus["trainer-0"]), gpus
    finally:
        cluster.shutdown()
