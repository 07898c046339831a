"""The trie, its flattening and packing, checked against brute-force definitions."""

from __future__ import annotations

import random

import pytest
import torch

from forge.kernels.tree_attention import tree_mask
from forge.prefix_tree import build_tree, pack_groups


def random_group(rng: random.Random, n: int, vocab: int = 5) -> list[list[int]]:
    """Sequences that share prefixes at several depths, end at branch points and repeat."""
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
    seqs = [prompt + [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))] for _ in range(n)]
    seqs.append(list(seqs[0]))  # a duplicate
    seqs.append(prompt[:])  # ends where the group branches
    return seqs


def check_tree(seqs: list[list[int]], tree, *, one_trie: bool = True) -> None:
    n = tree.num_tokens
    # Trees of different groups in one pack may share prefixes; each is still exact.
    assert not one_trie or n == len({tuple(s[: j + 1]) for s in seqs for j in range(len(s))}), "tokens are not unique prefixes"
    mask = tree_mask(tree.subtree_end[None])[0]  # [N, N]
    mult = torch.zeros(n, dtype=torch.long)
    for s, ix in zip(seqs, tree.seq_index):
        assert tree.token_ids[ix].tolist() == s
        assert tree.position[ix].tolist() == list(range(len(s)))
        for j in range(len(s)):
            visible = mask[ix[j]].nonzero().flatten().tolist()
            assert visible == sorted(ix[: j + 1].tolist()), f"query {j} sees the wrong keys"
        mult[ix] += 1
    assert torch.equal(mult, tree.multiplicity)


@pytest.mark.parametrize("seed", range(6))
def test_tree_matches_brute_force(seed):
    rng = random.Random(seed)
    seqs = random_group(rng, 6) + random_group(rng, 3)
    rng.shuffle(seqs)
    check_tree(seqs, build_tree(seqs))


def test_conversation_chain_matches_brute_force():
    """An agent's calls: each sequence is the conversation so far, so every one is a prefix of
    the next and the trie is one chain; each sequence's index is one range of it."""
    rng = random.Random(0)
    conv, seqs = [rng.randrange(5) for _ in range(7)], []
    for _ in range(6):
        conv = conv + [rng.randrange(5) for _ in range(rng.randrange(0, 4))]
        seqs.append(conv[:] + [rng.randrange(5) for _ in range(3)])
        conv = seqs[-1]
    seqs.append(seqs[2][:])
    tree = build_tree(seqs)
    check_tree(seqs, tree)
    assert tree.num_tokens == len(seqs[-2])
    assert all(torch.equal(ix, torch.arange(len(s))) for s, ix in zip(seqs, tree.seq_index))


def test_tensor_input_and_hand_example():
    seqs = [torch.tensor([1, 2, 3, 4]), [1, 2, 5], [1, 2], [1, 2, 5], [7, 8]]
    t = build_tree(seqs)
    assert t.token_ids.tolist() == [1, 2, 3, 4, 5, 7, 8]
    assert t.subtree_end.tolist() == [5, 5, 4, 4, 5, 7, 7]
    assert t.multiplicity.tolist() == [4, 4, 1, 1, 2, 1, 1]
    assert t.token_ratio() == pytest.approx(14 / 7)
    # Unmerged pairs 10 + 6 + 3 + 6 + 3 = 28; merged: sum of (position + 1) = 1+2+3+4+3+1+2 = 16.
    assert t.attention_pair_ratio() == pytest.approx(28 / 16)


def test_empty_sequence_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        build_tree([[1, 2], []])


def packed_seqs(packs, n_total):
    seen = {}
    for p in packs:
        for sid, ix in zip(p.seq_ids, p.tree.seq_index):
            assert sid not in seen
            seen[sid] = p.tree.token_ids[ix].tolist()
    assert sorted(seen) == list(range(n_total))
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_pack_keeps_groups_whole_and_exact(seed):
    rng = random.Random(seed)
    groups = [random_group(rng, rng.randrange(1, 5)) for _ in range(7)]
    flat = [s for g in groups for s in g]
    sizes = [build_tree(g).num_tokens for g in groups]
    budget = max(sizes) + 3
    packs = pack_groups(groups, budget)
    assert packed_seqs(packs, len(flat)) == dict(enumerate(flat))
    starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    for p in packs:
        assert p.tree.num_tokens <= budget
        check_tree([flat[i] for i in p.seq_ids], p.tree, one_trie=False)
        # A group that fits is not cut: all its ids are in this pack or none are.
        for g, st in zip(groups, starts):
            inside = {st + i for i in range(len(g))} & set(p.seq_ids)
            assert len(inside) in (0, len(g))
    # Fewer packs than groups: small trees share a pack.
    assert len(packs) < len(groups)
    inputs = packs[0].model_inputs()
    assert inputs["input_ids"].shape == (1, packs[0].tree.num_tokens)


def test_oversized_group_is_split_with_root_path_repeated():
    prompt = list(range(10))
    group = [prompt + [100 + i] * 4 for i in range(6)]
    # Whole tree: 10 + 6 * 4 = 34 tokens; budget 20 fits the prompt and two responses.
    packs = pack_groups([group], token_budget=20)
    assert packed_seqs(packs, 6) == dict(enumerate(group))
    assert all(p.tree.num_tokens <= 20 for p in packs)
    assert len(packs) == 3
    for p in packs:
        assert p.tree.token_ids[:10].tolist() == prompt


def test_sequence_over_budget_names_the_fix():
    with pytest.raises(ValueError, match="raise the micro-batch token budget"):
        pack_groups([[[1] * 9]], token_budget=8)


def test_long_conversation_chain_is_fast_and_shared():
    # 64 turns, each turn's sample is the history so far plus its own response.
    rng = random.Random(0)
    history: list[int] = []
    samples = []
    for _ in range(64):
        history = history + [rng.randrange(1000) for _ in range(50)]
        samples.append(list(history))
    t = build_tree(samples)
    assert t.num_tokens == 64 * 50
    assert t.token_ratio() == pytest.approx(65 / 2)


def test_should_merge_follows_the_measured_threshold():
    from forge.prefix_tree import MergeConfig, should_merge

    prompt = list(range(100))
    little = build_tree([prompt[:5] + [1000 + i] * 95 for i in range(8)])  # ratio ~1.05
    grpo = build_tree([prompt + [1000 + i] * 20 for i in range(8)])  # ratio ~3.5
    cfg = MergeConfig()
    assert little.token_ratio() < cfg.min_token_ratio < grpo.token_ratio()
    assert not should_merge(little, cfg) and should_merge(grpo, cfg)
    assert not should_merge(grpo, MergeConfig(enabled=False))
    assert should_merge(little, MergeConfig(min_token_ratio=1.0))
    with pytest.raises(ValueError, match="never below 1"):
        should_merge(grpo, MergeConfig(min_token_ratio=0.5))


def test_list_tensor_equals_torch_tensor():
    from forge.prefix_tree.trie import list_tensor

    ints = [0, 1, -3, 2**40, True, 7]
    floats = [0.0, -1.5, 1e-300, 3, float("inf")]
    for xs, dtype in ((ints, torch.long), (floats, torch.float64), ([0, 1, 1, 0], torch.float64), ([], torch.long)):
        got, want = list_tensor(xs, dtype), torch.tensor(xs, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(ValueError, match="torch.long or torch.float64"):
        list_tensor([1], torch.int32)


@pytest.mark.parametrize("seed", range(4))
def test_sizes_and_ids_without_trees_match_the_packs(seed):
    """`trie_size` is the built trie's size; `pack_ids` gives `pack_groups`' ids, with groups
    that fit and groups split over the budget."""
    from forge.prefix_tree import pack_ids, trie_size

    rng = random.Random(seed)
    groups = [random_group(rng, rng.randrange(1, 6)) for _ in range(6)]
    for g in groups:
        assert trie_size(g) == build_tree(g).num_tokens
    longest = max(len(s) for g in groups for s in g)
    for budget in (max(build_tree(g).num_tokens for g in groups) + 2, longest + 1):  # the second splits groups
        assert pack_ids(groups, budget) == [p.seq_ids for p in pack_groups(groups, budget)]
    with pytest.raises(ValueError, match="sequence 3 is empty"):
        pack_ids([[[1], [2]], [[3], []]], 10)
