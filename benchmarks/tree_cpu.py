"""The trainer's step on the CPU: tree attention walked branch by branch against one masked call.

On the CPU `forge.kernels.tree_attention` runs `tree_attention_split`: each trunk attends after
its ancestors' keys and the branches recurse, spans of at most `SPLIT_BELOW_TOKENS` in one
masked call. The first version masked the whole flattened tree in one scaled-dot-product call
(`tree_attention_naive`, kept as the reference), which spends nearly all its work on pairs the
mask throws away. This times forward and backward of `sequence_scores` (what the trainer runs)
on the quickstart's model over a batch shaped like one of its RL steps (groups sharing a
system prompt, each group a task prompt and its samples' responses), fp32, `--threads` threads
(1, as Ray gives each actor on a small machine):

- `merged, split`: the prefix tree, attention walked branch by branch (the default);
- `merged, one mask`: the prefix tree, attention under one [T, T] mask;
- `unmerged`: every sequence alone (one forward each, the CPU default for merge=False).

    PYTHONPATH=. python benchmarks/tree_cpu.py --out tree_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from _timing import cpu_name, timed_ms
from invariant import groups, preset

import forge.policy.model as policy_model
from forge.kernels.tree_attention import tree_attention, tree_attention_naive
from forge.policy.model import Transformer
from forge.prefix_tree import build_tree
from forge.trainer.logprobs import sequence_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=160, help="tokens before the responses (half shared by all)")
    parser.add_argument("--response", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    seqs = groups(args.groups, args.group_size, args.prompt, args.response)
    tree = build_tree(seqs)
    torch.manual_seed(0)
    model = Transformer(preset("quickstart"))

    def step(merge: bool):
        def run() -> None:
            scores = sequence_scores(model, seqs, merge=merge)
            (-sum(lp.sum() for lp in scores.logprobs)).backward()
            model.zero_grad(set_to_none=True)
        return run

    rows = [{"variant": "merged, split", "ms": timed_ms(step(True), args.reps)}]
    policy_model.tree_attention = tree_attention_naive
    try:
        rows.append({"variant": "merged, one mask", "ms": timed_ms(step(True), args.reps)})
    finally:
        policy_model.tree_attention = tree_attention
    rows.append({"variant": "unmerged", "ms": timed_ms(step(False), args.reps)})
    tokens = sum(map(len, seqs))
    base = rows[0]["ms"]
    print(f"quickstart model, fp32, {args.threads} thread(s): {len(seqs)} sequences, {tokens} tokens "
          f"({tree.num_tokens} unique, ratio {tree.token_ratio():.2f})")
    print(f"{'variant':<18} {'ms':>9} {'tokens/s':>10} {'x split':>8}")
    for r in rows:
        r["tokens_per_s"] = tokens / r["ms"] * 1e3
        print(f"{r['variant']:<18} {r['ms']:>9.1f} {r['tokens_per_s']:>10.0f} {r['ms'] / base:>8.2f}")
    if args.out:
        meta = {"cpu": cpu_name(), "torch": torch.__version__,
                "date": datetime.date.today().isoformat(), "args": vars(args), "tokens": tokens,
                "unique_tokens": tree.num_tokens}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
