"""Context management as a trained action: the compact tool, segments, the env-side policies.

A scripted generator plays the relay environment from what it reads (fragments and page numbers
in its context, the notice that asks it to compact), and logs every prompt it was given and every
id it sampled, so the tests can check that each segment is exactly the sequence the generator
read and wrote.
"""

from __future__ import annotations

import json
import random
import re
from typing import Sequence

import pytest

from envs.calculator import CalculatorEnv
from envs.relay import RelayEnv
from forge.agent_side.config import RolloutConfig
from forge.agent_side.context import DROPPED_STUB, ContextConfig, ContextRules, context_rules
from forge.agent_side.demos import oracle_batch, oracle_episode
from forge.agent_side.rollout import RolloutWorker, context_metrics
from forge.middleware.types import Group
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import ByteTokenizer
from forge.prefix_tree import build_tree

TOK = ByteTokenizer()


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def relay_turn(context: str, *, compact: bool = True, notes: bool = False) -> str:
    """What a perfect relay agent writes next, reading only its context; with `notes` it keeps
    the fragments so far in its thinking, which survives dropped tool results."""
    fragments, page = [], int(re.search(r"Read page (\d+)", context).group(1))
    summary = re.findall(r"your summary: fragments ([\w ]+), next page (\d+)", context)
    if summary:
        fragments, page = summary[-1][0].split(), int(summary[-1][1])
        context = context[context.rindex("your summary:"):]
    if notes and "<think>have" in context:
        fragments = re.findall(r"<think>have ([\w ]*)</think>", context)[-1].split()
        context = context[context.rindex("<think>have"):]
    for text in re.findall(r'<tool_result name="read">(.*?)</tool_result>', context, re.S):
        fragments.append(re.search(r"Fragment: (\w+)\.", text).group(1))
        if "This is the last page." in text:
            return "<answer>" + " ".join(fragments) + "</answer>"
        page = int(re.search(r"Next page: (\d+)\.", text).group(1))
    if compact and context.rstrip().endswith("call compact</tool_result>"):
        return call("compact", summary=f"fragments {' '.join(fragments)}, next page {page}")
    return (f"<think>have {' '.join(fragments)}</think>" if notes else "") + call("read", page=page)


class LoggingGenerator:
    """A `Generator` whose turns come from `policy(context_text)`; logs (prompt, ids) of each."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.rng = random.Random(0)
        self.log: list[tuple[list[int], list[int]]] = []

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for prompt in prompts:
            ids = TOK.encode(self.policy(TOK.decode(prompt)))
            if ids[-1] not in params.stop_token_ids:
                ids.append(TOK.eos_id)
            ids = ids[: params.max_new_tokens]
            self.log.append((list(prompt), ids))
            out.append(Completion(ids, [-self.rng.random() for _ in ids], "stop", policy_version=3))
        return out


def rollout_cfg(**context) -> RolloutConfig:
    return RolloutConfig(group_size=4, concurrency=8, max_new_tokens=128, max_context_tokens=656,
                         context=ContextConfig(**context))


def run_relay(cfg: RolloutConfig, seeds=(0, 1), policy=relay_turn, env_cls=RelayEnv):
    gen = LoggingGenerator(policy)
    worker = RolloutWorker(lambda: env_cls(prompt_style="brief"), gen, TOK, cfg, env_name="relay")
    try:
        return worker.run(list(seeds)), gen
    finally:
        worker.close()


def assert_token_exact(groups: list[Group], gen: LoggingGenerator) -> None:
    """Every turn of every segment was sampled by the generator from exactly the segment's prefix."""
    logged = {(tuple(p), tuple(ids)) for p, ids in gen.log}
    turns = 0
    for g in groups:
        for seg in g.trajectories:
            prefix = list(seg.prompt_ids)
            for turn in seg.turns:
                assert (tuple(prefix), tuple(turn.sampled_ids)) in logged
                prefix += turn.sampled_ids + turn.observation_ids
                turns += 1
            assert prefix == seg.token_ids
    assert turns == len(gen.log)


def test_the_env_offers_compact_and_reports_the_summary_without_running_tools():
    env = CalculatorEnv(prompt_style="brief")
    env.offer_compaction()
    prompt, _ = env.reset(seed=3)
    assert "compact(summary)" in prompt
    obs, reward, term, trunc, info = env.step(call("compact", summary="x is 4"))
    assert (obs, reward, term, trunc, info["compact"]) == ("", 0.0, False, False, "x is 4")
    obs, *_, info = env.step(call("compact", summary="x") + call("calculate", expression="1+1"))
    assert "compact" not in info and info["errors"] == ["compact_not_alone"] and "only call" in obs
    obs, *_, info = env.step(call("compact", note="x"))
    assert "compact" not in info and info["errors"] == ["bad_arguments"]
    # Without offer_compaction, compact is an unknown tool like any other.
    plain = CalculatorEnv(prompt_style="brief")
    plain.reset(seed=3)
    assert plain.step(call("compact", summary="x"))[4]["errors"] == ["unknown_tool"]


def test_an_env_with_its_own_compact_tool_is_refused_in_one_line():
    from forge.agent_side import ToolEnv, tool

    class Clash(ToolEnv):
        @tool
        def compact(self, text: str) -> str:
            """Squeeze text."""
            return text

    with pytest.raises(ValueError, match="already has a tool named 'compact'"):
        Clash().offer_compaction()


def test_relay_needs_compaction_and_its_segments_are_token_exact():
    cfg = rollout_cfg(compact=True, ask_at_tokens=280)
    result, gen = run_relay(cfg)
    assert result.stats.groups_done == 2 and not result.dropped
    assert_token_exact(result.groups, gen)
    for g in result.groups:
        episodes = g.episodes
        assert len(episodes) == 4
        for segs in episodes:
            assert [s.segment for s in segs] == [0, 1]
            assert {s.reward for s in segs} == {1.0}
            first = segs[0].prompt_ids
            # The new context is the first prompt's exact ids, then the summary.
            assert segs[1].prompt_ids[: len(first)] == first
            assert "your summary: fragments" in TOK.decode(segs[1].prompt_ids[len(first):])
            assert all(len(s.token_ids) <= cfg.max_context_tokens for s in segs)
            assert not segs[0].terminated and segs[1].terminated
            # The compact turn ends its segment with nothing after it.
            assert '"compact"' in TOK.decode(segs[0].turns[-1].sampled_ids) and not segs[0].turns[-1].observation_ids
    metrics = context_metrics(result.stats.as_metrics())
    assert metrics["context/compactions_per_episode"] == 1.0
    assert metrics["context/segments_per_episode"] == 2.0
    assert metrics["context/tokens_saved"] > 200


def test_without_compaction_the_relay_cannot_be_finished():
    result, gen = run_relay(rollout_cfg(), policy=lambda c: relay_turn(c, compact=False))
    assert result.stats.groups_done == 2
    for g in result.groups:
        assert len(g.trajectories) == 4 and {t.reward for t in g.trajectories} == {0.0}
        assert all(not t.terminated and len(t.token_ids) <= 656 for t in g.trajectories)
    assert context_metrics(result.stats.as_metrics())["context/segments_per_episode"] == 1.0


def test_a_full_context_asks_to_compact_in_place_of_the_last_observation():
    # No early ask: the second page does not fit, so the notice replaces it; the agent compacts
    # what it knew (the first page) and reads the second page again in the new context.
    result, gen = run_relay(rollout_cfg(compact=True, on_full="ask"))
    assert_token_exact(result.groups, gen)
    for segs in (s for g in result.groups for s in g.episodes):
        assert segs[-1].reward == 1.0 and len(segs) == 2
        notice = TOK.decode(segs[0].turns[-2].observation_ids)
        assert notice.startswith('<tool_result name="context">') and "call compact" in notice
    # With on_full 'truncate' the same agent never gets the notice and ends truncated.
    result, _ = run_relay(rollout_cfg(compact=True, on_full="truncate"))
    assert {t.reward for g in result.groups for t in g.trajectories} == {0.0}


def test_keep_last_turns_carries_the_exact_ids_of_the_turns_before_the_compaction():
    result, gen = run_relay(rollout_cfg(compact=True, ask_at_tokens=280, keep_last_turns=1), seeds=(5,))
    assert_token_exact(result.groups, gen)
    segs = result.groups[0].episodes[0]
    read = segs[0].turns[-2]  # the read before the compact turn
    tail = segs[1].prompt_ids[-(len(read.sampled_ids) + len(read.observation_ids)):]
    assert tail == read.sampled_ids + read.observation_ids


def test_dropping_old_tool_results_rewrites_the_context_as_a_new_segment():
    # max_turns stays 24; a wide context lets the whole relay fit, so only the drop policy acts.
    cfg = RolloutConfig(group_size=2, concurrency=4, max_new_tokens=128, max_context_tokens=4096,
                        context=ContextConfig(drop_tool_results_after=1))
    result, gen = run_relay(cfg, seeds=(2,), policy=lambda c: relay_turn(c, compact=False, notes=True),
                            env_cls=lambda prompt_style: _LongRelay(prompt_style=prompt_style))
    assert_token_exact(result.groups, gen)
    for segs in result.groups[0].episodes:
        # 4 reads and an answer: the second read's result makes the first one old, and so on.
        assert [s.segment for s in segs] == [0, 1, 2, 3] and segs[-1].reward == 1.0
        last = TOK.decode(segs[-1].prompt_ids)
        assert last.count(DROPPED_STUB.strip()) == 3 and last.count('<tool_result name="read">') == 1
    assert context_metrics(result.stats.as_metrics())["context/results_dropped_per_episode"] == 3.0


class _LongRelay(RelayEnv):
    def __init__(self, prompt_style: str = "brief") -> None:
        super().__init__(difficulty=2, prompt_style=prompt_style)


def test_an_episode_past_max_segments_ends_truncated():
    cfg = rollout_cfg(compact=True, ask_at_tokens=280, max_segments=1)
    result, _ = run_relay(cfg, seeds=(0,))
    for segs in result.groups[0].episodes:
        assert len(segs) == 1 and segs[0].reward == 0.0 and not segs[0].terminated


def test_demonstrations_compact_when_asked_and_give_one_sequence_per_segment():
    rules = context_rules(rollout_cfg(compact=True, ask_at_tokens=280))
    segs = oracle_episode(lambda: RelayEnv(prompt_style="brief"), 4, TOK, rules=rules)
    assert [s.segment for s in segs] == [0, 1] and {s.reward for s in segs} == {1.0}
    seqs, masks = oracle_batch(lambda: RelayEnv(prompt_style="brief"), [4, 5], TOK, rules=rules)
    assert len(seqs) == 4 and seqs[:2] == [s.token_ids for s in segs]
    assert [len(m) for m in masks] == [len(s) for s in seqs]


def test_segments_of_a_group_share_the_task_prefix_in_the_prefix_tree():
    result, _ = run_relay(rollout_cfg(compact=True, ask_at_tokens=280), seeds=(0,))
    seqs = [t.token_ids for t in result.groups[0].trajectories]
    prompt = len(result.groups[0].trajectories[0].prompt_ids)
    # Every one of the group's 8 segments starts with the same task prompt: stored once.
    assert build_tree(seqs).num_tokens <= sum(len(s) for s in seqs) - (len(seqs) - 1) * prompt


def test_context_config_refuses_bad_values_in_one_line():
    with pytest.raises(ValueError, match="on_full 'never' is not one of ask, truncate"):
        ContextConfig(on_full="never")
    with pytest.raises(ValueError, match="keep_last_turns must be >= 0"):
        ContextConfig(keep_last_turns=-1)
    assert context_rules(RolloutConfig()) is None
    assert ContextRules(ContextConfig(compact=True, ask_at_tokens=10), 100, 10).should_ask(11, asked=False)


@pytest.mark.timeout(600)
def test_forge_train_with_compaction_logs_the_context_metrics_and_keeps_segments(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from forge.middleware.arrow import read_parquet

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "forge.cli", "train", str(root / "tests" / "data" / "tiny_recipe.yaml"),
            f"run.output_dir={out}", "env.cls=envs.relay:RelayEnv", "env.kwargs={prompt_style: brief}",
            "rollout.context.compact=true",
            "rollout.context.ask_at_tokens=280", "rollout.max_new_tokens=128", "rollout.max_context_tokens=656",
            "train.steps=2", "train.keep_rollouts=true", "eval.every=2"]
    env = dict(os.environ, FORGE_NO_PROGRESS="1", PYTHONPATH=str(root))
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = out.iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "train/rl_step" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["context/segments_per_episode"] >= 1.0 and "context/tokens_saved" in r
        assert r["train/episodes"] == r["rollout/episodes"]
    groups = read_parquet(sorted((run / "rollouts").glob("*.parquet")))
    assert all(len(g.episodes) == 2 for g in groups)
    assert "compact(summary)" in TOK.decode(groups[0].trajectories[0].prompt_ids)
