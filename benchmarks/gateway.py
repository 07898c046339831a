"""What the OpenAI-compatible gateway costs: concurrent sessions through HTTP against the same
prompts straight into the generator.

`direct`: the prompts' token ids (encoded by the gateway's chat template) in one
`ModelGenerator.generate` call, as a rollout worker batches its episodes' turns. `gateway`: the
same prompts as `sessions` concurrent `AsyncOpenAI` chat calls (one session each, the
`X-Forge-Session` header set) against a live gateway on 127.0.0.1 over the same generator:
request checking, the chat template, the engine's batching, parsing the completion back,
recording the session and the HTTP round trips all count. The clients run in processes of
their own (`--client-procs`, sessions split evenly), as agent programs do: 64 agents are not one
Python event loop, and the official client's request building and response parsing (about a
millisecond a call) would otherwise be timed as the gateway's. A round runs from its first
request to its last answer over all processes (they start together at a barrier). Sampled tokens per second are total
sampled tokens over wall-clock time, median of `--reps` after a warm-up (which compiles and
captures the decoding step). Both sample at temperature 1, and every row samples `--max-tokens`
(no stop tokens: the gateway's `ignore_eos`), so both do the same work.

    PYTHONPATH=.:benchmarks python benchmarks/gateway.py --preset msa_100m --out gateway.json
    PYTHONPATH=.:benchmarks python benchmarks/gateway.py --preset tiny --device cpu --sessions 8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import time

import torch

from forge.middleware.gateway.app import GatewayConfig, create_app
from forge.middleware.gateway.engine import BatchingEngine
from forge.middleware.gateway.server import GatewayServer
from forge.middleware.gateway.sessions import SessionStore
from forge.policy.chat import ChatTemplate
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.policy.tokenizer import ByteTokenizer


def questions(n: int, chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["coins", "has", "then", "spends", "earns", "friends", "shares", "how", "many", "now"]
    return [" ".join(rng.choice(words) for _ in range(chars // 6))[:chars] + f" #{i}" for i in range(n)]


def wall(fn, reps: int) -> tuple[float, list[int]]:
    """Median seconds of `fn` (which returns sampled tokens) after one warm-up; the token counts."""
    fn()
    times, counts = [], []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        counts.append(fn())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), counts


def client_rounds(base_url: str, asks: list[tuple[int, str]], max_tokens: int, rounds: int, barrier, out) -> None:
    """In a child process: `rounds` rounds of concurrent sessions, each round started at
    `barrier` with the other client processes; puts [(start, end, sampled)] per round."""
    import openai

    async def one_round(r: int) -> tuple[float, float, int]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="forge", max_retries=0, timeout=600)
        try:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(
                client.chat.completions.create(
                    model="forge-policy", messages=[{"role": "user", "content": q}], temperature=1.0,
                    max_tokens=max_tokens, extra_headers={"X-Forge-Session": f"r{r}-{i}"},
                    extra_body={"ignore_eos": True})
                for i, q in asks))
            return t0, time.perf_counter(), sum(x.usage.completion_tokens for x in replies)
        finally:
            await client.close()

    out.put([asyncio.run(one_round(r)) for r in range(rounds)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="msa_100m", help="a ModelConfig preset: tiny, small, msa_100m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=2000, help="characters of each user message (~tokens)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=8,
                        help="processes the sessions' clients run in (1: every session in one event loop)")
    parser.add_argument("--prefill", choices=["early", "call"], default="call",
                        help="the engine prefills each batch while the wave arrives (early) or in the call")
    parser.add_argument("--gather-ms", type=float, default=20.0, help="the engine's quiet gap (BatchingEngine.gather_s)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    tok = ByteTokenizer()
    cfg = getattr(ModelConfig, args.preset)()
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device)
    if args.device == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    generator = ModelGenerator(model, tok, seed=0)
    template = ChatTemplate(tok)
    asks = questions(args.sessions, args.prompt_chars)
    prompts = [template.encode([{"role": "user", "content": q}]).token_ids for q in asks]
    # No stop tokens on either side (the gateway's `ignore_eos`): every row samples max_tokens, so
    # both variants do the same work and the rate compares what the gateway adds, not how soon a
    # random policy happened to sample <eos>.
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_tokens, stop_token_ids=())

    def direct() -> int:
        with torch.no_grad():
            return sum(len(c.token_ids) for c in generator.generate(prompts, params))

    engine = BatchingEngine(generator, max_rows=max(256, args.sessions), gather_s=args.gather_ms / 1e3,
                            prefill_early=args.prefill == "early")
    store = SessionStore()
    app = create_app(engine, tok, store, GatewayConfig(max_context_tokens=args.prompt_chars + args.max_tokens + 64,
                                                       default_max_tokens=args.max_tokens))
    rows = []
    seconds, counts = wall(direct, args.reps)
    rows.append({"variant": "direct", "s": seconds, "sampled_tokens": statistics.median(counts),
                 "tokens_per_s": statistics.median(counts) / seconds})
    with GatewayServer(app) as server:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        procs = max(1, min(args.client_procs, args.sessions))
        barrier = ctx.Barrier(procs)
        calls_before = engine.stats.calls
        children = [ctx.Process(target=client_rounds, args=(server.base_url, list(enumerate(asks))[k::procs],
                                                            args.max_tokens, args.reps + 1, barrier, results))
                    for k in range(procs)]
        for child in children:
            child.start()
        per_proc = [results.get(timeout=1800) for _ in children]
        for child in children:
            child.join(timeout=60)
        calls = engine.stats.calls - calls_before
    # A round: from the first process's first request to the last answer of any; the first warms up.
    timed_rounds = [(max(p[r][1] for p in per_proc) - min(p[r][0] for p in per_proc), sum(p[r][2] for p in per_proc))
                    for r in range(1, args.reps + 1)]
    seconds = statistics.median(t for t, _ in timed_rounds)
    tokens = statistics.median(n for _, n in timed_rounds)
    rows.append({"variant": "gateway", "s": seconds, "sampled_tokens": tokens, "tokens_per_s": tokens / seconds})
    engine.close()
    rows[1]["engine_calls_per_round"] = calls / (args.reps + 1)
    cost = 1 - rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"{args.preset} on {args.device}: {args.sessions} sessions in {procs} client processes, prompts of "
          f"{len(prompts[0])} tokens, up to {args.max_tokens} new")
    print(f"{'variant':<10} {'s':>8} {'sampled':>9} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['variant']:<10} {r['s']:>8.3f} {r['sampled_tokens']:>9.0f} {r['tokens_per_s']:>10.0f}")
    print(f"gateway cost: {100 * cost:.1f}% of sampled tokens/s; engine calls per round: "
          f"{rows[1]['engine_calls_per_round']:.2f}")
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        meta = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "args": vars(args), "prompt_tokens": len(prompts[0])}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "gateway_cost": cost}, f, indent=2)


if __name__ == "__main__":
    main()
