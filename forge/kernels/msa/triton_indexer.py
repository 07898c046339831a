"""Triton indexer for MSA prefill: causal `iq . ik`, block max and top-k in one streaming pass.

One program holds BLOCK_Q queries of one KV group, all inside one MSA block, and streams the
index keys of the blocks before it. It keeps a running top-(k-1) per query in registers and
never writes a block score, so memory is O(T * Hkv * top_k) at any length: at 1M tokens a
[T, Hkv, n_blocks] score tensor would need 256 GiB.

Only blocks before the query's own block compete for the k-1 free slots, and those are fully
visible to every query of the program, so the stream needs no causal mask; the own block is
always kept and written last. Ties go to the lower block index, as in `naive.py`: a later block
must score strictly higher than the slot it evicts, and among equal lowest slots the one with
the highest block index is evicted.

Departure from the paper's code: slots are returned unsorted (the own block last, -1 for
slots that a short prefix leaves empty); the attention kernels do not need an order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge.kernels.precision import dot_precision

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Warps and pipeline depth of the prefill indexer (benchmarks/msa.py --sweep times others).
INDEX_FORWARD = dict(num_warps=8, num_stages=2)


@triton.jit
def insert_block(top_s, top_i, block_score, n, slot, KP: tl.constexpr):
    """Offer block `n` with scores `block_score [R]` to running top lists `top_s, top_i [R, KP]`.

    Blocks come in increasing order: a block must beat the lowest slot strictly, and among
    equal lowest slots the one holding the highest block index goes, so ties keep lower blocks.
    """
    low = tl.min(top_s, 1)  # [R]
    # One victim per row (empty slots hold -1 and are told apart by their slot number).
    tag = tl.where(top_s == low[:, None], top_i * KP + slot[None, :], -(2**31 - 1))
    victim = tl.max(tag, 1)
    swap = (tag == victim[:, None]) & (block_score > low)[:, None]
    top_s = tl.where(swap, block_score[:, None], top_s)
    top_i = tl.where(swap, n, top_i)
    return top_s, top_i


@triton.jit(do_not_specialize=["T"])
def msa_index_fwd_kernel(
    IQ, IK, SEL, T,
    stride_iqb, stride_iqt, stride_iqh,
    stride_ikb, stride_ikt,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, IS_INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
):
    # The last query tiles stream the most blocks: launch them first to shorten the tail.
    pid_q = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = pid_bg % HKV
    q0 = pid_q * BLOCK_Q
    own = q0 // BLOCK_SIZE
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, DI)
    offs_n = tl.arange(0, BLOCK_SIZE)
    slot = tl.arange(0, KP)
    q_ok = offs_q < T

    iq_ptrs = (IQ + b * stride_iqb + offs_q[:, None].to(tl.int64) * stride_iqt
               + g * stride_iqh + offs_d[None, :])
    iq = tl.load(iq_ptrs, mask=q_ok[:, None], other=0.0)  # [BLOCK_Q, DI]
    if IS_INTERPRET:
        iq = iq.to(tl.float32)

    # Slots past TOPK-1 are locked at +inf so that they are never the minimum.
    top_s = tl.where(slot[None, :] < TOPK - 1, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_Q, KP], tl.float32)  # [BLOCK_Q, KP]
    top_i = tl.full([BLOCK_Q, KP], -1, tl.int32)

    ik_base = IK + b * stride_ikb
    for n in range(0, own):
        keys = (n * BLOCK_SIZE + offs_n).to(tl.int64)
        ik = tl.load(ik_base + keys[None, :] * stride_ikt + offs_d[:, None])  # [DI, BLOCK_SIZE]
        if IS_INTERPRET:
            ik = ik.to(tl.float32)
        s = tl.dot(iq, ik, input_precision=PRECISION)  # [BLOCK_Q, BLOCK_SIZE]
        top_s, top_i = insert_block(top_s, top_i, tl.max(s, 1), n, slot, KP)

    sel_row = SEL + b * stride_sb + offs_q.to(tl.int64) * stride_st + g * stride_sh  # [BLOCK_Q]
    tl.store(sel_row[:, None] + slot[None, :], top_i,
             mask=q_ok[:, None] & (slot[None, :] < TOPK - 1))
    tl.store(sel_row + (TOPK - 1), tl.full([BLOCK_Q], 0, tl.int32) + own, mask=q_ok)


def _check_index_inputs(iq: torch.Tensor, ik: torch.Tensor, block_size: int) -> None:
    if iq.dim() != 4 or ik.dim() != 3 or iq.shape[:2] != ik.shape[:2] or iq.shape[-1] != ik.shape[-1]:
        raise ValueError(
            f"iq {tuple(iq.shape)} and ik {tuple(ik.shape)} must be [B, T, Hkv, Di] and [B, T, Di]")
    di = iq.shape[-1]
    if di < 16 or di & (di - 1):
        raise ValueError(f"index dimension {di} must be a power of two >= 16 for the Triton indexer")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16 for the kernels")


def select_blocks_triton(
    iq: torch.Tensor, ik: torch.Tensor, *, block_size: int = 128, top_k: int = 16,
    block_q: int | None = None,
) -> torch.Tensor:
    """Kept blocks `[B, T, Hkv, top_k]` int32 (unsorted, own block last, -1 in empty slots).

    iq: [B, T, Hkv, Di], ik: [B, T, Di], fp32/bf16/fp16. `block_q` (queries per program, a
    power of two dividing block_size) is a tuning knob for the benchmark.
    """
    _check_index_inputs(iq, ik, block_size)
    if top_k < 1:
        raise ValueError(f"top_k is {top_k}; it must be at least 1 (the query's own block)")
    iq = iq if iq.stride(-1) == 1 else iq.contiguous()
    ik = ik if ik.stride(-1) == 1 else ik.contiguous()
    b, t, hkv, di = iq.shape
    sel = torch.empty(b, t, hkv, top_k, dtype=torch.int32, device=iq.device)
    block_q = min(block_size, 128) if block_q is None else block_q
    if block_size % block_q or block_q < 16:
        raise ValueError(f"block_q {block_q} must be >= 16 and divide block_size {block_size}")
    grid = (triton.cdiv(t, block_q), b * hkv)
    msa_index_fwd_kernel[grid](
        iq, ik, sel, t,
        iq.stride(0), iq.stride(1), iq.stride(2),
        ik.stride(0), ik.stride(1),
        sel.stride(0), sel.stride(1), sel.stride(2),
        HKV=hkv, DI=di, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        TOPK=top_k, KP=triton.next_power_of_2(max(top_k - 1, 1)), IS_INTERPRET=IS_INTERPRET,
        PRECISION=dot_precision(iq.dtype), **(INDEX_FORWARD if block_q * block_size >= 8192 else dict(INDEX_FORWARD, num_warps=4)),
    )
    return sel
