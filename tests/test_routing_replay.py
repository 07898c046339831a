"""Routing replay (forge.policy.choices): the model records each token's MoE experts and MSA
blocks, imposes given ones, and `sequence_scores` trains merged and unmerged under them.

The tiny MoE + MSA model of test_policy_msa.py (blocks of 4, top 2) on CPU, fp64 unless said.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge.kernels.moe import route_given, route_naive
from forge.policy.choices import ChoiceRecorder, Choices, record_alone, unknown
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.prefix_tree import build_tree
from forge.trainer.logprobs import _keyed, _real_ids, replay_tree, sequence_scores
from tests.test_policy_msa import batch, model, rel


def record(m: Transformer, ids: torch.Tensor) -> Choices:
    rec = ChoiceRecorder()
    m(ids, record=rec)
    return rec.choices()


def perturbed(m: Transformer, seed: int = 1) -> Transformer:
    """The same model with noise on the router and the index branch: other choices."""
    other = Transformer(m.config).to(next(m.parameters()).dtype)
    other.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "router" in name or "iq_proj" in name or "ik_proj" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std())
    return other


def test_route_given_matches_route_naive_on_its_own_choice():
    torch.manual_seed(0)
    logits = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8) * 0.1
    tw = torch.rand(50)
    w, e, load = route_naive(logits, bias, 3, token_weight=tw)
    w2, e2, load2 = route_given(logits, e, token_weight=tw)
    assert torch.equal(e, e2) and torch.equal(w, w2) and torch.equal(load, load2)
    w2.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_record_shapes_and_layout():
    m = model()
    ids = torch.tensor([batch()[0][1]])
    c = record(m, ids)
    cfg = m.config
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    n_msa = sum(cfg.is_msa_layer(i) for i in range(cfg.num_layers))
    t = ids.shape[1]
    assert c.experts.shape == (1, t, n_moe, cfg.top_k)
    assert c.blocks.shape == (1, t, n_msa, cfg.num_kv_heads, cfg.msa.top_k)
    own = torch.arange(t) // cfg.msa.block_size
    assert torch.equal(c.blocks[0, :, :, :, -1].long(), own[:, None, None].expand(t, n_msa, cfg.num_kv_heads))
    others = c.blocks[0, :, :, :, :-1].long()
    # Other blocks lie strictly before the own block (or are empty).
    assert bool(((others == -1) | (others < own[:, None, None, None])).all())


def test_imposing_own_choices_changes_nothing():
    m = model()
    ids = torch.tensor([batch()[0][1], batch()[0][0] + [5]])
    c = record(m, ids)
    assert torch.equal(m(ids, choices=c), m(ids))


def test_imposed_choices_take_effect_and_unknown_tokens_choose_themselves():
    m = model()
    other = perturbed(m)
    ids = torch.tensor([batch()[0][1]])
    mine, theirs = record(m, ids), record(other, ids)
    assert not torch.equal(mine.experts, theirs.experts) and not torch.equal(mine.blocks, theirs.blocks)
    imposed = m(ids, choices=theirs)
    assert rel(imposed, m(ids)) > 1e-3
    # The pass under imposed choices records exactly them.
    rec = ChoiceRecorder()
    m(ids, choices=theirs, record=rec)
    got = rec.choices()
    assert torch.equal(got.experts, theirs.experts)
    dense = torch.arange(ids.shape[1]) < m.config.msa.dense_below_tokens
    assert torch.equal(got.blocks[0, ~dense], theirs.blocks[0, ~dense])
    # Unknown everywhere: the model's own choices.
    assert torch.equal(m(ids, choices=unknown(m.config, 1, ids.shape[1])), m(ids))
    # Unknown from token 9 on: earlier tokens follow the record, later ones choose for themselves.
    part = Choices(theirs.experts.clone(), theirs.blocks.clone())
    part.experts[:, 9:] = -1
    part.blocks[:, 9:] = -1
    rec = ChoiceRecorder()
    logits = m(ids, choices=part, record=rec)
    got = rec.choices()
    assert torch.equal(got.experts[:, :9], theirs.experts[:, :9])
    assert bool((got.experts[:, 9:] >= 0).all()) and bool((got.blocks[:, 9:][..., -1] >= 0).all())
    assert (logits[:, :9] - imposed[:, :9]).abs().max() < 1e-12  # rounding only: experts batch other tokens
    assert torch.equal(m(ids, choices=got), logits)


def test_merged_equals_unmerged_under_imposed_choices():
    m = model()
    other = perturbed(m)
    seqs, _ = batch()
    # Each sequence's choices recorded alone by the other model: what a sampler would report.
    choices = [record(other, torch.tensor([s])).rows(0) for s in seqs]
    merged = sequence_scores(m, seqs, choices=choices, with_index_loss=True)
    unmerged = sequence_scores(m, seqs, merge=False, choices=choices, with_index_loss=True)
    padded = sequence_scores(m, seqs, merge=False, padded=True, choices=choices)
    packed = sequence_scores(m, seqs, choices=choices, token_budget=40)
    plain = sequence_scores(m, seqs)
    for a, b, c, d, e in zip(merged.logprobs, unmerged.logprobs, padded.logprobs, packed.logprobs, plain.logprobs):
        assert (a - b).abs().max() < 1e-10 and (c - b).abs().max() < 1e-10 and (d - b).abs().max() < 1e-10
    assert max((a - e).abs().max().item() for a, e in zip(merged.logprobs, plain.logprobs)) > 1e-4
    assert abs(merged.index_loss.item() - unmerged.index_loss.item()) < 1e-10 * abs(unmerged.index_loss.item())
    # Gradients too.
    grads = []
    for merge in (True, False):
        m.zero_grad()
        out = sequence_scores(m, seqs, merge=merge, choices=choices, with_index_loss=True)
        (sum(lp.sum() for lp in out.logprobs) + out.index_loss).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert rel(grads[0][name], grads[1][name]) < 1e-9, name


def test_tokens_merge_only_where_choices_agree():
    m = model()
    seqs, _ = batch()
    s = seqs[1]
    mine = record(m, torch.tensor([s])).rows(0)
    # The same experts, or the same blocks, in another order are the same choice.
    reordered = Choices(mine.experts.flip(-1), torch.cat([mine.blocks[..., :-1].flip(-1), mine.blocks[..., -1:]], -1))
    assert reordered.token_keys() == mine.token_keys()
    changed = Choices(mine.experts.clone(), mine.blocks.clone())
    e = changed.experts[5, 0]
    changed.experts[5, 0] = torch.tensor([x for x in range(m.config.num_experts) if x not in e.tolist()][: len(e)])
    keys = [mine.token_keys(), changed.token_keys()]
    assert keys[0][:5] == keys[1][:5] and keys[0][5] != keys[1][5]
    out = sequence_scores(m, [s, s], choices=[mine, changed])
    alone = [sequence_scores(m, [s], choices=[c]).logprobs[0] for c in (mine, changed)]
    for a, b in zip(out.logprobs, alone):
        assert (a - b).abs().max() < 1e-10
    assert (alone[0] - alone[1]).abs().max() > 0


def _tree_fields(tree):
    return [tree.token_ids, tree.position, tree.subtree_end, tree.multiplicity, *tree.seq_index]


def _keyed_tree(seqs, choices):
    keyed, token_of = _keyed(seqs, choices)
    return _real_ids(build_tree(keyed), token_of)


@pytest.mark.parametrize("case", ["agree", "reordered", "differ_in_prompt", "differ_at_branch", "no_blocks"])
def test_replay_tree_is_the_keyed_tree(case):
    """replay_tree's two ways (the plain tree where records agree on shared tokens, else keyed
    on (token, choices)) give the tree keyed on every token's choices, whatever the records."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50, (9,), generator=g).tolist()
    seqs = [prompt + torch.randint(0, 50, (n,), generator=g).tolist() for n in (4, 0, 6, 6)]
    seqs.append(seqs[2][:])  # a duplicate
    seqs.append(seqs[2][:12])  # a prefix of it, and the prompt's conversation goes on:
    seqs.append(seqs[2] + [7, 8])
    tree = build_tree(seqs)
    experts = torch.randint(0, 8, (tree.num_tokens, 2, 2), generator=g, dtype=torch.int16)
    blocks = torch.randint(-1, 5, (tree.num_tokens, 1, 2, 3), generator=g, dtype=torch.int16)
    choices = [Choices(experts[ix].clone(), blocks[ix].clone()) for ix in tree.seq_index]
    if case == "reordered":  # the same sets in another order: still one key, so still merged
        choices[3] = Choices(choices[3].experts.flip(-1), choices[3].blocks)
    if case == "differ_in_prompt":  # this sequence leaves the others at token 5
        choices[4].blocks[5, 0, 1, 0] += 1
    if case == "differ_at_branch":  # the last token the duplicate shares with the others
        choices[4].experts[len(seqs[4]) - 1, 1, 0] += 1
    if case == "no_blocks":  # a record of another kind shares no token with the others
        choices[4] = Choices(choices[4].experts, None)
    got = replay_tree(seqs, choices)
    want = _keyed_tree(seqs, choices)
    assert all(torch.equal(a, b) for a, b in zip(_tree_fields(got), _tree_fields(want)))
    unique = {"agree": tree.num_tokens, "reordered": tree.num_tokens,
              "differ_in_prompt": tree.num_tokens + len(seqs[4]) - 5, "differ_at_branch": tree.num_tokens + 1,
              "no_blocks": tree.num_tokens + len(seqs[4])}
    assert got.num_tokens == unique[case]


def test_bad_choices_name_the_fix():
    m = model()
    ids = torch.tensor([batch()[0][1]])
    c = record(m, ids)
    with pytest.raises(ValueError, match="choices.blocks must be"):
        m(ids, choices=Choices(c.experts, c.blocks[:, :, :, :1]))
    with pytest.raises(ValueError, match="lie in"):
        m(ids, choices=Choices(c.experts + 100, c.blocks))
    for merge in (True, False):
        with pytest.raises(ValueError, match="one record per sequence"):
            sequence_scores(m, [ids[0].tolist()], choices=[], merge=merge)
    for merge in (True, False):
        with pytest.raises(ValueError, match="tokens but its choices"):
            sequence_scores(m, [ids[0].tolist()], choices=[c.rows((0, slice(0, 3)))], merge=merge)


# The generator records


def _own(m: Transformer, seq: list[int]) -> Choices:
    return record_alone(m, [seq])[0]


def _assert_same_choices(got: Choices, want: Choices, ran: int) -> None:
    """The first `ran` tokens' choices agree (blocks and experts as sets); the rest are unknown."""
    assert got.token_keys()[:ran] == want.token_keys()[:ran]
    assert bool((got.experts[ran:] == -1).all()) and bool((got.blocks[ran:] == -1).all())


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generator_records_what_the_trainer_would_choose(decode):
    """Prompts of 3, 11 and 7 tokens (one twice) and 14 sampled tokens, dense below position 6:
    each completion's record (prompt and sampled tokens) is the forward's own record of the same
    sequence; the static step runs msa_decode (Triton's interpreter here), in fp32."""
    dtype = torch.float64 if decode == "eager" else torch.float32
    cfg_kw = dict(dense_below_tokens=6) if decode == "eager" else dict(block_size=16, index_dim=16,
                                                                       dense_below_tokens=20)
    if decode == "eager":
        m = model(dtype, **cfg_kw).eval()
    else:
        from tests.test_policy_msa import msa_config
        torch.manual_seed(0)
        m = Transformer(dataclasses.replace(msa_config(**cfg_kw), head_dim=16, rotary_dim=16)).eval()
    g = torch.Generator().manual_seed(3)
    lengths = (3, 11, 7) if decode == "eager" else (30, 41, 25)
    a, b, c = (torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths)
    prompts = [a, b, b, c]
    params = SamplingParams(temperature=1.0, max_new_tokens=14, stop_token_ids=(7,))
    done = ModelGenerator(m, seed=0, decode=decode, record_choices=True).generate(prompts, params)
    for prompt, completion in zip(prompts, done):
        seq = prompt + completion.token_ids
        assert completion.choices.experts.shape[0] == len(seq)
        ran = len(seq) - (1 if completion.finish_reason == "length" else 0)
        _assert_same_choices(completion.choices, _own(m, seq), ran)
        # Imposed on the trainer's forward, they give the sampler's logprobs.
        scored = sequence_scores(m, [seq], choices=[completion.choices]).logprobs[0][len(prompt) - 1 :]
        torch.testing.assert_close(scored.to(torch.float32), torch.tensor(completion.logprobs), rtol=0, atol=1e-5)


def test_generator_records_through_the_prefix_cache():
    """Turn 2 prefills only its new tokens; its record of the cached prefix comes from the cache
    and equals turn 1's, and the whole record is the forward's own."""
    m = model(torch.float64, dense_below_tokens=6).eval()
    gen = ModelGenerator(m, seed=0, decode="eager", record_choices=True, prefix_cache_tokens=10_000)
    params = SamplingParams(temperature=1.0, max_new_tokens=9)
    prompt = list(range(40, 53))
    first = gen.generate([prompt], params)[0]
    turn2 = prompt + first.token_ids + [5, 6, 7]
    second = gen.generate([turn2], params)[0]
    assert gen.prefix_cache.hits > 0
    seq = turn2 + second.token_ids
    _assert_same_choices(second.choices, _own(m, seq), len(seq) - 1)
    n1 = len(prompt) + len(first.token_ids) - 1  # turn 1's tokens that ran
    assert second.choices.token_keys()[:n1] == first.choices.token_keys()[:n1]


def test_generator_without_recording_reports_no_choices():
    m = model(torch.float64).eval()
    done = ModelGenerator(m, seed=0).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert done[0].choices is None


# Transport: packed records, Arrow, the rollout, the trainer's batch


def test_pack_unpack_round_trip_and_unknown_tail():
    from forge.policy.choices import pack, unpack

    m = model()
    seq = batch()[0][1]
    c = _own(m, seq)
    e, b = pack(c)
    back = unpack(m.config, e, b, len(seq) + 3)
    assert torch.equal(back.experts[: len(seq)].long(), c.experts.long())
    assert torch.equal(back.blocks[: len(seq)].long(), c.blocks.long())
    assert bool((back.experts[len(seq):] == -1).all()) and bool((back.blocks[len(seq):] == -1).all())
    empty = unpack(m.config, b"", b"", 4)
    assert bool((empty.experts == -1).all()) and bool((empty.blocks == -1).all())
    with pytest.raises(ValueError, match="do not fit"):
        unpack(m.config, e, b, len(seq) - 1)
    with pytest.raises(ValueError, match="do not fit"):
        unpack(m.config, e[:-2], b, len(seq))


def test_records_cross_arrow_and_old_files_read_without_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from forge.middleware.arrow import TRAJECTORY_SCHEMA, from_record_batch, read_parquet, to_record_batch
    from forge.middleware.types import Group, Trajectory, Turn

    traj = Trajectory("t", "g", [1, 2, 3], [Turn([4, 5], [-0.5, -0.25], 0)], choice_experts=b"\x01\x00\x02\x00",
                      choice_blocks=b"\xff\xff")
    plain = Trajectory("t", "g", [1, 2, 3], [Turn([6], [-1.0], 0)])
    groups = [Group("t", "g", [traj, plain])]
    (back,) = from_record_batch(to_record_batch(groups))
    assert back.trajectories[0].choice_experts == traj.choice_experts
    assert back.trajectories[0].choice_blocks == traj.choice_blocks
    assert back.trajectories[1].choice_experts == b"" and back.trajectories[1].choice_blocks == b""
    table = pa.Table.from_batches([to_record_batch(groups)], schema=TRAJECTORY_SCHEMA)
    old = table.drop(["choice_experts", "choice_blocks"]).replace_schema_metadata(
        {b"forge.schema": b"trajectory", b"forge.schema_version": b"2"})
    pq.write_table(old, tmp_path / "v2.parquet")
    (read,) = read_parquet(tmp_path / "v2.parquet")
    assert [t.choice_experts for t in read.trajectories] == [b"", b""]


def test_a_turn_keeps_the_record_of_the_call_that_ran_the_whole_trajectory():
    from forge.agent_side.episode import Episode, apply_turn
    from forge.middleware.types import Trajectory
    from forge.policy.choices import pack
    from forge.policy.sampling import Completion
    from forge.policy.tokenizer import ByteTokenizer

    class Env:
        def step(self, text):
            return "ok", 0.0, False, False, {}

    m = model()
    prompt = [256, 10, 11, 12]
    ep = Episode(env=Env(), traj=Trajectory("t", "g", list(prompt)))
    ep.context = list(prompt)
    ep.traj.timings = {"generate": 0.0, "env": 0.0, "total": 0.0}
    c = _own(m, prompt + [5, 6])
    apply_turn(ep, Completion([5, 6], [-1.0, -1.0], choices=c), ByteTokenizer(), timeout_s=5)
    assert (ep.traj.choice_experts, ep.traj.choice_blocks) == pack(c)
    # A context rewritten in place (not the trajectory's tokens): its record is not the trajectory's.
    ep.context[1] = 99
    c2 = _own(m, ep.context + [7])
    apply_turn(ep, Completion([7], [-1.0], choices=c2), ByteTokenizer(), timeout_s=5)
    assert (ep.traj.choice_experts, ep.traj.choice_blocks) == pack(c)


def test_a_model_without_moe_or_msa_takes_empty_records():
    from forge.policy.config import ModelConfig

    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.tiny(), num_experts=0, dense_layers=3)
    m = Transformer(cfg).double()
    seqs, _ = batch()
    empty = [Choices(None, None)] * len(seqs)
    plain = sequence_scores(m, seqs).logprobs
    for merge in (True, False):
        for a, b in zip(sequence_scores(m, seqs, merge=merge, choices=empty).logprobs, plain):
            assert (a - b).abs().max() < 1e-10
