"""Plain-PyTorch definition of MiniMax Sparse Attention (MSA), the reference for the kernels.

Shapes: q [B, T, Hq, D]; k, v [B, T, Hkv, D]; index queries iq [B, T, Hkv, Di] (one index head
per KV group); index keys ik [B, T, Di] (one index head shared by all groups).

For query t and KV group g, token j <= t scores `iq[t, g] . ik[j]`. A block's score is the max
over its visible tokens. The query keeps its own block and the `top_k - 1` other visible blocks
with the highest scores (ties go to the lower block index), so at most `top_k` blocks in all.
Attention is exact softmax over the tokens of the kept blocks, causal inside the own block; all
query heads of a group share the group's blocks. A query that sees no more than `top_k` blocks
keeps them all, which is dense causal attention.

The index loss (`msa_index_loss_naive`) is the paper's: KL from the main branch's attention over
the kept tokens (its probabilities averaged over the heads of the group, the backbone detached)
to the index branch's softmax over the same tokens, with index logits scaled by Di^-0.5, averaged
over batch, tokens and groups. With `dense=True` both distributions cover every causal token:
the warm-up under dense attention.

Everything here materialises [B, Hkv, T, T] tensors: it is a definition for small inputs.
"""

from __future__ import annotations

import math

import torch


def _check_shapes(q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor) -> None:
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if iq.shape[:3] != (b, t, hkv):
        raise ValueError(
            f"iq has shape {tuple(iq.shape)}; it must be [B, T, Hkv, Di] = [{b}, {t}, {hkv}, Di]"
            " (one index-query head per KV group)"
        )
    if ik.shape[:2] != (b, t) or ik.dim() != 3 or ik.shape[-1] != iq.shape[-1]:
        raise ValueError(
            f"ik has shape {tuple(ik.shape)}; it must be [B, T, Di] = [{b}, {t}, {iq.shape[-1]}]"
            " (one index-key head shared by all groups)"
        )


def block_scores_naive(iq: torch.Tensor, ik: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block scores `[B, Hkv, T, n_blocks]` in fp32: max of `iq[t, g] . ik[j]` over visible j.

    Blocks with no visible token score -inf.
    """
    b, t, hkv, _ = iq.shape
    n_blocks = math.ceil(t / block_size)
    scores = torch.einsum("btgd,bjd->bgtj", iq.float(), ik.float())  # [B, Hkv, T, T]
    pos = torch.arange(t, device=iq.device)
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    pad = n_blocks * block_size - t
    scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    return scores.view(b, hkv, t, n_blocks, block_size).amax(-1)


def select_blocks_naive(
    iq: torch.Tensor, ik: torch.Tensor, *, block_size: int = 128, top_k: int = 16
) -> torch.Tensor:
    """Kept block indices `[B, T, Hkv, top_k]` int64, ascending, -1 in unused slots at the end."""
    if top_k < 1:
        raise ValueError(f"top_k is {top_k}; it must be at least 1 (the query's own block)")
    scores = block_scores_naive(iq, ik, block_size)  # [B, Hkv, T, NB]
    b, hkv, t, n_blocks = scores.shape
    own = torch.arange(t, device=iq.device) // block_size  # [T]
    others = scores.scatter(-1, own.view(1, 1, t, 1).expand(b, hkv, t, 1), float("-inf"))
    # A stable descending sort puts the lower block index first among equal scores.
    order = torch.sort(others, dim=-1, descending=True, stable=True).indices
    n_other = min(top_k - 1, n_blocks)
    chosen = order[..., :n_other]  # [B, Hkv, T, top_k - 1]
    valid = torch.gather(others, -1, chosen) > float("-inf")
    chosen = torch.where(valid, chosen, torch.full_like(chosen, n_blocks))
    own_col = own.view(1, 1, t, 1).expand(b, hkv, t, 1)
    kept = torch.cat([chosen, own_col], dim=-1)
    if kept.shape[-1] < top_k:
        fill = torch.full((b, hkv, t, top_k - kept.shape[-1]), n_blocks, device=iq.device)
        kept = torch.cat([kept, fill], dim=-1)
    kept = kept.sort(dim=-1).values
    kept = torch.where(kept == n_blocks, torch.full_like(kept, -1), kept)
    return kept.permute(0, 2, 1, 3).contiguous()  # [B, T, Hkv, top_k]


def kept_token_mask(selected: torch.Tensor, block_size: int) -> torch.Tensor:
    """Visibility `[B, Hkv, T, T]` (query, key) from kept blocks `[B, T, Hkv, top_k]`: key j is
    seen by query t iff j <= t and j's block is kept by (t, group)."""
    b, t, hkv, _ = selected.shape
    n_blocks = math.ceil(t / block_size)
    kept = torch.zeros(b, t, hkv, n_blocks + 1, dtype=torch.bool, device=selected.device)
    # Unused slots (-1) land in a spare column that is dropped.
    kept.scatter_(-1, torch.where(selected < 0, n_blocks, selected), True)
    kept = kept[..., :n_blocks].permute(0, 2, 1, 3)  # [B, Hkv, T, NB]
    key_block = torch.arange(t, device=selected.device) // block_size
    mask = kept[..., key_block]  # [B, Hkv, T, T]
    pos = torch.arange(t, device=selected.device)
    return mask & (pos[None, :] <= pos[:, None])


def sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention over the kept blocks `selected [B, T, Hkv, top_k]`, in fp32.

    Returns [B, T, Hq, D] in q's dtype.
    """
    hq, hkv = q.shape[2], k.shape[2]
    rep = hq // hkv
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = kept_token_mask(selected, block_size).repeat_interleave(rep, dim=1)  # [B, Hq, T, T]
    qt = q.float().transpose(1, 2)  # [B, Hq, T, D]
    kt = k.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vt).transpose(1, 2).to(q.dtype)


def msa_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    iq: torch.Tensor,
    ik: torch.Tensor,
    *,
    block_size: int = 128,
    top_k: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """MSA: select blocks with the index branch, then exact attention over them.

    The selection is discrete, so no gradient reaches iq or ik here; the index branch learns
    through `msa_index_loss_naive`.
    """
    _check_shapes(q, k, iq, ik)
    with torch.no_grad():
        selected = select_blocks_naive(iq, ik, block_size=block_size, top_k=top_k)
    return sparse_attention_naive(q, k, v, selected, block_size=block_size, scale=scale)


def msa_index_loss_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    iq: torch.Tensor,
    ik: torch.Tensor,
    *,
    block_size: int = 128,
    top_k: int = 16,
    scale: float | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """KL(main-branch attention || index-branch distribution) over the kept tokens, a scalar.

    q and k are detached: the loss trains only iq and ik. `dense=True` uses every causal token.
    """
    _check_shapes(q, k, iq, ik)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    scale = d**-0.5 if scale is None else scale
    with torch.no_grad():
        if dense:
            pos = torch.arange(t, device=q.device)
            mask = (pos[None, :] <= pos[:, None]).expand(b, hkv, t, t)
        else:
            selected = select_blocks_naive(iq, ik, block_size=block_size, top_k=top_k)
            mask = kept_token_mask(selected, block_size)  # [B, Hkv, T, T]
        qt = q.detach().float().transpose(1, 2).reshape(b, hkv, rep, t, d)
        kt = k.detach().float().transpose(1, 2)  # [B, Hkv, T, D]
        s = torch.einsum("bgrtd,bgjd->bgrtj", qt, kt) * scale
        p = torch.softmax(s.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
        target = p.mean(dim=2)  # [B, Hkv, T, T]
    logits = torch.einsum("btgd,bjd->bgtj", iq.float(), ik.float()) * iq.shape[-1] ** -0.5
    log_student = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    log_target = torch.log(target.clamp_min(torch.finfo(torch.float32).tiny))
    terms = torch.where(mask, target * (log_target - log_student), torch.zeros_like(target))
    return terms.sum(-1).mean()
