"""The gateway's engine: concurrent requests share the generator's decoding calls.

Requests arrive from many sessions at once; one thread owns the generator and, whenever it is
free, takes every request waiting (up to `max_rows` sampled rows) and serves them in as few
`generate` calls as their sampling settings allow: one call per distinct (temperature, top_p,
stop ids, seed). A request that arrives while a call runs joins the next one, so under load
every decoding step serves all the sessions that were waiting when the call began.

Departure from vLLM-style continuous batching: rows join at call boundaries, not at every
decoding step, because `ModelGenerator`'s cache layout (left-padded dense slots shared by the
rows, captured in one CUDA graph per call) is fixed for a call. Agents' calls come in waves
(every session waits for its tools between calls), which this serves in one call per wave; a
late request waits at most one call. Rows with fewer `max_tokens` than the longest of their call
are cut to their own budget (finish reason "length").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from forge.policy.sampling import Completion, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    seed: int | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def key(self) -> tuple:
        p = self.params
        return (p.temperature, p.top_p, p.stop_token_ids, self.seed)


@dataclass
class EngineStats:
    """Counters since the engine started."""

    requests: int = 0
    rows: int = 0
    calls: int = 0
    sampled_tokens: int = 0
    max_rows_in_call: int = 0
    busy_s: float = 0.0
    """Seconds spent inside the generator's calls."""


class BatchingEngine:
    """Serves `generate` requests from many threads or coroutines through one generator."""

    def __init__(self, generator: Any, *, max_rows: int = 256, gather_s: float = 0.02, max_gather_s: float = 0.1) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.generator = generator
        self.max_rows = max_rows
        self.gather_s = gather_s
        """An idle engine starts a call once no request came for this long (or max_gather_s
        passed): sessions that start together then share their first call."""
        self.max_gather_s = max_gather_s
        self.stats = EngineStats()
        self._pending: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="forge-gateway-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
               seed: int | None = None) -> concurrent.futures.Future:
        """A future of `n` completions of one prompt."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        request = _Request(list(prompt_ids), params, n, seed)
        with self._cv:
            if self._closed:
                raise RuntimeError("the gateway's engine is closed")
            self._pending.append(request)
            self.stats.requests += 1
            self._cv.notify()
        return request.future

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
                       seed: int | None = None) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompt_ids, params, n=n, seed=seed))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[_Request] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed and not self._pending:
                return None
            deadline = time.monotonic() + self.max_gather_s
            while not self._closed and len(self._pending) < self.max_rows:
                seen = len(self._pending)
                self._cv.wait(timeout=min(self.gather_s, max(0.0, deadline - time.monotonic())))
                if len(self._pending) == seen or time.monotonic() >= deadline:
                    break
            taken, rows = [], 0
            while self._pending and (not taken or rows + self._pending[0].n <= self.max_rows):
                request = self._pending.pop(0)
                taken.append(request)
                rows += request.n
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            groups: dict[tuple, list[_Request]] = {}
            for request in taken:
                groups.setdefault(request.key(), []).append(request)
            for requests in groups.values():
                self._serve(requests)

    def _serve(self, requests: list[_Request]) -> None:
        live = [r for r in requests if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        first = live[0].params
        params = replace(first, max_new_tokens=max(r.params.max_new_tokens for r in live),
                         top_logprobs=max(r.params.top_logprobs for r in live))
        prompts = [r.prompt_ids for r in live for _ in range(r.n)]
        t0 = time.perf_counter()
        try:
            if live[0].seed is not None and hasattr(self.generator, "reseed"):
                self.generator.reseed(live[0].seed)
            done = self.generator.generate(prompts, params)
        except Exception as exc:  # every waiting request learns why; the engine serves on
            for r in live:
                r.future.set_exception(exc)
            return
        finally:
            self.stats.busy_s += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.rows += len(prompts)
        self.stats.max_rows_in_call = max(self.stats.max_rows_in_call, len(prompts))
        at = 0
        for r in live:
            mine = [_cut(c, r.params) for c in done[at : at + r.n]]
            at += r.n
            self.stats.sampled_tokens += sum(len(c.token_ids) for c in mine)
            r.future.set_result(mine)


def _cut(completion: Completion, params: SamplingParams) -> Completion:
    """The completion within this request's own token budget and top-logprob count."""
    extra = dict(completion.extra)
    if "top_logprobs" in extra:
        extra["top_logprobs"] = [row[: params.top_logprobs] for row in extra["top_logprobs"]][: params.max_new_tokens]
        if not params.top_logprobs:
            del extra["top_logprobs"]
    if len(completion.token_ids) <= params.max_new_tokens:
        return replace(completion, extra=extra)
    return Completion(completion.token_ids[: params.max_new_tokens], completion.logprobs[: params.max_new_tokens],
                      "length", completion.policy_version, extra)
