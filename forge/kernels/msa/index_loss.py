"""The MSA index-branch loss at any length: the naive definition, chunked over queries.

`naive.msa_index_loss_naive` materialises [B, Hkv, T, T]. Here each chunk of queries gathers
only its kept blocks' keys and index keys ([chunk, Hkv, top_k * block_size] logits), and the
chunk is recomputed in the backward pass (activation checkpointing), so the memory held for
the backward pass is the inputs plus one chunk. The warm-up under dense attention (`dense=True`)
scores each chunk against all earlier keys instead.

This is PyTorch, not a fused Triton kernel: the loss trains only the small index branch and
its cost is about one sparse-attention forward (the teacher's logits are recomputed).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _kl_terms(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over chunk rows of KL(mean-over-heads teacher || student) over masked keys.

    teacher_logits: [..., rep, L]; student_logits, mask: [..., L].
    """
    neg = float("-inf")
    target = torch.softmax(teacher_logits.masked_fill(~mask.unsqueeze(-2), neg), dim=-1).mean(-2)
    log_student = torch.log_softmax(student_logits.masked_fill(~mask, neg), dim=-1)
    log_target = torch.log(target.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.where(mask, target * (log_target - log_student), torch.zeros_like(target)).sum()


def _sparse_chunk(q, k, iq, ik, selected, t0: int, block_size: int, scale: float) -> torch.Tensor:
    b, tc, hq, d = q.shape
    hkv = k.shape[2]
    t_all = k.shape[1]
    offs = torch.arange(block_size, device=q.device)
    sel = selected.long()  # [B, Tc, Hkv, K]
    tok = (sel.clamp_min(0).unsqueeze(-1) * block_size + offs).flatten(-2)  # [B, Tc, Hkv, L]
    pos = (t0 + torch.arange(tc, device=q.device)).view(1, tc, 1, 1)
    mask = (sel >= 0).repeat_interleave(block_size, dim=-1) & (tok <= pos) & (tok < t_all)
    tok = tok.clamp_max(t_all - 1)
    bidx = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    gidx = torch.arange(hkv, device=q.device).view(1, 1, hkv, 1)
    k_sel = k[bidx, tok, gidx].float()  # [B, Tc, Hkv, L, D]
    q_g = q.float().view(b, tc, hkv, hq // hkv, d)
    teacher = torch.einsum("btgrd,btgld->btgrl", q_g, k_sel) * scale
    ik_sel = ik[bidx, tok].float()  # [B, Tc, Hkv, L, Di]
    student = torch.einsum("btgd,btgld->btgl", iq.float(), ik_sel) * iq.shape[-1] ** -0.5
    return _kl_terms(teacher, student, mask)


def _dense_chunk(q, k, iq, ik, t0: int, scale: float) -> torch.Tensor:
    b, tc, hq, d = q.shape
    hkv = k.shape[2]
    t1 = t0 + tc
    pos = t0 + torch.arange(tc, device=q.device)
    mask = (torch.arange(t1, device=q.device)[None, :] <= pos[:, None]).view(1, tc, 1, t1)
    q_g = q.float().view(b, tc, hkv, hq // hkv, d)
    teacher = torch.einsum("btgrd,bjgd->btgrj", q_g, k[:, :t1].float()) * scale
    student = torch.einsum("btgd,bjd->btgj", iq.float(), ik[:, :t1].float()) * iq.shape[-1] ** -0.5
    return _kl_terms(teacher, student, mask.expand(b, tc, hkv, t1))


def msa_index_loss_chunked(
    q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor,
    selected: torch.Tensor | None, *, block_size: int, scale: float, dense: bool,
    chunk: int = 256,
) -> torch.Tensor:
    """Mean over (batch, token, group) of the index KL; gradients reach only iq and ik.

    selected: kept blocks [B, T, Hkv, top_k] (ignored when dense).
    """
    q, k = q.detach(), k.detach()
    b, t, _, _ = q.shape
    hkv = k.shape[2]
    total = q.new_zeros((), dtype=torch.float32)
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        if dense:
            part = checkpoint(_dense_chunk, q[:, t0:t1], k, iq[:, t0:t1], ik, t0, scale,
                              use_reentrant=False)
        else:
            part = checkpoint(_sparse_chunk, q[:, t0:t1], k, iq[:, t0:t1], ik, selected[:, t0:t1],
                              t0, block_size, scale, use_reentrant=False)
        total = total + part
    return total / (b * t * hkv)
