"""One trainer rank: turns a batch of groups into an optimizer step on the DeepSpeed engine.

Plain Python: the Ray actor (`trainer_actor.py`) and the `torchrun` entry point
(`python -m forge.trainer.torchrun`) both drive it, so two GPUs can be tested without Ray.

A step: recompute the old logprobs with the current weights (no gradient), and the reference
logprobs if a KL term is on; then, per micro-batch, the current logprobs through the merged
prefix tree, the loss weighted by the micro-batch's share of the batch, and backward; one
optimizer step; then the MoE expert biases move towards balanced load (loads summed over
ranks). The importance ratio is taken against the recomputed old logprobs, so that several
updates on one batch stay well defined; the gap between them and the sampler's logprobs, the
train/inference mismatch that RL on MoE models is sensitive to, is logged every step
(`mismatch/logprob_abs_mean`, `mismatch/logprob_abs_max`, `mismatch/kl`) and, on request, corrected
by importance weights (`algorithm.is_correction`, forge.trainer.mismatch). With MSA on, each step also trains the index branch: `msa.index_loss_weight`
times its KL (mean per token and MSA layer, `train/index_loss`) joins the loss, and every
optimizer step advances the model's `msa_step`, which ends the dense warm-up. An episode split
into context segments counts once in the loss under `algorithm.segment_weighting` 'episode'
(forge.trainer.losses.episode_weights, with the step's sequence and episode counts over all ranks);
a step without such an episode runs the plain per-sequence path.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from forge.middleware.types import Group
from forge.policy.choices import Choices, unpack
from forge.policy.config import ModelConfig
from forge.policy.model import Transformer, advance_msa_step
from forge.policy.moe import update_expert_bias
from forge.prefix_tree import FlatTree, build_tree
from forge.prefix_tree.fallback import should_merge
from forge.trainer.batch import RLBatch, make_batch, micro_batches
from forge.trainer.config import AlgorithmConfig, TrainerConfig
from forge.trainer.engine import all_reduce_max, all_reduce_sum, init_process_group, make_engine
from forge.trainer.logprobs import replay_tree, sequence_scores
from forge.trainer.losses import DEFAULT_REDUCTION, LOSSES, episode_weights
from forge.trainer.mismatch import is_weights, mismatch_stats


@dataclass
class _MicroBatch:
    idx: list[int]
    """Indices of its sequences in the batch."""
    seqs: list[list[int]]
    merge: bool
    """Run it as a prefix tree (its token ratio pays for it)."""
    tree: FlatTree
    """Its prefix tree, built once and reused by every pass of the step."""
    tokens: int
    """Tokens the forward pass computes: unique ones when merged, all otherwise."""
    choices: list[Choices] | None = None
    """Routing replay: each sequence's recorded choices, imposed on every pass (the tree keyed on them)."""


class _PhaseClock:
    """When each phase of a step ended, on the timeline its work completes on: CUDA events on
    a GPU (kernels run after the host queues them, so the host clock would time the queueing),
    the host clock elsewhere. Read `seconds()` only after the step's last device read, which
    waits for every event marked before it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []
        self.mark("start")

    def mark(self, phase: str) -> None:
        """`phase` ends here (its host work is done and its device work queued)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def seconds(self, prefix: str) -> dict[str, float]:
        """`{prefix}{phase}_s`: each phase's time since the end of the one before."""
        out = {}
        for (_, begin), (phase, end) in zip(self.marks, self.marks[1:]):
            out[f"{prefix}{phase}_s"] = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
        return out


KEEP_VERSIONS = 8
"""Published versions whose weights the trainer keeps for algorithm.mismatch_weights 'sampling'."""


class Trainer:
    """The model, its optimizer and the RL step on one data-parallel rank."""

    def __init__(
        self, model_cfg: ModelConfig, cfg: TrainerConfig, algo: AlgorithmConfig, *,
        seed: int = 0, rank: int = 0, world_size: int = 1, init_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        init_process_group(rank, world_size)
        torch.manual_seed(seed)
        model = Transformer(model_cfg)
        if init_weights is not None:
            model.load_state_dict(init_weights)
        self.engine = make_engine(model, cfg)
        self.model: Transformer = self.engine.module
        self.reference: Transformer | None = None
        if algo.kl_coef > 0:
            self.reset_reference()
        self.version = 0
        """Policy version: the number of optimizer steps taken."""
        self.last_router_loads: dict[str, list[float]] = {}
        self.last_mismatch = torch.zeros(0, dtype=torch.float64)
        self.replay_known = [0, 0]
        """Tokens of the last planned batch whose routing-replay record was known, and all its tokens."""
        self._snapshots: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        """Published versions' weights (algorithm.mismatch_weights 'sampling')."""
        self._scratch: Transformer | None = None
        """Tokens per expert of each MoE layer in the last step (summed over ranks), for histograms."""

    def reset_reference(self) -> None:
        """Freeze the current weights as the reference policy of the KL term."""
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def train_step(self, groups: list[Group], lr: float | None = None) -> dict[str, float]:
        """One optimizer step on `groups` (this rank's share of the batch), at `lr` if given (the
        driver's schedule, `TrainerConfig.lr_at`); returns metrics."""
        t0 = time.perf_counter()
        dev = next(self.model.parameters()).device
        clock = _PhaseClock(dev)
        lr = self.cfg.lr if lr is None else float(lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batch = make_batch(groups, self.algo.advantage, self.algo.segment_weighting)
        mbs = self._plan(batch)
        clock.mark("batch")
        # The step makes one update, so the trainer's logprobs "at the start of the step" are those
        # of the forward that trains: taken from it, detached, they cost no pass of their own (20-30%
        # of a step on the CPU, docs/architecture.md). A separate no-grad pass runs only where they are needed
        # before that forward: the importance-sampling correction weights the loss with them, and
        # mismatch_weights 'sampling' scores with kept versions, falling back on them.
        separate = self.algo.is_correction != "none" or self.algo.mismatch_weights == "sampling"
        old: list[torch.Tensor] = self._scores(self.model, batch, mbs) if separate else [torch.empty(0)] * len(batch.sequences)
        coverage = None
        if separate:
            scored, coverage = (self._at_sampling_weights(groups, batch, mbs, old)
                                if self.algo.mismatch_weights == "sampling" else (old, None))
            mismatch, self.last_mismatch = mismatch_stats(scored, batch.sampler_logprobs, batch.masks)
        is_w, is_sums = [], {"weight_sum": 0.0, "reduced": 0.0}
        if self.algo.is_correction != "none":
            is_w, is_sums = is_weights(self.algo.is_correction, self.algo.is_level, self.algo.is_threshold, old,
                                       batch.sampler_logprobs, batch.masks)
        # The reference policy routes as it would on its own: the sampler's records are the policy's.
        ref = self._scores(self.reference, batch, mbs, replay=False) if self.reference is not None else None
        clock.mark("scoring")
        # Every rank scales its loss by its part of the step's global sequences or loss tokens,
        # times the world size, since DeepSpeed averages gradients over ranks: the step then
        # equals one rank training on the whole global batch, whatever share each rank got.
        counts = all_reduce_sum(torch.tensor(
            [float(len(batch.sequences)), float(batch.num_loss_tokens), float(sum(len(s) for s in batch.sequences)),
             float(batch.num_episodes)],
            dtype=torch.float64, device=dev)).tolist()
        totals = {"seqs": counts[0], "tokens": max(counts[1], 1.0), "episodes": counts[3]}
        # Only where some episode of the step (on any rank) has several segments: otherwise every
        # weight would be 1 and the step stays the plain per-sequence one, bit for bit.
        seq_w = None
        if self.algo.segment_weighting == "episode" and totals["episodes"] < totals["seqs"]:
            seq_w = episode_weights(batch.masks, batch.episode_index, self._reduction(), sequences=totals["seqs"],
                                    episodes=totals["episodes"])
        # Sums stay on the device until the step ends: a host read per micro-batch would stall the
        # launch queue between micro-batches (the GPU idles while the next one's kernels queue).
        acc = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("loss", "kl", "entropy", "clipped", "index_loss")}
        self.model.train()
        index_norm = self._index_norm(counts[2])
        for i, mb in enumerate(mbs):
            idx = mb.idx
            scores = sequence_scores(self.model, mb.seqs, merge=mb.merge, with_entropy=True, tree=mb.tree,
                                     with_index_loss=index_norm is not None, padded=self._padded,
                                     temperature=self._temperature, choices=mb.choices)
            masks = [batch.masks[j].to(dev, scores.logprobs[0].dtype) for j in idx]
            if not separate:
                for j, lp in zip(idx, scores.logprobs):
                    old[j] = lp.detach()
            olds = [old[j] for j in idx] if self.algo.ratio_against == "recomputed" else [
                batch.sampler_logprobs[j].to(dev, scores.logprobs[0].dtype) for j in idx]
            adv = batch.advantages[idx].to(dev, scores.logprobs[0].dtype)
            weights = _token_weights(idx, masks, is_w, seq_w)
            loss = LOSSES[self.algo.loss](scores.logprobs, olds, masks, adv, weights=weights, **self._loss_kwargs())
            loss = loss * self._share(idx, [batch.masks[j] for j in idx], totals) * self.world_size
            if ref is not None:
                kl = _kl_k3(scores.logprobs, [ref[j] for j in idx], masks) / totals["tokens"] * self.world_size
                loss = loss + self.algo.kl_coef * kl
                acc["kl"] += kl.detach().double()
            if index_norm is not None:
                index_loss = scores.index_loss / index_norm
                loss = loss + self.model.config.msa.index_loss_weight * index_loss
                acc["index_loss"] += index_loss.detach().double()
            self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            self.engine.backward(loss)
            acc["loss"] += loss.detach().double()
            with torch.no_grad():
                acc["entropy"] += sum((e * m).sum() for e, m in zip(scores.entropies, masks)).double()
                acc["clipped"] += sum(_clipped(lp, o, m, self.algo) for lp, o, m in zip(scores.logprobs, olds, masks)).double()
        if not separate:
            mismatch, self.last_mismatch = mismatch_stats(old, batch.sampler_logprobs, batch.masks)
        clock.mark("forward_backward")
        grad_norm = self._local_grad_norm() if self.cfg.zero_stage == 0 else None
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        advance_msa_step(self.model)
        router = update_expert_bias(self.model, all_reduce=all_reduce_sum)
        clock.mark("optimizer")
        self.last_router_loads = {f"router/load_layer{s.layer}": s.tokens_per_expert for s in router}
        self.version += 1
        tokens = totals["tokens"]
        # The reward of a step is that of its episodes, or of its segments when each is a sample.
        rewards = batch.episode_rewards if self.algo.segment_weighting == "episode" else batch.rewards
        summed = all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (
            acc["loss"], acc["kl"], acc["entropy"], acc["clipped"], float(rewards.sum()), float(rewards.numel()),
            acc["index_loss"], mismatch["abs_sum"], mismatch["k3_sum"], mismatch["tokens"], is_sums["weight_sum"],
            is_sums["reduced"])])).tolist()
        mismatch_max = all_reduce_max(torch.tensor([mismatch["abs_max"]], dtype=torch.float64, device=dev)).item()
        acc["loss"], acc["kl"] = summed[0] / self.world_size, summed[1] / self.world_size
        acc["index_loss"] = summed[6] / self.world_size
        acc["entropy"], acc["clipped"] = summed[2], summed[3]
        reward_mean = summed[4] / max(summed[5], 1.0)
        metrics = {
            "train/loss": acc["loss"], "train/entropy": acc["entropy"] / tokens,
            "train/clip_fraction": acc["clipped"] / tokens, "train/reward_mean": reward_mean,
            "train/loss_tokens": tokens, "train/sequences": totals["seqs"], "train/episodes": totals["episodes"],
            "train/segments_per_episode": totals["seqs"] / max(totals["episodes"], 1.0),
            "train/token_ratio": sum(len(s) for s in batch.sequences) / max(1, sum(mb.tokens for mb in mbs)),
            "train/micro_batches": float(len(mbs)),
            "mismatch/logprob_abs_mean": summed[7] / max(summed[9], 1.0), "mismatch/logprob_abs_max": mismatch_max,
            "mismatch/kl": summed[8] / max(summed[9], 1.0),
            **({"mismatch/at_sampling_weights": coverage} if coverage is not None else {}),
            "train/step_s": time.perf_counter() - t0, "train/policy_version": float(self.version), "train/lr": lr,
        }
        if self.algo.is_correction != "none":
            metrics["mismatch/is_weight_mean"] = summed[10] / max(summed[9], 1.0)
            metrics["mismatch/is_reduced_fraction"] = summed[11] / max(summed[9], 1.0)
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if ref is not None:
            metrics["train/kl"] = acc["kl"]
        if index_norm is not None:
            metrics["train/index_loss"] = acc["index_loss"]
        for stats in router:
            metrics.update(stats.metrics())
        if batch.choices is not None:
            # This rank's tokens whose sampler record was imposed (the rest chose for themselves:
            # the last sampled token, an observation no turn read, a context rewritten in place).
            metrics["replay/known_fraction"] = self.replay_known[0] / max(self.replay_known[1], 1)
        metrics["train/tokens_per_s"] = sum(len(s) for s in batch.sequences) / metrics["train/step_s"]
        # Where the step's time went: building the batch and its micro-batches, the passes
        # without gradients (old logprobs where a separate pass is needed, the reference), the
        # forward and backward passes, the optimizer and the router's bias; the rest of step_s
        # is the statistics' reduction.
        metrics.update(clock.seconds("train/time_"))
        return metrics

    def sft_step(self, sequences: list[list[int]], masks: list[list[int]], lr: float) -> dict[str, float]:
        """One supervised step (warm-start): token-mean NLL over each sequence's masked tokens."""
        t0 = time.perf_counter()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        dev = next(self.model.parameters()).device
        # Demonstrations are micro-batched like RL batches (one "group" each, so the packer
        # may put several in one micro-batch and merge them only where they share enough).
        batch = RLBatch(sequences=[list(s) for s in sequences], masks=[torch.tensor(m[1:], dtype=torch.float64) for m in masks],
                        sampler_logprobs=[], advantages=torch.zeros(len(sequences), dtype=torch.float64),
                        rewards=torch.zeros(len(sequences), dtype=torch.float64), group_sizes=[1] * len(sequences),
                        min_policy_version=0, episode_index=list(range(len(sequences))))
        # The step's loss tokens over all ranks, times the world size (DeepSpeed averages
        # gradients): the step is the token mean of the global batch, as in train_step.
        counts = all_reduce_sum(torch.tensor(
            [float(batch.num_loss_tokens), float(sum(len(s) for s in batch.sequences))], dtype=torch.float64, device=dev
        )).tolist()
        tokens = max(counts[0], 1.0)
        mbs = self._plan(batch)
        self.model.train()
        # Summed on the device, read once after the step (no host read between micro-batches).
        total = torch.zeros((), dtype=torch.float64, device=dev)
        index_total = torch.zeros((), dtype=torch.float64, device=dev)
        index_norm = self._index_norm(counts[1])
        for i, mb in enumerate(mbs):
            scores = sequence_scores(self.model, mb.seqs, merge=mb.merge, tree=mb.tree, padded=self._padded,
                                     with_index_loss=index_norm is not None, choices=mb.choices)
            lps = scores.logprobs
            loss = -sum((lp * batch.masks[j].to(dev, lp.dtype)).sum() for j, lp in zip(mb.idx, lps)) / tokens * self.world_size
            if index_norm is not None:
                index_loss = scores.index_loss / index_norm
                loss = loss + self.model.config.msa.index_loss_weight * index_loss
                index_total += index_loss.detach().double()
            self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            self.engine.backward(loss)
            total += loss.detach().double()
        self.engine.step()
        advance_msa_step(self.model)
        update_expert_bias(self.model, all_reduce=all_reduce_sum)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.cfg.lr
        summed = all_reduce_sum(torch.stack([total, index_total])).tolist()
        total, index_total = summed[0] / self.world_size, summed[1] / self.world_size
        metrics = {"warmstart/loss": total, "warmstart/tokens": float(tokens), "warmstart/micro_batches": float(len(mbs)),
                   "warmstart/step_s": time.perf_counter() - t0}
        if index_norm is not None:
            metrics["warmstart/index_loss"] = index_total
        return metrics

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """Model, optimizer, router biases and this rank's RNG state, through DeepSpeed."""
        state = dict(client_state, version=self.version, torch_rng=torch.get_rng_state())
        self.engine.save_checkpoint(directory, tag=tag, client_state=state)

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        """Restore what `save` wrote; returns the client state."""
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client is None:
            raise FileNotFoundError(f"no checkpoint '{tag}' under {directory}")
        self.version = int(client["version"])
        torch.set_rng_state(client["torch_rng"])
        if self.reference is not None:
            self.reset_reference()
        return client

    def mismatch_log_ratios(self) -> list[float]:
        """The last step's per-token log(trainer / sampler) on this rank's loss tokens (the histogram)."""
        return self.last_mismatch.tolist()

    def router_loads(self) -> dict[str, list[float]]:
        """The last step's tokens per expert, per MoE layer."""
        return self.last_router_loads

    def published(self, version: int) -> None:
        """The driver published the current weights as `version`: with algorithm.mismatch_weights
        'sampling', keep a copy to score that version's samples with."""
        if self.algo.mismatch_weights != "sampling":
            return
        self._snapshots[version] = self.weights()
        while len(self._snapshots) > KEEP_VERSIONS:
            self._snapshots.popitem(last=False)

    def _at_sampling_weights(self, groups: list[Group], batch, mbs, old: list[torch.Tensor]) -> tuple[list, float]:
        """Each sequence's logprobs under the weights that sampled it (where one kept version
        sampled all its turns; else `old`), and the fraction of sequences scored so."""
        versions = [set(t.policy_versions) for g in groups for t in g.trajectories]
        out, covered = list(old), 0
        for v in sorted({next(iter(vs)) for vs in versions if len(vs) == 1} & set(self._snapshots)):
            if self._scratch is None:
                self._scratch = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._scratch.load_state_dict(self._snapshots[v])
            scores = self._scores(self._scratch, batch, mbs)
            for j, vs in enumerate(versions):
                if vs == {v}:
                    out[j], covered = scores[j], covered + 1
        return out, covered / max(1, len(versions))

    def weights(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """A CPU copy of the full weights, for rollout workers. Under ZeRO-3 the gather is a
        collective: every rank must call this together; ranks whose copy nobody reads pass
        keep=False and get {}."""
        gathered = contextlib.nullcontext()
        if self.cfg.zero_stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        with gathered:
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} if keep else {}

    def _index_norm(self, step_tokens: float) -> float | None:
        """Tokens x MSA layers of the step (`step_tokens`, summed over all ranks) over the world
        size, which turn the summed index KL into a mean; None when there is no index loss to train."""
        cfg = self.model.config
        if not cfg.msa.enabled or cfg.msa.index_loss_weight == 0:
            return None
        layers = sum(cfg.is_msa_layer(i) for i in range(cfg.num_layers))
        # Over the world size: DeepSpeed averages gradients, so each rank's sum over this norm
        # adds up to the global mean.
        return max(1.0, step_tokens) * layers / self.world_size

    def _local_grad_norm(self) -> float | None:
        # Without ZeRO every rank holds the full (all-reduced at step) gradient; DeepSpeed
        # reports a norm only for ZeRO stages, so compute it here before the step clears it.
        grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else None

    @property
    def _temperature(self) -> float:
        """The temperature RL tokens are scored at (AlgorithmConfig.temperature; the loop resolves None)."""
        return self.algo.temperature if self.algo.temperature is not None else 1.0

    @property
    def _padded(self) -> bool | None:
        """sequence_scores' `padded` for unmerged micro-batches: its CUDA default, or never."""
        return None if self.cfg.merge.pad_unmerged else False

    def _plan(self, batch: RLBatch) -> list[_MicroBatch]:
        """Micro-batches, each merged only where its token ratio pays for it (should_merge).
        With routing-replay records, counts the tokens they cover (`replay_known`)."""
        plans = []
        self.replay_known = [0, 0]
        for idx in micro_batches(batch, self.cfg.micro_batch_tokens):
            seqs = [batch.sequences[j] for j in idx]
            choices = None
            if batch.choices is not None:
                cfg = self.model.config
                choices = [unpack(cfg, *batch.choices[j], len(batch.sequences[j])) for j in idx]
                for c in choices:
                    known = c.experts[:, 0, 0] >= 0 if c.experts is not None else c.blocks[:, 0, 0, -1] >= 0
                    self.replay_known[0] += int(known.sum())
                    self.replay_known[1] += known.numel()
            tree = build_tree(seqs) if choices is None else replay_tree(seqs, choices)
            merge = should_merge(tree, self.cfg.merge)
            plans.append(_MicroBatch(idx, seqs, merge, tree, tree.num_tokens if merge else sum(len(s) for s in seqs),
                                     choices))
        return plans

    @torch.no_grad()
    def _scores(self, model: Transformer | None, batch: RLBatch, mbs: list[_MicroBatch],
                replay: bool = True) -> list[torch.Tensor]:
        assert model is not None
        out: list[torch.Tensor] = [torch.empty(0)] * len(batch.sequences)
        was_training = model.training
        model.eval()
        for mb in mbs:
            scores = sequence_scores(model, mb.seqs, merge=mb.merge, tree=mb.tree, padded=self._padded,
                                     temperature=self._temperature, choices=mb.choices if replay else None)
            for j, lp in zip(mb.idx, scores.logprobs):
                out[j] = lp.detach()
        model.train(was_training)
        return out

    def _reduction(self) -> str:
        return DEFAULT_REDUCTION[self.algo.loss] if self.algo.reduction == "default" else self.algo.reduction

    def _share(self, idx: list[int], masks: list[torch.Tensor], totals: dict[str, float]) -> float:
        """This micro-batch's weight in the step's loss: a micro-batch's loss is reduced over its
        own sequences, so it is scaled by its part of the sequences (sequence means) or of the
        loss tokens (token mean). `masks` are the batch's host copies: a sum read back from the
        device would stall the launch queue before each micro-batch's backward."""
        if self._reduction() in ("seq_mean", "dr_grpo"):
            return len(idx) / totals["seqs"]
        return float(sum(m.sum() for m in masks)) / totals["tokens"]

    def _loss_kwargs(self) -> dict[str, Any]:
        common = {"reduction": self._reduction(), "dr_grpo_constant": self.algo.dr_grpo_constant}
        if self.algo.loss == "cispo":
            return {"clip_high": 1.0 + self.algo.clip_high, **common}
        return {"clip_low": self.algo.clip_low, "clip_high": self.algo.clip_high, **common}


def _token_weights(idx: list[int], masks: list[torch.Tensor], is_w: list[torch.Tensor],
                   seq_w: torch.Tensor | None) -> list[torch.Tensor] | None:
    """What multiplies the token losses of a micro-batch's sequences (`idx`, with their `masks`):
    the importance weights (`is_w`, empty when off) times the episode weights (`seq_w`, None when
    off); None when neither is on."""
    if seq_w is None:
        return [is_w[j] for j in idx] if is_w else None
    return [float(seq_w[j]) * (is_w[j] if is_w else torch.ones_like(m)) for j, m in zip(idx, masks)]


def _kl_k3(logprobs: list[torch.Tensor], ref: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Summed k3 estimator of KL(policy || reference) over loss tokens (Schulman's unbiased, >= 0)."""
    total = 0.0
    for lp, r, m in zip(logprobs, ref, masks):
        d = r.to(lp.dtype) - lp
        total = total + ((torch.exp(d) - d - 1) * m).sum()
    return total


def _clipped(lp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, algo: AlgorithmConfig) -> torch.Tensor:
    ratio = torch.exp(lp - old.to(lp.dtype))
    out = (ratio < 1 - algo.clip_low) | (ratio > 1 + algo.clip_high)
    return (out.to(mask.dtype) * mask).sum()
