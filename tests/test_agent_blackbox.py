"""Black-box agents (forge.agent_side.agent): OpenAI-client programs rolled out through the gateway.

The central check: an agent that talks to the gateway produces, token for token, the trajectory
the calculator environment's episode produces for the same task and the same turns, so the
environment's oracle demonstrations warm-start the agent's policy and the trainer sees the
sampler's exact tokens. Then the failure paths, the recipe checks and `forge serve`.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from envs.calculator import CalculatorEnv
from forge.agent_side.agent import AgentRolloutWorker
from forge.agent_side.config import AgentConfig, RolloutConfig
from forge.agent_side.demos import oracle_trajectory, turn_ids
from forge.config import ConfigError, load_recipe
from forge.middleware.arrow import read_parquet
from forge.policy.sampling import Completion
from forge.policy.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


class OracleGenerator:
    """Plays the calculator's oracle for whatever prompt it is given; records the params it got."""

    policy_version = 4

    def __init__(self) -> None:
        self.params: list = []

    def generate(self, prompts, params):
        self.params.append(params)
        out = []
        for prompt in prompts:
            text = TOK.decode(prompt[1:])
            oracle = CalculatorEnv(prompt_style="brief").oracle(text.split("<tool_result")[0])
            turn = next(oracle)
            if "<tool_result" in text:
                turn = oracle.send(text[text.index("<tool_result") :])
            ids = turn_ids(turn, TOK)
            out.append(Completion(ids, [-0.25] * len(ids), "stop", self.policy_version))
        return out


class AnswerGenerator:
    """Answers every prompt with <answer>1</answer>."""

    policy_version = 0

    def generate(self, prompts, params):
        ids = TOK.encode("<answer>1</answer>")
        return [Completion(ids, [-0.5] * len(ids), "stop", 0) for _ in prompts]


def worker(agent: str, generator=None, **rollout) -> AgentRolloutWorker:
    cfg = AgentConfig(cls=agent, tasks="examples.calculator_openai:tasks", tool_style="brief")
    settings = {"group_size": 2, "concurrency": 4, "max_new_tokens": 96, "max_retries": 1, **rollout}
    return AgentRolloutWorker(cfg, generator or OracleGenerator(), TOK, RolloutConfig(**settings), name="calc")


@pytest.mark.parametrize("agent", ["examples.calculator_openai:run", "examples.calculator_agents_sdk:run"],
                         ids=["openai_client", "agents_sdk"])
def test_agent_trajectories_equal_the_environment_episode(agent):
    pytest.importorskip("agents") if "sdk" in agent else None
    generator = OracleGenerator()
    w = worker(agent, generator)
    try:
        result = w.run([5, 6, 7])
    finally:
        w.close()
    assert result.stats.groups_done == 3 and result.stats.trajectories_ok == 6 and not result.stats.failure_reasons
    assert result.stats.turns == 12 and result.stats.sampled_tokens > 0
    for group in result.groups:
        seed = int(group.task_id.split(":")[1])
        assert group.task_id == f"calc:{seed}" and len(group.trajectories) == 2
        demo = oracle_trajectory(lambda: CalculatorEnv(prompt_style="brief"), seed, TOK)
        for traj in group.trajectories:
            assert traj.token_ids == demo.token_ids
            assert traj.loss_mask == demo.loss_mask
            assert traj.reward == 1.0 and traj.ok and traj.policy_versions == [4, 4]
            sampled = [lp for lp, m in zip(traj.sampling_logprobs, traj.loss_mask) if m]
            assert sampled == [-0.25] * sum(traj.loss_mask)
    # The recipe's sampling settings, not the agent's max_tokens=96 alone, reach the generator.
    assert {(p.temperature, p.top_p) for p in generator.params} == {(1.0, 1.0)}
    assert all(p.max_new_tokens <= 96 for p in generator.params)


async def raises(task, client):
    await client.chat.completions.create(model="forge-policy", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    raise RuntimeError("agent bug")


async def returns_nan(task, client):
    await client.chat.completions.create(model="forge-policy", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    return math.nan


async def never_calls(task, client):
    return 1.0


async def sleeps(task, client):
    await asyncio.sleep(30)
    return 1.0


async def low_temperature(task, client):
    reply = await client.chat.completions.create(
        model="forge-policy", messages=[{"role": "user", "content": task["question"]}], temperature=0.1, max_tokens=4)
    return float(len(reply.choices[0].message.content or "") >= 0)


@pytest.mark.parametrize(("agent", "cause", "rollout"), [
    ("raises", "raised", {}),
    ("returns_nan", "garbage", {}),
    ("never_calls", "no_calls", {}),
    ("sleeps", "episode_timeout", {"episode_timeout_s": 0.3}),
], ids=["raises", "nan_reward", "no_calls", "timeout"])
def test_a_failing_agent_fails_its_group_which_is_retried_then_dropped(agent, cause, rollout):
    w = worker(f"{__name__}:{agent}", AnswerGenerator(), **rollout)
    try:
        result = w.run([1])
    finally:
        w.close()
    assert result.groups == []
    stats = result.stats
    assert (stats.groups_done, stats.groups_retried, stats.groups_dropped) == (0, 1, 1)
    assert stats.failure_reasons == {cause: 4} and stats.trajectories_failed == 4


def test_the_recipe_temperature_overrides_the_agents():
    generator = OracleGenerator()
    w = worker(f"{__name__}:low_temperature", generator, temperature=0.7)
    try:
        result = w.run([2])
    finally:
        w.close()
    assert result.stats.groups_done == 1
    assert {p.temperature for p in generator.params} == {0.7} and {p.max_new_tokens for p in generator.params} == {4}


def test_recipe_checks_the_agent_section(tmp_path):
    recipe = ROOT / "recipes" / "agent_calculator_openai.yaml"
    cfg = load_recipe(recipe)
    assert cfg.agent.enabled and cfg.agent.tool_style == "brief"
    with pytest.raises(ConfigError, match="agent.cls 'examples.calculator_openai:score' is not an async function"):
        load_recipe(recipe, ["agent.cls=examples.calculator_openai:score"])
    with pytest.raises(ConfigError, match="no module named 'examples.nope'"):
        load_recipe(recipe, ["agent.tasks=examples.nope:tasks"])
    with pytest.raises(ConfigError, match="did you mean 'examples.calculator_openai:tasks'"):
        load_recipe(recipe, ["agent.tasks=examples.calculator_openai:taks"])
    with pytest.raises(ConfigError, match="agent.tool_style must be 'full' or 'brief'"):
        load_recipe(recipe, ["agent.tool_style=long"])


def test_forge_serve_writes_closed_sessions_as_training_data(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORGE_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge.cli", "serve", "recipes/quickstart.yaml", "--port", "0",
         f"run.output_dir={tmp_path}", "rollout.max_new_tokens=8"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A test run started in the background (`cmd &` in a script) ignores SIGINT, and the child
        # would inherit that: give it the default, as a terminal's Ctrl-C finds it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "serving 'forge-policy' (policy version 0) at http://127.0.0.1:" in line, proc.stderr.read()[-2000:]
        base = line.split(" at ")[1].split(";")[0]
        import openai

        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, default_headers={"X-Forge-Session": "ep-1"})
        reply = client.chat.completions.create(model="forge-policy", messages=[{"role": "user", "content": "2+2?"}])
        assert reply.usage.completion_tokens <= 8
        closed = httpx.post(base.replace("/v1", "/forge/sessions/ep-1/reward"), json={"reward": 0.5}, timeout=30)
        assert closed.status_code == 200, closed.text
        recorded = httpx.get(base.replace("/v1", "/forge/sessions/ep-1"), timeout=30).json()["calls"][0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("forge serve did not stop within 30 s of SIGINT; its stderr: " + proc.communicate()[1][-2000:])
    (written,) = tmp_path.glob("quickstart-serve-*/sessions/session-ep-1.parquet")
    (group,) = read_parquet(written)
    (traj,) = group.trajectories
    assert group.group_id == "ep-1" and traj.reward == 0.5
    assert traj.token_ids == recorded["prompt_token_ids"] + recorded["completion_token_ids"]
    assert traj.turns[0].logprobs == recorded["logprobs"]
