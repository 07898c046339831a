"""The policy model's training step and generation, end to end through Forge's code paths, on GPU.

Issue 7's one-GPU recipe (recipes/needle_msa_100m.yaml, the ModelConfig.msa_100m shape) ran its
warm-start at about 8.5 s per step of 16 sequences (14K tokens) on an H100, and its evaluation
sampled slowly; this benchmark isolates those two parts from Ray and the environment so that a
profile shows where the time goes. Batches are synthetic token ids of the shapes the recipe
meets: groups of sequences that share a prompt.

- train_merged / train_unmerged: `sequence_scores` (the trainer's forward) with the MSA index
  loss, then backward, in bf16; merged through the prefix tree, or each sequence alone.
- generate: `ModelGenerator.generate` over prompts of the given length, new tokens sampled, once
  per decoding mode (`--decode`, eager and CUDA graph by default); `prefill` samples one token.
- turns_no_cache / turns_prefix_cache (`--turns N`): N-turn conversations from those prompts,
  40 answer tokens appended a turn, without and with the generator's prefix cache.
- train_unmerged_each: unmerged, one forward per sequence instead of padded batches.
- hf_generate (`--hf`): transformers' `generate` on the same weights exported with `save_hf`;
  the preset is then made exportable (MSA off, softmax routing, no shared expert).

Times are medians of CUDA-event timings after a warm-up call (the first call compiles the Triton
kernels). Tokens per second count every token of the batch (training) or sampled tokens
(generation). `--profile` prints torch.profiler's tables for one call of each.

    PYTHONPATH=. python benchmarks/policy_step.py --out policy_step.json [--profile]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random

import torch
from _timing import timed

from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import SamplingParams
from forge.policy.tokenizer import ByteTokenizer
from forge.trainer.logprobs import sequence_scores


def batch(groups: int, group_size: int, prompt: int, response: int, seed: int = 0) -> list[list[int]]:
    """`groups` groups of `group_size` sequences: a shared prompt, then distinct responses."""
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        p = [rng.randrange(256) for _ in range(prompt)]
        out += [p + [rng.randrange(256) for _ in range(response)] for _ in range(group_size)]
    return out


def train_call(model: Transformer, seqs: list[list[int]], merge: bool, padded: bool | None = None):
    def run() -> None:
        scores = sequence_scores(model, seqs, merge=merge, with_entropy=True, with_index_loss=True, padded=padded)
        loss = -sum(lp.sum() for lp in scores.logprobs) / sum(len(s) for s in seqs)
        if scores.index_loss is not None:
            loss = loss + scores.index_loss / sum(len(s) for s in seqs)
        loss.backward()

    return run


def hf_generate(model: Transformer, prompts: list[list[int]], new_tokens: int, reps: int) -> dict:
    """transformers' `generate` on `model`'s weights (save_hf, then from_pretrained), sampling
    `new_tokens` per row at temperature 1 with no stop token, as the Forge rows above do."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from forge.policy.checkpoint import save_hf

    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder)
        # Hub kernels (transformers' default on a GPU) need a download; the GPU machines are offline.
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, use_kernels=False).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)

    def run() -> None:
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=0)

    ms = timed(run, reps)
    sampled = len(prompts) * new_tokens
    del hf
    return {"variant": "hf_generate", "ms": ms, "tokens": sampled, "tokens_per_s": sampled / ms * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048, help="shared prompt tokens per group")
    parser.add_argument("--response", type=int, default=1024, help="tokens after the prompt per sequence")
    parser.add_argument("--gen-prompt", type=int, default=2048)
    parser.add_argument("--gen-rows", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--decode", default="eager,graph",
                        help="comma-separated ModelGenerator decode modes to time side by side")
    parser.add_argument("--turns", type=int, default=0,
                        help="also time conversations of this many turns (40 answer tokens a turn), "
                             "with and without the prefix cache")
    parser.add_argument("--no-msa", action="store_true", help="the same shape with every layer dense")
    parser.add_argument("--hf", action="store_true",
                        help="also time transformers' generate on the same weights, exported with save_hf; the "
                             "preset is made exportable (MSA off, softmax routing, no shared expert)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="time generation only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cfg = ModelConfig.msa_100m()
    if args.no_msa or args.hf:
        cfg.msa.enabled = False
    if args.hf:
        # What Qwen3-MoE holds (forge.policy.checkpoint.config_arch): the same shape otherwise.
        cfg.score_func, cfg.num_shared_experts = "softmax", 0
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    seqs = batch(args.groups, args.group_size, args.prompt, args.response)
    tokens = sum(len(s) for s in seqs)
    rows = []
    # Unmerged: right-padded batches of similar lengths (the CUDA default), and one forward per sequence.
    train = (("train_merged", True, None), ("train_unmerged", False, None), ("train_unmerged_each", False, False))
    for name, merge, padded in () if args.skip_train else train:
        ms = timed(train_call(model, seqs, merge, padded), args.reps)
        rows.append({"variant": name, "ms": ms, "tokens": tokens, "tokens_per_s": tokens / ms * 1e3})
    prompts = [[random.Random(i).randrange(256) for _ in range(args.gen_prompt)] for i in range(args.gen_rows)]
    model.eval()
    generators = {}

    def generate_with(mode: str, max_new_tokens: int):
        gen = generators.setdefault(mode, ModelGenerator(model, ByteTokenizer(), seed=0, decode=mode))
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
        sampled = []

        def generate() -> None:
            sampled.append(sum(len(c.token_ids) for c in gen.generate(prompts, params)))

        return generate, sampled

    # The prefill alone (one sampled token per row), then whole calls per decoding mode.
    for name, mode, new in [("prefill", "eager", 1)] + [(f"generate_{m}", m, args.gen_tokens)
                                                        for m in args.decode.split(",")]:
        fn, sampled = generate_with(mode, new)
        with torch.no_grad():
            ms = timed(fn, args.reps)
        rows.append({"variant": name, "ms": ms, "tokens": sampled[-1], "tokens_per_s": sampled[-1] / ms * 1e3})
    if args.hf:
        rows.append(hf_generate(model, prompts, args.gen_tokens, args.reps))
    generate = generate_with(args.decode.split(",")[-1], args.gen_tokens)[0]
    for name, cache_tokens in [("turns_no_cache", 0), ("turns_prefix_cache", 1 << 20)][: 2 if args.turns else 0]:
        sampled = []

        def conversation(cache_tokens=cache_tokens, sampled=sampled) -> None:
            gen = ModelGenerator(model, ByteTokenizer(), seed=0, prefix_cache_tokens=cache_tokens)
            params = SamplingParams(max_new_tokens=args.gen_tokens, temperature=1.0)
            rng, turn, n = random.Random(0), list(prompts), 0
            for _ in range(args.turns):
                done = gen.generate(turn, params)
                n += sum(len(c.token_ids) for c in done)
                turn = [p + c.token_ids + [rng.randrange(256) for _ in range(40)] for p, c in zip(turn, done)]
            sampled.append(n)

        with torch.no_grad():
            ms = timed(conversation, args.reps)
        rows.append({"variant": name, "ms": ms, "tokens": sampled[-1], "tokens_per_s": sampled[-1] / ms * 1e3})
    model.train()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        calls = [("generate", generate)] if args.skip_train else [
            ("train_merged", train_call(model, seqs, True)), ("generate", generate)]
        for name, fn in calls:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with torch.set_grad_enabled(name != "generate"):
                    fn()
                torch.cuda.synchronize()
            print(f"--- {name}: by CUDA time")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
            print(f"--- {name}: by CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))

    print(f"{'variant':<20} {'ms':>10} {'tokens':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['variant']:<20} {r['ms']:>10.1f} {r['tokens']:>8} {r['tokens_per_s']:>10.0f}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "date": datetime.date.today().isoformat(), "args": vars(args), "msa": not (args.no_msa or args.hf)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
