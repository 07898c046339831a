"""MSA over prefix trees on the GPU at the 100M model's shapes (issue 14), and the whole model exact.

The interpreter tests (tests/test_msa_tree_*_triton.py) check the kernels on tiny trees; these
repeat the contracts at full size on CUDA: the indexer selects bitwise alike merged and unmerged,
attention and the index loss match the PyTorch reference (tree.py), and the msa_100m policy in
fp32 gives merged logprobs and gradients within 1e-5 of unmerged.
"""

from __future__ import annotations

import random

import pytest
import torch

from forge.prefix_tree import build_tree

pytestmark = pytest.mark.gpu

HQ, HKV, D, DI, BS, TOPK = 8, 2, 64, 64, 64, 8


def _groups(groups: int, size: int, prompt: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    seqs = []
    for _ in range(groups):
        p = [rng.randrange(256) for _ in range(prompt)]
        seqs += [p + [rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(size)]
    return seqs


def _tree_inputs(n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", dtype)  # noqa: E731
    return mk(1, n, HQ, D), mk(1, n, HKV, D), mk(1, n, HKV, D), mk(1, n, HKV, DI), mk(1, n, DI)


def _chain(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((1, n), n, device="cuda", dtype=torch.int32),
            torch.arange(n, device="cuda", dtype=torch.int32)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_tree_selection_is_bitwise_the_unmerged_one(dtype):
    from forge.kernels.msa.triton_tree_indexer import select_blocks_tree_triton

    tree = build_tree(_groups(2, 8, 3000, 100, 600))
    _, _, _, iq, ik = _tree_inputs(tree.num_tokens, dtype)
    se, pos = tree.subtree_end[None].cuda().int(), tree.position[None].cuda().int()
    merged = select_blocks_tree_triton(iq, ik, se, pos, block_size=BS, top_k=TOPK)
    for ix in tree.seq_index:
        ix = ix.cuda()
        alone = select_blocks_tree_triton(iq[:, ix].contiguous(), ik[:, ix].contiguous(), *_chain(len(ix)),
                                          block_size=BS, top_k=TOPK)
        assert torch.equal(merged[:, ix], alone)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_gpu_tree_attention_and_index_loss_match_the_reference(dtype, tol):
    from forge.kernels.msa.tree import msa_tree
    from forge.kernels.msa.tree_triton import msa_tree_triton
    from forge.kernels.msa.triton_tree_indexer import select_blocks_tree_triton

    tree = build_tree(_groups(2, 4, 1500, 50, 400, seed=1))
    n = tree.num_tokens
    q, k, v, iq, ik = (x.requires_grad_() for x in _tree_inputs(n, dtype, seed=1))
    se, pos = tree.subtree_end[None].cuda().int(), tree.position[None].cuda().int()
    w = tree.multiplicity[None].cuda().float()
    kw = dict(block_size=BS, top_k=TOPK, dense_below=512, token_weight=w, with_index_loss=True)
    sel = select_blocks_tree_triton(iq.detach(), ik.detach(), se, pos, block_size=BS, top_k=TOPK)
    out, loss = msa_tree_triton(q, k, v, iq, ik, se, pos, selected=sel, **kw)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    grads = torch.autograd.grad((out.float() * g_out.float()).sum() + loss, (q, k, v, iq, ik))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, iq, ik)]
    ref_out, ref_loss = msa_tree(*ref_in, se.long(), pos.long(), selected=sel, **kw)
    ref_grads = torch.autograd.grad((ref_out * g_out.double()).sum() + ref_loss, ref_in)
    assert _rel(out, ref_out) < tol
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    for name, a, b in zip("q k v iq ik".split(), grads, ref_grads):
        assert _rel(a, b) < tol * (5 if dtype == torch.bfloat16 else 1), name


_NOT_EXACT = pytest.mark.xfail(strict=True, reason=(
    "issue 14's 1e-5 contract is not met yet: on an H200 (2026-12-06) the issue's batch gave max "
    "|logprob diff| 0.0127 (mean 2.9e-6) and 0.9% on layers.7.mlp.router's gradient. Selections "
    "and routes near ties flip because the layers before them round differently merged and "
    "unmerged (dense tree attention vs causal, different tile groupings); docs/benchmarks.md"))


@pytest.mark.parametrize("numerics", [pytest.param("default", marks=_NOT_EXACT), "replay", "batch_invariant"])
def test_gpu_msa_100m_merged_equals_unmerged_in_fp32(numerics):
    """Issue 14's contract on its batch (benchmarks/model_step.py's `issue` workload, same seed):
    met with `batch_invariant` numerics (on an H100, 2026-12-07: logprobs equal to the bit, worst
    gradient 4.0e-6 relative) and with routing replay (both layouts impose the choices each
    sequence made alone, forge.policy.choices; H100, 2026-12-08: max 2.4e-6, worst gradient
    4.9e-6), not by the default kernels choosing alone."""
    import dataclasses

    from forge.policy.choices import record_alone
    from forge.policy.config import ModelConfig
    from forge.policy.model import Transformer
    from forge.trainer.logprobs import sequence_scores

    seqs = _groups(2, 8, 3000, 100, 600, seed=0)
    torch.manual_seed(0)
    invariant = numerics == "batch_invariant"
    model = Transformer(dataclasses.replace(ModelConfig.msa_100m(), batch_invariant=invariant)).cuda().float()
    choices = record_alone(model, seqs) if numerics == "replay" else None

    def run(merge: bool):
        model.zero_grad(set_to_none=True)
        scores = sequence_scores(model, seqs, merge=merge, with_index_loss=True, choices=choices)
        n = sum(map(len, seqs))
        loss = sum((lp * torch.linspace(0.5, 1.5, lp.numel(), device="cuda")).sum() for lp in scores.logprobs) / n
        (loss + scores.index_loss / n).backward()
        return (torch.cat([lp.detach() for lp in scores.logprobs]),
                {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    lp_m, g_m = run(True)
    lp_u, g_u = run(False)
    assert float((lp_m - lp_u).abs().max()) <= 1e-5
    worst = max((_rel(g_m[name], g_u[name]), name) for name in g_u)
    assert worst[0] <= 1e-5, worst
