"""The gateway's engine: concurrent requests share the generator's decoding calls.

Requests arrive from many sessions at once; one thread owns the generator. Whenever it is free
it starts a call with the first waiting request's sampling settings (temperature, top_p, stop
ids, seed) and gathers every request of the same settings that comes until the wave is over
(up to `max_rows` sampled rows); requests of other settings wait for the next call. A request
that arrives while a call decodes joins the next one.

Prefill while the wave arrives (`prefill_early=True`, off by default): where the generator can
(`ModelGenerator.prefill` and `generate_prefilled`), each batch of requests is prefilled as soon
as it is taken, while later requests are still arriving, and the call then decodes every row
together. It made `benchmarks/gateway.py` slower on an H100 (64 sessions, 1,846-token prompts:
21.6% cost against 4.6-7.9% without; docs/benchmarks.md). Not profiled; likely causes: several
small prefills cost more than one large one, and the engine thread's kernel launches compete
for the GIL with the HTTP thread that is parsing the wave. It stays an option, for prompts
whose prefill dwarfs the HTTP work (not measured).

The end of a wave: the server announces each request it has begun to read (`arriving()`, from
the moment its handler starts until it has submitted or failed), and the engine stops gathering
once none is being read and no request came for `gather_s`, or after `max_gather_s` of idle
waiting (time spent prefilling does not count). A request whose body was still being parsed
thus stays in its wave rather than waiting for the whole next call.

Departure from vLLM-style continuous batching: rows join a call before its first decoding step,
not at every step, because `ModelGenerator`'s cache layout (left-padded dense slots shared by
the rows, captured in one CUDA graph per call) is fixed for a call. Agents' calls come in waves
(every session waits for its tools between calls), which this serves in one call per wave; a
request that comes after a wave began decoding waits at most one call. Rows with fewer
`max_tokens` than the longest of their call are cut to their own budget (finish reason "length").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
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

    def __init__(self, generator: Any, *, max_rows: int = 256, gather_s: float = 0.02, max_gather_s: float = 0.1,
                 prefill_early: bool = False) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if gather_s < 0 or max_gather_s < 0:
            raise ValueError(f"gather_s and max_gather_s must be >= 0, got {gather_s} and {max_gather_s}")
        self.generator = generator
        self.max_rows = max_rows
        self.gather_s = gather_s
        """An idle engine starts a call once no request is `arriving()` and none came for this
        long (or max_gather_s passed): sessions that start together then share their first call."""
        self.max_gather_s = max_gather_s
        self.prefill_early = prefill_early
        """Prefill each batch while the wave arrives (where the generator can); off by default:
        slower on an H100 (module docstring). Off: gather the whole wave, then one `generate`."""
        self.stats = EngineStats()
        self._pending: list[_Request] = []
        self._arriving = 0
        self._last_event = 0.0
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
            self._last_event = time.monotonic()
            self._cv.notify()
        return request.future

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around the reading and checking of one request, up to its `submit`: while any request
        is inside, an idle engine waits (up to `max_gather_s`) so that it joins the wave."""
        with self._cv:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cv:
                self._arriving -= 1
                self._last_event = time.monotonic()
                self._cv.notify()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
                       seed: int | None = None) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompt_ids, params, n=n, seed=seed))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _pop(self, key: tuple | None, room: int) -> list[_Request]:
        """Under the lock: the waiting requests of sampling settings `key` (the first waiting
        request's when None) that fit in `room` rows, in arrival order; the rest keep waiting."""
        if key is None and self._pending:
            key = self._pending[0].key()
        taken, keep, rows = [], [], 0
        for request in self._pending:
            if request.key() == key and rows + request.n <= room:
                taken.append(request)
                rows += request.n
            else:
                keep.append(request)
        if not taken and room == self.max_rows:
            # A request of more rows than max_rows: served alone rather than never.
            big = next((r for r in self._pending if r.key() == key), None)
            if big is not None:
                taken, keep = [big], [r for r in self._pending if r is not big]
        self._pending = keep
        return taken

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
            self._gather_and_serve()

    def _gather_and_serve(self) -> None:
        """One call: the first waiting request's sampling settings, every request of the same
        settings that comes until the wave is over (module docstring), prefilled batch by batch
        as they come where the generator can (`prefill` / `generate_prefilled`)."""
        pipelined = (self.prefill_early and hasattr(self.generator, "prefill")
                     and hasattr(self.generator, "generate_prefilled"))
        key: tuple | None = None
        live: list[_Request] = []
        parts: list[Any] = []
        rows = 0
        waited = 0.0  # idle seconds spent gathering; prefilling does not count
        while rows < self.max_rows:
            with self._cv:
                batch = self._pop(key, self.max_rows - rows)
                if not batch:
                    now = time.monotonic()
                    quiet_at = self._last_event + self.gather_s
                    if self._closed or waited >= self.max_gather_s or (not self._arriving and now >= quiet_at):
                        break
                    until = self.max_gather_s - waited if self._arriving else min(quiet_at - now, self.max_gather_s - waited)
                    self._cv.wait(timeout=max(0.0, until))
                    waited += time.monotonic() - now
                    continue
            key = batch[0].key()
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            if pipelined:
                t0 = time.perf_counter()
                try:
                    if not parts and batch[0].seed is not None and hasattr(self.generator, "reseed"):
                        self.generator.reseed(batch[0].seed)  # a seeded call prefills with no prefix reuse either
                    parts.append(self.generator.prefill([r.prompt_ids for r in batch for _ in range(r.n)]))
                except Exception as exc:  # these requests learn why; the call goes on without them
                    for r in batch:
                        r.future.set_exception(exc)
                    continue
                finally:
                    self.stats.busy_s += time.perf_counter() - t0
            live += batch
            rows += sum(r.n for r in batch)
        if live:
            self._serve(live, parts if pipelined else None)

    def _serve(self, live: list[_Request], parts: list[Any] | None) -> None:
        first = live[0].params
        params = replace(first, max_new_tokens=max(r.params.max_new_tokens for r in live),
                         top_logprobs=max(r.params.top_logprobs for r in live))
        prompts = [r.prompt_ids for r in live for _ in range(r.n)]
        t0 = time.perf_counter()
        try:
            if live[0].seed is not None and hasattr(self.generator, "reseed"):
                self.generator.reseed(live[0].seed)
            if parts is None:
                done = self.generator.generate(prompts, params)
            else:
                done = self.generator.generate_prefilled(parts, params)
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
