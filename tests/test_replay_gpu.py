"""Issue 7, point 11: on two GPUs (torchrun, NCCL, ZeRO-2, bf16) a training step gives the loss
and, within bf16 rounding, the updated weights of one GPU with the same global batch. Issue 20,
point 2: in fp32 under ZeRO-2 and ZeRO-3, two ranks match one within 1e-5.

The CPU analogue (gloo, fp32, exact to 1e-5) is tests/test_replay.py. Here the two runs pack
their micro-batches differently (each rank merges only its own groups), so the bf16 forward
sums in another order; the check is on the size of the difference against the size of the update.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge.middleware.arrow import write_parquet
from forge.middleware.types import Group, Trajectory, Turn

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "data" / "tiny_recipe.yaml"
MODEL = [
    "model.hidden_size=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=2", "model.head_dim=64",
    "model.rotary_dim=64", "model.num_experts=8", "model.top_k=2", "model.expert_width=256", "model.dense_layers=1",
    "model.dense_width=1024",
]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def agent_groups(seed: int, n_groups: int, g: int) -> list[Group]:
    """Groups of g two-turn trajectories that share a ~400-token prompt, rewards 0/1."""
    rng = random.Random(seed)
    out = []
    for gi in range(n_groups):
        prompt = [256] + [rng.randrange(256) for _ in range(rng.randint(300, 500))]
        trajs = []
        for k in range(g):
            first = [rng.randrange(256) for _ in range(rng.randint(40, 160))]
            second = [rng.randrange(256) for _ in range(rng.randint(20, 120))]
            turns = [
                Turn(first, [-1.5 + 0.01 * (i % 7) for i in range(len(first))], 0,
                     observation_ids=[rng.randrange(256) for _ in range(rng.randint(5, 40))]),
                Turn(second, [-2.0] * len(second), 0),
            ]
            trajs.append(Trajectory(f"t{gi}", f"g{gi}", prompt, turns, reward=float(rng.random() < 0.5)))
        out.append(Group(f"t{gi}", f"g{gi}", trajs))
    return out


def replay(tmp_path: Path, nproc: int, micro: int = 4096, stage: int = 2,
           precision: str = "bf16") -> tuple[list[dict], dict, dict]:
    tag = f"{nproc}-{micro}-{stage}-{precision}"
    save, initial = tmp_path / f"w-{tag}.pt", tmp_path / f"w0-{tag}.pt"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         # A rendezvous on a port torchrun binds itself: a free port chosen here and bound later
         # can be taken in between by another process of the session.
         "--standalone",
         "-m", "forge.replay", str(RECIPE), "--rollouts", str(tmp_path / "rollouts"), "--save", str(save),
         "--save-initial", str(initial), f"trainer.zero_stage={stage}", f"trainer.precision={precision}",
         "trainer.groups_per_step=8", f"trainer.micro_batch_tokens={micro}", "trainer.lr=1e-3",
         "algorithm.loss=grpo", "algorithm.reduction=token_mean", *MODEL],
        cwd=ROOT, capture_output=True, text=True, timeout=800, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows, torch.load(initial), torch.load(save)


def test_two_gpus_match_one(tmp_path):
    for step in (1, 2):
        write_parquet(agent_groups(step, n_groups=8, g=4), tmp_path / "rollouts" / f"step-{step:06d}.parquet")
    one_rows, w0, one = replay(tmp_path, 1)
    two_rows, w0_two, two = replay(tmp_path, 2)
    # The noise floor: one GPU again, the same batch cut into smaller micro-batches, so only the
    # order of bf16 sums changes.
    _, _, repacked = replay(tmp_path, 1, micro=2048)
    assert all(torch.equal(w0[k], w0_two[k]) for k in w0), "the two runs must start from the same weights"
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2]
    report = {"loss_1gpu": [r["train/loss"] for r in one_rows], "loss_2gpu": [r["train/loss"] for r in two_rows]}
    update = torch.cat([(one[k].double() - w0[k].double()).flatten() for k in w0])
    differ = torch.cat([(one[k].double() - two[k].double()).flatten() for k in w0])
    report["update_norm"] = update.norm().item()
    report["diff_norm"] = differ.norm().item()
    report["relative"] = report["diff_norm"] / report["update_norm"]
    report["max_abs_diff"] = differ.abs().max().item()
    floor = torch.cat([(one[k].double() - repacked[k].double()).flatten() for k in w0])
    report["floor_relative"] = floor.norm().item() / report["update_norm"]
    report["floor_max_abs_diff"] = floor.abs().max().item()
    print("REPLAY_GPU", json.dumps(report))
    # Token-mean GRPO: a loss that is not zero on-policy; the same numbers up to bf16 rounding.
    for a, b in zip(report["loss_1gpu"], report["loss_2gpu"]):
        assert a == pytest.approx(b, rel=2e-2, abs=2e-3)
    assert abs(report["loss_1gpu"][0]) > 1e-4 and report["update_norm"] > 0
    # Adam's first steps move each weight by about lr whatever the gradient's size, so a weight
    # whose gradient is near zero can flip direction under any rounding change: the difference
    # is measured against the same one-GPU run with another packing, not against zero.
    assert report["relative"] < 2 * report["floor_relative"] + 1e-3, report


@pytest.mark.parametrize("stage", [2, 3])
def test_two_gpus_match_one_in_fp32(tmp_path, stage):
    """Issue 20, point 2: two trainer ranks under DeepSpeed ZeRO-2 or ZeRO-3 over NCCL match one
    rank on the same batches within 1e-5 in fp32: the losses (relative) and every weight after
    two Adam steps (absolute; Adam moves each weight by about lr = 1e-3 a step)."""
    for step in (1, 2):
        write_parquet(agent_groups(step, n_groups=8, g=4), tmp_path / "rollouts" / f"step-{step:06d}.parquet")
    one_rows, w0, one = replay(tmp_path, 1, stage=stage, precision="fp32")
    two_rows, w0_two, two = replay(tmp_path, 2, stage=stage, precision="fp32")
    assert all(torch.equal(w0[k], w0_two[k]) for k in w0), "the two runs must start from the same weights"
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2]
    assert all(w.dtype == torch.float32 for w in one.values())
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - w0[k]).abs().max().item() for k in one)
    print("REPLAY_GPU_FP32", json.dumps({"stage": stage, "loss_1gpu": [r["train/loss"] for r in one_rows],
                                         "loss_2gpu": [r["train/loss"] for r in two_rows], "max_abs_diff": diff,
                                         "max_abs_update": moved}))
    for a, b in zip(one_rows, two_rows):
        assert abs(a["train/loss"]) > 1e-4
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/loss_tokens"] == b["train/loss_tokens"]
    assert moved > 1e-4 and diff < 1e-5, (diff, moved)
