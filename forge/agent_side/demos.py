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

from forge.agent_side.context import ContextRules
from forge.agent_side.episode import Episode, apply_turn, drop_last_observation, finish, start_episode
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


def oracle_episode(
    make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *, timeout_s: float = 30.0,
    rules: ContextRules | None = None,
) -> list[Trajectory]:
    """One demonstration: the env's oracle played through the rollout episode code; its context
    segments in order (one unless the oracle compacted or `rules` dropped tool results).

    Raises DemonstrationFailed when it does not count (see the module's docstring), and
    TypeError when the env has no oracle.
    """
    ep = start_episode(make_env, seed, tokenizer, task_id=f"demo:{seed}", group_id=f"demo:{seed}",
                       timeout_s=timeout_s, rules=rules)
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
        finish(ep)
    problem = _why_not_a_demonstration(ep.trajectories)
    if problem:
        raise DemonstrationFailed(f"demonstration {seed}: {problem}")
    return ep.trajectories


def oracle_trajectory(make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *, timeout_s: float = 30.0) -> Trajectory:
    """The demonstration of an episode without context management, as one trajectory (`oracle_episode`)."""
    return oracle_episode(make_env, seed, tokenizer, timeout_s=timeout_s)[-1]


def _play(ep: Episode, oracle: Callable[[str], Any], tokenizer: Tokenizer, timeout_s: float, seed: int) -> None:
    """Feed the oracle's turns to the episode until it ends; the oracle failing is the demo failing."""
    try:
        # The oracle reads what the agent reads: the prompt as tokenized, after the <bos>.
        policy = oracle(tokenizer.decode(ep.traj.prompt_ids[1:]))
        text = next(policy)
        while True:
            rules = ep.rules
            if rules is not None and len(ep.context) + rules.max_new_tokens > rules.max_context_tokens:
                # Out of room, as a rollout would be: ends truncated (an oracle must compact in
                # time; the notice in place of a read observation is for the policy's mistakes).
                drop_last_observation(ep)
                return
            ids = turn_ids(text, tokenizer)
            apply_turn(ep, Completion(ids, [0.0] * len(ids), finish_reason="stop"), tokenizer, timeout_s=timeout_s)
            if ep.done:
                return
            text = policy.send(tokenizer.decode(ep.last_observation))
    except StopIteration:
        raise DemonstrationFailed(f"demonstration {seed}: the oracle stopped before the episode ended") from None
    except Exception as exc:
        # Usually an oracle reading a tool result that a failing tool did not give it.
        counts = _error_counts(ep.trajectories)
        errors = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "none"
        raise DemonstrationFailed(f"demonstration {seed}: the oracle raised {type(exc).__name__}: {exc} "
                                  f"(errors in the episode: {errors})") from None


def _error_counts(trajs: list[Trajectory]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trajs:
        for k, n in t.error_counts.items():
            counts[k] = counts.get(k, 0) + n
    return counts


def _why_not_a_demonstration(segments: list[Trajectory]) -> str:
    traj = segments[-1]
    if not traj.ok:
        return traj.failure_reason
    counts = _error_counts(segments)
    failed = {k: counts[k] for k in TOOL_FAILURES if counts.get(k)}
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
    rules: ContextRules | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and loss masks of one demonstration per seed, in the seeds' order; a demonstration
    of several context segments gives one sequence per segment, in order.

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
                trajs.extend(oracle_episode(make_env, spare_seed(seed, retry), tokenizer, rules=rules))
                break
            except DemonstrationFailed as exc:
                failed += 1
                last = " ".join(str(exc).split())[:300]
                retry += 1
                if stats is not None:
                    stats["demos_failed"] = stats.get("demos_failed", 0) + 1
    return [t.token_ids for t in trajs], [t.loss_mask for t in trajs]
