"""Triton indexer for MSA over a flattened prefix tree: block max and top-k in one streaming pass.

The tree counterpart of `triton_indexer.py`. Query q sees key k iff `k <= q < subtree_end[k]`
(its ancestors and itself); key k belongs to block `position[k] // block_size` (position space,
as in `tree.py`); a block scores the max of `iq[q, g] . ik[k]` over the keys of it that q sees.
Each (query, KV group) keeps its own block, written in the last slot, and the `top_k - 1` best
blocks before it that it sees (ties to the lower block index, -1 in empty slots): the selection
`tree.kept_keys` makes. A token gets bitwise the slots it gets in its own sequence run alone
as a chain (`subtree_end = T`, `position = arange(T)`): the same blocks in the same slots.

Two facts make one pass over the keys in flat order enough:
- the keys a query sees are its ancestors, one at each position up to its own, which DFS
  pre-order lays out in increasing flat index and increasing position; so streaming key tiles
  in flat order hands every query its blocks in non-decreasing block order, as a chain does;
- for two keys i < j that one query sees, `position[j] - position[i] <= j - i`; so a tile of
  BLOCK_N <= block_size keys holds the keys of at most two blocks of any query. With the first
  fact, more: those keys are the query's next positions, so they continue the block it has open
  (the last one it saw) and may start the next block, but never hold a whole new block.

Departures from the chain indexer, where a program's queries share one block and every earlier
block is wholly visible to them:
- a program holds BLOCK_Q consecutive flat queries, which may lie in different blocks and on
  different branches, so scores are masked per element (seen, and before the row's own block);
- a block of a query may be split over several tiles, even far apart (a branch point inside a
  block puts its first keys in the parent and the rest after the sibling subtrees), so each row
  keeps an open block (id, running max) and offers it to its running top-(k-1) only when its
  next block starts or the stream ends: one offer per row and tile at most. The offer is the
  chain indexer's `insert_block` (strictly greater evicts; the highest block index among equal
  lowest slots goes) with a block id per row, so the slots fill in the order, and so the
  layout, that they fill in the sequence alone;
- tiles that no row of the program sees before its own block are skipped before their index
  keys are loaded, and the stream jumps over whole subtrees that no row sees: subtrees nest in
  DFS order, so when no key of a tile reaches the program's first query, neither does any key
  up to the largest `subtree_end` in the tile; a sibling branch or an earlier tree of a forest
  costs one step, not one step per tile;
- tiles are smaller than the chain indexer's 128 x 128: the per-element masks keep several
  [BLOCK_Q, BLOCK_N] tensors live, and an IEEE fp32 dot runs on CUDA cores with a row tile of
  iq per thread. Compiled for sm_90 (not yet timed on a GPU), 64 x 64 takes 215 registers a
  thread in bf16 but spills 6.5 KB a thread in fp32, so fp32 gets 32 x 32 (128 registers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from forge.kernels.msa.triton_indexer import insert_block
from forge.kernels.precision import dot_precision

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TreeIndexBlocks:
    """Tile sizes and launch settings of the tree indexer."""

    block_q: int = 64
    """Flat queries per program (a power of two >= 16)."""
    block_n: int = 64
    """Keys per streamed tile (a power of two >= 16), capped at block_size."""
    num_warps: int = 4
    """Warps per program (the key loop is a while loop with a branch: Triton does not pipeline it)."""


def default_blocks(dtype: torch.dtype) -> TreeIndexBlocks:
    """Tiles for inputs of `dtype` (block_n is then capped at block_size)."""
    if IS_INTERPRET:
        # The interpreter pays per operation more than per element: few tiles run fastest,
        # and 32 queries still spread a test's tree over several programs.
        return TreeIndexBlocks(block_q=32, block_n=64)
    # IEEE fp32 runs the dot on CUDA cores with a row tile of iq per thread (see the docstring).
    if dot_precision(dtype) == "ieee":
        return TreeIndexBlocks(block_q=32, block_n=32)
    return TreeIndexBlocks()


@triton.jit(do_not_specialize=["T", "stride_sb"])
def msa_tree_index_fwd_kernel(
    IQ, IK, SE, POS, SEL, T,
    stride_iqb, stride_iqt, stride_iqh,
    stride_ikb, stride_ikt,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, IS_INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Later query tiles tend to stream more tiles: launch them first to shorten the tail.
    pid_q = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    q0 = pid_q * BLOCK_Q
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < T
    offs_d = tl.arange(0, DI)
    slot = tl.arange(0, KP)
    se_base = SE + b * T
    pos_base = POS + b * T
    # Padded rows get block 0: nothing is before it, so they never see a key.
    own = tl.load(pos_base + offs_q, mask=q_ok, other=0) // BLOCK_SIZE  # [BLOCK_Q]
    top_i = tl.full([BLOCK_Q, KP], -1, tl.int32)

    if TOPK > 1:
        iq_ptrs = (IQ + b * stride_iqb + offs_q[:, None].to(tl.int64) * stride_iqt
                   + g * stride_iqh + offs_d[None, :])
        iq = tl.load(iq_ptrs, mask=q_ok[:, None], other=0.0)  # [BLOCK_Q, DI]
        if IS_INTERPRET:
            iq = iq.to(tl.float32)
        # Slots past TOPK-1 are locked at +inf so that they are never the minimum.
        top_s = tl.where(slot[None, :] < TOPK - 1, float("-inf"), float("inf")) + tl.zeros(
            [BLOCK_Q, KP], tl.float32)  # [BLOCK_Q, KP]
        # The open block of each row: -1 with score -inf until the row sees a key.
        cur_id = tl.full([BLOCK_Q], -1, tl.int32)
        cur_s = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        own_max = tl.max(own, 0)
        ik_base = IK + b * stride_ikb
        # Keys after the program's last query are seen by none of its rows.
        q_end = tl.minimum(q0 + BLOCK_Q, T)
        n0 = q0 * 0
        while n0 < q_end:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < q_end
            # Keys past the end get subtree_end 0: no row sees them.
            se = tl.load(se_base + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
            kb = tl.load(pos_base + offs_n, mask=n_ok, other=0) // BLOCK_SIZE  # [BLOCK_N]
            se_max = tl.max(se, 0)
            if tl.max(((se > q0) & (kb < own_max)).to(tl.int32), 0) > 0:
                ik = tl.load(ik_base + offs_n[None, :].to(tl.int64) * stride_ikt + offs_d[:, None],
                             mask=n_ok[None, :], other=0.0)  # [DI, BLOCK_N]
                if IS_INTERPRET:
                    ik = ik.to(tl.float32)
                s = tl.dot(iq, ik, input_precision=PRECISION)  # [BLOCK_Q, BLOCK_N]
                seen = ((offs_n[None, :] <= offs_q[:, None]) & (offs_q[:, None] < se[None, :])
                        & (kb[None, :] < own[:, None]))  # [BLOCK_Q, BLOCK_N]
                # A row's keys here continue its open block and may start the next one, never
                # more: they are the row's next few positions, fewer than a block.
                later = kb[None, :] > cur_id[:, None]  # [BLOCK_Q, BLOCK_N]
                hi = tl.max(tl.where(seen, kb[None, :], -1), 1)  # [BLOCK_Q]
                s_cur = tl.max(tl.where(seen & ~later, s, float("-inf")), 1)
                s_next = tl.max(tl.where(seen & later, s, float("-inf")), 1)
                cur_s = tl.maximum(cur_s, s_cur)
                # A row that starts its next block offers the open one (its max is now final);
                # -inf offers nothing, as insert_block evicts only for a strictly higher score.
                new = hi > cur_id
                top_s, top_i = insert_block(top_s, top_i, tl.where(new, cur_s, float("-inf")), cur_id[:, None],
                                            slot, KP)
                cur_s = tl.where(new, s_next, cur_s)
                cur_id = tl.where(new, hi, cur_id)
            # Keys up to se_max lie in the subtrees of this tile's keys, which nest: if none of
            # those reaches the first row, no row sees any of them, so jump past them all (a
            # sibling branch or an earlier tree of the forest costs one step).
            n0 = tl.where(se_max <= q0, tl.maximum(n0 + BLOCK_N, se_max), n0 + BLOCK_N)
        # The last open block of each row.
        top_s, top_i = insert_block(top_s, top_i, cur_s, cur_id[:, None], slot, KP)

    sel_row = SEL + b * stride_sb + offs_q.to(tl.int64) * stride_st + g * stride_sh  # [BLOCK_Q]
    tl.store(sel_row[:, None] + slot[None, :], top_i, mask=q_ok[:, None] & (slot[None, :] < TOPK - 1))
    tl.store(sel_row + (TOPK - 1), own.to(tl.int32), mask=q_ok)


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _check_inputs(iq: torch.Tensor, ik: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor,
                  block_size: int, top_k: int) -> None:
    if iq.dim() != 4 or ik.dim() != 3 or iq.shape[:2] != ik.shape[:2] or iq.shape[-1] != ik.shape[-1]:
        raise ValueError(f"iq {tuple(iq.shape)} and ik {tuple(ik.shape)} must be [B, T, Hkv, Di] and [B, T, Di] "
                         "with the same B, T and Di")
    if iq.dtype not in (torch.float32, torch.bfloat16, torch.float16) or ik.dtype != iq.dtype:
        raise ValueError(f"iq and ik must share one dtype of fp32, bf16 or fp16; got {iq.dtype} and {ik.dtype} "
                         "(cast them, or use tree.kept_keys for fp64)")
    bt = tuple(iq.shape[:2])
    for name, x in (("subtree_end", subtree_end), ("position", position)):
        if tuple(x.shape) != bt or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor [B, T] = {bt}; got {x.dtype} {tuple(x.shape)} "
                             "(FlatTree fields need a leading batch dimension: x[None])")
        if x.device != iq.device:
            raise ValueError(f"{name} is on {x.device} but iq on {iq.device}; move it to {iq.device}")
    if not _power_of_two(iq.shape[-1]):
        raise ValueError(f"index dimension {iq.shape[-1]} must be a power of two >= 16 for the Triton indexer "
                         "(pad iq and ik with zeros)")
    if not _power_of_two(block_size):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16 for the kernels")
    if top_k < 1:
        raise ValueError(f"top_k is {top_k}; it must be at least 1 (the query's own block)")


def select_blocks_tree_triton(
    iq: torch.Tensor, ik: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor, *,
    block_size: int, top_k: int, blocks: TreeIndexBlocks | None = None,
) -> torch.Tensor:
    """Kept blocks `[B, T, Hkv, top_k]` int32 over a flattened prefix tree (own block last, -1 empty).

    iq: [B, T, Hkv, Di], ik: [B, T, Di], fp32/bf16/fp16; subtree_end, position: [B, T] integer
    (a causal row: subtree_end = T, position = arange(T)). Blocks are `position // block_size`;
    the other slots hold the `top_k - 1` best blocks before the own block that the query sees,
    in no particular order. `blocks` (default: `default_blocks(iq.dtype)`) sets the tiles, a tuning
    knob.
    """
    _check_inputs(iq, ik, subtree_end, position, block_size, top_k)
    cfg = default_blocks(iq.dtype) if blocks is None else blocks
    block_n = min(cfg.block_n, block_size)
    if not (_power_of_two(cfg.block_q) and _power_of_two(block_n)):
        raise ValueError(f"blocks.block_q {cfg.block_q} and block_n {cfg.block_n} must be powers of two >= 16")
    iq = iq if iq.stride(-1) == 1 else iq.contiguous()
    ik = ik if ik.stride(-1) == 1 else ik.contiguous()
    b, t, hkv, di = iq.shape
    # int32 halves the per-tile loads of the skip test; a flattened batch is far below 2^31.
    se = subtree_end.to(torch.int32).contiguous()
    pos = position.to(torch.int32).contiguous()
    sel = torch.empty(b, t, hkv, top_k, dtype=torch.int32, device=iq.device)
    if sel.numel() == 0:
        return sel
    grid = (triton.cdiv(t, cfg.block_q), b * hkv)
    msa_tree_index_fwd_kernel[grid](
        iq, ik, se, pos, sel, t,
        iq.stride(0), iq.stride(1), iq.stride(2),
        ik.stride(0), ik.stride(1),
        sel.stride(0), sel.stride(1), sel.stride(2),
        HKV=hkv, DI=di, BLOCK_SIZE=block_size, BLOCK_Q=cfg.block_q, BLOCK_N=block_n,
        TOPK=top_k, KP=triton.next_power_of_2(max(top_k - 1, 1)), IS_INTERPRET=IS_INTERPRET,
        PRECISION=dot_precision(iq.dtype), num_warps=cfg.num_warps,
    )
    return sel
