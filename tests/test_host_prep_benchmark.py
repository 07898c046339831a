"""benchmarks/host_prep.py: its records exercise both ways of building the replay tree."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import host_prep  # noqa: E402

from forge.prefix_tree import build_tree  # noqa: E402
from forge.trainer.logprobs import replay_tree  # noqa: E402


def test_records_agree_or_differ_as_the_benchmark_says():
    seqs = host_prep.workload("issue")
    plain = build_tree(seqs)
    agree = host_prep.records(seqs, "msa_100m", differ=False)
    differ = host_prep.records(seqs, "msa_100m", differ=True)
    assert agree[0].experts.shape == (len(seqs[0]), 9, 4) and agree[0].blocks.shape == (len(seqs[0]), 8, 2, 8)
    assert replay_tree(seqs, agree).num_tokens == plain.num_tokens
    # The second sequence leaves its group at its first token: its copy of the 3,000-token
    # prompt is a tree of its own (its response was unique already).
    assert replay_tree(seqs, differ).num_tokens == plain.num_tokens + 3000


def test_measure_reports_every_column(monkeypatch):
    monkeypatch.setattr(host_prep, "workload", lambda name: [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6]])
    row = host_prep.measure("tiny", "msa_100m", reps=1)
    assert row["tokens"] == 11 and row["unique"] == 6 and row["sequences"] == 3
    assert all(row[k] > 0 for k in ("build_tree_ms", "replay_agree_ms", "replay_differ_ms", "scores_host_ms"))
