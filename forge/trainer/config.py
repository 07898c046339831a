"""Config of the trainer side: the algorithm, the DeepSpeed engine, warm-start, evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from forge.prefix_tree.fallback import MergeConfig


@dataclass
class AlgorithmConfig:
    """The RL objective."""

    loss: Literal["grpo", "cispo", "ppo_clip"] = "grpo"
    """Policy loss, from forge.trainer.losses.LOSSES."""
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    """Advantage estimator, from forge.trainer.advantages.ADVANTAGES."""
    reduction: Literal["default", "token_mean", "seq_mean", "dr_grpo"] = "default"
    """How token losses average: 'token_mean' over all loss tokens of the step, 'seq_mean' per
    sequence then over sequences, 'dr_grpo' summed per sequence and divided by
    dr_grpo_constant (Dr. GRPO's length-unbiased normalisation); 'default' takes the loss's own
    (seq_mean for grpo, token_mean for ppo_clip and cispo)."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio (1 - clip_low); unused by CISPO."""
    clip_high: float = 0.28
    """Upper clip of the importance ratio (1 + clip_high); CISPO's weight is clipped at this value + 1."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy (the weights RL started from); 0 turns it off."""
    dr_grpo_constant: int = 1024
    """The constant that divides the summed token loss under reduction 'dr_grpo'."""
    segment_weighting: Literal["episode", "segment"] = "episode"
    """How an episode split into context segments (docs/context.md) counts; each segment trains
    with the episode's reward either way. 'episode': advantages are computed over the group's G
    episode rewards, and each episode weighs as one sample in the loss whatever its number of
    segments (seq_mean: its loss tokens' mean over all its segments; dr_grpo: their sum over
    dr_grpo_constant; token_mean counts tokens, so nothing changes). 'segment': each segment is a
    sample of its own (advantages over segments, sequence means per segment), which is what
    treating segments as independent trajectories gives: episodes with more segments weigh more.
    Without segmented episodes the two are the same step."""
    temperature: float | None = None
    """Temperature the trainer scores tokens at (logits / temperature), so that the policy
    gradient and the importance ratio are those of the distribution the samples came from;
    None takes rollout.temperature (1 when rollouts are greedy). Warm-start always scores at 1."""

    ratio_against: Literal["recomputed", "sampler"] = "recomputed"
    """What the loss's importance ratio divides by: 'recomputed', the trainer's logprobs under the
    weights it holds at the start of the step (ratio 1 on the first update, so stale samples are
    not corrected); 'sampler', the sampler's logprobs (the behaviour policy, as in PPO proper and
    AReaL's decoupled PPO), so that the clip bounds how far each step moves from the weights that
    sampled the batch."""
    mismatch_weights: Literal["current", "sampling"] = "current"
    """The weights the logged mismatch (mismatch/*) scores the sampled tokens with: 'current', the
    trainer's at the step (under a lag the gap then includes the policy's change), or 'sampling',
    a copy the trainer keeps of each published version (the last 8), so the gap is the numerics
    of sampler against trainer alone. Costs a forward per version in a batch and the copies."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Importance-sampling correction of the sampler/trainer ratio r = exp(old - sampler)
    (forge.trainer.mismatch): 'tis' weights each token's loss by min(r, is_threshold), 'mis' by r
    where r <= is_threshold and 0 elsewhere; 'none' leaves the loss alone (the gap is still logged)."""
    is_level: Literal["token", "sequence"] = "token"
    """Whether the correction takes each token's ratio or the sequence's (the product over its loss tokens)."""
    is_threshold: float = 2.0
    """The ratio cap C of the correction (> 1)."""

    def __post_init__(self) -> None:
        if not self.is_threshold > 1.0:
            raise ValueError(f"algorithm.is_threshold must be > 1 (a ratio cap), got {self.is_threshold}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"algorithm.temperature must be > 0 (or null for rollout.temperature), got {self.temperature}")


@dataclass
class TrainerConfig:
    """The optimizer, DeepSpeed and batching of the trainer."""

    groups_per_step: int = 8
    """Groups (tasks x G samples) per optimizer step."""
    init_seed: int | None = None
    """Seed of the model's initial weights; None takes run.seed. Fix it to start every seed of
    an experiment from the same weights, as runs from one pretrained checkpoint do."""
    lr: float = 1e-4
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """RL learning rate over `train.steps`: 'cosine' anneals from `lr` towards 0 (half a cosine),
    so the run ends on settled weights rather than mid-stride."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0 to 3."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision; bf16 keeps fp32 master weights in the optimizer."""
    micro_batch_tokens: int = 16384
    """Token budget of one micro-batch (unique tokens after prefix merging)."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """Prefix-tree merging of each micro-batch (exact); off, or below its token ratio, it runs unmerged."""
    num_ranks: int = 1
    """Data-parallel trainer ranks (Ray actors, or processes under torchrun)."""
    gpus_per_rank: float = 0.0
    """GPUs per trainer rank on a Ray cluster; 0 trains on the CPU."""
    cpus_per_rank: float = 1.0
    """CPUs Ray reserves for each trainer rank."""
    resources_per_rank: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each trainer rank needs, e.g. {trainer_node: 1} to pin ranks to nodes started with it."""

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of RL step `step` (counted from 0) of `steps`."""
        return scheduled_lr(self.lr, self.lr_schedule, step, steps)

    def __post_init__(self) -> None:
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.groups_per_step < 1 or self.num_ranks < 1:
            raise ValueError("groups_per_step and num_ranks must be at least 1")
        if self.groups_per_step % self.num_ranks:
            raise ValueError(f"groups_per_step ({self.groups_per_step}) must be a multiple of num_ranks "
                             f"({self.num_ranks}) so every rank gets whole groups")


@dataclass
class WarmStartConfig:
    """Supervised warm-start on the environment's oracle demonstrations, before RL."""

    steps: int = 0
    """Optimizer steps of warm-start; 0 skips it."""
    batch_size: int = 16
    """Demonstrations per step."""
    lr: float = 1e-3
    """Learning rate of warm-start. It steps the trainer's AdamW, whose moments carry on into RL at `trainer.lr`."""
    seed_offset: int = 1_000_000
    """Task seeds of the demonstrations start here, away from the RL and eval seeds."""
    target_reward: float | None = None
    """Stop early once the reward on `check_tasks` validation tasks, sampled at `check_temperature`,
    reaches this; None runs all `steps`. A fixed step count lands wherever the run's numerics put
    it (docs/quickstart.md)."""
    check_temperature: float = 0.0
    """With `target_reward`: sampling temperature of the checks; 0 is greedy."""
    check_every: int = 25
    """With `target_reward`: check every this many steps."""
    check_from: int = 0
    """With `target_reward`: the first step to check at (earlier checks would be wasted time)."""
    check_tasks: int = 64
    """With `target_reward`: validation tasks per check, seeded from `check_seed_offset`."""
    check_seed_offset: int = 20_000_000
    """Validation task seeds start here, apart from the demonstrations', the RL tasks' and the evaluation's."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """'cosine' anneals the learning rate from `lr` towards 0 over the steps (half a cosine), so
    warm-start settles instead of ending mid-stride; docs/quickstart.md says why the default recipe uses it."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"warm_start needs steps >= 0, batch_size >= 1 and lr > 0; got steps={self.steps}, "
                             f"batch_size={self.batch_size}, lr={self.lr}")
        if self.target_reward is not None and (self.check_every < 1 or self.check_tasks < 1):
            raise ValueError(f"warm_start.target_reward needs check_every >= 1 and check_tasks >= 1; got "
                             f"check_every={self.check_every}, check_tasks={self.check_tasks}")

    def checks_at(self, step: int) -> bool:
        """Whether warm-start checks its validation reward after step `step` (counted from 1)."""
        return self.target_reward is not None and step >= self.check_from and step % self.check_every == 0

    def lr_at(self, step: int) -> float:
        """The learning rate of warm-start step `step` (counted from 0)."""
        return scheduled_lr(self.lr, self.lr_schedule, step, self.steps)


@dataclass
class EvalConfig:
    """Held-out evaluation: episodes on tasks never trained on (greedy by default)."""

    every: int = 10
    """Evaluate every this many RL steps (and before the first and after the last)."""
    num_tasks: int = 32
    """Held-out tasks per evaluation."""
    seed_offset: int = 10_000_000
    """Held-out task seeds start here."""
    temperature: float = 0.0
    """Sampling temperature in evaluation; 0 is greedy. `eval/reward_mean` is measured at it."""
    greedy_too: bool = False
    """With temperature > 0, also run the same tasks greedily, logged as `eval/greedy_reward_mean`."""


def scheduled_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of step `step` (from 0) of `steps`: `lr`, or half a cosine from it towards 0."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
    return lr
