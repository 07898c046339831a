"""Tree attention as dense attention pieces on torch's cuDNN or flash attention, combined by
log-sum-exp.

In DFS pre-order a run of consecutive tokens with one `subtree_end` E is a chain (each token
is the first child of the one before), and the tokens that see all of a run [s, e) are exactly
its strict descendants, the contiguous range [e, E). So the tree mask splits into
- one causal self-attention per run;
- per run with descendants, a dense (non-causal) attention of the queries [e, E) against the
  run's keys [s, e) (their query rows gathered when there are several such pieces; one
  contiguous piece is passed as a view);
and every visible (query, key) pair lies in exactly one piece. A query's output is the
combination of its pieces by their log-sum-exps. For a GRPO group that is a causal prompt,
causal responses and one responses-by-prompt piece; for a conversation whose samples form one
chain, one causal piece.

Fused layout: a run's causal piece and its dense piece are one top-left causal attention of the
queries [s, E) against the keys [s, e) (query i sees keys up to i, all of them once past the
run), so a GRPO group becomes one call of all queries against the prompt's keys plus the
responses' causal call, and the root runs' calls cover every row once (no copy into the
result). It needs a library whose causal mask is top-left aligned when queries outnumber keys
(cuDNN, checked once by `cudnn_top_left`; flash attention aligns it bottom-right); the cost
rule picks the layout with the backend.

Backward, as ring attention does it: each piece's backward runs with the final output and the
final log-sum-exp, so its softmax probabilities and its row term rowsum(dO * O) are those of the
whole row, and the gradients of the pieces add up to the exact gradient; no piece needs the
gradient of its own log-sum-exp.

Backends (`BACKENDS`, in `piece_backends.py`): `cudnn`, torch's cuDNN fused attention, one call
per group of consecutive equal-shape pieces on strided views (about twice flash's rate on an
H100 once built; it builds a plan per new shape, so the cost rule offers it only with
`FORGE_CUDNN_ATTENTION=1`, `piece_backends.cudnn_chosen`); `flash`, FlashAttention-2 inside
ATen, one variable-length call per kind of piece;
`reference`, the same two operations in plain PyTorch, so the CPU tests check the
decomposition in fp64. `plan_tree` holds the cost rule that picks the backend and says when the
pieces pay against the Triton kernel (many tiny runs waste the libraries' 128-row tiles).

On CUDA the extra pieces (the calls after the root runs') run on a second stream beside the
base call, forward and backward (`OVERLAP_EXTRA`): they share no output, and each fills the
other's last, partly empty wave of tiles (0.4 ms of (a)'s 10.2 ms on an H100,
docs/benchmarks.md).

Departures: rows in several dense pieces (nested runs) are combined, and their dQ accumulated,
in fp32 and rounded once; rows in one dense piece are combined in fp32 by one Triton pass
(`triton_combine.py`) and their gradients are the sum of two values already rounded to the
input dtype, rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.kernels.tree_attention.piece_backends import (
    BACKENDS,
    TOP_LEFT,
    PieceBackend,
    Segments,
    cudnn_chosen,
    cudnn_top_left,
    cudnn_usable,
)


Rows = tuple[int, int] | torch.Tensor
"""Flat rows a call reads: a contiguous span (start, end), or an int64 tensor of row indices."""


@dataclass
class PieceCall:
    """One attention call over several pieces: `seg` lays them out over the query rows `q` and
    the key rows `k` (each a span or gathered rows of the flattened tokens)."""

    seg: Segments
    causal: bool
    """Top-left causal: query i of a piece sees its keys 0 .. i (all of them from i >= Lk on)."""
    q: Rows
    k: Rows
    q_disjoint: bool = True
    """No flat row appears twice among `q` (else their results are added in fp32)."""

    def to(self, device) -> "PieceCall":
        mv = lambda r: r if isinstance(r, tuple) else r.to(device, non_blocking=True)  # noqa: E731
        return PieceCall(self.seg.to(device), self.causal, mv(self.q), mv(self.k), self.q_disjoint)


@dataclass
class TreePlan:
    """The pieces of one `subtree_end [B, T]`, over the flattened token axis (row b at b*T).

    `base` holds every query row exactly once, in order, so its output is the start of the
    result; `extra` (None when there is nothing more) holds the pieces whose rows are combined
    into it by log-sum-exp."""

    num_rows: int
    """B * T."""
    base: PieceCall
    extra: PieceCall | None
    fused: bool = False
    """The split (False): every run's causal self-attention as `base`, each run's descendants x
    its keys as dense `extra` pieces. Fused (True): each run with descendants as ONE top-left
    causal piece of queries [run start, subtree end) x the run's keys (its causal part and its
    dense part in one call); the root runs' pieces are `base`, the other runs' are `extra`."""
    backend: str = "flash"
    """The attention library the cost rule picked for the pieces (a name in BACKENDS)."""
    cost_pieces: float = 0.0
    """Estimated cost of the pieces, in Triton-kernel tile-pair units (see `plan_tree`)."""
    cost_triton: float = 0.0
    """Estimated cost of the Triton kernel on the same mask, same units."""
    split: "TreePlan | None" = None
    """For a fused plan, the cheapest split plan (for a backend without top-left alignment)."""

    @property
    def num_calls(self) -> int:
        """Attention calls on a backend taking one call per group of equal-shape pieces."""
        return len(self.base.seg.groups) + (0 if self.extra is None else len(self.extra.seg.groups))

    @property
    def pays(self) -> bool:
        """The cost rule: run the pieces when they are estimated cheaper than the Triton kernel."""
        return self.cost_pieces < self.cost_triton

    def to(self, device) -> "TreePlan":
        extra = None if self.extra is None else self.extra.to(device)
        split = None if self.split is None else self.split.to(device)
        return TreePlan(self.num_rows, self.base.to(device), extra, self.fused, self.backend, self.cost_pieces,
                        self.cost_triton, split)


# Cost rule, in units of one 64x64 (query, key) tile pair of the Triton kernel (fwd+bwd). The
# attention libraries run 128x128 tiles: per visited tile pair, 4 units of Triton work at
# SPEEDUP[backend] times the rate. Each library call (forward and backward of one group of
# sequences) costs CALL_COST units, each gathered or combined row ROW_COST units (gather,
# scatter, combination, copies into the result). SPEEDUP was measured on an H100, bf16, 16 query
# heads of size 128, 4 key/value heads (docs/benchmarks.md, 2026-11-27: cuDNN 1.95-2.16, flash
# 1.20-1.29 times the Triton kernel's rate per unit on batches (a) and (b)); CALL_COST (about
# 10 us) and ROW_COST are estimates, not measured.
SPEEDUP = {"flash": 1.25, "cudnn": 2.0}
CALL_COST = 20.0
ROW_COST = 0.02
LIB_TILE = 128
TRITON_TILE = 64
def _ceil(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def _triton_tiles(se: torch.Tensor) -> int:
    """(query tile, key block) pairs the Triton kernel visits, 64 x 64: as its block lists."""
    b, t = se.shape
    nb = (t + TRITON_TILE - 1) // TRITON_TILE
    blocks = torch.nn.functional.pad(se, (0, nb * TRITON_TILE - t)).view(b, nb, TRITON_TILE)
    bmax = blocks.amax(-1)[:, None, :]  # [B, 1, NB]
    m0 = torch.arange(nb)[:, None] * TRITON_TILE
    m_last = (m0 + TRITON_TILE).clamp(max=t) - 1
    n0 = torch.arange(nb)[None, :] * TRITON_TILE
    return int(((n0 <= m_last) & (bmax > m0)).sum())


def _lib_tiles(lq: torch.Tensor, lk: torch.Tensor, causal: bool) -> int:
    """128 x 128 tiles a library visits: a top-left causal piece skips the tiles wholly above
    the diagonal of its first Lk queries."""
    nq, nk = _ceil(lq, LIB_TILE), _ceil(lk, LIB_TILE)
    if not causal:
        return int((nq * nk).sum())
    tri = torch.minimum(nq, nk)
    return int((tri * (tri + 1) // 2 + (nq - tri) * nk).sum())


def _rows(start: torch.Tensor, length: torch.Tensor) -> tuple[Rows, bool]:
    """The rows of pieces [start, start + length) in order: a span when they are contiguous;
    and whether no row repeats."""
    rows = _ranges(start, length)
    if len(rows) and bool((rows[1:] - rows[:-1] == 1).all()):
        return (int(rows[0]), int(rows[-1]) + 1), True
    return rows, len(rows) == 0 or bool(torch.bincount(rows).max() <= 1)


def _call(q0: torch.Tensor, lq: torch.Tensor, k0: torch.Tensor, lk: torch.Tensor, causal: bool) -> PieceCall | None:
    if len(lq) == 0:
        return None
    q, q_disjoint = _rows(q0, lq)
    k, _ = _rows(k0, lk)
    return PieceCall(Segments.of(lq, lk), causal, q, k, q_disjoint)


def _cost(plan: TreePlan, tiles: int, name: str) -> float:
    gathered = sum(len(r) for c in (plan.base, plan.extra) if c is not None for r in (c.q, c.k)
                   if not isinstance(r, tuple))
    combined = 0 if plan.extra is None else plan.extra.seg.cu_q[-1].item()
    # Backends with one call per group copy each group's rows into the result when there are several.
    calls = 1 + (plan.extra is not None) if name == "flash" else plan.num_calls
    copied = plan.num_rows if name != "flash" and len(plan.base.seg.groups) > 1 else 0
    return (tiles * (LIB_TILE // TRITON_TILE) ** 2 / SPEEDUP[name] + CALL_COST * calls
            + ROW_COST * (gathered + combined + copied))


def plan_tree(subtree_end: torch.Tensor, *, fused: bool | None = None) -> TreePlan:
    """Split the tree mask of `subtree_end [B, T]` (any device; read on the host) into pieces.

    `fused` forces the fused (True) or split (False) layout; None lets the cost rule choose it
    together with the backend."""
    se = subtree_end.detach().to("cpu", torch.int64)
    b, t = se.shape
    n = b * t
    flat = se.reshape(-1)  # [B*T], values local to each row
    idx = torch.arange(n)
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::t] = True
    run_start = idx[start]  # [R]
    run_end = torch.cat([run_start[1:], torch.tensor([n])])
    run_len = run_end - run_start
    row0 = (run_start // t) * t
    desc_end = row0 + flat[run_end - 1]  # flat end of each run's subtree
    has = desc_end > run_end
    # A root run lies in no earlier run's subtree: no earlier token of its row ends past it.
    reach = torch.nn.functional.pad(se.cummax(-1).values[:, :-1], (1, 0)).reshape(-1)  # [B*T]
    root = reach[run_start] <= run_start - row0
    whole = (0, n)
    split = TreePlan(n, PieceCall(Segments.of(run_len, run_len), True, whole, whole),
                     _call(run_end[has], desc_end[has] - run_end[has], run_start[has], run_len[has], False))
    tiles_split = _lib_tiles(run_len, run_len, True) + _lib_tiles(desc_end[has] - run_end[has], run_len[has], False)
    piece_end = torch.where(has, desc_end, run_end)
    lq = piece_end - run_start
    base = _call(run_start[root], lq[root], run_start[root], run_len[root], True)
    fused_plan = TreePlan(n, base, _call(run_start[~root], lq[~root], run_start[~root], run_len[~root], True),
                          fused=True)
    tiles_fused = _lib_tiles(lq, run_len, True)
    options = []
    for name in SPEEDUP:
        # Forced fused pieces are priced as cuDNN's even where it is missing (the reference backend runs them);
        # otherwise cuDNN is a candidate only where it is there and chosen (`cudnn_chosen`: its per-shape plans).
        if name == "cudnn" and not (cudnn_usable() and cudnn_chosen()) and not fused:
            continue
        for plan, tiles in ((split, tiles_split), (fused_plan, tiles_fused)):
            if fused is not None and plan.fused != fused:
                continue
            if plan.fused and (name not in TOP_LEFT or not fused and not cudnn_top_left()):
                continue
            options.append((_cost(plan, tiles, name), name, plan))
    cost, name, plan = min(options, key=lambda o: o[0])
    plan.backend, plan.cost_pieces, plan.cost_triton = name, cost, float(_triton_tiles(se))
    if plan.fused and fused is None:
        cost, name, plan.split = min((o for o in options if not o[2].fused), key=lambda o: o[0])
        plan.split.backend, plan.split.cost_pieces, plan.split.cost_triton = name, cost, plan.cost_triton
    return plan


def _ranges(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start[i], start[i] + length[i]) over i."""
    offsets = torch.nn.functional.pad(length.cumsum(0), (1, 0))[:-1]
    return torch.arange(int(length.sum())) + torch.repeat_interleave(start - offsets, length)


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows[0]:rows[1]] if isinstance(rows, tuple) else x.index_select(0, rows)


def _combine(o, lse, o_x, lse_x, call: PieceCall):
    """Merge the extra pieces' (o_x [NQ, H, D], lse_x [H, NQ]) into the base's (o [N, H, D],
    lse [H, N]) at the rows `call.q`."""
    rows = call.q
    if call.q_disjoint and o.is_cuda:
        from forge.kernels.tree_attention.triton_combine import lse_combine_

        span = isinstance(rows, tuple)
        lse_combine_(o, lse, o_x, lse_x, None if span else rows, rows[0] if span else 0)
        return o, lse
    if isinstance(rows, tuple):
        rows = torch.arange(*rows, device=o.device)
    h = lse.shape[0]
    # A token may lie in several extra pieces (one per ancestor run): reduce over all of them.
    m = lse.scatter_reduce(1, rows.expand(h, -1), lse_x, "amax")  # [H, N]
    wc = torch.exp(lse - m)
    wx = torch.exp(lse_x - m[:, rows])  # [H, NQ]
    tot = wc.index_add(1, rows, wx)
    acc = o.to(wc.dtype) * (wc / tot).t()[..., None]  # [N, H, D]
    acc.index_add_(0, rows, o_x.to(wx.dtype) * (wx / tot[:, rows]).t()[..., None])
    return acc.to(o.dtype), m + torch.log(tot)


def _add_rows(dst: torch.Tensor, src: torch.Tensor, rows: Rows, disjoint: bool) -> torch.Tensor:
    """dst[rows] += src. Each row of dst takes one addition when `disjoint` (both operands
    already rounded to dst's dtype, so an in-place add rounds once, as an fp32 sum would);
    rows listed several times accumulate in fp32 and round once."""
    if isinstance(rows, tuple):
        dst[rows[0]:rows[1]] += src
        return dst
    if disjoint:
        return dst.index_add_(0, rows, src)
    acc_t = torch.promote_types(dst.dtype, torch.float32)
    return dst.to(acc_t).index_add_(0, rows, src.to(acc_t)).to(dst.dtype)


def _place_rows(src: torch.Tensor, rows: Rows, n: int) -> torch.Tensor:
    """[n, ...] holding src at `rows` (each at most once) and zeros elsewhere; src itself when
    rows are all n rows in order."""
    if isinstance(rows, tuple) and rows == (0, n):
        return src
    out = src.new_zeros(n, *src.shape[1:])
    if isinstance(rows, tuple):
        out[rows[0]:rows[1]] = src
        return out
    return out.index_copy_(0, rows, src)


OVERLAP_EXTRA = True
"""On CUDA, run the extra pieces on a second stream beside the base call: they read the same
inputs and write their own outputs, so each fills the other's last wave of tiles."""
_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(x: torch.Tensor, plan: TreePlan):
    if not (OVERLAP_EXTRA and x.is_cuda and plan.extra is not None):
        return None
    if x.device not in _SIDE_STREAMS:
        _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)
    side = _SIDE_STREAMS[x.device]
    side.wait_stream(torch.cuda.current_stream(x.device))
    return side


def _join(side, *made_there: torch.Tensor) -> None:
    """The current stream waits for `side`; tensors made on `side` are marked as used here, so
    that the allocator does not hand their memory back to `side` while this stream reads them."""
    cur = torch.cuda.current_stream(side.device)
    cur.wait_stream(side)
    for t in made_there:
        t.record_stream(cur)


def pieces_fwd(q, k, v, plan: TreePlan, scale: float, backend: PieceBackend):
    """q [N, Hq, D], k, v [N, Hkv, D] (flattened rows) -> (o [N, Hq, D], lse [Hq, N], states)."""
    base, extra = plan.base, plan.extra

    def extra_fwd():
        return backend.fwd(_take(q, extra.q), _take(k, extra.k), _take(v, extra.k), extra.seg, extra.causal, scale)

    side = _side_stream(q, plan)
    if side is not None:
        with torch.cuda.stream(side):
            o_x, lse_x, st_x = extra_fwd()
    o, lse, st_b = backend.fwd(q, _take(k, base.k), _take(v, base.k), base.seg, base.causal, scale)
    if extra is None:
        return o, lse, (st_b, None)
    if side is None:
        o_x, lse_x, st_x = extra_fwd()
    else:
        _join(side, o_x, lse_x)
    o, lse = _combine(o, lse, o_x, lse_x, extra)
    return o, lse, (st_b, st_x)


def pieces_bwd(do, q, k, v, o, lse, plan: TreePlan, scale: float, backend: PieceBackend, states):
    st_b, st_x = states
    base, extra = plan.base, plan.extra
    n = q.shape[0]

    def extra_bwd():
        rows = extra.q
        lse_x = (lse[:, rows[0]:rows[1]] if isinstance(rows, tuple) else lse[:, rows]).contiguous()
        return backend.bwd(_take(do, rows), _take(q, rows), _take(k, extra.k), _take(v, extra.k),
                           _take(o, rows), lse_x, extra.seg, extra.causal, scale, st_x)

    side = _side_stream(q, plan)
    if side is not None:
        with torch.cuda.stream(side):
            dqx, dkx, dvx = extra_bwd()
    dq, dk, dv = backend.bwd(do, q, _take(k, base.k), _take(v, base.k), o, lse, base.seg, base.causal, scale, st_b)
    dk, dv = _place_rows(dk, base.k, n), _place_rows(dv, base.k, n)
    if extra is None:
        return dq, dk, dv
    if side is None:
        dqx, dkx, dvx = extra_bwd()
    else:
        _join(side, dqx, dkx, dvx)
    dq = _add_rows(dq, dqx, extra.q, extra.q_disjoint)
    # Every run is the key side of at most one extra piece.
    dk = _add_rows(dk, dkx, extra.k, True)
    dv = _add_rows(dv, dvx, extra.k, True)
    return dq, dk, dv


class TreePiecesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, backend):
        b, t, hq, d = q.shape
        hkv = k.shape[2]
        q2 = q.reshape(b * t, hq, d).contiguous()
        k2, v2 = k.reshape(b * t, hkv, d).contiguous(), v.reshape(b * t, hkv, d).contiguous()
        o, lse, states = pieces_fwd(q2, k2, v2, plan, scale, backend)
        ctx.save_for_backward(q2, k2, v2, o, lse)
        ctx.plan, ctx.scale, ctx.backend, ctx.states, ctx.shape = plan, scale, backend, states, (b, t)
        return o.view(b, t, hq, d)

    @staticmethod
    def backward(ctx, do):
        q2, k2, v2, o, lse = ctx.saved_tensors
        b, t = ctx.shape
        do2 = do.reshape(o.shape).contiguous()
        dq, dk, dv = pieces_bwd(do2, q2, k2, v2, o, lse, ctx.plan, ctx.scale, ctx.backend, ctx.states)
        return dq.view(b, t, *dq.shape[1:]), dk.view(b, t, *dk.shape[1:]), dv.view(b, t, *dv.shape[1:]), None, None, None


def flash_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether torch's flash attention takes these tensors (CUDA, fp16/bf16, head size)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and d % 8 == 0 and d <= 256 and hasattr(torch.ops.aten, "_flash_attention_forward"))


def tree_attention_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    scale: float | None = None,
    plan: TreePlan | None = None,
    backend: PieceBackend | str | None = None,
) -> torch.Tensor:
    """Tree attention as causal and dense pieces combined by log-sum-exp; differentiable.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; subtree_end: [B, T] integer. Returns [B, T, Hq, D].
    `plan` (from `plan_tree`, on q's device) may be passed to reuse it across layers; `backend`
    (a PieceBackend or a name in BACKENDS) defaults to the plan's choice; the CUDA backends need
    `flash_supports(q, k)`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if plan is None:
        plan = plan_tree(subtree_end).to(q.device)
    if backend is None or isinstance(backend, str):
        if not flash_supports(q, k):
            raise ValueError(f"flash attention takes CUDA fp16/bf16 with head size a multiple of 8 up to 256; got "
                             f"{q.device} {q.dtype} head size {q.shape[-1]} (use tree_attention)")
        # cuDNN's fused attention is taken up to head size 128 only (what has been tested).
        name = backend or (plan.backend if q.shape[-1] <= 128 else "flash")
        if plan.fused and name not in TOP_LEFT:
            # cuDNN is not taken here (head size): the split pieces instead.
            plan = plan.split if plan.split is not None else plan_tree(subtree_end, fused=False).to(q.device)
        backend = BACKENDS[name]()
    if plan.fused and not getattr(backend, "top_left", False):
        raise ValueError(f"{type(backend).__name__} aligns its causal mask bottom-right; the fused pieces need "
                         "top-left (cuDNN, reference): pass plan_tree(subtree_end, fused=False)")
    return TreePiecesFunction.apply(q, k, v, plan, float(scale), backend)
