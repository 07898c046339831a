"""Token permutation for the MoE: sort (token, choice) pairs by expert on the device, and return.

`plan_routes` turns experts [N, k] into a layout the grouped GEMMs read: the N*k pairs sorted by
expert (stable: pairs of one expert keep token order), each expert's segment padded to a
multiple of BLOCK_M so that a GEMM tile never spans two experts, and a table giving the expert
of every tile. It needs no host synchronisation: buffers are sized by the bound
sum_e ceil(c_e / BLOCK_M) <= min(N*k, ceil(N*k / BLOCK_M) + E) tiles, and tiles past the real
count carry expert id E, on which the GEMM programs exit at once.

Two kernels do the sort: each block of pairs counts its pairs per expert; after prefix sums
over blocks and experts (small [blocks, E] torch ops), each block ranks its pairs within their
expert with a cumulative sum over a one-hot tile and scatters them. `combine` brings the rows
home: out[n] = sum_j w[n, j] * y[pos[n, j]] in float32, which is where the routing weights are
applied; its backward gives the rows' gradient and the weights' gradient in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from forge.kernels.moe.triton_common import cast_out, is_interpret


@triton.jit(do_not_specialize=["M"])
def moe_count_kernel(experts_ptr, block_counts_ptr, M, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    e = tl.load(experts_ptr + idx, mask=idx < M, other=-1)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK, BLOCK_E]
    tl.store(block_counts_ptr + pid * E + cols, tl.sum(onehot, axis=0), mask=cols < E)


@triton.jit(do_not_specialize=["M"])
def moe_scatter_kernel(
    experts_ptr, block_start_ptr, sorted_token_ptr, position_ptr, M, E,
    TOP_K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    mask = idx < M
    e = tl.load(experts_ptr + idx, mask=mask, other=-1)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK, BLOCK_E]
    # Rank of each pair among this block's pairs of the same expert, in index order (stable).
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # [BLOCK]
    start = tl.load(block_start_ptr + pid * E + e, mask=mask, other=0)
    pos = start + rank
    tl.store(position_ptr + idx, pos, mask=mask)
    tl.store(sorted_token_ptr + pos, (idx // TOP_K).to(tl.int32), mask=mask)


@triton.jit
def moe_combine_fwd_kernel(
    y_ptr, position_ptr, weights_ptr, out_ptr, H,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, IS_INTERPRET: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    hmask = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pos = tl.load(position_ptr + n * TOP_K + j).to(tl.int64)
        row = tl.load(y_ptr + pos * H + offs, mask=hmask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            row = row * tl.load(weights_ptr + n * TOP_K + j).to(tl.float32)
        acc += row
    tl.store(out_ptr + n * H + offs, cast_out(acc, out_ptr.dtype.element_ty, IS_INTERPRET), mask=hmask)


@triton.jit
def moe_combine_bwd_kernel(
    dout_ptr, y_ptr, position_ptr, weights_ptr, dy_ptr, dweights_ptr, H,
    TOP_K: tl.constexpr, IS_INTERPRET: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOP_K):
        pos = tl.load(position_ptr + n * TOP_K + j).to(tl.int64)
        w = tl.load(weights_ptr + n * TOP_K + j).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h in range(0, H, BLOCK_H):
            offs = h + tl.arange(0, BLOCK_H)  # [BLOCK_H]
            hmask = offs < H
            do = tl.load(dout_ptr + n * H + offs, mask=hmask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + pos * H + offs, mask=hmask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + pos * H + offs, cast_out(do * w, dy_ptr.dtype.element_ty, IS_INTERPRET), mask=hmask)
            dot += do * y
        tl.store(dweights_ptr + n * TOP_K + j, tl.sum(dot, axis=0))


@dataclass
class RoutePlan:
    """Where each (token, choice) pair sits in the expert-sorted, tile-padded row order."""

    sorted_token: torch.Tensor
    """[num_tiles_max * block_m] int32: the token of each padded row, -1 for padding."""
    position: torch.Tensor
    """[N * k] int32: the padded row of each pair, in token-major order."""
    tile_expert: torch.Tensor
    """[num_tiles_max] int32: the expert of each tile; E for tiles past the real count."""
    seg_start: torch.Tensor
    """[E] int64: first padded row of each expert's segment."""
    seg_tiles: torch.Tensor
    """[E] int64: tiles in each expert's segment."""
    num_experts: int
    """E."""
    block_m: int
    """Rows per tile; every segment is padded to a multiple of it."""

    @property
    def num_tiles_max(self) -> int:
        return self.tile_expert.shape[0]


def plan_routes(experts: torch.Tensor, num_experts: int, block_m: int) -> RoutePlan:
    """Sort the pairs of experts [N, k] (int64) by expert, padded per expert to block_m rows."""
    n, top_k = experts.shape
    m = n * top_k
    device = experts.device
    flat = experts.reshape(-1).contiguous()
    block_e = triton.next_power_of_2(num_experts)
    # A [BLOCK, BLOCK_E] one-hot tile per program; keep it near 32K elements.
    block = max(16, min(1024, triton.next_power_of_2(max(1, 32768 // block_e))))
    num_blocks = triton.cdiv(max(m, 1), block)
    block_counts = torch.empty(num_blocks, num_experts, device=device, dtype=torch.int32)
    moe_count_kernel[(num_blocks,)](flat, block_counts, m, num_experts, BLOCK=block, BLOCK_E=block_e)
    counts = block_counts.sum(0)  # [E]
    seg_tiles = (counts + block_m - 1) // block_m  # [E]
    tile_end = seg_tiles.cumsum(0)  # [E]
    seg_start = (tile_end - seg_tiles) * block_m  # [E]
    # Start row of each (block, expert) run: the expert's segment plus earlier blocks' pairs.
    block_start = seg_start[None, :] + block_counts.cumsum(0) - block_counts  # [blocks, E]
    num_tiles_max = max(1, min(m, triton.cdiv(m, block_m) + num_experts))
    sorted_token = torch.full((num_tiles_max * block_m,), -1, device=device, dtype=torch.int32)
    position = torch.empty(m, device=device, dtype=torch.int32)
    moe_scatter_kernel[(num_blocks,)](
        flat, block_start.to(torch.int32).contiguous(), sorted_token, position, m, num_experts,
        TOP_K=top_k, BLOCK=block, BLOCK_E=block_e,
    )
    tiles = torch.arange(num_tiles_max, device=device, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True).to(torch.int32)
    return RoutePlan(sorted_token, position, tile_expert, seg_start, seg_tiles, num_experts, block_m)


def _block_h(h: int) -> int:
    return min(1024, triton.next_power_of_2(h))


def combine(y: torch.Tensor, plan: RoutePlan, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * y[position[n, j]], summed in float32."""
    n, top_k = weights.shape
    return _combine(y, plan, weights.contiguous(), out_dtype, n, top_k, y.shape[1])


def _combine(y, plan, weights, out_dtype, n, top_k, h):
    out = torch.empty(n, h, device=y.device, dtype=out_dtype)
    block_h = _block_h(h)
    moe_combine_fwd_kernel[(n, triton.cdiv(h, block_h))](
        y, plan.position, weights if weights is not None else y, out, h,
        TOP_K=top_k, HAS_WEIGHTS=weights is not None, IS_INTERPRET=is_interpret(), BLOCK_H=block_h,
    )
    return out


def gather_sum(rows: torch.Tensor, plan: RoutePlan, top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[n] = sum_j rows[position[n, j]] in float32: the input gradient of the gathered tokens."""
    n = plan.position.shape[0] // top_k
    return _combine(rows, plan, None, out_dtype, n, top_k, rows.shape[1])


def combine_bwd(dout: torch.Tensor, y: torch.Tensor, plan: RoutePlan, weights: torch.Tensor):
    """Backward of `combine`: dy[position[n, j]] = w[n, j] * dout[n] (padded rows left unwritten),
    dweights[n, j] = dout[n] . y[position[n, j]] in float32."""
    n, top_k = weights.shape
    h = y.shape[1]
    dy = torch.empty_like(y)
    dweights = torch.empty(n, top_k, device=y.device, dtype=torch.float32)
    moe_combine_bwd_kernel[(n,)](
        dout.contiguous(), y, plan.position, weights.contiguous(), dy, dweights, h,
        TOP_K=top_k, IS_INTERPRET=is_interpret(), BLOCK_H=_block_h(h),
    )
    return dy, dweights
