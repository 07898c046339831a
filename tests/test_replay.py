"""The trainer as plain processes (torchrun, gloo, ZeRO-2 and ZeRO-3): two ranks with a global
batch give the loss and the weights of one rank with the same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge.middleware.arrow import write_parquet
from test_trainer_step import groups_of

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "data" / "tiny_recipe.yaml"

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    """A port nothing listens on now. Fixed ones can collide with a port held by another test of
    the session (in-process gloo groups draw theirs from the process id); one did in CI."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def replay(tmp_path: Path, nproc: int, stage: int = 2) -> tuple[list[dict], dict]:
    save = tmp_path / f"weights-{nproc}-{stage}.pt"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         # A rendezvous on a port torchrun binds itself: a free port chosen here and bound later
         # can be taken in between by another process of the session.
         "--standalone",
         "-m", "forge.replay", str(RECIPE), "--rollouts", str(tmp_path / "rollouts"), "--save", str(save),
         f"trainer.zero_stage={stage}", "trainer.groups_per_step=2", "trainer.lr=1e-3", "algorithm.loss=grpo",
         # Token mean over sequences of different lengths: the loss is not zero on-policy, and
         # the two ranks hold different numbers of loss tokens, so each must scale by the global count.
         "algorithm.reduction=token_mean"],
        cwd=ROOT, capture_output=True, text=True, timeout=500,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows, torch.load(save)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one(tmp_path, stage):
    for step in (1, 2):
        # Two groups of three: each rank of two gets one whole group.
        write_parquet(groups_of(step, n_groups=2, g=3), tmp_path / "rollouts" / f"step-{step:06d}.parquet")
    one_rows, one = replay(tmp_path, 1, stage)
    # Under ZeRO-3 saving the weights gathers the shards: every rank must join (it hung when only
    # rank 0 asked).
    two_rows, two = replay(tmp_path, 2, stage)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2]
    for a, b in zip(one_rows, two_rows):
        assert abs(a["train/loss"]) > 1e-4
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/loss_tokens"] == b["train/loss_tokens"]
        assert a["train/entropy"] == pytest.approx(b["train/entropy"], rel=1e-5)
    moved = max((one[k].float() - torch.load(tmp_path / f"weights-1-{stage}.pt")[k].float()).abs().max() for k in one)
    assert moved == 0
    # Adam steps are about lr in size; the two runs differ only by the all-reduce's rounding.
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert diff < 1e-5, diff


def _sft_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    from forge.policy.config import ModelConfig
    from forge.policy.model import Transformer
    from forge.trainer.config import AlgorithmConfig, TrainerConfig
    from forge.trainer.trainer import Trainer

    torch.manual_seed(0)
    init = Transformer(ModelConfig.tiny()).state_dict()
    trainer = Trainer(ModelConfig.tiny(), TrainerConfig(lr=1e-2, zero_stage=2), AlgorithmConfig(), seed=0,
                      rank=rank, world_size=world, init_weights=init)
    # Demonstrations of very different lengths: split over two ranks, each holds a different
    # number of loss tokens, so each rank must scale by the global count.
    seqs = [[256] + list(range(1, 40)), [256] + list(range(50, 60)), [256] + list(range(70, 75)),
            [256] + list(range(100, 130))]
    masks = [[0] * 4 + [1] * (len(s) - 4) for s in seqs]
    metrics = trainer.sft_step(seqs[rank::world], masks[rank::world], lr=1e-2)
    if rank == 0:
        torch.save({"metrics": metrics, "weights": trainer.weights()}, out)


def test_sft_step_on_two_ranks_matches_one(tmp_path):
    import torch.multiprocessing as mp

    results = {}
    for world, port in ((1, free_port()), (2, free_port())):
        out = tmp_path / f"sft-{world}.pt"
        mp.spawn(_sft_worker, args=(world, port, str(out)), nprocs=world, join=True)
        results[world] = torch.load(out)
    one, two = results[1], results[2]
    assert one["metrics"]["warmstart/loss"] == pytest.approx(two["metrics"]["warmstart/loss"], rel=1e-5)
    assert one["metrics"]["warmstart/tokens"] == two["metrics"]["warmstart/tokens"]
    diff = max((one["weights"][k].float() - two["weights"][k].float()).abs().max().item() for k in one["weights"])
    assert diff < 1e-5, diff
