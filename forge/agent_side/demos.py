"""Oracle demonstrations for the supervised warm-start, tokenized exactly as rollouts are.

An environment may define `oracle(prompt)`, a generator that yields the text of each assistant
turn and receives each observation (the test suite's oracles reach reward 1 this way). Each
demonstration runs through the same episode code as a rollout (`start_episode`, `apply_turn`),
so its token layout (the <bos>, the markers as special ids, the <eos> that ends a tool-calling
turn, the observations) is the one the policy will meet in RL.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from forge.agent_side.episode import apply_turn, finish, start_episode
from forge.middleware.types import Trajectory
from forge.policy.sampling import Completion
from forge.policy.tokenizer import Tokenizer


def turn_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """The ids a policy samples for a turn: its text, then <eos> unless it stopped at </answer>."""
    ids = tokenizer.encode(text)
    if not text.rstrip().endswith("</answer>"):
        ids.append(tokenizer.eos_id)
    return ids


def oracle_trajectory(make_env: Callable[[], Any], seed: int, tokenizer: Tokenizer, *, timeout_s: float = 30.0) -> Trajectory:
    """One demonstration: the env's oracle played through the rollout episode code."""
    ep = start_episode(make_env, seed, tokenizer, task_id=f"demo:{seed}", group_id=f"demo:{seed}", timeout_s=timeout_s)
    if ep.done:
        raise RuntimeError(f"demonstration {seed}: {ep.traj.failure_reason}")
    oracle = getattr(ep.env, "oracle", None)
    if oracle is None:
        raise TypeError(f"{type(ep.env).__name__} has no oracle(prompt) generator; define one to use warm-start, "
                        "or set warm_start.steps=0")
    # The oracle reads what the agent reads: the prompt as tokenized, after the <bos>.
    policy = oracle(tokenizer.decode(ep.traj.prompt_ids[1:]))
    text = next(policy)
    while True:
        ids = turn_ids(text, tokenizer)
        apply_turn(ep, Completion(ids, [0.0] * len(ids), finish_reason="stop"), tokenizer, timeout_s=timeout_s)
        if ep.done:
            break
        text = policy.send(tokenizer.decode(ep.traj.turns[-1].observation_ids))
    traj = finish(ep)
    if not traj.ok:
        raise RuntimeError(f"demonstration {seed} failed: {traj.failure_reason}")
    return traj


def oracle_batch(make_env: Callable[[], Any], seeds: Sequence[int], tokenizer: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and loss masks of one demonstration per seed."""
    trajs = [oracle_trajectory(make_env, s, tokenizer) for s in seeds]
    return [t.token_ids for t in trajs], [t.loss_mask for t in trajs]
