"""The agent loop and rollout workers: token-exact trajectories, complete groups, failing envs.

A scripted generator stands in for the policy: it answers each prompt with the text a policy
function gives, sampled as ids that re-tokenizing would not reproduce, and logs every id and
logprob it produced, so the tests can compare the trajectories with what was really sampled.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sys
import time
from typing import Callable, Sequence

import pytest

from envs.reverse import ReverseEnv
from forge.agent_side.config import EnvConfig, EnvLoadError, RolloutConfig, load_env_class
from forge.agent_side.rollout import RolloutStats, RolloutWorker
from forge.middleware.pool import DataPool, PoolConfig
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


class ScriptedGenerator:
    """A `Generator` whose turns come from `policy(context_text)`, with logged ids and logprobs."""

    def __init__(self, policy: Callable[[str], str], policy_version: int = 7, seed: int = 0) -> None:
        self.policy = policy
        self.version = policy_version
        self.rng = random.Random(seed)
        self.log: list[tuple[list[int], list[int], list[float]]] = []
        self.batch_sizes: list[int] = []

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        self.batch_sizes.append(len(prompts))
        out = []
        for prompt in prompts:
            text = self.policy(TOK.decode(prompt))
            # "<think>" as seven byte ids, not its special id: encode(decode(ids)) != ids, so a
            # loop that re-tokenized text would store different ids than were sampled.
            ids: list[int] = []
            for piece in re.split("(<think>)", text):
                ids.extend(list(piece.encode()) if piece == "<think>" else TOK.encode(piece))
            if not ids or ids[-1] not in params.stop_token_ids:
                ids.append(TOK.eos_id)
            ids = ids[: params.max_new_tokens]
            logprobs = [-self.rng.random() * 3 for _ in ids]
            self.log.append((list(prompt), ids, logprobs))
            out.append(Completion(ids, logprobs, "stop", policy_version=self.version))
        return out


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def reverse_policy(context: str) -> str:
    """Think, call the tool, check it once more, then answer: three turns with tool results between."""
    word = re.search(r"Reverse the word (\w+)\.", context).group(1)
    got = re.findall(r'<tool_result name="reverse">(.*?)</tool_result>', context)
    if len(got) == 0:
        return f"<think>I should reverse {word}; é</think>" + call("reverse", text=word)
    if len(got) == 1:
        return "<think>check it</think>" + call("reverse", text=got[0][::-1])
    return f"<think>done</think><answer>{got[0]}</answer>"


# Faults by seed. Class-level counters make "fails on the first attempt only" possible in-process.
ATTEMPTS: dict[tuple[str, int], int] = {}


class FaultyEnv(ReverseEnv):
    """seed 1 raises always; 2 hangs on the first attempt; 3 returns garbage on the first; 4 raises in reset first."""

    def reset(self, *, seed=None, options=None):
        key = ("reset", seed)
        ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
        if seed == 4 and ATTEMPTS[key] <= 2:
            raise OSError("reset could not reach its data")
        self.seed_ = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        key = ("step", self.seed_)
        ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
        first = ATTEMPTS[key] == 1
        if self.seed_ == 1:
            raise RuntimeError("the tool server is down")
        if self.seed_ == 2 and first:
            time.sleep(30)
        if self.seed_ == 3 and first:
            return None
        return super().step(action)


def make_worker(env_cls=ReverseEnv, policy=reverse_policy, **cfg) -> tuple[RolloutWorker, ScriptedGenerator]:
    gen = ScriptedGenerator(policy)
    defaults = dict(group_size=2, concurrency=4, max_retries=1, turn_timeout_s=0.5, episode_timeout_s=20.0, max_new_tokens=200)
    defaults.update(cfg)
    return RolloutWorker(env_cls, gen, TOK, RolloutConfig(**defaults), env_name=env_cls.__name__), gen


def test_trajectory_is_exactly_what_was_sampled():
    worker, gen = make_worker(group_size=2, concurrency=4)
    result = worker.run([10, 11])
    trajs = [t for g in result.groups for t in g.trajectories]
    assert len(trajs) == 4 and all(t.ok and t.reward == 1.0 and len(t.turns) == 3 for t in trajs)
    # Every sampled turn is stored exactly once, with its ids and logprobs unchanged, and the
    # context the generator saw for it is the trajectory's own prefix (nothing re-tokenized).
    unclaimed = list(gen.log)
    for t in trajs:
        for k, turn in enumerate(t.turns):
            entry = (t.token_ids[: t.turn_boundaries[k][0]], turn.sampled_ids, turn.logprobs)
            assert entry in unclaimed
            unclaimed.remove(entry)
            assert turn.policy_version == 7
    assert unclaimed == []
    for t in trajs:
        assert TOK.encode(TOK.decode(t.turns[0].sampled_ids)) != t.turns[0].sampled_ids
        # Observations sit between turns; the last turn (the answer) has none.
        assert [bool(turn.observation_ids) for turn in t.turns] == [True, True, False]
        assert TOK.decode(t.turns[0].observation_ids).startswith('<tool_result name="reverse">')


def test_loss_mask_marks_the_sampled_tokens_only():
    worker, _ = make_worker()
    t = worker.run([3]).groups[0].trajectories[0]
    ids, mask, lps = t.token_ids, t.loss_mask, t.sampling_logprobs
    assert len(ids) == len(mask) == len(lps)
    sampled = [i for turn in t.turns for i in turn.sampled_ids]
    assert [i for i, m in zip(ids, mask) if m] == sampled
    assert [lp for lp, m in zip(lps, mask) if m] == [lp for turn in t.turns for lp in turn.logprobs]
    assert mask[: len(t.prompt_ids)] == [0] * len(t.prompt_ids) and t.prompt_ids[0] == TOK.bos_id
    for (a, b), turn in zip(t.turn_boundaries, t.turns):
        assert ids[a:b] == turn.sampled_ids and all(mask[a:b])


def test_groups_are_complete_and_batched():
    worker, gen = make_worker(group_size=3, concurrency=6)
    result = worker.run(list(range(5)))
    assert [len(g.trajectories) for g in result.groups] == [3] * 5
    assert sorted(g.task_id for g in result.groups) == sorted(f"ReverseEnv:{s}" for s in range(5))
    for g in result.groups:
        assert len({t.prompt_ids[1:40].__repr__() for t in g.trajectories}) == 1  # one task per group
        assert {t.group_id for t in g.trajectories} == {g.group_id}
    assert max(gen.batch_sizes) == 6 and result.stats.groups_done == 5 and result.stats.turns == 45


def test_faulty_envs_fail_their_trajectory_and_the_worker_goes_on():
    ATTEMPTS.clear()
    worker, _ = make_worker(FaultyEnv, group_size=2, concurrency=4, max_retries=2)
    t0 = time.monotonic()
    result = worker.run([0, 1, 2, 3, 4, 5])
    assert time.monotonic() - t0 < 15
    done = {g.task_id.split(":")[1]: g for g in result.groups}
    # Seed 1 always raises: dropped after 1 + 2 attempts; the others come back complete.
    assert sorted(done) == ["0", "2", "3", "4", "5"]
    assert all(len(g.trajectories) == 2 and all(t.ok for t in g.trajectories) for g in result.groups)
    assert done["0"].attempts == 1 and done["2"].attempts == 2 and done["3"].attempts == 2
    s = result.stats
    assert s.groups_dropped == 1 and s.groups_done == 5
    assert s.failure_reasons["raised"] >= 3 * 2 and s.failure_reasons["timeout"] >= 1 and s.failure_reasons["garbage"] >= 1


class OneBadMemberEnv(ReverseEnv):
    """The first instance made raises on its first step; the others are fine."""

    made = 0

    def __init__(self, difficulty: int = 0) -> None:
        super().__init__(difficulty)
        self.bad = OneBadMemberEnv.made == 0
        OneBadMemberEnv.made += 1

    def step(self, action):
        if self.bad:
            raise RuntimeError("this one is broken")
        return super().step(action)


def test_a_failed_member_cancels_the_rest_of_its_group():
    OneBadMemberEnv.made = 0
    worker, gen = make_worker(OneBadMemberEnv, group_size=3, concurrency=3, max_retries=0)
    result = worker.run([0])
    assert result.groups == [] and result.stats.failure_reasons == {"raised": 1, "cancelled": 2}
    # One batched turn for the three, then nothing more is generated for the doomed group.
    assert gen.batch_sizes == [3]


def test_failure_reasons_name_the_cause():
    from forge.agent_side.episode import apply_turn, start_episode

    ATTEMPTS.clear()
    ep = start_episode(FaultyEnv, 1, TOK, task_id="t", group_id="g", timeout_s=1.0)
    ids = TOK.encode("<answer>x</answer>")
    apply_turn(ep, Completion(ids, [0.0] * len(ids)), TOK, timeout_s=1.0)
    assert ep.traj.status == "failed" and ep.traj.failure_reason == "raised: env.step raised RuntimeError: the tool server is down"
    ep = start_episode(FaultyEnv, 3, TOK, task_id="t", group_id="g", timeout_s=1.0)
    apply_turn(ep, Completion(TOK.encode("hi"), [0.0, 0.0]), TOK, timeout_s=1.0)
    assert ep.traj.failure_reason.startswith("garbage: env.step returned None; it must return (obs, reward")


class TrainerSidePool(DataPool):
    """A small pool whose refusals stand in for a trainer that takes groups meanwhile."""

    def __init__(self) -> None:
        super().__init__(PoolConfig(capacity=2, window=2, max_staleness=100))
        self.trained: list = []

    def try_start(self, task_id: str) -> bool:
        ok = super().try_start(task_id)
        if not ok:
            self.trained += self.take(8, policy_version=7)
        return ok


def test_groups_go_to_the_data_pool_with_backpressure_and_abandons():
    ATTEMPTS.clear()
    worker, _ = make_worker(FaultyEnv, group_size=2, concurrency=2, max_retries=1, backpressure_wait_s=0.01)
    pool = TrainerSidePool()
    result = worker.run([0, 1, 2, 3, 5], sink=pool)
    assert result.groups == [] and result.stats.groups_done == 4
    trained = pool.trained + pool.take(8, policy_version=7)
    assert sorted(g.task_id for g in trained) == [f"FaultyEnv:{s}" for s in (0, 2, 3, 5)]
    assert pool.counters["refused_full"] >= 1 and pool.counters["abandoned"] == 1


def test_stats_merge_and_flatten_for_the_metrics_sink():
    a = RolloutStats(groups_done=2, turns=5, generate_s=1.5, failure_reasons={"raised": 1}, protocol_errors={"bad_json": 2})
    b = RolloutStats(groups_done=1, turns=1, failure_reasons={"raised": 2, "timeout": 1})
    a.merge(b)
    m = a.as_metrics()
    assert (m["rollout/groups_done"], m["rollout/turns"], m["rollout/generate_s"]) == (3.0, 6.0, 1.5)
    assert (m["rollout/failed/raised"], m["rollout/failed/timeout"], m["rollout/errors/bad_json"]) == (3.0, 1.0, 2.0)
    assert b.failure_reasons == {"raised": 2, "timeout": 1}


def test_episode_time_limit_fails_the_trajectory():
    def slow_policy(context: str) -> str:
        time.sleep(0.3)
        return "<think>hmm</think>"

    worker, _ = make_worker(policy=slow_policy, group_size=1, max_retries=0, episode_timeout_s=0.5)
    result = worker.run([0])
    assert result.groups == [] and result.stats.groups_dropped == 1
    assert result.stats.failure_reasons == {"episode_timeout": 1}


def test_context_limit_truncates_or_fails_a_prompt_that_cannot_fit():
    full = make_worker(group_size=1)[0].run([0]).groups[0].trajectories[0]
    third_start = full.turn_boundaries[2][0]
    # Room for the second turn's 200 new tokens but not the third's: the episode stops after two.
    worker, _ = make_worker(group_size=1, max_retries=0, max_new_tokens=200, max_context_tokens=third_start + 199)
    t = worker.run([0]).groups[0].trajectories[0]
    assert t.ok and not t.terminated and [turn.sampled_ids for turn in t.turns] == [turn.sampled_ids for turn in full.turns[:2]]
    # The observation after the last turn is not kept: nothing reads it, and a flooding tool must
    # not make the trajectory longer than the context limit.
    assert t.turns[-1].observation_ids == [] and len(t.token_ids) <= third_start + 199
    worker, _ = make_worker(group_size=1, max_retries=0, max_new_tokens=200, max_context_tokens=len(full.prompt_ids) + 199)
    result = worker.run([0])
    assert result.groups == [] and result.stats.failure_reasons == {"context": 1}


def test_protocol_errors_are_counted_not_fatal():
    worker, _ = make_worker(policy=lambda ctx: "no protocol here", group_size=2, max_retries=0)
    result = worker.run([0])
    t = result.groups[0].trajectories[0]
    assert t.ok and not t.terminated and len(t.turns) == ReverseEnv.max_turns and t.reward == 0.0
    assert t.error_counts == {"no_action": ReverseEnv.max_turns}
    assert result.stats.protocol_errors == {"no_action": 2 * ReverseEnv.max_turns}


def test_load_env_class_errors_name_the_fix():
    assert load_env_class("envs.calculator:CalculatorEnv").__name__ == "CalculatorEnv"
    for ref, fragment in [
        ("envs.calculator", "write it as module.path:ClassName"),
        ("no_such_pkg.env:X", "no module named 'no_such_pkg'"),
        ("envs.calculator:CalculatorEnvv", "did you mean 'envs.calculator:CalculatorEnv'"),
        ("envs.calculator:safe_eval", "not a ToolEnv; subclass forge.agent_side.ToolEnv"),
    ]:
        with pytest.raises(EnvLoadError, match=re.escape(fragment)):
            load_env_class(ref)


def test_env_config_makes_the_env_with_its_settings():
    env = EnvConfig(cls="envs.needle:NeedleEnv", difficulty=1).make()
    assert type(env).__name__ == "NeedleEnv" and env.difficulty == 1


def test_ray_actors_produce_complete_groups_and_survive_faulty_envs(ray_session):
    """Two actors on the local cluster: every seed but the always-raising one comes back as a
    complete group, the bad one is dropped and counted, and the actors keep serving."""
    from forge.agent_side.rollout_actor import run_groups, start_rollout_actors

    # The test module is not importable under its pytest name in Ray's workers: ship the
    # generator by value; the env is imported by reference from the repository root.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = RolloutConfig(group_size=3, num_workers=2, actor_num_cpus=0.5, concurrency=6, max_retries=1,
                        turn_timeout_s=0.5, max_new_tokens=200)
    actors = start_rollout_actors(EnvConfig(cls="tests.test_agent_rollout:FaultyEnv"), cfg,
                                  functools.partial(ScriptedGenerator, reverse_policy))
    result = run_groups(actors, [0, 1, 2, 3, 5, 6])
    assert sorted(g.task_id for g in result.groups) == [f"FaultyEnv:{s}" for s in (0, 2, 3, 5, 6)]
    assert all(len(g.trajectories) == 3 and all(t.ok and t.reward == 1.0 for t in g.trajectories) for g in result.groups)
    s = result.stats
    assert (s.groups_done, s.groups_dropped, s.failure_reasons["raised"]) == (5, 1, 6)
    assert s.failure_reasons["timeout"] >= 1 and s.failure_reasons["garbage"] >= 1
    # Again on the same actors, now delivering into a data-pool actor as groups finish.
    pool = ray_session.remote(DataPool).remote(PoolConfig(capacity=8))
    assert run_groups(actors, [7, 8], pool).groups == []
    assert ray_session.get(pool.ready.remote(7)) == 2


def test_with_the_model_generator_stored_logprobs_match_a_forward_pass():
    """End to end with the real local generator: the stored ids, scored by the model in one
    forward pass over the flat sequence, give back the stored sampling logprobs."""
    torch = pytest.importorskip("torch")
    from forge.policy import ModelConfig, ModelGenerator, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=TOK.vocab_size))
    gen = ModelGenerator(model, TOK, seed=0, policy_version=3)
    cfg = RolloutConfig(group_size=2, concurrency=2, max_retries=0, max_new_tokens=12, temperature=1.0)

    class TwoTurns(ReverseEnv):
        max_turns = 2

    result = RolloutWorker(TwoTurns, gen, TOK, cfg, env_name="reverse").run([0])
    (group,) = result.groups
    for t in group.trajectories:
        # An untrained model rarely follows the protocol: its episodes run to the turn limit.
        assert t.ok and len(t.turns) == 2 and t.policy_versions == [3, 3]
        ids = torch.tensor([t.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).float(), dim=-1)[0]  # [T, V]
        for (start, end), turn in zip(t.turn_boundaries, t.turns):
            # Token p is predicted by the logits at p - 1.
            expected = logprobs[start - 1 : end - 1].gather(-1, ids[0, start:end, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(turn.logprobs), expected, atol=1e-4, rtol=1e-4)


class TemperatureLog(ScriptedGenerator):
    """Records the temperature of every generate call."""

    def __init__(self) -> None:
        super().__init__(reverse_policy)
        self.temperatures: list[float] = []

    def generate(self, prompts, params):
        self.temperatures.append(params.temperature)
        return super().generate(prompts, params)


def test_actor_temperature_override_is_for_one_call():
    # The evaluator's greedy pass (eval.greedy_too) reuses the sampling evaluator's actor.
    from forge.agent_side.rollout_actor import RolloutActor

    gen = TemperatureLog()
    actor = RolloutActor(EnvConfig(cls="envs.reverse:ReverseEnv"), RolloutConfig(group_size=1, temperature=0.7),
                         lambda: gen)
    actor.run([0])
    sampled = len(gen.temperatures)
    actor.run([0], None, 0.0)
    greedy = len(gen.temperatures) - sampled
    actor.run([1])
    assert sampled and greedy
    assert gen.temperatures[:sampled] == [0.7] * sampled
    assert gen.temperatures[sampled:sampled + greedy] == [0.0] * greedy
    assert set(gen.temperatures[sampled + greedy:]) == {0.7}
