"""The trajectory schema in Arrow: groups of trajectories as record batches, and Parquet files.

One row per trajectory. Token ids are stored flat, exactly as sampled or appended; the turn
structure is kept as per-turn lengths, so the loss mask, the logprobs and the turn boundaries
are rebuilt from the same lengths the rollout recorded and `from_record_batch` returns equal
`Trajectory` objects. Logprobs are float64 so that whatever the sampler reported round-trips
bit for bit. Record batches travel through Ray's object store without copies (Arrow buffers
are shared memory there).

Version 2 added `segment` (the context segment of the episode, `Trajectory.segment`); files of
version 1 lack it and read back with segment 0 for every row, which is what they held. Version 3
added `choice_experts` and `choice_blocks` (routing replay's records, forge.policy.choices);
older files read back without records (every token unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from forge.middleware.types import Group, Trajectory, Turn

SCHEMA_VERSION = 3

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("group_attempts", pa.int32(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("turn_sampled_len", pa.list_(pa.int32()), nullable=False),
        pa.field("turn_observation_len", pa.list_(pa.int32()), nullable=False),
        pa.field("turn_policy_version", pa.list_(pa.int64()), nullable=False),
        pa.field("turn_finish_reason", pa.list_(pa.string()), nullable=False),
        pa.field("sampled_logprobs", pa.list_(pa.float64()), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("failure_reason", pa.string(), nullable=False),
        pa.field("terminated", pa.bool_(), nullable=False),
        pa.field("timings", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("error_counts", pa.map_(pa.string(), pa.int64()), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("choice_experts", pa.binary(), nullable=False),
        pa.field("choice_blocks", pa.binary(), nullable=False),
    ],
    metadata={"forge.schema": "trajectory", "forge.schema_version": str(SCHEMA_VERSION)},
)

ADDED_IN = {"segment": 2, "choice_experts": 3, "choice_blocks": 3}
"""Columns added after version 1, by the schema version that added them; older files lack them."""


def to_record_batch(groups: Sequence[Group]) -> pa.RecordBatch:
    """One row per trajectory of `groups`, in order."""
    rows: dict[str, list] = {name: [] for name in TRAJECTORY_SCHEMA.names}
    for group in groups:
        for traj in group.trajectories:
            rows["group_id"].append(group.group_id)
            rows["task_id"].append(traj.task_id)
            rows["group_attempts"].append(group.attempts)
            rows["token_ids"].append(traj.token_ids)
            rows["prompt_len"].append(len(traj.prompt_ids))
            rows["turn_sampled_len"].append([len(t.sampled_ids) for t in traj.turns])
            rows["turn_observation_len"].append([len(t.observation_ids) for t in traj.turns])
            rows["turn_policy_version"].append([t.policy_version for t in traj.turns])
            rows["turn_finish_reason"].append([t.finish_reason for t in traj.turns])
            rows["sampled_logprobs"].append([lp for t in traj.turns for lp in t.logprobs])
            rows["reward"].append(float(traj.reward))
            rows["status"].append(traj.status)
            rows["failure_reason"].append(traj.failure_reason)
            rows["terminated"].append(bool(traj.terminated))
            rows["timings"].append(list(traj.timings.items()))
            rows["error_counts"].append(list(traj.error_counts.items()))
            rows["segment"].append(traj.segment)
            rows["choice_experts"].append(traj.choice_experts)
            rows["choice_blocks"].append(traj.choice_blocks)
    return pa.RecordBatch.from_pydict(rows, schema=TRAJECTORY_SCHEMA)


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> list[Group]:
    """Groups back from rows, in first-appearance order of their group ids."""
    _check_schema(batch.schema)
    cols = batch.to_pydict()
    groups: dict[str, Group] = {}
    for i in range(batch.num_rows):
        gid = cols["group_id"][i]
        group = groups.get(gid)
        if group is None:
            group = groups[gid] = Group(task_id=cols["task_id"][i], group_id=gid, attempts=cols["group_attempts"][i])
        groups[gid].trajectories.append(_trajectory(cols, i))
    for group in groups.values():
        # Raises on segments out of order, which the trainer could not group into episodes.
        group.episodes
    return list(groups.values())


def write_parquet(groups: Sequence[Group], path: str | Path) -> Path:
    """Keep a batch of groups as a Parquet file (e.g. under the run folder's rollouts/)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches([to_record_batch(groups)], schema=TRAJECTORY_SCHEMA), path)
    return path


def read_parquet(paths: str | Path | Iterable[str | Path]) -> list[Group]:
    """Groups from one Parquet file or several, in file order. A file that cannot be read back
    (missing, truncated, corrupt, another schema) is a ValueError whose one line names it."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    groups: list[Group] = []
    for path in paths:
        try:
            table = pq.read_table(path)
            _check_schema(table.schema)
            nulls = [name for name in TRAJECTORY_SCHEMA.names if name in table.schema.names and table.column(name).null_count]
            if nulls:
                raise ValueError(f"columns {nulls} hold nulls")
            groups.extend(from_record_batch(table))
        # pyarrow reports a damaged file as any ArrowException (ArrowInvalid, OSError, ...), and a
        # foreign one's values surface as ValueError or TypeError while the rows are rebuilt.
        except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"{path} is not a readable Forge rollout file ({detail})") from exc
    return groups


def _trajectory(cols: dict[str, list], i: int) -> Trajectory:
    ids = cols["token_ids"][i]
    prompt_len = cols["prompt_len"][i]
    logprobs = cols["sampled_logprobs"][i]
    n_sampled = sum(cols["turn_sampled_len"][i])
    if prompt_len + n_sampled + sum(cols["turn_observation_len"][i]) != len(ids) or n_sampled != len(logprobs):
        raise ValueError(f"row {i} of group {cols['group_id'][i]}: turn lengths do not add up to its tokens; "
                         "the batch was not written by forge.middleware.arrow")
    segment = cols["segment"][i] if "segment" in cols else 0
    if segment < 0:
        raise ValueError(f"row {i} of group {cols['group_id'][i]}: segment {segment} is negative; "
                         "the batch was not written by forge.middleware.arrow")
    turns, pos, lp_pos = [], prompt_len, 0
    for n_s, n_o, version, reason in zip(cols["turn_sampled_len"][i], cols["turn_observation_len"][i],
                                         cols["turn_policy_version"][i], cols["turn_finish_reason"][i]):
        turns.append(Turn(sampled_ids=ids[pos:pos + n_s], logprobs=logprobs[lp_pos:lp_pos + n_s],
                          policy_version=version, observation_ids=ids[pos + n_s:pos + n_s + n_o],
                          finish_reason=reason))
        pos += n_s + n_o
        lp_pos += n_s
    return Trajectory(
        task_id=cols["task_id"][i], group_id=cols["group_id"][i], prompt_ids=ids[:prompt_len], turns=turns,
        reward=cols["reward"][i], status=cols["status"][i], failure_reason=cols["failure_reason"][i],
        terminated=cols["terminated"][i], timings=dict(cols["timings"][i]), error_counts=dict(cols["error_counts"][i]),
        segment=segment, choice_experts=cols["choice_experts"][i] if "choice_experts" in cols else b"",
        choice_blocks=cols["choice_blocks"][i] if "choice_blocks" in cols else b"",
    )


def _check_schema(schema: pa.Schema) -> None:
    version = (schema.metadata or {}).get(b"forge.schema_version")
    if version is not None and not version.isdigit():
        raise ValueError(f"not a Forge trajectory batch: its forge.schema_version is {version!r}, not a number")
    if version is not None and int(version) > SCHEMA_VERSION:
        raise ValueError(f"trajectory schema version {int(version)} is newer than this Forge reads "
                         f"({SCHEMA_VERSION}); upgrade forge")
    # A file that says which version wrote it may lack the columns added since; one that does not
    # say must have them all.
    written = SCHEMA_VERSION if version is None else max(1, int(version))
    missing = [name for name in TRAJECTORY_SCHEMA.names
               if name not in schema.names and ADDED_IN.get(name, 1) <= written]
    if missing:
        raise ValueError(f"not a Forge trajectory batch: columns {missing} are missing")
    present = [f for f in TRAJECTORY_SCHEMA if f.name in schema.names]
    twice = [f.name for f in present if len(schema.get_all_field_indices(f.name)) > 1]
    if twice:
        raise ValueError(f"not a Forge trajectory batch: columns {twice} appear more than once")
    wrong = [f"{f.name} is {schema.field(f.name).type}, not {f.type}" for f in present
             if not schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise ValueError(f"not a Forge trajectory batch: column {'; column '.join(wrong)}")
