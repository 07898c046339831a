"""The host's share of a merged training step: what the GPU waits for before and between kernels.

`sequence_scores` builds the prefix tree on the host (a trie in Python), and before its
forward the token-id, position and index tensors. The GPU idles while it does, so this time
adds to every merged step (on `model_step.py`'s agent workload, 64 turns of one conversation,
the merged step is about 130 ms on an H100). Needs no GPU. Per workload of `model_step.py`
(grpo, agent, low, issue), median milliseconds of:

- `build_tree`: the plain prefix tree;
- `replay_tree, records agree`: the tree under routing replay when every sequence's record
  agrees with the others' on their shared tokens (a generator prefills a group's prompt once,
  so its samples share one record of it): records as large as `--preset`'s (MoE experts and
  MSA blocks per token), random, one per unique token;
- `replay_tree, records differ`: the same records with one shared token's changed in one
  sequence, so the tree must be keyed on (token, choices);
- `sequence_scores host`: `sequence_scores(merge=True)` with a model that only looks its
  logits up in a table (no layers): the tree, the tensors, the gathers of each sequence's
  logprobs and entropies, on the CPU.

    PYTHONPATH=.:benchmarks python benchmarks/host_prep.py --out host_prep.json [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from _timing import cpu_name, timed_ms
from model_step import preset, workload

from forge.policy.choices import Choices
from forge.prefix_tree import build_tree
from forge.trainer.logprobs import replay_tree, sequence_scores


class LogitTable(torch.nn.Module):
    """A model with no layers: each token's logits are a row of a table. `sequence_scores`
    around it costs what its host work and gathers cost."""

    def __init__(self, vocab: int = 256):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, **_):
        return self.table(input_ids)


def records(seqs: list[list[int]], preset_name: str, differ: bool, seed: int = 0) -> list[Choices]:
    """Per sequence, a record shaped like the preset's: random, one per unique prefix token
    (so sequences agree wherever they share one); with `differ`, the second sequence's record
    changed at its first token."""
    cfg = preset(preset_name)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    n_msa = sum(cfg.is_msa_layer(i) for i in range(cfg.num_layers))
    tree = build_tree(seqs)
    g = torch.Generator().manual_seed(seed)
    n = tree.num_tokens
    experts = torch.randint(0, cfg.num_experts, (n, n_moe, cfg.top_k), generator=g, dtype=torch.int16)
    blocks = torch.randint(0, 64, (n, n_msa, cfg.num_kv_heads, cfg.msa.top_k), generator=g, dtype=torch.int16)
    out = [Choices(experts[ix], blocks[ix]) for ix in tree.seq_index]
    if differ and len(out) > 1:
        out[1].experts[0, 0, 0] = (out[1].experts[0, 0, 0] + 1) % cfg.num_experts
    return out


def measure(name: str, preset_name: str, reps: int) -> dict:
    seqs = workload(name)
    agree = records(seqs, preset_name, differ=False)
    differ = records(seqs, preset_name, differ=True)
    model = LogitTable()
    tree = build_tree(seqs)

    def scores() -> None:
        with torch.no_grad():
            sequence_scores(model, seqs, merge=True, with_entropy=True)

    return {
        "workload": name,
        "tokens": sum(len(s) for s in seqs),
        "unique": tree.num_tokens,
        "sequences": len(seqs),
        "build_tree_ms": timed_ms(lambda: build_tree(seqs), reps),
        "replay_agree_ms": timed_ms(lambda: replay_tree(seqs, agree), reps),
        "replay_differ_ms": timed_ms(lambda: replay_tree(seqs, differ), max(1, reps // 3)),
        "scores_host_ms": timed_ms(scores, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="grpo,agent,issue,low")
    parser.add_argument("--preset", default="msa_100m", help="whose record sizes to use")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as a Ray actor gets)")
    parser.add_argument("--out", default="host_prep.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(w, args.preset, args.reps) for w in args.workloads.split(",")]
    print(f"{'workload':<8} {'tokens':>8} {'unique':>7} {'build_tree':>11} {'replay, agree':>14} "
          f"{'replay, differ':>15} {'scores host':>12}  (ms)")
    for r in rows:
        print(f"{r['workload']:<8} {r['tokens']:>8} {r['unique']:>7} {r['build_tree_ms']:>11.1f} "
              f"{r['replay_agree_ms']:>14.1f} {r['replay_differ_ms']:>15.1f} {r['scores_host_ms']:>12.1f}")
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(),
            "torch": torch.__version__, "threads": args.threads, "preset": args.preset}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
