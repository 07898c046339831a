"""Log-sum-exp combination of two attention pieces' rows, in place, in one Triton pass.

`decomposed.py` runs a tree's causal pieces and its dense pieces as separate attention calls;
a query row that lies in both gets out = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2}) and
lse = log(e^{l1} + e^{l2}). Here that is one read of each operand and one write, in fp32, for
rows that each appear once among the dense rows (the rows of a single dense piece, or of
pieces over disjoint subtrees); rows in several dense pieces (nested runs) take the
scatter-based PyTorch path in `decomposed.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["NQ", "ROW0", "stride_lh", "stride_ldh"])
def lse_combine_kernel(
    O, LSE, OD, LSED, ROWS,
    NQ, D, ROW0, stride_on, stride_oh, stride_dn, stride_dh, stride_lh, stride_ldh,
    HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    h = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] dense-piece rows
    rmask = r < NQ
    if HAS_ROWS:
        tok = tl.load(ROWS + r, mask=rmask, other=0).to(tl.int64)  # [BLOCK_R] their tokens
    else:
        tok = (ROW0 + r).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = rmask[:, None] & (offs_d[None, :] < D)
    lc = tl.load(LSE + h * stride_lh + tok, mask=rmask, other=0.0)
    ld = tl.load(LSED + h * stride_ldh + r, mask=rmask, other=0.0)
    m = tl.maximum(lc, ld)
    wc = tl.exp(lc - m)
    wd = tl.exp(ld - m)
    s = wc + wd
    o_ptr = O + tok[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    oc = tl.load(o_ptr, mask=dmask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    od = tl.load(OD + r.to(tl.int64)[:, None] * stride_dn + h * stride_dh + offs_d[None, :], mask=dmask,
                 other=0.0).to(tl.float32)
    out = (oc * wc[:, None] + od * wd[:, None]) / s[:, None]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=dmask)
    tl.store(LSE + h * stride_lh + tok, m + tl.log(s), mask=rmask)


def lse_combine_(o: torch.Tensor, lse: torch.Tensor, o_d: torch.Tensor, lse_d: torch.Tensor,
                 rows: torch.Tensor | None, row0: int = 0) -> None:
    """In place: o [N, H, D], lse [H, N] fp32 absorb o_d [NQ, H, D], lse_d [H, NQ] at tokens
    `rows` [NQ] (each at most once) or, with rows None, at tokens row0 .. row0 + NQ - 1."""
    nq, h, d = o_d.shape
    if nq == 0:
        return
    assert o.stride(-1) == 1 and o_d.stride(-1) == 1 and lse.stride(-1) == 1 and lse_d.stride(-1) == 1
    block_r = 16 if triton.next_power_of_2(d) > 128 else 32
    grid = (triton.cdiv(nq, block_r), h)
    lse_combine_kernel[grid](
        o, lse, o_d, lse_d, rows if rows is not None else lse_d,
        nq, d, row0, o.stride(0), o.stride(1), o_d.stride(0), o_d.stride(1), lse.stride(0), lse_d.stride(0),
        HAS_ROWS=rows is not None, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )
