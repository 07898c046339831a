"""Batch-invariant numerics (`model.batch_invariant`) against the default: what they cost, and
what they buy, on the CPU or a GPU.

For each mode the same weights (seed 0) are timed on the trainer's step (`sequence_scores` over
a merged batch of groups, forward and backward) and on generation (`ModelGenerator.generate`,
its default decoding mode: a CUDA graph on a GPU for the default numerics, eager for the
invariant ones), and the gap between what the generator reported and what the trainer scores
is measured over multi-turn rollouts through the prefix cache (max |logprob diff|, and how many
tokens agree to the bit), merged and unmerged.

Presets: `quickstart` (the model of recipes/quickstart.yaml, the CPU default) and `msa_100m`
(ModelConfig.msa_100m, the GPU default). On the CPU the timings use `--threads` threads (1, as
Ray gives each actor on a small machine).

    PYTHONPATH=. python benchmarks/invariant.py [--device cpu|cuda] [--preset quickstart|msa_100m] --out inv.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import statistics
import time
from pathlib import Path

import torch
import yaml

from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.trainer.logprobs import sequence_logprobs, sequence_scores

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str) -> ModelConfig:
    if name == "quickstart":
        section = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["model"]
        return ModelConfig(**{k: v for k, v in section.items() if k != "batch_invariant"})
    return getattr(ModelConfig, name)()


def timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of fn over reps calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def groups(n: int, size: int, prompt: int, response: int, seed: int = 0) -> list[list[int]]:
    """n groups of `size` sequences: a shared system prefix, a prompt per group, distinct responses."""
    rng = random.Random(seed)
    system = [rng.randrange(256) for _ in range(prompt // 2)]
    out = []
    for _ in range(n):
        p = system + [rng.randrange(256) for _ in range(prompt - len(system))]
        out += [p + [rng.randrange(256) for _ in range(response)] for _ in range(size)]
    return out


def gaps(model: Transformer, prompts: list[list[int]], turns: int, new_tokens: int) -> dict:
    """Sampler against trainer over multi-turn rollouts: max |diff| and bitwise-equal share,
    merged and unmerged."""
    gen = ModelGenerator(model, seed=1, prefix_cache_tokens=1 << 20)
    rng = random.Random(1)
    seqs, sampled = [list(p) for p in prompts], [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(turns):
            done = gen.generate(seqs, SamplingParams(temperature=1.0, max_new_tokens=new_tokens))
            for i, c in enumerate(done):
                sampled[i] += [(len(seqs[i]) + j, lp) for j, lp in enumerate(c.logprobs)]
                seqs[i] = seqs[i] + c.token_ids + [rng.randrange(256) for _ in range(8)]
        out = {}
        for merge in (True, False):
            scored = sequence_logprobs(model, seqs, merge=merge)
            got = torch.tensor([scored[i][pos - 1].item() for i, s in enumerate(sampled) for pos, _ in s],
                               dtype=torch.float64)
            want = torch.tensor([lp for s in sampled for _, lp in s], dtype=torch.float64)
            key = "merged" if merge else "unmerged"
            out[f"{key}_max_abs"] = (got - want).abs().max().item()
            out[f"{key}_bitwise_share"] = (got == want).double().mean().item()
        out["tokens"] = len(want)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="quickstart (CPU default) or msa_100m (GPU default)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--groups", type=int, default=None, help="default: 8 on CPU, 2 on GPU")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=None, help="tokens before the responses (default 160 / 3000)")
    parser.add_argument("--response", type=int, default=None, help="tokens per response (default 60 / 600)")
    parser.add_argument("--gen-rows", type=int, default=None, help="default 32 / 64")
    parser.add_argument("--gen-prompt", type=int, default=None, help="default 160 / 2048")
    parser.add_argument("--gen-tokens", type=int, default=None, help="default 64 / 256")
    parser.add_argument("--turns", type=int, default=3, help="turns of the rollouts whose gap is measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    name = args.preset or ("quickstart" if cpu else "msa_100m")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("fp32" if cpu else "bf16")]
    pick = lambda given, on_cpu, on_gpu: given if given is not None else (on_cpu if cpu else on_gpu)  # noqa: E731
    n_groups, prompt, response = pick(args.groups, 8, 2), pick(args.prompt, 160, 3000), pick(args.response, 60, 600)
    rows_gen, gen_prompt, gen_tokens = pick(args.gen_rows, 32, 64), pick(args.gen_prompt, 160, 2048), pick(args.gen_tokens, 64, 256)
    if cpu:
        torch.set_num_threads(args.threads)

    seqs = groups(n_groups, args.group_size, prompt, response)
    prompts = [[random.Random(i).randrange(256) for _ in range(gen_prompt)] for i in range(rows_gen)]
    gap_prompts = [[random.Random(100 + i).randrange(256) for _ in range(gen_prompt // 2)] for i in range(8)]
    rows = []
    for invariant in (False, True):
        cfg = dataclasses.replace(preset(name), batch_invariant=invariant)
        torch.manual_seed(0)
        model = Transformer(cfg).to(args.device, dtype)

        def train() -> None:
            scores = sequence_scores(model, seqs)
            (-sum(lp.sum() for lp in scores.logprobs)).backward()

        train_ms = timed(train, args.reps, args.device)
        model.eval()
        gen = ModelGenerator(model, seed=0)
        params = SamplingParams(max_new_tokens=gen_tokens, temperature=1.0)
        with torch.no_grad():
            gen_ms = timed(lambda: gen.generate(prompts, params), args.reps, args.device)
        row = {"mode": "batch_invariant" if invariant else "default", "train_ms": train_ms,
               "train_tokens_per_s": sum(map(len, seqs)) / train_ms * 1e3, "generate_ms": gen_ms,
               "generate_tokens_per_s": rows_gen * gen_tokens / gen_ms * 1e3,
               **gaps(model, gap_prompts, args.turns, min(gen_tokens, 32))}
        rows.append(row)
        del model, gen

    base = rows[0]
    print(f"{name} on {args.device} ({dtype}), train {len(seqs)} sequences / {sum(map(len, seqs))} tokens, "
          f"generate {rows_gen} x {gen_tokens} after {gen_prompt}")
    print(f"{'mode':<16} {'train ms':>9} {'x':>5} {'gen tok/s':>10} {'x':>5} {'max gap merged':>15} "
          f"{'unmerged':>10} {'bitwise':>8}")
    for r in rows:
        print(f"{r['mode']:<16} {r['train_ms']:>9.1f} {r['train_ms'] / base['train_ms']:>5.2f} "
              f"{r['generate_tokens_per_s']:>10.0f} {base['generate_tokens_per_s'] / r['generate_tokens_per_s']:>5.2f} "
              f"{r['merged_max_abs']:>15.2e} {r['unmerged_max_abs']:>10.2e} {r['merged_bitwise_share']:>8.1%}")
    if args.out:
        device = torch.cuda.get_device_name() if not cpu else "cpu"
        meta = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "preset": name, "dtype": str(dtype), "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
