"""Synthetic needle inputs for the MSA retrieval check (a test on the CPU, the benchmark on a GPU).

Index keys are noise except at a few needle tokens, each carrying its own direction; the last
`n_questions` queries each ask for one needle by carrying that direction in their index queries
(every KV group). The check is whether the needle's block is among the blocks those queries
keep. Directions have norm sqrt(Di), added times `signal` to unit-variance noise, so a needle
scores about `signal**2 * Di` against noise of standard deviation about `sqrt(Di)`, whose block
maxima reach several times that: at Di=64, block 64 and 64 blocks, signal 1.0 is near the edge
(about 97% kept with top_k=8) and 0.5 is mostly lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NeedleCase:
    """Index inputs with needles, and which needle each question query asks for."""

    iq: torch.Tensor
    """[1, T, Hkv, Di] index queries."""
    ik: torch.Tensor
    """[1, T, Di] index keys."""
    needle_pos: torch.Tensor
    """[n_needles] token position of each needle."""
    question_pos: torch.Tensor
    """[n_questions] positions of the queries that need a needle."""
    asks: torch.Tensor
    """[n_questions] index into needle_pos of the needle each question needs."""


def needle_case(
    t: int, *, hkv: int = 2, di: int = 64, n_needles: int = 8, n_questions: int = 256,
    signal: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> NeedleCase:
    """Needles at random positions before the questions, which are the last n_questions tokens."""
    if n_needles > di:
        raise ValueError(f"n_needles ({n_needles}) must be <= di ({di}): each needle needs its own direction")
    gen = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(di, di, generator=gen))[0][:n_needles] * di**0.5  # [N, Di]
    ik = torch.randn(1, t, di, generator=gen)
    iq = torch.randn(1, t, hkv, di, generator=gen)
    needle_pos = torch.randperm(t - n_questions, generator=gen)[:n_needles]
    ik[0, needle_pos] += signal * directions
    question_pos = torch.arange(t - n_questions, t)
    asks = torch.randint(0, n_needles, (n_questions,), generator=gen)
    iq[0, question_pos] += signal * directions[asks].unsqueeze(1)
    return NeedleCase(iq.to(device, dtype), ik.to(device, dtype), needle_pos.to(device),
                      question_pos.to(device), asks.to(device))


def needle_recall(case: NeedleCase, selected: torch.Tensor, block_size: int) -> float:
    """Fraction of (question, KV group) pairs whose kept blocks `[1, T, Hkv, top_k]` hold the needle."""
    needle_block = (case.needle_pos[case.asks] // block_size).view(-1, 1, 1)  # [Q, 1, 1]
    kept = selected[0, case.question_pos].long()  # [Q, Hkv, top_k]
    return (kept == needle_block).any(-1).float().mean().item()
