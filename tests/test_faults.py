"""Fault injection (`forge.agent_side.faults`) and the paths that must survive it: episodes,
rollout workers, warm-start demonstrations.

Each fault at rate 1 does what it says and is counted; rates 0 change nothing, token for token;
the draws replay under a seed. A calculator whose reset fails 8% of the time and whose tool
fails, hangs, floods or dies 25% of the time must cost groups and demonstrations, never a run.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from envs.calculator import CalculatorEnv
from envs.python_env import PythonEnv
from forge.agent_side import tool
from forge.agent_side.config import EnvConfig, RolloutConfig
from forge.agent_side.demos import (
    ATTEMPTS_PER_DEMO,
    DemonstrationFailed,
    oracle_batch,
    oracle_trajectory,
    spare_seed,
    turn_ids,
)
from forge.agent_side.env import PRINTABLE
from forge.agent_side.episode import apply_turn, finish, start_episode
from forge.agent_side.faults import GARBAGE_KINDS, FaultConfig, InjectedFault, faulty_class, with_faults
from forge.agent_side.rollout import RolloutWorker
from forge.config import ConfigError, RecipeConfig, dump_yaml, load_recipe
from forge.policy.protocol import render_tool_call, tool_results
from forge.policy.sampling import Completion
from forge.policy.tokenizer import ByteTokenizer
from test_agent_rollout import ScriptedGenerator

TOK = ByteTokenizer()
CALL = render_tool_call("calculate", {"expression": "(3 + 4) * 2"})


class QuickCalc(CalculatorEnv):
    """The calculator with a tool time limit short enough for tests."""

    tool_timeout_s = 0.05


def begin(env, seed: int = 0):
    return start_episode(lambda: env, seed, TOK, task_id="t", group_id="g", timeout_s=5.0)


def turn(ep, text: str) -> None:
    ids = turn_ids(text, TOK)
    apply_turn(ep, Completion(ids, [0.0] * len(ids), finish_reason="stop"), TOK, timeout_s=5.0)


def observation(ep) -> str:
    return TOK.decode(ep.traj.turns[-1].observation_ids)


# (config, what the episode shows after a reset and one tool-calling turn)
AT_RATE_ONE = {
    "reset_error": "raised: env.reset raised InjectedFault: injected fault: QuickCalc.reset failed",
    "step_error": "raised: env.step raised InjectedFault: injected fault: QuickCalc.step failed",
    "tool_error": "error: InjectedFault: injected fault: tool 'calculate' failed",
    "tool_hang": "error: tool 'calculate' ran past its time limit of 0.05 s",
    "tool_crash": "error: ChildProcessError: injected fault: the process behind tool 'calculate' died",
}


@pytest.mark.parametrize("kind", list(AT_RATE_ONE))
def test_each_fault_at_rate_one_does_what_it_says_and_is_counted(kind):
    cls = with_faults(QuickCalc, FaultConfig(**{kind: 1.0}, hang_s=5.0))
    env = cls()
    ep = begin(env)
    if not ep.done:
        t0 = time.monotonic()
        turn(ep, CALL)
        assert time.monotonic() - t0 < 1.0
    shown = ep.traj.failure_reason if kind.endswith(("reset_error", "step_error")) else observation(ep)
    assert AT_RATE_ONE[kind] in shown
    assert env.injected == {kind: 1} and cls.injected_total == {kind: 1}
    if kind.startswith("tool"):
        caught = "tool_timeout" if kind == "tool_hang" else "tool_error"
        assert ep.traj.ok and ep.traj.error_counts == {caught: 1}
    finish(ep)


def test_a_hung_tool_wakes_when_its_env_closes():
    env = with_faults(QuickCalc, FaultConfig(tool_hang=1.0, hang_s=30.0))()
    ep = begin(env)
    turn(ep, CALL)
    assert ep.traj.error_counts == {"tool_timeout": 1}
    sleepers = [t for t in threading.enumerate() if t.name == "forge-call-calculate"]
    assert sleepers and all(t.is_alive() for t in sleepers)
    finish(ep)
    for t in sleepers:
        t.join(1.0)
        assert not t.is_alive()


def test_default_hang_passes_the_tools_own_limit():
    env = with_faults(QuickCalc, FaultConfig(tool_hang=1.0))()
    assert env._hang_seconds("calculate") == pytest.approx(1.05)


class SleepEnv(QuickCalc):
    """A tool that runs a child process, as tools that wrap a program or a server do."""

    tool_timeout_s = 10.0

    @tool
    def wait(self, seconds: str) -> str:
        """Sleep in a child process and report its exit status.

        Args:
            seconds: How long the child sleeps.
        """
        return f"exit {subprocess.run(['sleep', seconds]).returncode}"


needs_proc = pytest.mark.skipif(not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children"),
                                reason="killing a tool's child needs /proc/<pid>/task/<tid>/children (Linux)")


@needs_proc
def test_tool_crash_kills_the_child_process_of_a_tool():
    env = with_faults(SleepEnv, FaultConfig(tool_crash=1.0))()
    ep = begin(env)
    t0 = time.monotonic()
    turn(ep, render_tool_call("wait", {"seconds": "5"}))
    assert time.monotonic() - t0 < 2.0
    assert tool_results(observation(ep)) == ["exit -9"]
    assert env.injected == {"tool_crash": 1} and env.children_killed == 1
    finish(ep)


@needs_proc
def test_tool_crash_kills_the_sandbox_of_the_python_env():
    env = with_faults(PythonEnv, FaultConfig(tool_crash=1.0))()
    ep = begin(env)
    turn(ep, render_tool_call("run_python", {"code": "import time\ntime.sleep(3)\nprint(42)"}))
    (result,) = tool_results(observation(ep))
    assert "42" not in result and "[exit code -9]" in result
    assert env.children_killed == 1
    finish(ep)


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
def test_hostile_tool_output_never_crashes_the_episode(kind):
    env = with_faults(QuickCalc, FaultConfig(tool_garbage=1.0, garbage_kinds=(kind,)))()
    ep = begin(env)
    turn(ep, CALL)
    assert ep.traj.ok and not ep.done and env.injected == {"tool_garbage": 1}
    obs = observation(ep)
    assert set(obs) <= set(PRINTABLE)
    # Megabytes are cut to the env's bound; escapes and the result's markup add a little.
    assert len(obs) < env.max_result_chars + 200
    (result,) = tool_results(obs)
    if kind == "flood":
        assert "more characters cut" in result
    if kind == "bad_text":
        # Lone surrogates and control characters come through as escapes, and the markers the
        # text holds cannot close the result or start an answer.
        assert "\\udcc3" in result and "\\x00" in result and "\\x1b" in result
    turn(ep, "<answer>14</answer>")
    assert ep.traj.ok and ep.done
    finish(ep)


def test_zero_rates_leave_the_env_unchanged_token_for_token():
    cls = with_faults(CalculatorEnv, FaultConfig())
    plain, faulty = CalculatorEnv(), cls()
    assert isinstance(faulty, CalculatorEnv) and faulty.tool_schemas() == plain.tool_schemas()
    assert faulty.render_prompt("x") == plain.render_prompt("x")
    for seed in range(5):
        a = oracle_trajectory(CalculatorEnv, seed, TOK)
        b = oracle_trajectory(cls, seed, TOK)
        assert (a.token_ids, a.loss_mask, a.reward) == (b.token_ids, b.loss_mask, b.reward)
    assert cls.injected_total == {}
    assert type(EnvConfig().make()) is CalculatorEnv


def test_env_config_turns_faults_on_and_counts_across_envs():
    cfg = EnvConfig(cls="envs.calculator:CalculatorEnv", faults=FaultConfig(reset_error=1.0, seed=123))
    envs = [cfg.make() for _ in range(3)]
    assert all(isinstance(e, CalculatorEnv) and type(e).__name__ == "FaultyCalculatorEnv" for e in envs)
    assert len({type(e) for e in envs}) == 1 and type(envs[0]) is faulty_class(CalculatorEnv, cfg.faults)
    for env in envs:
        with pytest.raises(InjectedFault):
            env.reset(seed=0)
    assert type(envs[0]).injected_total == {"reset_error": 3}


def record(cls: type, seeds: list[int]) -> list[tuple]:
    """What each of a run of episodes went through: its fault counts, failure and tokens."""
    out = []
    for seed in seeds:
        ep = begin(cls(), seed)
        if not ep.done:
            turn(ep, CALL)
        if not ep.done:
            turn(ep, "<answer>14</answer>")
        out.append((dict(ep.env.injected) if ep.env else {}, ep.traj.failure_reason, ep.traj.token_ids))
        finish(ep)
    return out


MIXED = dict(reset_error=0.2, step_error=0.1, tool_error=0.2, tool_garbage=0.2, garbage_kinds=("dict", "nan", "bytes"))


def test_injection_is_deterministic_under_a_seed():
    seeds = [s for s in range(20) for _ in range(2)]
    first = record(with_faults(QuickCalc, FaultConfig(**MIXED, seed=5)), seeds)
    again = record(with_faults(QuickCalc, FaultConfig(**MIXED, seed=5)), seeds)
    other = record(with_faults(QuickCalc, FaultConfig(**MIXED, seed=6)), seeds)
    assert first == again and first != other
    kinds = {k for injected, _, _ in first for k in injected}
    assert kinds == {"reset_error", "step_error", "tool_error", "tool_garbage"}
    # Two resets with one seed (a group's members, a rerun) draw different faults.
    assert any(first[i][0] != first[i + 1][0] for i in range(0, len(first), 2))


CHAOS = FaultConfig(reset_error=0.08, tool_error=0.07, tool_hang=0.06, tool_garbage=0.06, tool_crash=0.06, hang_s=0.5)


def calculator_policy(context: str) -> str:
    """Call the tool once with the story's expression, then answer whatever it returned."""
    try:
        results = tool_results(context)
        if not results:
            return next(CalculatorEnv().oracle(context))
        return f"<answer>{results[-1][:40]}</answer>"
    except Exception:
        return "<answer>0</answer>"


def test_rollout_worker_survives_a_faulty_calculator():
    cls = with_faults(QuickCalc, CHAOS)
    gen = ScriptedGenerator(calculator_policy)
    cfg = RolloutConfig(group_size=4, concurrency=16, max_retries=2, turn_timeout_s=2.0, episode_timeout_s=20.0,
                        max_new_tokens=300)
    worker = RolloutWorker(cls, gen, TOK, cfg, env_name="calc")
    seeds = list(range(24))
    result = worker.run(seeds)
    worker.close()
    stats = result.stats
    assert stats.groups_done + stats.groups_dropped == len(seeds) and len(result.groups) == stats.groups_done
    assert stats.groups_retried > 0 and stats.groups_done >= 20
    for group in result.groups:
        assert len(group.trajectories) == 4 and all(t.ok for t in group.trajectories)
    injected = cls.injected_total
    assert set(injected) == {"reset_error", "tool_error", "tool_hang", "tool_garbage", "tool_crash"}
    # Every fault injected was caught where it belongs: a failed reset fails its trajectory,
    # a failed or hung tool is an error result the policy reads.
    assert stats.failure_reasons["raised"] == injected["reset_error"]
    assert set(stats.failure_reasons) <= {"raised", "cancelled"}
    assert stats.protocol_errors["tool_error"] == injected["tool_error"] + injected["tool_crash"]
    assert stats.protocol_errors["tool_timeout"] == injected["tool_hang"]
    assert any(t.reward == 1.0 for g in result.groups for t in g.trajectories)


def test_oracle_batch_returns_full_batches_over_a_faulty_calculator():
    cls = with_faults(QuickCalc, CHAOS)
    seeds = list(range(100, 116))
    stats: dict[str, int] = {}
    seqs, masks = oracle_batch(cls, seeds, TOK, stats=stats)
    assert len(seqs) == len(masks) == len(seeds) and stats["demos_failed"] > 0
    # Each demonstration is the plain env's for its seed or one of that seed's spares, in order;
    # faults never leak into one.
    for seed, ids, mask in zip(seeds, seqs, masks):
        spares = [oracle_trajectory(QuickCalc, spare_seed(seed, k), TOK) for k in range(4)]
        assert any((t.token_ids, t.loss_mask) == (ids, mask) for t in spares)
    assert sum(cls.injected_total.values()) >= stats["demos_failed"]


def test_oracle_batch_is_unchanged_when_nothing_fails():
    seeds = [7, 3, 11]
    seqs, masks = oracle_batch(CalculatorEnv, seeds, TOK, stats=(stats := {}))
    trajs = [oracle_trajectory(CalculatorEnv, s, TOK) for s in seeds]
    assert seqs == [t.token_ids for t in trajs] and masks == [t.loss_mask for t in trajs]
    assert stats == {}


def test_oracle_batch_gives_up_with_a_one_line_error_that_names_the_fix():
    stats: dict[str, int] = {}
    with pytest.raises(RuntimeError) as info:
        oracle_batch(with_faults(QuickCalc, FaultConfig(reset_error=1.0)), [0, 1], TOK, stats=stats)
    text = str(info.value)
    assert "\n" not in text and f"{2 * ATTEMPTS_PER_DEMO} of {2 * ATTEMPTS_PER_DEMO} demonstration attempts failed" in text
    assert "injected fault" in text and "env.faults" in text and "forge env check" in text
    assert stats == {"demos_failed": 2 * ATTEMPTS_PER_DEMO}


class FragileOracleEnv(QuickCalc):
    """An oracle that indexes the tool's results without looking, as quick oracles do."""

    def oracle(self, prompt):
        reply = yield CALL
        yield f"<answer>{tool_results(reply)[1]}</answer>"


@pytest.mark.parametrize("cls, reason", [
    (with_faults(QuickCalc, FaultConfig(tool_error=1.0)), "a tool call failed (tool_error: 1)"),
    (with_faults(QuickCalc, FaultConfig(tool_garbage=1.0, garbage_kinds=("none",))), "earned reward 0.0"),
    (with_faults(QuickCalc, FaultConfig(step_error=1.0)), "raised: env.step raised InjectedFault"),
    (FragileOracleEnv, "the oracle raised IndexError"),
], ids=["error-result", "garbage-result", "step-raised", "oracle-raised"])
def test_a_demonstration_that_meets_a_fault_fails_as_a_demonstration(cls, reason):
    with pytest.raises(DemonstrationFailed, match=reason.replace("(", r"\(").replace(")", r"\)")):
        oracle_trajectory(cls, 0, TOK)


@pytest.mark.parametrize("kwargs, message", [
    ({"reset_error": 1.5}, r"reset_error must be a probability in \[0, 1\], got 1.5"),
    ({"tool_hang": -0.1}, r"tool_hang must be a probability"),
    ({"tool_error": 0.6, "tool_hang": 0.6}, r"tool_error \+ tool_hang \+ tool_garbage \+ tool_crash = 1.2; .* at most 1"),
    ({"garbage_kinds": ("flod",)}, r"unknown kind 'flod'; did you mean 'flood'\?"),
    ({"garbage_kinds": "flood"}, r"write \[flood\]"),
    ({"tool_garbage": 0.1, "garbage_kinds": ()}, r"garbage_kinds is empty"),
    ({"flood_chars": 0}, r"flood_chars must be a positive integer"),
    ({"hang_s": 0.0}, r"hang_s must be a positive number"),
])
def test_fault_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaultConfig(**kwargs)


def test_recipes_turn_faults_on_under_env(tmp_path):
    path = tmp_path / "chaos.yaml"
    path.write_text("env:\n  cls: envs.calculator:CalculatorEnv\n  faults:\n    reset_error: 0.08\n"
                    "    tool_error: 0.1\n    garbage_kinds: [flood, dict]\n    seed: 3\n")
    cfg = load_recipe(path, ["env.faults.tool_hang=0.05"])
    assert cfg.env.faults == FaultConfig(reset_error=0.08, tool_error=0.1, tool_hang=0.05,
                                         garbage_kinds=("flood", "dict"), seed=3)
    assert "faults:" in dump_yaml(cfg) and not RecipeConfig().env.faults.enabled
    path.write_text("env:\n  faults:\n    reset_eror: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'env.faults.reset_eror'; did you mean 'env.faults.reset_error'"):
        load_recipe(path)
    path.write_text("env:\n  faults:\n    tool_hang: 2\n")
    with pytest.raises(ConfigError, match=r"env.faults: tool_hang must be a probability in \[0, 1\], got 2.0"):
        load_recipe(path)
