"""The whole model's training step, merged against unmerged, and how exact merging is (issue 14).

Two parts, one JSON:

- `speed`: forward and backward of `sequence_scores` as the trainer calls it (entropy and the
  MSA index loss on), merged through the prefix tree against unmerged (right-padded batches of
  similar lengths, the CUDA default), in bf16. Workloads: `grpo` 16 x (8K prompt + 1K), `agent`
  (64 turns of one conversation: one sequence per model call, each the conversation so far),
  `low` 8 x (1K + 4K) (little sharing), and `issue` 2 groups x 8 of 3,000-token prompts and
  100-600-token responses (the batch the issue measured). Per row: ms, tokens/s over the
  unmerged tokens, the token ratio, the FLOP ratio (unmerged over merged FLOPs: the speed-up at
  equal efficiency, below the token ratio because a branch's queries still attend to the whole
  shared prefix), the speed-up (forced merge, and as the trainer runs it: its fallback leaves
  batches below `MergeConfig.min_token_ratio` unmerged), peak memory, the micro-batches a batch
  too large for the card ran in, and MFU: active-parameter FLOPs (6 per parameter per unique
  token) plus attention FLOPs (4 * Hq * D per visible kept key per query forward, 3x that
  forward plus backward) over the step time, against 989 TFLOP/s.
- `exact`: on the `issue` batch, fp32 merged against unmerged (max |logprob diff|, largest
  relative gradient difference over parameters), bf16 merged and unmerged against fp32, and the
  sampler's logprobs (ModelGenerator, graph decoding) against `sequence_scores` of the same
  tokens. `--replay` imposes recorded choices (routing replay, forge.policy.choices): each
  sequence's, as a forward of it alone made them, on merged and unmerged; the sampler's on the
  trained pass of its tokens. `--exact-parts fp32` leaves out the bf16 and sampler comparisons (the
  three together ran past 150 s with `--replay` on an H100).

`--merged-only` times the merged step alone (an A/B of one change against another commit).
`--vary-shapes` drops 0-63 tokens from each sequence's end, anew at every call: a fixed batch
repeated lets every per-shape cost (a library's execution plan, a compiled kernel) be paid once
and hidden, where a trainer meets new lengths every step. Throughput is then counted on the
workload's full token count, about 1% high on these workloads.

    PYTHONPATH=. python benchmarks/model_step.py --out model_step.json [--parts speed,exact]
        [--presets msa_100m,msa_100m_dense,msa_100m_invariant] [--workloads grpo,agent,low,issue]
        [--vary-shapes]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random

import torch
from _timing import timed

from forge.policy.choices import record_alone
from forge.policy.config import ModelConfig
from forge.policy.model import Transformer, count_parameters
from forge.prefix_tree import build_tree
from forge.prefix_tree.fallback import MergeConfig, should_merge
from forge.trainer.logprobs import sequence_scores

H100_BF16_DENSE = 989e12


def preset(name: str) -> ModelConfig:
    """A ModelConfig by name; `_dense` turns MSA off on the same shape, `_invariant` turns on
    batch-invariant numerics (model.batch_invariant): `msa_100m_dense_invariant`."""
    invariant = name.endswith("_invariant")
    base = name.removesuffix("_invariant")
    dense = base.endswith("_dense")
    cfg = getattr(ModelConfig, base.removesuffix("_dense"))()
    if dense:
        cfg.msa.enabled = False
    cfg.batch_invariant = invariant
    return cfg


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def workload(name: str, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    if name == "grpo":
        p = _tokens(rng, 8192)
        return [p + _tokens(rng, 1024) for _ in range(16)]
    if name == "low":
        return [_tokens(rng, 1024) + _tokens(rng, 4096) for _ in range(8)]
    if name == "agent":
        conv, seqs = _tokens(rng, 512), []
        for _ in range(64):
            conv = conv + _tokens(rng, 64)  # the tool result / user turn
            seqs.append(conv + _tokens(rng, 64))  # the call: context + the model's answer
            conv = seqs[-1]
        return seqs
    if name == "issue":
        seqs = []
        for _ in range(2):
            p = _tokens(rng, 3000)
            seqs += [p + _tokens(rng, rng.randint(100, 600)) for _ in range(8)]
        return seqs
    raise ValueError(f"unknown workload {name!r}; use grpo, agent, low or issue")


VARY_TOKENS = 64


def varied(seqs: list[list[int]], rng: random.Random) -> list[list[int]]:
    """`seqs` with 0 to VARY_TOKENS - 1 tokens dropped from the end of each: another step's
    lengths (an RL trainer meets new ones every step), the shared prefixes unchanged."""
    return [s[:max(2, len(s) - rng.randrange(VARY_TOKENS))] for s in seqs]


def step(model: Transformer, seqs: list[list[int]], merge: bool, parts: int = 1, vary: bool = False):
    """One training step's forward and backward over `seqs`, in `parts` micro-batches of
    consecutive sequences (gradients accumulate, as the trainer's micro-batches do), the loss
    normalised over the whole batch's tokens. `vary`: every call trains `varied(seqs)`, so
    anything built per shape (library plans, compiled kernels) is paid as in training."""
    size = -(-len(seqs) // parts)
    rng = random.Random(1)

    def run() -> None:
        batch = varied(seqs, rng) if vary else seqs
        n = sum(len(s) for s in batch)
        for i in range(0, len(batch), size):
            scores = sequence_scores(model, batch[i:i + size], merge=merge, with_entropy=True, with_index_loss=True)
            loss = -sum(lp.sum() for lp in scores.logprobs) / n
            if scores.index_loss is not None:
                loss = loss + scores.index_loss / n
            loss.backward()

    return run


def _timed_fitting(model: Transformer, seqs: list[list[int]], merge: bool, reps: int,
                   vary: bool = False) -> tuple[float, int]:
    """(median ms, micro-batches): the whole batch in one pass, or, where that runs out of the
    card's memory, in 2, 4, ... micro-batches, as a trainer with a smaller token budget would."""
    parts = 1
    while True:
        torch.cuda.reset_peak_memory_stats()
        try:
            return timed(step(model, seqs, merge, parts, vary), reps), parts
        except torch.OutOfMemoryError:
            if parts >= len(seqs):
                raise
            parts *= 2
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def step_flops(cfg: ModelConfig, active: int, seqs: list[list[int]], merged: bool, parts: int = 1) -> float:
    """FLOPs of one forward and backward: 6 * active parameters per token run, plus attention,
    summed over the `parts` micro-batches of `step`."""
    size = -(-len(seqs) // parts)
    if parts > 1:
        return sum(step_flops(cfg, active, seqs[i:i + size], merged) for i in range(0, len(seqs), size))
    tree = build_tree(seqs)
    tokens = tree.num_tokens if merged else sum(len(s) for s in seqs)
    # Keys each query attends to: its position + 1 (dense layers, and MSA rows below dense_below),
    # else at most top_k blocks.
    pos = tree.position.double() if merged else torch.cat([torch.arange(len(s), dtype=torch.float64) for s in seqs])
    dense_keys = float((pos + 1).sum())
    msa_layers = sum(cfg.is_msa_layer(i) for i in range(cfg.num_layers))
    m = cfg.msa
    sparse_keys = float(torch.where(pos < m.dense_below_tokens, pos + 1,
                                    torch.clamp(pos + 1, max=m.top_k * m.block_size)).sum()) if m.enabled else 0.0
    keys = (cfg.num_layers - msa_layers) * dense_keys + msa_layers * sparse_keys
    return 6.0 * active * tokens + 3 * 4 * cfg.num_heads * cfg.head_dim * keys


def speed(preset_name: str, workloads: list[str], reps: int, vary: bool = False,
          layouts: tuple[bool, ...] = (True, False)) -> list[dict]:
    cfg = preset(preset_name)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    _, active = count_parameters(model)
    rows = []
    for w in workloads:
        seqs = workload(w)
        tree = build_tree(seqs)
        row = {"preset": preset_name, "workload": w, "sequences": len(seqs), "tokens": sum(map(len, seqs)),
               "unique_tokens": tree.num_tokens, "token_ratio": tree.token_ratio(),
               # The speed-up's ceiling at equal efficiency: a branch's queries still attend to the
               # whole shared prefix, so attention shrinks less than the token count.
               "flop_ratio": step_flops(cfg, active, seqs, False) / step_flops(cfg, active, seqs, True),
               "vary_shapes": vary}
        for merge in layouts:
            key = "merged" if merge else "unmerged"
            torch.cuda.empty_cache()
            try:
                ms, parts = _timed_fitting(model, seqs, merge, reps, vary)
            except torch.OutOfMemoryError:
                row[f"{key}_ms"] = None
                row[f"{key}_error"] = "out of memory"
                continue
            row[f"{key}_micro_batches"] = parts
            row[f"{key}_ms"] = ms
            row[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row[f"{key}_tokens_per_s"] = row["tokens"] / ms * 1e3
            row[f"{key}_mfu"] = step_flops(cfg, active, seqs, merge, parts) / (ms * 1e-3) / H100_BF16_DENSE
        if row.get("merged_ms") and row.get("unmerged_ms"):
            row["speedup"] = row["unmerged_ms"] / row["merged_ms"]
            # What the trainer runs: its fallback (MergeConfig.min_token_ratio) leaves batches that
            # share too little unmerged.
            row["trainer_merges"] = should_merge(tree, MergeConfig())
            row["trainer_speedup"] = row["speedup"] if row["trainer_merges"] else 1.0
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    return (f"{row['preset']:<16} {row['workload']:<6} tokens {row['tokens']:>7} ratio {row['token_ratio']:5.2f} "
            f"merged {f(row.get('merged_ms'), '8.1f')} ms ({f(row.get('merged_mfu'), '.1%')} MFU, "
            f"{f(row.get('merged_peak_gib'), '.1f')} GiB, {row.get('merged_micro_batches', '-')} mb) "
            f"unmerged {f(row.get('unmerged_ms'), '8.1f')} ms "
            f"({f(row.get('unmerged_peak_gib'), '.1f')} GiB, {row.get('unmerged_micro_batches', '-')} mb) speed-up {f(row.get('speedup'), '.2f')}x "
            f"(as the trainer runs it: {f(row.get('trainer_speedup'), '.2f')}x; FLOP ratio {row['flop_ratio']:.2f})")


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _scores(model: Transformer, seqs: list[list[int]], merge: bool, choices=None):
    model.zero_grad(set_to_none=True)
    scores = sequence_scores(model, seqs, merge=merge, with_index_loss=True, choices=choices)
    n = sum(len(s) for s in seqs)
    # A loss that weights every token differently, so that the gradient sees every logprob.
    loss = sum((lp * torch.linspace(0.5, 1.5, lp.numel(), device=lp.device)).sum() for lp in scores.logprobs) / n
    if scores.index_loss is not None:
        loss = loss + scores.index_loss / n
    loss.backward()
    return torch.cat([lp.detach().double() for lp in scores.logprobs]), _grads(model)


def exact(preset_name: str, sample_rows: int, sample_prompt: int, sample_tokens: int, replay: bool = False,
          parts: tuple[str, ...] = ("fp32", "bf16", "sampled")) -> dict:
    cfg = preset(preset_name)
    seqs = workload("issue")
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().float()
    # With replay, both layouts impose the choices each sequence made alone in fp32.
    choices = record_alone(model, seqs) if replay else None
    lp_m, g_m = _scores(model, seqs, True, choices)
    lp_u, g_u = _scores(model, seqs, False, choices)
    rel = {n: float((g_m[n] - g_u[n]).norm() / g_u[n].norm().clamp_min(1e-30)) for n in g_u}
    worst = max(rel, key=rel.get)
    out = {"preset": preset_name, "replay": replay, "fp32_logprob_max_abs_diff": float((lp_m - lp_u).abs().max()),
           "fp32_logprob_mean_abs_diff": float((lp_m - lp_u).abs().mean()),
           "fp32_grad_max_rel_diff": rel[worst], "fp32_grad_worst_param": worst}
    model16 = Transformer(cfg).cuda()
    model16.load_state_dict(model.state_dict())
    model16.to(torch.bfloat16)
    for merge, key in ((True, "merged"), (False, "unmerged")) if "bf16" in parts else ():
        lp16, g16 = _scores(model16, seqs, merge, choices)
        out[f"bf16_{key}_logprob_max_abs_to_fp32"] = float((lp16 - lp_u).abs().max())
        out[f"bf16_{key}_logprob_mean_abs_to_fp32"] = float((lp16 - lp_u).abs().mean())
        out[f"bf16_{key}_grad_rel_to_fp32"] = max(
            float((g16[n] - g_u[n]).norm() / g_u[n].norm().clamp_min(1e-30)) for n in g_u if n in g16)
    if "sampled" in parts:
        out.update(sampled_vs_trained(model, sample_rows, sample_prompt, sample_tokens, "fp32", replay))
        out.update(sampled_vs_trained(model16, sample_rows, sample_prompt, sample_tokens, "bf16", replay))
    print(json.dumps(out, indent=1), flush=True)
    return out


def sampled_vs_trained(model: Transformer, rows: int, prompt: int, new: int, tag: str, replay: bool = False) -> dict:
    from forge.policy.generation import ModelGenerator
    from forge.policy.sampling import SamplingParams
    from forge.policy.tokenizer import ByteTokenizer

    rng = random.Random(1)
    prompts = [_tokens(rng, prompt) for _ in range(rows)]
    gen = ModelGenerator(model, ByteTokenizer(), seed=0, decode="graph", record_choices=replay)
    done = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=1.0))
    seqs = [p + c.token_ids for p, c in zip(prompts, done)]
    choices = [c.choices for c in done] if replay else None
    out = {}
    for merge, key in ((False, ""), (True, "_merged")):
        with torch.no_grad():
            trained = sequence_scores(model, seqs, merge=merge, choices=choices).logprobs
        diffs = torch.cat([(t[len(p) - 1:].double().cpu() - torch.tensor(c.logprobs, dtype=torch.float64)).abs()
                           for p, c, t in zip(prompts, done, trained)])
        out.update({f"{tag}_sampled_vs_trained{key}_tokens": int(diffs.numel()),
                    f"{tag}_sampled_vs_trained{key}_max_abs": float(diffs.max()),
                    f"{tag}_sampled_vs_trained{key}_mean_abs": float(diffs.mean())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="exact,speed")
    parser.add_argument("--presets", default="msa_100m,msa_100m_dense")
    parser.add_argument("--workloads", default="issue,grpo,agent,low")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vary-shapes", action="store_true",
                        help="drop 0-63 tokens from each sequence's end, anew at every call (RL's changing lengths)")
    parser.add_argument("--sample-rows", type=int, default=8)
    parser.add_argument("--sample-prompt", type=int, default=2048)
    parser.add_argument("--sample-tokens", type=int, default=96)
    parser.add_argument("--replay", action="store_true",
                        help="exact: impose recorded choices (routing replay) on merged, unmerged and trained passes")
    parser.add_argument("--exact-parts", default="fp32,bf16,sampled",
                        help="exact: which comparisons (fp32 merged vs unmerged always runs; bf16, sampled)")
    parser.add_argument("--merged-only", action="store_true",
                        help="speed: time the merged step alone (A/B runs of one change; no speed-up)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "speed": [], "exact": []}
    for name in args.presets.split(","):
        if "exact" in parts:
            result["exact"].append(exact(name, args.sample_rows, args.sample_prompt, args.sample_tokens,
                                         args.replay, tuple(args.exact_parts.split(","))))
        if "speed" in parts:
            result["speed"] += speed(name, args.workloads.split(","), args.reps, args.vary_shapes,
                                     (True,) if args.merged_only else (True, False))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
