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

Backward, as ring attention does it: each piece's backward runs with the final output and the
final log-sum-exp, so its softmax probabilities and its row term rowsum(dO * O) are those of the
whole row, and the gradients of the pieces add up to the exact gradient; no piece needs the
gradient of its own log-sum-exp.

Backends (`BACKENDS`): `cudnn`, torch's cuDNN fused attention, one call per group of
consecutive equal-shape pieces on strided views (about twice flash's rate on an H100);
`flash`, FlashAttention-2 inside ATen, one variable-length call per kind of piece;
`reference`, the same two operations in plain PyTorch, so the CPU tests check the
decomposition in fp64. `plan_tree` holds the cost rule that picks the backend and says when the
pieces pay against the Triton kernel (many tiny runs waste the libraries' 128-row tiles).

Departures: rows in several dense pieces (nested runs) are combined, and their dQ accumulated,
in fp32 and rounded once; rows in one dense piece are combined in fp32 by one Triton pass
(`triton_combine.py`) and their gradients are the sum of two values already rounded to the
input dtype, rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Segments:
    """Variable-length attention calls' layout: sequence i has queries [cu_q[i], cu_q[i+1]) of
    the packed query rows and keys [cu_k[i], cu_k[i+1]) of the packed key rows."""

    cu_q: torch.Tensor
    """[P + 1] int32 (on the device the call runs on)."""
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    groups: list[tuple[int, int, int, int, int]]
    """Host-side (q start, k start, count, Lq, Lk) of runs of consecutive sequences of one shape."""

    @classmethod
    def of(cls, lq: torch.Tensor, lk: torch.Tensor) -> "Segments":
        cu_q = torch.nn.functional.pad(lq.cumsum(0), (1, 0))
        cu_k = torch.nn.functional.pad(lk.cumsum(0), (1, 0))
        groups: list[tuple[int, int, int, int, int]] = []
        for i, (a, b) in enumerate(zip(lq.tolist(), lk.tolist())):
            if groups and groups[-1][3:] == (a, b):
                qa, ka, n, _, _ = groups[-1]
                groups[-1] = (qa, ka, n + 1, a, b)
            else:
                groups.append((int(cu_q[i]), int(cu_k[i]), 1, a, b))
        return cls(cu_q.to(torch.int32), cu_k.to(torch.int32), int(lq.max()), int(lk.max()), groups)

    def to(self, device) -> "Segments":
        return Segments(self.cu_q.to(device, non_blocking=True), self.cu_k.to(device, non_blocking=True),
                        self.max_q, self.max_k, self.groups)


@dataclass
class TreePlan:
    """The pieces of one `subtree_end [B, T]`, over the flattened token axis (row b at b*T)."""

    num_rows: int
    """B * T."""
    runs: Segments
    """The runs (chains of equal subtree_end) as causal self-attention pieces."""
    dense: Segments | None
    """The dense pieces (each run with descendants: its descendants' queries x its keys); None
    for a single chain."""
    q_span: tuple[int, int] | None = None
    """The query range when there is exactly one dense piece (no gather), else None."""
    k_span: tuple[int, int] | None = None
    q_rows: torch.Tensor | None = None
    """[NQ] int64 flat query row of every gathered dense-piece row (several pieces), else None."""
    k_rows: torch.Tensor | None = None
    """[NK] int64 flat key row of every gathered dense-piece key."""
    dense_disjoint: bool = True
    """No query row lies in two dense pieces (no run has an ancestor run with descendants)."""
    backend: str = "flash"
    """The attention library the cost rule picked for the pieces (a name in BACKENDS)."""
    cost_pieces: float = 0.0
    """Estimated cost of the pieces, in Triton-kernel tile-pair units (see `plan_tree`)."""
    cost_triton: float = 0.0
    """Estimated cost of the Triton kernel on the same mask, same units."""

    @property
    def num_dense(self) -> int:
        return 0 if self.dense is None else len(self.dense.cu_q) - 1

    @property
    def pays(self) -> bool:
        """The cost rule: run the pieces when they are estimated cheaper than the Triton kernel."""
        return self.cost_pieces < self.cost_triton

    def to(self, device) -> "TreePlan":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        dense = None if self.dense is None else self.dense.to(device)
        return TreePlan(self.num_rows, self.runs.to(device), dense, self.q_span, self.k_span,
                        mv(self.q_rows), mv(self.k_rows), self.dense_disjoint, self.backend, self.cost_pieces,
                        self.cost_triton)


# Cost rule, in units of one 64x64 (query, key) tile pair of the Triton kernel (fwd+bwd). The
# attention libraries run 128x128 tiles: per visited tile pair, 4 units of Triton work at
# SPEEDUP[backend] times the rate. Each library call (forward and backward of one group of
# sequences) costs CALL_COST units, each gathered dense row ROW_COST units (gather, scatter,
# combination). SPEEDUP was measured on an H100, bf16, 16 query heads of size 128, 4 key/value
# heads (docs/benchmarks.md, 2026-11-27: cuDNN 1.95-2.16, flash 1.20-1.29 times the Triton
# kernel's rate per unit on batches (a) and (b)); CALL_COST (about 10 us) and ROW_COST are
# estimates, not measured.
SPEEDUP = {"flash": 1.25, "cudnn": 2.0}
CALL_COST = 20.0
ROW_COST = 0.02
LIB_TILE = 128
TRITON_TILE = 64


def cudnn_usable() -> bool:
    """cuDNN's fused attention is there (cuDNN 9 or later, CUDA build of torch)."""
    return (torch.cuda.is_available() and torch.backends.cudnn.is_available()
            and (torch.backends.cudnn.version() or 0) >= 90000
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"))


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


def plan_tree(subtree_end: torch.Tensor) -> TreePlan:
    """Split the tree mask of `subtree_end [B, T]` (any device; read on the host) into pieces."""
    se = subtree_end.detach().to("cpu", torch.int64)
    b, t = se.shape
    flat = se.reshape(-1)  # [B*T], values local to each row
    idx = torch.arange(b * t)
    start = torch.ones(b * t, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::t] = True
    run_start = idx[start]  # [R]
    run_end = torch.cat([run_start[1:], torch.tensor([b * t])])
    run_len = run_end - run_start
    row0 = (run_start // t) * t
    desc_end = row0 + flat[run_end - 1]  # flat end of each run's subtree
    has = desc_end > run_end
    q0, q1, k0, k1 = run_end[has], desc_end[has], run_start[has], run_end[has]
    lq, lk = q1 - q0, k1 - k0
    n_causal = _ceil(run_len, LIB_TILE)
    lib_tiles = int((n_causal * (n_causal + 1) // 2).sum() + (_ceil(lq, LIB_TILE) * _ceil(lk, LIB_TILE)).sum())
    num_dense = int(has.sum())
    gathered = int(lq.sum()) if num_dense > 1 else 0
    runs, dense = Segments.of(run_len, run_len), Segments.of(lq, lk) if num_dense else None
    calls = {"flash": 1 + (dense is not None), "cudnn": len(runs.groups) + (len(dense.groups) if dense else 0)}
    cost = {name: lib_tiles * (LIB_TILE // TRITON_TILE) ** 2 / SPEEDUP[name] + CALL_COST * calls[name]
            + ROW_COST * gathered for name in SPEEDUP if name != "cudnn" or cudnn_usable()}
    backend = min(cost, key=cost.get)
    plan = TreePlan(b * t, runs, dense, backend=backend, cost_pieces=cost[backend],
                    cost_triton=float(_triton_tiles(se)))
    if num_dense == 1:
        plan.q_span, plan.k_span = (int(q0[0]), int(q1[0])), (int(k0[0]), int(k1[0]))
    elif num_dense > 1:
        plan.q_rows = _ranges(q0, lq)
        plan.k_rows = _ranges(k0, lk)
        plan.dense_disjoint = bool(torch.bincount(plan.q_rows).max() <= 1)
    return plan


def _ranges(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start[i], start[i] + length[i]) over i."""
    offsets = torch.nn.functional.pad(length.cumsum(0), (1, 0))[:-1]
    return torch.arange(int(length.sum())) + torch.repeat_interleave(start - offsets, length)


class PieceBackend(Protocol):
    """Variable-length attention over packed [total, H, D] rows, returning and taking the LSE."""

    def fwd(self, q, k, v, seg: Segments, causal: bool, scale: float):
        """-> (out [total_q, Hq, D], lse [Hq, total_q] fp32 natural log, state for bwd)."""

    def bwd(self, do, q, k, v, o, lse, seg: Segments, causal: bool, scale: float, state):
        """-> (dq, dk, dv), with o and lse the final (whole-row) output and log-sum-exp."""


class FlashBackend:
    """torch's flash attention (FlashAttention-2 inside ATen), variable-length form, with GQA:
    one call for all sequences of a Segments."""

    def fwd(self, q, k, v, seg, causal, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, causal, False, scale=scale)
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"flash attention returned a log-sum-exp of shape {tuple(lse.shape)}, expected "
                               f"[heads, total] = {(q.shape[1], q.shape[0])}; this torch is not supported here")
        return out, lse, (rng, unused)

    def bwd(self, do, q, k, v, o, lse, seg, causal, scale, state):
        rng, unused = state
        return torch.ops.aten._flash_attention_backward(
            do, q, k, v, o, lse, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, causal, rng, unused, scale=scale)


def _single_key_fwd(q, k, v, scale):
    """Row i of q [n, Hq, D] against its one key k[i], v[i] [n, Hkv, D]: out = v, lse = the score."""
    rep = q.shape[1] // k.shape[1]
    ki, vi = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q.float() * ki.float()).sum(-1) * scale  # [n, Hq]
    return vi, s.t()


def _single_key_bwd(do, q, k, v, o, lse, scale):
    """The backward of `_single_key_fwd` given the whole row's o and lse (as every piece's)."""
    rep = q.shape[1] // k.shape[1]
    ki, vi = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    dof, qf = do.float(), q.float()
    p = torch.exp((qf * ki).sum(-1) * scale - lse.t())  # [n, Hq]
    ds = p * ((dof * vi).sum(-1) - (dof * o.float()).sum(-1))

    def per_kv(x):  # [n, Hq, D] -> [n, Hkv, D]
        return x.unflatten(1, (k.shape[1], rep)).sum(2)

    dq = (ds[..., None] * ki * scale).to(q.dtype)
    return dq, per_kv(ds[..., None] * qf * scale).to(k.dtype), per_kv(p[..., None] * dof).to(v.dtype)


class CudnnBackend:
    """cuDNN's fused attention through torch, one call per group of equal-shape sequences
    (`Segments.groups`), on [n, H, L, D] views of the packed rows (no copy of q, k, v)."""

    # Whether this cuDNN takes fewer key/value heads than query heads; learnt on the first call.
    native_gqa: bool | None = None

    def __init__(self, expand_kv: bool = False) -> None:
        # GQA by repeating the key/value heads, for a cuDNN that takes only equal head counts.
        self.expand_kv = expand_kv or CudnnBackend.native_gqa is False

    @staticmethod
    def _view(x, start, n, length):
        return x[start:start + n * length].view(n, length, *x.shape[1:]).transpose(1, 2)  # [n, H, L, D]

    def _kv(self, q, k, v, ka, n, lk):
        kg, vg = self._view(k, ka, n, lk), self._view(v, ka, n, lk)
        if self.expand_kv and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            kg, vg = kg.repeat_interleave(rep, dim=1), vg.repeat_interleave(rep, dim=1)
        return kg, vg

    def _reduce(self, g, k):
        # [n, Hq, L, D] gradient of repeated heads -> [n, Hkv, L, D].
        if g.shape[1] == k.shape[1]:
            return g
        return g.unflatten(1, (k.shape[1], -1)).sum(2)

    def fwd(self, q, k, v, seg, causal, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        states = []
        for qa, ka, n, lq, lk in seg.groups:
            if lq == lk == 1:  # cuDNN refuses s_q = s_kv = 1: one key per row, done in closed form
                o1, l1 = _single_key_fwd(q[qa:qa + n], k[ka:ka + n], v[ka:ka + n], scale)
                out[qa:qa + n], lse[:, qa:qa + n] = o1, l1
                states.append(None)
                continue
            qg = self._view(q, qa, n, lq)
            kg, vg = self._kv(q, k, v, ka, n, lk)
            try:
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qg, kg, vg, None, True, 0.0, causal, False, scale=scale)
            except RuntimeError:
                if kg.shape[1] == qg.shape[1] or CudnnBackend.native_gqa:
                    raise
                # This cuDNN refuses GQA: repeat the key/value heads from now on.
                CudnnBackend.native_gqa, self.expand_kv = False, True
                kg, vg = self._kv(q, k, v, ka, n, lk)
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qg, kg, vg, None, True, 0.0, causal, False, scale=scale)
            if kg.shape[1] != qg.shape[1]:
                CudnnBackend.native_gqa = True
            o, l = res[0], res[1]
            self._view(out, qa, n, lq).copy_(o)
            lse[:, qa:qa + n * lq].view(-1, n, lq).copy_(l.reshape(n, -1, lq).transpose(0, 1))
            states.append((l.shape, res[6], res[7]))
        return out, lse, states

    def bwd(self, do, q, k, v, o, lse, seg, causal, scale, states):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for (qa, ka, n, lq, lk), state in zip(seg.groups, states):
            if state is None:
                dq[qa:qa + n], dk[ka:ka + n], dv[ka:ka + n] = _single_key_bwd(
                    do[qa:qa + n], q[qa:qa + n], k[ka:ka + n], v[ka:ka + n], o[qa:qa + n], lse[:, qa:qa + n], scale)
                continue
            lshape, seed, offset = state
            qg = self._view(q, qa, n, lq)
            kg, vg = self._kv(q, k, v, ka, n, lk)
            og, dog = self._view(o, qa, n, lq), self._view(do, qa, n, lq)
            lg = lse[:, qa:qa + n * lq].view(-1, n, lq).transpose(0, 1).contiguous().view(lshape)
            g = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dog, qg, kg, vg, og, lg, seed, offset, None, None, None, lq, lk, 0.0, causal, scale=scale)
            self._view(dq, qa, n, lq).copy_(g[0])
            self._view(dk, ka, n, lk).copy_(self._reduce(g[1], k))
            self._view(dv, ka, n, lk).copy_(self._reduce(g[2], k))
        return dq, dk, dv


class ReferenceBackend:
    """The same two operations in plain PyTorch, sequence by sequence (tests, any dtype/device)."""

    @staticmethod
    def _scores(q, k, i, seg, causal, scale):
        a, bq = int(seg.cu_q[i]), int(seg.cu_q[i + 1])
        c, bk = int(seg.cu_k[i]), int(seg.cu_k[i + 1])
        rep = q.shape[1] // k.shape[1]
        ki = k[c:bk].repeat_interleave(rep, dim=1)  # [Lk, Hq, D]
        s = torch.einsum("qhd,khd->hqk", q[a:bq], ki) * scale  # [Hq, Lq, Lk]
        if causal:
            s = s.masked_fill(torch.ones(bq - a, bk - c, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return s, (a, bq, c, bk, rep)

    def fwd(self, q, k, v, seg, causal, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for i in range(len(seg.cu_q) - 1):
            s, (a, bq, c, bk, rep) = self._scores(q, k, i, seg, causal, scale)
            lse[:, a:bq] = torch.logsumexp(s, -1)
            p = torch.softmax(s, -1)
            out[a:bq] = torch.einsum("hqk,khd->qhd", p, v[c:bk].repeat_interleave(rep, dim=1))
        return out, lse, None

    def bwd(self, do, q, k, v, o, lse, seg, causal, scale, state):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (do * o).sum(-1).t()  # [Hq, total_q]
        hk = k.shape[1]
        for i in range(len(seg.cu_q) - 1):
            s, (a, bq, c, bk, rep) = self._scores(q, k, i, seg, causal, scale)
            p = torch.exp(s - lse[:, a:bq, None])  # [Hq, Lq, Lk], probabilities of the whole row
            vi = v[c:bk].repeat_interleave(rep, dim=1)
            ki = k[c:bk].repeat_interleave(rep, dim=1)
            dvi = torch.einsum("hqk,qhd->khd", p, do[a:bq])
            ds = p * (torch.einsum("qhd,khd->hqk", do[a:bq], vi) - delta[:, a:bq, None])
            dq[a:bq] += torch.einsum("hqk,khd->qhd", ds, ki) * scale
            dki = torch.einsum("hqk,qhd->khd", ds, q[a:bq]) * scale
            dk[c:bk] += dki.view(bk - c, hk, rep, -1).sum(2)
            dv[c:bk] += dvi.view(bk - c, hk, rep, -1).sum(2)
        return dq, dk, dv


BACKENDS = {"flash": FlashBackend, "cudnn": CudnnBackend, "cudnn_expand": lambda: CudnnBackend(expand_kv=True),
            "reference": ReferenceBackend}


def _take(x: torch.Tensor, rows: torch.Tensor | None, span: tuple[int, int] | None) -> torch.Tensor:
    return x[span[0]:span[1]] if rows is None else x.index_select(0, rows)


def _combine(o_c, lse_c, o_d, lse_d, plan: TreePlan):
    """Merge the causal pieces' (o_c [N, H, D], lse_c [H, N]) with the dense pieces' rows."""
    if plan.dense_disjoint and o_c.is_cuda:
        from forge.kernels.tree_attention.triton_combine import lse_combine_

        lse_combine_(o_c, lse_c, o_d, lse_d, plan.q_rows, plan.q_span[0] if plan.q_span else 0)
        return o_c, lse_c
    if plan.q_span is not None:
        a, b = plan.q_span
        lc = lse_c[:, a:b]
        lse = torch.logaddexp(lc, lse_d)  # [H, NQ]
        wc = torch.exp(lc - lse).t()[..., None]  # [NQ, H, 1]
        wd = torch.exp(lse_d - lse).t()[..., None]
        o = o_c  # fresh from the causal call: write the combined rows in place
        o[a:b] = (o_c[a:b].to(wc.dtype) * wc + o_d.to(wd.dtype) * wd).to(o.dtype)
        lse_c[:, a:b] = lse
        return o, lse_c
    rows = plan.q_rows
    h = lse_c.shape[0]
    # A token may lie in several dense pieces (one per ancestor run): reduce over all of them.
    m = lse_c.scatter_reduce(1, rows.expand(h, -1), lse_d, "amax")  # [H, N]
    wc = torch.exp(lse_c - m)
    wd = torch.exp(lse_d - m[:, rows])  # [H, NQ]
    s = wc.index_add(1, rows, wd)
    acc = o_c.to(wc.dtype) * (wc / s).t()[..., None]  # [N, H, D]
    acc.index_add_(0, rows, o_d.to(wd.dtype) * (wd / s[:, rows]).t()[..., None])
    return acc.to(o_c.dtype), m + torch.log(s)


def _add_rows(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None, span: tuple[int, int] | None,
              disjoint: bool):
    """dst[rows] += src. Each row of dst takes one addition when `disjoint` (both operands
    already rounded to dst's dtype, so an in-place add rounds once, as an fp32 sum would);
    rows in several pieces accumulate in fp32 and round once."""
    if rows is None:
        dst[span[0]:span[1]] += src
        return dst
    if disjoint:
        return dst.index_add_(0, rows, src)
    acc_t = torch.promote_types(dst.dtype, torch.float32)
    return dst.to(acc_t).index_add_(0, rows, src.to(acc_t)).to(dst.dtype)


def pieces_fwd(q, k, v, plan: TreePlan, scale: float, backend: PieceBackend):
    """q [N, Hq, D], k, v [N, Hkv, D] (flattened rows) -> (o [N, Hq, D], lse [Hq, N], states)."""
    o, lse, st_c = backend.fwd(q, k, v, plan.runs, True, scale)
    if plan.num_dense == 0:
        return o, lse, (st_c, None)
    qd = _take(q, plan.q_rows, plan.q_span)
    kd, vd = _take(k, plan.k_rows, plan.k_span), _take(v, plan.k_rows, plan.k_span)
    o_d, lse_d, st_d = backend.fwd(qd, kd, vd, plan.dense, False, scale)
    o, lse = _combine(o, lse, o_d, lse_d, plan)
    return o, lse, (st_c, st_d)


def pieces_bwd(do, q, k, v, o, lse, plan: TreePlan, scale: float, backend: PieceBackend, states):
    st_c, st_d = states
    dq, dk, dv = backend.bwd(do, q, k, v, o, lse, plan.runs, True, scale, st_c)
    if plan.num_dense == 0:
        return dq, dk, dv
    qr, kr = plan.q_rows, plan.k_rows
    qd, kd, vd = _take(q, qr, plan.q_span), _take(k, kr, plan.k_span), _take(v, kr, plan.k_span)
    dod, od = _take(do, qr, plan.q_span), _take(o, qr, plan.q_span)
    lsed = (lse[:, plan.q_span[0]:plan.q_span[1]] if qr is None else lse[:, qr]).contiguous()
    dqd, dkd, dvd = backend.bwd(dod, qd, kd, vd, od, lsed, plan.dense, False, scale, st_d)
    dq = _add_rows(dq, dqd, qr, plan.q_span, plan.dense_disjoint)
    # Every run is the key side of at most one dense piece.
    dk = _add_rows(dk, dkd, kr, plan.k_span, True)
    dv = _add_rows(dv, dvd, kr, plan.k_span, True)
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
        backend = BACKENDS[backend or (plan.backend if q.shape[-1] <= 128 else "flash")]()
    return TreePiecesFunction.apply(q, k, v, plan, float(scale), backend)
