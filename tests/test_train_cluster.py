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
        out = tmp_path / "runs"
        env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-m", "forge.cli", "train", str(RECIPE), f"run.output_dir={out}", "train.steps=2",
             "warm_start.steps=1", "trainer.resources_per_rank={trainer_node: 1}",
             "rollout.actor_resources={rollout_node: 1}", "--ray-address", cluster.address],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run,) = list(out.iterdir())
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
