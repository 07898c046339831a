"""Retrieval check: where the index keys carry the signal, MSA keeps the needle's block."""

from __future__ import annotations

from forge.kernels.msa import select_blocks
from forge.kernels.msa.synthetic import needle_case, needle_recall


def test_needle_block_is_kept_for_the_queries_that_ask_for_it():
    # 64 blocks, 8 kept: picking blocks at random would keep the needle about 12% of the time.
    case = needle_case(4096, hkv=2, di=64, n_needles=8, n_questions=256, signal=1.0, seed=0)
    selected = select_blocks(case.iq, case.ik, block_size=64, top_k=8)
    assert needle_recall(case, selected, 64) >= 0.95


def test_without_signal_the_needle_is_kept_only_by_chance():
    case = needle_case(4096, hkv=2, di=64, n_needles=8, n_questions=256, signal=0.0, seed=0)
    selected = select_blocks(case.iq, case.ik, block_size=64, top_k=8)
    assert needle_recall(case, selected, 64) < 0.3
