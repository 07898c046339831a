"""Context segments (issue 19): an episode that compacted its context is several sequences with
the episode's reward. They round-trip through Arrow, group into episodes, get the episode's
advantage, count once in the loss under segment weighting 'episode' (one in the loss as if its
segments' loss tokens were one sequence), merge in the prefix tree; and a step without them is
the plain step, bit for bit."""

from __future__ import annotations

import os
import random

import pyarrow.parquet as pq
import pytest
import torch

from forge.middleware.arrow import read_parquet, to_record_batch, write_parquet
from forge.middleware.gateway.sessions import CallRecord, Session, session_trajectories
from forge.middleware.types import Group, Trajectory, Turn
from forge.prefix_tree import build_tree
from forge.trainer.advantages import grpo_advantages
from forge.trainer.batch import make_batch, micro_batches
from forge.trainer.losses import episode_weights, reduce_token_losses

os.environ.setdefault("MASTER_PORT", str(29400 + (os.getpid() + 500) % 1000))

PREFIX = [256, 10, 11, 12, 13, 14, 15, 16]
"""The system and task prompt every segment of every episode starts with."""


def traj(rng: random.Random, gid: str, reward: float, segment: int = 0, lead: int = 0) -> Trajectory:
    """A two-turn trajectory; `lead` opens what follows the shared prefix, so that sequences
    with different leads share exactly PREFIX."""
    own = [lead] + [rng.randrange(1, 256) for _ in range(rng.randint(1, 4))]
    first = [rng.randrange(256) for _ in range(rng.randint(2, 6))]
    second = [rng.randrange(256) for _ in range(rng.randint(1, 4))]
    turns = [Turn(first, [-1.0 - 0.1 * i for i in range(len(first))], 0, observation_ids=[rng.randrange(256)]),
             Turn(second, [-2.0] * len(second), 0)]
    return Trajectory(f"t-{gid}", gid, PREFIX + own, turns, reward=reward, segment=segment)


def segmented_groups(seed: int = 0) -> list[Group]:
    """Two groups of 2 episodes: in each, episode 0 has 3 segments (reward 1), episode 1 one (reward 0)."""
    rng = random.Random(seed)
    out = []
    for gi in range(2):
        gid = f"g{gi}"
        trajs = [traj(rng, gid, 1.0, s, lead=200 + 10 * gi + s) for s in range(3)] + [traj(rng, gid, 0.0, lead=205 + 10 * gi)]
        out.append(Group(f"t-{gid}", gid, trajs))
    return out


def plain_groups(seed: int = 1, g: int = 3) -> list[Group]:
    rng = random.Random(seed)
    return [Group(f"t-g{gi}", f"g{gi}", [traj(rng, f"g{gi}", float(k == 0) + 0.25 * k, lead=k) for k in range(g)])
            for gi in range(2)]


def test_arrow_round_trip_keeps_segments_and_reads_version_1_files(tmp_path):
    groups = segmented_groups()
    path = write_parquet(groups, tmp_path / "v2.parquet")
    back = read_parquet(path)
    assert back == groups and [t.segment for t in back[0].trajectories] == [0, 1, 2, 0]

    # A file Forge wrote before segments existed: no `segment` column, schema version 1.
    table = pq.read_table(path)
    old = table.drop_columns(["segment"])
    old = old.replace_schema_metadata({b"forge.schema": b"trajectory", b"forge.schema_version": b"1"})
    pq.write_table(old, tmp_path / "v1.parquet")
    read = read_parquet(tmp_path / "v1.parquet")
    assert [t.segment for g in read for t in g.trajectories] == [0] * 8
    assert [len(g.episodes) for g in read] == [4, 4]
    assert [t.token_ids for g in read for t in g.trajectories] == [t.token_ids for g in groups for t in g.trajectories]

    # A version 2 file must have it; segments out of order do not read back.
    pq.write_table(old.replace_schema_metadata({b"forge.schema_version": b"2"}), tmp_path / "v2-short.parquet")
    with pytest.raises(ValueError, match=r"v2-short.parquet .*\['segment'\] are missing"):
        read_parquet(tmp_path / "v2-short.parquet")
    bad = segmented_groups()
    bad[1].trajectories[1].segment = 2
    with pytest.raises(ValueError, match="segment 2 of an episode does not follow its segment 1"):
        read_parquet(write_parquet(bad, tmp_path / "bad.parquet"))
    assert to_record_batch(groups).column("segment").to_pylist() == [0, 1, 2, 0] * 2


def test_group_episodes_follow_the_segments_and_refuse_a_gap():
    (group, _) = segmented_groups()
    assert [[t.segment for t in e] for e in group.episodes] == [[0, 1, 2], [0]]
    assert group.episode_rewards == [1.0, 0.0] and group.rewards == [1.0, 1.0, 1.0, 0.0]
    group.trajectories[2].segment = 3
    with pytest.raises(ValueError, match="segment 3 of an episode does not follow its segment 2"):
        group.episodes
    group.trajectories[0].segment = 1
    with pytest.raises(ValueError, match="segment 1 of an episode does not follow its segment 0"):
        group.episodes


def test_advantages_are_the_episodes_or_the_segments():
    groups = segmented_groups()
    by_episode = make_batch(groups, "grpo", "episode")
    by_segment = make_batch(groups, "grpo", "segment")
    a = grpo_advantages([1.0, 0.0])
    assert by_episode.episode_index == [0, 0, 0, 1, 2, 2, 2, 3] and by_episode.num_episodes == 4
    assert torch.equal(by_episode.advantages, a[[0, 0, 0, 1, 0, 0, 0, 1]])
    assert by_episode.advantages[0] == pytest.approx(1.0, abs=1e-5)
    # Over the segments, the 3-segment episode is 3 of 4 samples: it centres the group on 0.75.
    s = grpo_advantages([1.0, 1.0, 1.0, 0.0])
    assert torch.equal(by_segment.advantages, torch.cat([s, s]))
    assert by_segment.advantages[0] == pytest.approx(0.25 / 0.1875**0.5, rel=1e-5)
    assert torch.equal(by_episode.episode_rewards, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))

    # Without segments, the two weightings give the same batch, bit for bit.
    plain = plain_groups()
    one, other = make_batch(plain, "dr_grpo", "episode"), make_batch(plain, "dr_grpo", "segment")
    assert torch.equal(one.advantages, other.advantages) and one.episode_index == list(range(6))

    groups[0].trajectories[1].reward = 0.5
    with pytest.raises(ValueError, match=r"segments carry rewards \[1.0, 0.5, 1.0\]"):
        make_batch(groups, "grpo")
    with pytest.raises(ValueError, match="'episodes' is not one of episode, segment"):
        make_batch(plain, "grpo", "episodes")


def hand_losses(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per-token losses and masks of 6 sequences: episodes [0, 0, 0], [1], [2, 2] (lengths differ)."""
    gen = torch.Generator().manual_seed(seed)
    episode = [0, 0, 0, 1, 2, 2]
    lengths = [5, 9, 3, 7, 4, 11]
    losses = [torch.randn(n, generator=gen, dtype=torch.float64) for n in lengths]
    masks = [(torch.rand(n, generator=gen) < 0.7).double() for n in lengths]
    masks[1][0] = 1.0
    return losses, masks, episode


@pytest.mark.parametrize("reduction", ["seq_mean", "dr_grpo"])
@pytest.mark.parametrize("ranks", [[[[0, 1, 2, 3, 4, 5]]], [[[0, 1], [2, 3, 4], [5]]], [[[0, 1], [2]], [[3, 4, 5]]]],
                         ids=["one", "micro-batches", "two-ranks"])
def test_episode_weighted_loss_is_each_episode_as_one_sequence(reduction, ranks):
    losses, masks, episode = hand_losses()
    # The trainer's way: each rank weighs its own sequences by the step's global counts, reduces
    # each micro-batch, scales it by its share of the sequences times the world size, and
    # DeepSpeed averages the ranks' gradients.
    world, total = len(ranks), 0.0
    for micro in ranks:
        mine = [j for mb in micro for j in mb]
        w = dict(zip(mine, episode_weights([masks[j] for j in mine], [episode[j] for j in mine], reduction,
                                           sequences=6, episodes=3).tolist()))
        total += sum(reduce_token_losses([losses[j] for j in mb], [masks[j] for j in mb], reduction, dr_grpo_constant=8,
                                         weights=[torch.full_like(masks[j], w[j]) for j in mb]) * len(mb) / 6 * world
                     for mb in micro)
    total = total / world
    # Each episode's segments as one sequence of their tokens.
    joined = [torch.cat([losses[j] for j in range(6) if episode[j] == e]) for e in range(3)]
    joined_masks = [torch.cat([masks[j] for j in range(6) if episode[j] == e]) for e in range(3)]
    expected = reduce_token_losses(joined, joined_masks, reduction, dr_grpo_constant=8)
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    # Segment weighting: the plain mean over sequences, which differs here.
    per_seq = [(t * m).sum() / (m.sum() if reduction == "seq_mean" else 8) for t, m in zip(losses, masks)]
    plain = reduce_token_losses(losses, masks, reduction, dr_grpo_constant=8)
    assert float(plain) == pytest.approx(float(sum(per_seq) / 6), rel=1e-12)
    assert abs(float(plain) - float(expected)) > 1e-3
    assert episode_weights(masks, episode, "token_mean", sequences=6, episodes=3) is None


def test_segments_of_a_group_merge_in_the_prefix_tree():
    groups = segmented_groups()
    batch = make_batch(groups, "grpo")
    (pack,) = micro_batches(batch, token_budget=10_000)
    seqs = [batch.sequences[j] for j in pack]
    # Every segment and every member starts with the system and task prompt: it is stored once.
    assert build_tree(seqs).num_tokens == len(PREFIX) + sum(len(s) - len(PREFIX) for s in seqs)
    episode = seqs[:3]
    assert build_tree(episode).num_tokens == sum(len(s) for s in episode) - 2 * len(PREFIX)


def test_a_broken_gateway_session_is_one_episode_of_segments():
    def call(prompt: list[int], completion: list[int]) -> CallRecord:
        return CallRecord(prompt, completion, [-0.5] * len(completion), 3, "stop")

    session = Session("s", reward=0.5)
    session.calls.append(call(PREFIX + [1, 2], [3, 4]))
    session.calls.append(call(PREFIX + [1, 2, 3, 4, 5], [6]))
    # The agent rewrote its history (compacted): the prefix breaks and a second segment starts.
    session.calls.append(call(PREFIX + [9], [7, 8]))
    session.calls.append(call(PREFIX + [9, 7, 8, 5, 40], [41]))
    trajs = session_trajectories(session, task_id="t", group_id="g")
    assert [t.segment for t in trajs] == [0, 1] and [t.reward for t in trajs] == [0.5, 0.5]
    other = session_trajectories(Session("s2", calls=[call(PREFIX + [1], [2])], reward=0.0), task_id="t", group_id="g")
    group = Group("t", "g", trajs + other)
    assert [len(e) for e in group.episodes] == [2, 1] and group.episode_rewards == [0.5, 0.0]


def make_trainer(segment_weighting: str, reduction: str = "default", **overrides):
    from forge.policy.config import ModelConfig
    from forge.policy.model import Transformer
    from forge.trainer.config import AlgorithmConfig, TrainerConfig
    from forge.trainer.trainer import Trainer

    pytest.importorskip("deepspeed")
    algo = AlgorithmConfig(loss="grpo", reduction=reduction, segment_weighting=segment_weighting,
                           is_correction=overrides.pop("is_correction", "none"))
    torch.manual_seed(0)
    init = Transformer(ModelConfig.tiny()).state_dict()
    return Trainer(ModelConfig.tiny(), TrainerConfig(lr=1e-2, **overrides), algo, seed=0, init_weights=init), init


def summed_grads(trainer) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    for name, p in trainer.model.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, grads.get(name, 0) + g.detach().clone()))
    return grads


def test_without_segments_the_step_is_the_plain_one_bit_for_bit(monkeypatch):
    import forge.trainer.trainer as trainer_module

    runs = {}
    for weighting in ("episode", "segment"):
        trainer, _ = make_trainer(weighting, "seq_mean", micro_batch_tokens=60, is_correction="tis")
        if weighting == "episode":
            # No episode has segments: the episode weights must not even be computed.
            monkeypatch.setattr(trainer_module, "episode_weights", lambda *a, **k: pytest.fail("episode weights used"))
        metrics = [trainer.train_step(plain_groups(s)) for s in (1, 2)]
        runs[weighting] = (trainer.weights(), metrics)
    (w_ep, m_ep), (w_seg, m_seg) = runs["episode"], runs["segment"]
    assert all(torch.equal(w_ep[k], w_seg[k]) for k in w_ep)
    for a, b in zip(m_ep, m_seg):
        assert a["train/micro_batches"] > 1 and a["train/episodes"] == 6 and a["train/segments_per_episode"] == 1
        assert [a[k] for k in ("train/loss", "train/reward_mean", "train/grad_norm")] == \
               [b[k] for k in ("train/loss", "train/reward_mean", "train/grad_norm")]


def direct_grads(init: dict, groups: list[Group], weighting: str, reduction: str) -> dict[str, torch.Tensor]:
    """The gradient of the first update (ratio 1) written out: each sequence alone, -A * logprob
    per loss token, reduced over episodes (weighting 'episode') or over sequences."""
    from forge.policy.config import ModelConfig
    from forge.policy.model import Transformer
    from forge.trainer.logprobs import sequence_logprobs

    model = Transformer(ModelConfig.tiny())
    model.load_state_dict(init)
    batch = make_batch(groups, "grpo", weighting)
    lps = sequence_logprobs(model, batch.sequences, merge=False)
    samples = batch.episode_index if weighting == "episode" else list(range(len(lps)))
    sums = [torch.zeros((), dtype=lps[0].dtype) for _ in range(max(samples) + 1)]
    tokens = [0.0] * len(sums)
    for lp, m, a, e in zip(lps, batch.masks, batch.advantages, samples):
        sums[e] = sums[e] + (-float(a) * lp * m.to(lp.dtype)).sum()
        tokens[e] += float(m.sum())
    if reduction == "seq_mean":
        loss = sum(s / t for s, t in zip(sums, tokens)) / len(sums)
    elif reduction == "dr_grpo":
        loss = sum(sums) / 1024 / len(sums)
    else:
        loss = sum(sums) / sum(tokens)
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weighting,reduction", [("episode", "seq_mean"), ("episode", "dr_grpo"),
                                                 ("episode", "token_mean"), ("segment", "seq_mean")])
def test_a_segmented_step_counts_each_episode_once(weighting, reduction):
    groups = segmented_groups()
    # Micro-batches split the groups, so an episode's segments fall into different ones.
    trainer, init = make_trainer(weighting, reduction, micro_batch_tokens=40)
    grads = summed_grads(trainer)
    metrics = trainer.train_step(groups)
    assert metrics["train/micro_batches"] > 2 and metrics["train/token_ratio"] > 1.0
    assert metrics["train/sequences"] == 8 and metrics["train/episodes"] == 4
    assert metrics["train/segments_per_episode"] == 2.0
    assert metrics["train/reward_mean"] == (0.5 if weighting == "episode" else 0.75)
    expected = direct_grads(init, groups, weighting, reduction)
    other = direct_grads(init, groups, "segment" if weighting == "episode" else "episode", reduction)
    scale = max(v.abs().max().item() for v in expected.values())
    assert set(grads) == set(expected) and scale > 1e-4
    assert all((grads[k] - expected[k]).abs().max().item() <= 1e-5 * scale for k in expected)
    # The other weighting's step is measurably another one.
    assert max((other[k] - expected[k]).abs().max().item() for k in expected) > 1e-2 * scale
