"""The Arrow trajectory schema: exact round trips through record batches, Parquet and Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from forge.middleware.arrow import TRAJECTORY_SCHEMA, from_record_batch, read_parquet, to_record_batch, write_parquet
from forge.middleware.types import Group, Trajectory, Turn


def sample_groups() -> list[Group]:
    def traj(gid: str, seed: int, status: str = "ok", task: str = "calc-1") -> Trajectory:
        turns = [
            Turn(sampled_ids=[seed, seed + 1, 300], logprobs=[-0.1 * seed - 1e-17, -2.5, -1 / 3], policy_version=4,
                 observation_ids=[7, 8], finish_reason="stop"),
            Turn(sampled_ids=[9, 301], logprobs=[-0.25, -3.0000000000000004], policy_version=5, finish_reason="length"),
        ]
        return Trajectory(task_id=task, group_id=gid, prompt_ids=[256, 1, 2, 3], turns=turns, reward=0.5 * seed,
                          status=status, failure_reason="" if status == "ok" else "env raised", terminated=True,
                          timings={"generate": 0.25, "env": 0.01}, error_counts={"bad_json": 1})

    return [
        Group(task_id="calc-1", group_id="g0", trajectories=[traj("g0", 1), traj("g0", 2)], attempts=2),
        Group(task_id="calc-2", group_id="g1", trajectories=[traj("g1", 3, status="failed", task="calc-2")]),
    ]


def test_record_batch_round_trip_is_exact():
    groups = sample_groups()
    batch = to_record_batch(groups)
    assert batch.schema.equals(TRAJECTORY_SCHEMA) and batch.num_rows == 3
    back = from_record_batch(batch)
    assert back == groups
    # Derived views agree too: the mask, logprobs and boundaries come from the same turns.
    t = back[0].trajectories[0]
    assert t.loss_mask == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert t.turn_boundaries == [(4, 7), (9, 11)]
    assert t.sampling_logprobs[4] == -0.1 - 1e-17


def test_parquet_round_trip(tmp_path):
    groups = sample_groups()
    path = write_parquet(groups, tmp_path / "rollouts" / "step-000001.parquet")
    assert read_parquet(path) == groups
    assert read_parquet([path, path]) == groups + groups


def test_foreign_table_is_refused():
    with pytest.raises(ValueError, match="columns .* are missing"):
        from_record_batch(pa.table({"x": [1]}))


def test_corrupt_lengths_are_refused():
    batch = to_record_batch(sample_groups())
    cols = batch.to_pydict()
    cols["prompt_len"][0] += 1
    bad = pa.RecordBatch.from_pydict(cols, schema=TRAJECTORY_SCHEMA)
    with pytest.raises(ValueError, match="turn lengths do not add up"):
        from_record_batch(bad)


def test_batches_cross_the_object_store(ray_session):
    ray = ray_session
    groups = sample_groups()

    @ray.remote
    def rewards(batch):
        return batch.column("reward").to_pylist()

    ref = ray.put(to_record_batch(groups))
    assert ray.get(rewards.remote(ref)) == [0.5, 1.0, 1.5]
    assert from_record_batch(ray.get(ref)) == groups
