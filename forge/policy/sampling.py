"""The generation interface between rollout workers and the policy: token ids in, ids out.

Rollout workers depend only on the `Generator` protocol, so a scripted policy in tests, the
local model's generator and a remote inference server are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:  # torch stays out of the rollout side's imports
    from forge.policy.choices import Choices


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_new_tokens: int = 256
    """Most tokens to sample for this turn."""
    stop_token_ids: tuple[int, ...] = ()
    """Sampling stops after any of these ids; the stop token is kept in the output."""
    top_logprobs: int = 0
    """Also report, per sampled token, the this-many most likely ids and their logprobs (under
    the same distribution as `Completion.logprobs`) in `Completion.extra["top_logprobs"]`."""


@dataclass
class Completion:
    """What was sampled for one prompt: the exact ids and the sampler's logprob of each."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "length"
    """'stop' (a stop token was sampled) or 'length' (max_new_tokens reached)."""
    policy_version: int = 0
    """Version of the weights that sampled these tokens."""
    extra: dict = field(default_factory=dict)
    choices: Choices | None = None
    """Routing replay (forge.policy.choices): the MoE experts and MSA blocks of every token of
    prompt + completion as the sampler ran them ([len(prompt) + len(token_ids)] leading; the
    last sampled token, never run, unknown). Only from a generator that records them."""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs; "
                "the generator must report one logprob per sampled token"
            )


class Generator(Protocol):
    """Samples continuations of token-id prompts. Prompts may differ in length."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]: ...
