"""Batched sampling from the policy with a KV cache: the local `Generator` of the rollout workers.

Prompts of different lengths batch together, left-padded; padding slots are masked and each
row's positions start at 0 at its first real token, so a row computes what it would alone.
Identical prompts in one call (the G samples of a group) are prefilled once: the unique
prompts run through the model, then their cache rows are copied to every request that shares
them. The copy costs memory, not compute; a paged cache that shares the blocks is the next step
if memory becomes the limit.

Decoding steps: on CUDA the step after the prefill runs `Transformer.forward_decode`, whose
shapes are fixed for the whole call and which never reads the device from the host, captured
once per call in a CUDA graph and replayed for every later token. A small model's decoding
step is otherwise bound by the host (about 1,200 kernel launches per step for the 100M MoE + MSA
preset, docs/benchmarks.md "One H100"); the replay is one launch. Sampling stays outside the
graph, so the random stream is the eager one. `decode="eager"` turns it off; `"static"` runs
the fixed-shape step without a graph (on any device: the tests compare it with the eager one).
With the graph, whether every row has stopped is read on the host only every
`GRAPH_DONE_CHECK_EVERY` steps: a read waits for the device, and one per step kept the GPU idle
while the host launched the next step (about a fifth of a 64-row call on an H100). Rows that
stopped sample on until the check, and their completions are cut at their stop as always.

Reported logprobs: for each sampled token, its log-probability under the distribution it was
drawn from before top-p truncation, log_softmax(logits / temperature) (temperature 1 for
greedy decoding), computed in fp32 from the same logits that were sampled from. That is what
the trainer scores for the same tokens at `algorithm.temperature` (default the rollout
temperature), so the importance ratio of an on-policy sample is 1 up to numerics. Top-p only
shapes which token is drawn; a loss that needs the truncated distribution's probability must
recompute it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, get_args

import torch

from forge.policy.choices import ChoiceRecorder, Choices, concat, unknown
from forge.policy.model import KVCache, Transformer
from forge.policy.prefix_cache import CachedPrefix, PrefixCache
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import Tokenizer

DecodeMode = Literal["auto", "eager", "static", "graph"]
GRAPH_DONE_CHECK_EVERY = 16
"""Decoding steps between two host reads of "every row stopped" when the step runs in a graph."""
GRAPH_MIN_NEW_TOKENS = 8
"""`decode="auto"` captures a graph only for calls that may sample at least this many tokens:
the capture costs about two eager steps."""


def _logprobs(logits: torch.Tensor, params: SamplingParams, invariant: bool) -> torch.Tensor:
    """log_softmax(logits / temperature) [B, V]; with `invariant` (model.batch_invariant) taken
    in fp64 and rounded once, as the trainer's scores are (forge.trainer.logprobs)."""
    tempered = logits / params.temperature if params.temperature > 0 else logits
    if invariant:
        return torch.log_softmax(tempered.double(), dim=-1).to(logits.dtype)
    return torch.log_softmax(tempered, dim=-1)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, *, invariant: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits [B, V] (fp32): (token ids [B], their logprobs [B] under
    softmax(logits / temperature), temperature 1 when greedy; see `_logprobs` for `invariant`)."""
    logprobs = _logprobs(logits, params, invariant)  # [B, V]
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


def _top_logprobs(logits: torch.Tensor, params: SamplingParams, invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `params.top_logprobs` largest logprobs [B, k] and their ids [B, k], under the
    distribution `sample_next` reports logprobs of."""
    logprobs = _logprobs(logits, params, invariant)
    return logprobs.topk(min(params.top_logprobs, logprobs.shape[-1]), dim=-1)


class ModelGenerator:
    """`Generator` over a local `Transformer`: batched, KV-cached, prompt prefill shared."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        seed: int | None = None,
        policy_version: int = 0,
        decode: DecodeMode = "auto",
        prefix_cache_tokens: int = 0,
        record_choices: bool = False,
    ) -> None:
        if decode not in get_args(DecodeMode):
            raise ValueError(f"decode must be one of {', '.join(get_args(DecodeMode))}, got {decode!r}")
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
        if decode == "graph" and device.type != "cuda":
            raise ValueError(f"decode='graph' needs the model on a CUDA device, it is on {device}; use 'auto'")
        self.decode = decode
        """How decoding steps run: see the module docstring."""
        self.record_choices = record_choices
        """Report every token's MoE experts and MSA blocks in `Completion.choices` (routing
        replay, forge.policy.choices), for the trainer to impose."""
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        """Keys of recent sequences, so a conversation's next turn prefills only its new tokens
        (forge.policy.prefix_cache); None unless `prefix_cache_tokens` > 0."""
        self._cache_version = policy_version
        self._rng = torch.Generator(device=device)
        if seed is not None:
            self._rng.manual_seed(seed)
        else:
            self._rng.seed()

    def reseed(self, seed: int) -> None:
        """Restart sampling at `seed` with an empty prefix cache: what follows depends on the
        weights, the prompts and `seed` only, not on what this generator sampled before."""
        self._rng.manual_seed(int(seed))
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample one continuation per prompt; see the module docstring for the logprobs."""
        if not prompts:
            return []
        return self.generate_prefilled([self.prefill(prompts)], params)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefilled:
        """Run the prompts through the model (each distinct prompt once), ready for
        `generate_prefilled`: a caller that receives prompts over time (the gateway's engine)
        prefills each batch as it comes, while the rest are still arriving, and samples them all
        in one call. Consumes no randomness, so where the prefill happened does not change what
        is sampled after a `reseed`. Each part keeps its keys until the call copies them into the
        call's cache (grown for the new tokens), as one call's own prefill is copied."""
        if not prompts:
            raise ValueError("prefill takes at least one prompt")
        rows = [list(map(int, p)) for p in prompts]
        for i, prompt in enumerate(rows):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; start every prompt with at least one token (e.g. <bos>)")
        if self.prefix_cache is not None and self._cache_version != self.policy_version:
            # New weights: every kept key is stale.
            self.prefix_cache.clear()
            self._cache_version = self.policy_version
        unique_index: dict[tuple[int, ...], int] = {}
        owner = [unique_index.setdefault(tuple(p), len(unique_index)) for p in rows]
        with self._eval(), torch.no_grad():
            cache, valid, last, choices = self._prefill([list(p) for p in unique_index])
        return Prefilled(rows, owner, cache, valid, last, self.policy_version, choices)

    def generate_prefilled(self, parts: Sequence[Prefilled], params: SamplingParams) -> list[Completion]:
        """Sample one continuation for every prompt of `parts` (in order) in one decoding call.
        A part prefilled under other weights (`policy_version` changed since) is prefilled again."""
        parts = [p if p.policy_version == self.policy_version else self.prefill(p.prompts) for p in parts]
        if not parts:
            return []
        with self._eval(), torch.no_grad():
            return self._generate(parts, params)

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _prefill(self, unique: list[list[int]]) -> tuple[KVCache, torch.Tensor, torch.Tensor, list[Choices] | None]:
        """Run the unique prompts once, after whatever prefix of each the prefix cache holds.
        Returns their cache, key validity [U, W], the logits after each prompt's last token [U, V]
        and, when recording, each prompt's choices ([len] leading; cached ones from the cache).

        Layout of the W = P + S dense slots: row r's cached prefix (p_r tokens) ends at slot P =
        max p_r and its new tokens end at slot W, each left-padded; a row's positions count from
        0 at its first real token. With nothing cached this is the plain left-padded batch.
        """
        device = self.model.embed.weight.device
        hits = [self.prefix_cache.lookup(u) if self.prefix_cache is not None else (None, 0) for u in unique]
        p = [n for _, n in hits]
        big_p, big_s = max(p), max(len(u) - n for u, n in zip(unique, p))
        ids = torch.zeros(len(unique), big_s, dtype=torch.long)
        positions = torch.zeros(len(unique), big_s, dtype=torch.long)
        valid = torch.zeros(len(unique), big_p + big_s, dtype=torch.bool)
        for row, (prompt, n) in enumerate(zip(unique, p)):
            s = len(prompt) - n
            ids[row, big_s - s :] = torch.tensor(prompt[n:])
            # Padding takes the row's first new position: masked in dense layers, never written in MSA ones.
            positions[row] = n
            positions[row, big_s - s :] = torch.arange(n, len(prompt))
            valid[row, big_p - n : big_p] = True
            valid[row, big_p + big_s - s :] = True
        cache = KVCache.allocate(
            self.model.config, len(unique), big_p + big_s, device=device, dtype=self.model.embed.weight.dtype
        )
        for row, ((entry, n), prompt) in enumerate(zip(hits, unique)):
            if entry is not None:
                _restore(cache, row, entry, n, big_p)
        cache.length = big_p
        valid = valid.to(device)
        rec = ChoiceRecorder() if self.record_choices else None
        logits = self.model.forward_cached(ids.to(device), positions.to(device), cache, valid, record=rec)  # [U, S, V]
        choices = None
        if rec is not None:
            new = rec.choices()  # [U, S, ...], left-padded
            choices = []
            for row, ((entry, n), prompt) in enumerate(zip(hits, unique)):
                mine = new.rows((row, slice(big_s - (len(prompt) - n), big_s)))
                if entry is None:
                    choices.append(mine)
                    continue
                # An entry kept without a record (none can be, within one generator) is unknown.
                cached = (entry.choices.rows(slice(0, n)) if entry.choices is not None
                          else unknown(self.model.config, 1, n).rows(0))
                choices.append(concat([cached.to(device), mine]))
        return cache, valid, logits[:, -1], choices

    def _keep(self, prompts: list[list[int]], done: list[Completion], cache: KVCache, valid: torch.Tensor,
              width: int, fed: int, choices: list[Choices] | None = None) -> None:
        """Put every row's prompt and its fed-back sampled tokens, with their keys, in the prefix cache.
        valid: [B, width] prefill key validity per row; fed: decoding steps that ran."""
        cols = valid.cpu()
        for r, (prompt, completion) in enumerate(zip(prompts, done)):
            tail = completion.token_ids[: min(fed, max(len(completion.token_ids) - 1, 0))]
            tokens = prompt + tail
            dense_cols = torch.cat([cols[r].nonzero()[:, 0], width + torch.arange(len(tail))]).to(valid.device)
            k, v, ik = [], [], []
            for i in range(len(cache.k)):
                if cache.ik and cache.ik[i] is not None:  # MSA layer: slot = position
                    k.append(cache.k[i][r, : len(tokens)].clone())
                    v.append(cache.v[i][r, : len(tokens)].clone())
                    ik.append(cache.ik[i][r, : len(tokens)].clone())
                else:  # dense layer: [Hkv, slots, D], this row's real slots in order
                    k.append(cache.k[i][r][:, dense_cols].transpose(0, 1).contiguous())
                    v.append(cache.v[i][r][:, dense_cols].transpose(0, 1).contiguous())
                    ik.append(None)
            self.prefix_cache.store(tokens, k, v, ik,
                                    None if choices is None else choices[r].rows(slice(0, len(tokens))))

    def _generate(self, parts: list[Prefilled], params: SamplingParams) -> list[Completion]:
        prompts = [p for part in parts for p in part.prompts]
        cache, valid, logits = _join(parts, params.max_new_tokens)  # every row; [B, P], [B, V]
        width = valid.shape[1]
        device = logits.device
        next_position = torch.tensor([len(p) for p in prompts], device=device)  # [B]
        stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
        tokens_out: list[torch.Tensor] = []
        logprobs_out: list[torch.Tensor] = []
        top_out: list[tuple[torch.Tensor, torch.Tensor]] = []
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        mode = self._mode(params)
        static = None if mode == "eager" else _StaticDecode(
            self.model, cache, valid, next_position, width + params.max_new_tokens, graph=mode == "graph",
            min_position=min(map(len, prompts)), record=self.record_choices)
        fed_choices: list[Choices] = []  # [B, 1, ...] per decoding step: the choices of the token fed
        check_every = GRAPH_DONE_CHECK_EVERY if mode == "graph" else 1
        invariant = self.model.config.batch_invariant
        for step in range(params.max_new_tokens):
            tokens, logprobs = sample_next(logits, params, self._rng, invariant=invariant)
            tokens_out.append(tokens)
            logprobs_out.append(logprobs)
            if params.top_logprobs:
                top_out.append(_top_logprobs(logits, params, invariant))
            done = done | torch.isin(tokens, stop)
            if step + 1 == params.max_new_tokens or ((step + 1) % check_every == 0 and bool(done.all())):
                break
            if static is not None:
                logits = static.step(tokens)
                if static.choices is not None:
                    fed_choices.append(static.choices)
                continue
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            rec = ChoiceRecorder() if self.record_choices else None
            logits = self.model.forward_cached(tokens[:, None], next_position[:, None], cache, valid,
                                               record=rec)[:, -1]
            if rec is not None:
                fed_choices.append(rec.choices())
            next_position = next_position + 1
        done_list = self._completions(torch.stack(tokens_out, 1), torch.stack(logprobs_out, 1), params)
        row_choices = None
        if self.record_choices:
            row_choices = self._row_choices(parts, fed_choices, done_list)
        if top_out:
            values = torch.stack([v for v, _ in top_out], 1).tolist()  # [B, steps, k]
            ids = torch.stack([i for _, i in top_out], 1).tolist()
            for row, completion in enumerate(done_list):
                n = len(completion.token_ids)
                completion.extra["top_logprobs"] = [list(zip(ids[row][j], values[row][j])) for j in range(n)]
        if self.prefix_cache is not None:
            self._keep(prompts, done_list, cache, valid[:, :width], width, len(tokens_out) - 1, row_choices)
        return done_list

    def _row_choices(self, parts: list[Prefilled], fed: list[Choices], done: list[Completion]) -> list[Choices]:
        """Each row's choices over prompt + completion (set on `done`'s completions, on the CPU):
        the prompt's from the prefill, then those of each sampled token the decoding fed back
        (the last sampled token, if it never ran, unknown)."""
        on_cpu = [[c.to("cpu") for c in part.choices] for part in parts]  # one copy per unique prompt
        prompt = [on_cpu[i][o] for i, part in enumerate(parts) for o in part.owner]
        sampled = concat(fed, dim=1).to("cpu") if fed else None  # [B, len(fed), ...], one copy
        rows = []
        for r, completion in enumerate(done):
            n = len(completion.token_ids)
            ran = min(n, len(fed))
            pieces = [prompt[r]]
            if ran:
                pieces.append(sampled.rows((r, slice(0, ran))))
            if n > ran:
                pieces.append(unknown(self.model.config, 1, n - ran).rows(0))
            mine = concat(pieces)
            completion.choices = mine
            rows.append(mine)
        return rows

    def _mode(self, params: SamplingParams) -> str:
        """The decoding mode of one call: "auto" becomes "graph" on CUDA for calls long enough to
        pay for a capture; the MSA warm-up (whose dense path reads the step counter) and
        batch-invariant numerics run eagerly."""
        mode = self.decode
        if self.model.config.batch_invariant:
            # Its attention and MoE run the plain-PyTorch references, which read the device.
            return "eager"
        if mode == "auto":
            long_enough = params.max_new_tokens >= GRAPH_MIN_NEW_TOKENS
            mode = "graph" if self.model.embed.weight.is_cuda and long_enough else "eager"
        return "eager" if mode != "eager" and self.model.msa_warming_up() else mode

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


@dataclass
class Prefilled:
    """Prompts run through the model and not yet sampled from (`ModelGenerator.prefill`)."""

    prompts: list[list[int]]
    owner: list[int]
    """Row of each prompt in the cache below (identical prompts share one)."""
    cache: KVCache
    valid: torch.Tensor
    """[U, width] bool: the dense slots each unique prompt's keys fill (left-padded)."""
    last: torch.Tensor
    """[U, V] the logits after each unique prompt's last token."""
    policy_version: int
    choices: list[Choices] | None = None
    """Per unique prompt, its tokens' choices ([len] leading) when the generator records them."""


def _join(parts: list[Prefilled], max_new_tokens: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """One cache with a row per prompt of `parts`, room for `max_new_tokens` more slots; the
    rows' key validity [B, width] and next-token logits [B, V]. A part narrower than the widest
    is shifted right in the dense slots (more left padding); MSA layers' slots are positions."""
    width = max(p.valid.shape[1] for p in parts)
    if len(parts) == 1:
        (part,) = parts
        rows = torch.tensor(part.owner, device=part.last.device)
        return part.cache.select(rows, width + max_new_tokens), part.valid[rows], part.last[rows]
    first = parts[0]
    count = sum(len(p.owner) for p in parts)
    cache = first.cache.empty(count, width + max_new_tokens)
    cache.length = width
    valid = first.valid.new_zeros(count, width)
    last = first.last.new_empty(count, first.last.shape[1])
    at = 0
    for part in parts:
        rows = torch.tensor(part.owner, device=part.last.device)
        n, w = len(part.owner), part.valid.shape[1]
        shift = width - w
        for mine, joined, slot_dim in part.cache.paired(cache):
            if slot_dim == 1:  # position-indexed (MSA layers): the same slots
                joined[at : at + n, : mine.shape[1]] = mine[rows]
            else:  # dense slots: right-aligned to the widest part
                joined[at : at + n, :, shift:width] = mine[rows][:, :, :w]
        valid[at : at + n, shift:] = part.valid[rows]
        last[at : at + n] = part.last[rows]
        at += n
    return cache, valid, last


class _StaticDecode:
    """The decoding loop's state in tensors of fixed shape, advanced on the device, stepped by
    `Transformer.forward_decode`: eagerly, or (graph=True) by replaying one CUDA graph captured
    after a first eager step, which also compiles and warms every kernel the graph records."""

    def __init__(self, model: Transformer, cache: KVCache, valid: torch.Tensor, next_position: torch.Tensor,
                 capacity: int, *, graph: bool, min_position: int = 0, record: bool = False) -> None:
        b, width = valid.shape
        self.min_position = min_position
        """No row decodes below this position (known on the host: positions only grow)."""
        self.model, self.cache = model, cache
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=valid.device)
        self.position = next_position[:, None].clone()  # [B, 1]
        self.slot = torch.full((1,), width, dtype=torch.long, device=valid.device)
        self.valid = torch.zeros(b, capacity, dtype=torch.bool, device=valid.device)  # [B, C] dense slots seen
        self.valid[:, :width] = valid
        self.valid[:, width] = True
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.record = ChoiceRecorder() if record else None
        """The step's choices as the model writes them (the graph's buffers once captured)."""
        self.choices: Choices | None = None
        """The last step's choices, [B, 1, ...], copied out (when recording)."""

    def _forward(self) -> torch.Tensor:
        return self.model.forward_decode(self.ids, self.position, self.slot, self.valid, self.cache,
                                         min_position=self.min_position, record=self.record)[:, -1]

    def _read(self) -> None:
        if self.record is not None:
            self.choices = self.record.choices()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the sampled tokens [B]; the logits [B, V] for the next ones (valid until the next step)."""
        if self.steps:
            self.position += 1
            self.slot += 1
            self.valid.index_fill_(1, self.slot, True)
        self.steps += 1
        self.ids.copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
            self._read()
            return self.logits
        if not self.use_graph:
            logits = self._forward()
            self._read()
            return logits
        # Warm up on a side stream as torch asks before a capture, then capture the same step.
        # The step is idempotent (it rewrites the same cache slots), and the capture runs nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self._forward()
            self._read()  # before the capture takes the recorder's entries over
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()
        return first


def _restore(cache: KVCache, row: int, entry: CachedPrefix, n: int, end: int) -> None:
    """Copy the first n tokens' keys of `entry` into `row` of a fresh cache: dense layers at the
    slots [end - n, end), MSA layers at their positions [0, n)."""
    for i in range(len(cache.k)):
        if cache.ik and cache.ik[i] is not None:
            cache.k[i][row, :n] = entry.k[i][:n]
            cache.v[i][row, :n] = entry.v[i][:n]
            cache.ik[i][row, :n] = entry.ik[i][:n]
        else:
            cache.k[i][row, :, end - n : end] = entry.k[i][:n].transpose(0, 1)
            cache.v[i][row, :, end - n : end] = entry.v[i][:n].transpose(0, 1)
