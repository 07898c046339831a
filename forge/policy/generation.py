"""Batched sampling from the policy with a KV cache: the local `Generator` of the rollout workers.

Prompts of different lengths batch together, left-padded; padding slots are masked and each
row's positions start at 0 at its first real token, so a row computes what it would alone.
Identical prompts in one call (the G samples of a group) are prefilled once: the unique
prompts run through the model, then their cache rows are copied to every request that shares
them. The copy costs memory, not compute; a paged cache that shares the blocks is the next step
if memory becomes the limit.

Reported logprobs: for each sampled token, its log-probability under the model's own
distribution, log_softmax(logits) at temperature 1 with no top-p truncation, computed in fp32
from the same logits that were sampled from. That is what `Transformer.forward` gives the
trainer for the same tokens, so the importance ratio of an on-policy sample is 1 up to
numerics. The temperature and top-p only shape which token is drawn; a loss that needs the
truncated sampling distribution's probability must recompute it from its own parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch

from forge.policy.model import KVCache, Transformer
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import Tokenizer


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits [B, V] (fp32): (token ids [B], model logprobs [B])."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
            keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < params.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class ModelGenerator:
    """`Generator` over a local `Transformer`: batched, KV-cached, prompt prefill shared."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        seed: int | None = None,
        policy_version: int = 0,
    ) -> None:
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size} "
                "embedding rows; build the model with ModelConfig(vocab_size=tokenizer.vocab_size)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.policy_version = policy_version
        """Version stamped on every Completion; the weight-sync code sets it when it loads weights."""
        device = next(model.parameters()).device
        self._rng = torch.Generator(device=device)
        if seed is not None:
            self._rng.manual_seed(seed)
        else:
            self._rng.seed()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample one continuation per prompt; see the module docstring for the logprobs."""
        if not prompts:
            return []
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; start every prompt with at least one token (e.g. <bos>)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._generate([list(map(int, p)) for p in prompts], params)
        finally:
            self.model.train(was_training)

    def _prefill(self, unique: list[list[int]], capacity: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Run the unique prompts once. Returns their cache (`capacity` slots), key
        validity [U, P] and the logits after each prompt's last token [U, V]."""
        device = self.model.embed.weight.device
        width = max(len(p) for p in unique)
        ids = torch.zeros(len(unique), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(unique), width, dtype=torch.bool, device=device)
        for row, prompt in enumerate(unique):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            valid[row, width - len(prompt) :] = True
        # Left padding: a row's first real token sits at position 0, padding positions clamp to 0.
        positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
        cache = KVCache.allocate(
            self.model.config, len(unique), capacity, device=device, dtype=self.model.embed.weight.dtype
        )
        logits = self.model.forward_cached(ids, positions, cache, valid)  # [U, P, V]
        return cache, valid, logits[:, -1]

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        unique_index: dict[tuple[int, ...], int] = {}
        owner = [unique_index.setdefault(tuple(p), len(unique_index)) for p in prompts]
        unique = [list(p) for p in unique_index]
        width = max(len(p) for p in unique)
        cache, valid, last = self._prefill(unique, width)
        device = last.device
        rows = torch.tensor(owner, device=device)
        cache = cache.select(rows, width + params.max_new_tokens)
        valid, logits = valid[rows], last[rows]  # [B, P], [B, V]
        next_position = torch.tensor([len(p) for p in prompts], device=device)  # [B]
        stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
        tokens_out: list[torch.Tensor] = []
        logprobs_out: list[torch.Tensor] = []
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(params.max_new_tokens):
            tokens, logprobs = sample_next(logits, params, self._rng)
            tokens_out.append(tokens)
            logprobs_out.append(logprobs)
            done = done | torch.isin(tokens, stop)
            if step + 1 == params.max_new_tokens or bool(done.all()):
                break
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            logits = self.model.forward_cached(tokens[:, None], next_position[:, None], cache, valid)[:, -1]
            next_position = next_position + 1
        return self._completions(torch.stack(tokens_out, 1), torch.stack(logprobs_out, 1), params)

    def _completions(self, tokens: torch.Tensor, logprobs: torch.Tensor, params: SamplingParams) -> list[Completion]:
        """Cut each row after its first stop token. tokens, logprobs: [B, steps]."""
        stops = set(params.stop_token_ids)
        out = []
        for ids, lps in zip(tokens.tolist(), logprobs.tolist()):
            end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
            reason = "length" if end is None else "stop"
            end = len(ids) if end is None else end
            out.append(Completion(ids[:end], lps[:end], reason, self.policy_version))
        return out
