"""Oracle demonstrations for the supervised warm-start, tokenized exactly as rollouts are.

An environment may define `oracle(prompt)`, a generator that yields the text of each assistant
turn and receives each observation (the test suite's oracles reach reward 1 this way). Each
demonstration runs through the same episode code as a rollout (`start_episode`, `apply_turn`),
so its token layout (the <bos>, the markers as special ids, the <eos> that ends a tool-calling
turn, the observations) is the one the policy will meet in RL.

Environments fail (a reset that raises, a tool that hangs or returns garbage), and a warm-start
must not die of it: `oracle_batch` replaces a failed demonstration with one from a spare seed,
up to a bound. A demonstration counts only if its episode ran, no tool call of it failed, the
oracle played to the end, and its answer earned a reward above 0: an oracle that copied an
error or garbage into its answer demonstrates nothing worth imitating.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from forge.agent_side.episode import Episode, apply_turn, finish, start_episode
from forge.middleware.types import Trajectory
from forge.policy.sampling import Completion
from forge.policy.tokenizer import Tokenizer

ATTEMPTS_PER_DEMO = 4
"""`oracle_batch` gives up after this many attempts per demonstration of the batch, all told."""
SPARE_SEED_STRIDE = 2**32
"""The k-th replacement of seed s uses seed s + k * stride: above every seed a recipe uses, so a
spare never repeats another batch's task, nor a validation or evaluation one."""
TOOL_FAILURES = ("tool_error", "tool_timeout")
"""`info['errors']` kinds that mean a tool did not give the oracle its result."""


class DemonstrationFailed(RuntimeError):
    """A demonstration whose episode failed or whose oracle could not finish; one line saying why."""


def turn_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """The ids a policy samples for a turn: its text, then <eos> unless it stopped at </answer>."""
    ids = tokenizer.encode(text)
    if not text.rstrip().endswith("</answer>"):
        ids.append(tokenizer.eos_id)
    return ids


def oracle_trajectory(make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *, timeout_s: float = 30.0) -> Trajectory:
    """One demonstration: the env's oracle played through the rollout episode code.

    Raises DemonstrationFailed when it does not count (see the module's docstring), and
    TypeError when the env has no oracle.
    """
    ep = start_episode(make_env, seed, tokenizer, task_id=f"demo:{seed}", group_id=f"demo:{seed}", timeout_s=timeout_s)
    try:
        if ep.done:
            raise DemonstrationFailed(f"demonstration {seed}: {ep.traj.failure_reason}")
        oracle = getattr(ep.env, "oracle", None)
        if oracle is None:
            raise TypeError(f"{type(ep.env).__name__} has no oracle(prompt) generator; define one to use warm-start, "
                            "or set warm_start.steps=0")
        _play(ep, oracle, tokenizer, timeout_s, seed)
    finally:
        # Closing also releases what a failed episode left behind (a hung tool's thread).
        traj = finish(ep)
    problem = _why_not_a_demonstration(traj)
    if problem:
        raise DemonstrationFailed(f"demonstration {seed}: {problem}")
    return traj


def _play(ep: Episode, oracle: Callable[[str], Any], tokenizer: Tokenizer, timeout_s: float, seed: int) -> None:
    """Feed the oracle's turns to the episode until it ends; the oracle failing is the demo failing."""
    try:
        # The oracle reads what the agent reads: the prompt as tokenized, after the <bos>.
        policy = oracle(tokenizer.decode(ep.traj.prompt_ids[1:]))
        text = next(policy)
        while True:
            ids = turn_ids(text, tokenizer)
            apply_turn(ep, Completion(ids, [0.0] * len(ids), finish_reason="stop"), tokenizer, timeout_s=timeout_s)
            if ep.done:
                return
            text = policy.send(tokenizer.decode(ep.traj.turns[-1].observation_ids))
    except StopIteration:
        raise DemonstrationFailed(f"demonstration {seed}: the oracle stopped before the episode ended") from None
    except Exception as exc:
        # Usually an oracle reading a tool result that a failing tool did not give it.
        errors = ", ".join(f"{k}: {n}" for k, n in sorted(ep.traj.error_counts.items())) or "none"
        raise DemonstrationFailed(f"demonstration {seed}: the oracle raised {type(exc).__name__}: {exc} "
                                  f"(errors in the episode: {errors})") from None


def _why_not_a_demonstration(traj: Trajectory) -> str:
    if not traj.ok:
        return traj.failure_reason
    failed = {k: traj.error_counts[k] for k in TOOL_FAILURES if traj.error_counts.get(k)}
    if failed:
        return f"a tool call failed ({', '.join(f'{k}: {n}' for k, n in failed.items())}), so the oracle went on without its result"
    if not traj.reward > 0:
        return f"the oracle's answer earned reward {traj.reward} (a tool may have returned garbage)"
    return ""


def spare_seed(seed: int, retry: int) -> int:
    """The seed of the `retry`-th replacement of the demonstration of `seed` (0: the seed itself)."""
    return seed + retry * SPARE_SEED_STRIDE


def oracle_batch(
    make_env: Callable[[], Any], seeds: Sequence[int], tokenizer: Tokenizer, *, stats: dict[str, int] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and loss masks of one demonstration per seed, in the seeds' order.

    A demonstration that fails is replaced by its seed's next spare (`spare_seed`); when nothing
    fails, the same seeds give the same demonstrations. After ATTEMPTS_PER_DEMO x len(seeds)
    attempts it raises RuntimeError. `stats['demos_failed']`, if given, is increased by the
    number of failed attempts.
    """
    seeds = [int(s) for s in seeds]
    budget = ATTEMPTS_PER_DEMO * len(seeds)
    attempts = failed = 0
    last = ""
    trajs: list[Trajectory] = []
    for seed in seeds:
        retry = 0
        while True:
            if attempts >= budget:
                raise RuntimeError(
                    f"warm-start: {failed} of {attempts} demonstration attempts failed for a batch of {len(seeds)} "
                    f"(last: {last}); run `forge env check` on the env, fix its oracle, or lower the env.faults rates")
            attempts += 1
            try:
                trajs.append(oracle_trajectory(make_env, spare_seed(seed, retry), tokenizer))
                break
            except DemonstrationFailed as exc:
                failed += 1
                last = " ".join(str(exc).split())[:300]
                retry += 1
                if stats is not None:
                    stats["demos_failed"] = stats.get("demos_failed", 0) + 1
    return [t.token_ids for t in trajs], [t.loss_mask for t in trajs]
