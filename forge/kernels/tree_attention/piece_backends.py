"""The dense attention libraries behind `decomposed.py`'s pieces, behind one interface.

A backend runs variable-length attention over packed [total, H, D] rows laid out by a
`Segments` (sequence i: queries [cu_q[i], cu_q[i+1]), keys [cu_k[i], cu_k[i+1])) and returns
the log-sum-exp with the output; its backward takes the final, whole-row output and
log-sum-exp, so that pieces combined by log-sum-exp get exact gradients (decomposed.py's
docstring). `flash`: torch's FlashAttention-2, one variable-length call; `cudnn`: torch's cuDNN
fused attention, one call per group of equal-shape sequences on strided views; `reference`:
plain PyTorch, sequence by sequence, for the CPU tests in fp64. Segments of a single key take a
closed form (cuDNN refuses s_q = s_kv = 1).
"""

from __future__ import annotations

import functools
import os
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


# Backends whose causal mask is top-left aligned when a piece has more queries than keys (the
# fused pieces need it); flash attention aligns it bottom-right.
TOP_LEFT = ("cudnn", "cudnn_expand", "reference")


CUDNN_ENV = "FORGE_CUDNN_ATTENTION"


def cudnn_chosen() -> bool:
    """Whether Forge may pick cuDNN's fused attention by itself (`FORGE_CUDNN_ATTENTION=1`; off by
    default). cuDNN builds an execution plan the first time it meets a shape (batch, query and
    key lengths, strides), forward and backward separately: tens of milliseconds to about a
    second each (public reports for torch 2.11 on H100 and B200), against a few milliseconds for
    a piece's attention. A benchmark that repeats one batch builds them once and never sees it;
    an RL trainer meets new lengths at almost every step, a few dozen per micro-batch (one call
    per distinct piece shape). Flash attention's variable-length call and the Triton kernels
    take any lengths without a plan. Turn it on for work whose shapes repeat."""
    return os.environ.get(CUDNN_ENV, "0") == "1"


def cudnn_usable() -> bool:
    """cuDNN's fused attention is there (cuDNN 9 or later, CUDA build of torch)."""
    return (torch.cuda.is_available() and torch.backends.cudnn.is_available()
            and (torch.backends.cudnn.version() or 0) >= 90000
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"))


class PieceBackend(Protocol):
    """Variable-length attention over packed [total, H, D] rows, returning and taking the LSE."""

    def fwd(self, q, k, v, seg: Segments, causal: bool, scale: float):
        """-> (out [total_q, Hq, D], lse [Hq, total_q] fp32 natural log, state for bwd)."""

    def bwd(self, do, q, k, v, o, lse, seg: Segments, causal: bool, scale: float, state):
        """-> (dq, dk, dv), with o and lse the final (whole-row) output and log-sum-exp."""


class FlashBackend:
    """torch's flash attention (FlashAttention-2 inside ATen), variable-length form, with GQA:
    one call for all sequences of a Segments. Its causal mask is aligned bottom-right, so it
    takes no fused plan (pieces with more queries than keys)."""

    top_left = False

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


def _single_key_fwd(q, k, v, scale, lq=1):
    """Segments of one key: q [n * lq, Hq, D], k, v [n, Hkv, D]. Every query of segment i sees key
    i alone (dense, or causal aligned top-left), so out = v and lse = the score."""
    rep = q.shape[1] // k.shape[1]
    ki, vi = (x.repeat_interleave(rep, dim=1).repeat_interleave(lq, dim=0) for x in (k, v))
    s = (q.float() * ki.float()).sum(-1) * scale  # [n * lq, Hq]
    return vi, s.t()


def _single_key_bwd(do, q, k, v, o, lse, scale, lq=1):
    """The backward of `_single_key_fwd` given the whole row's o and lse (as every piece's)."""
    rep = q.shape[1] // k.shape[1]
    ki, vi = (x.repeat_interleave(rep, dim=1).repeat_interleave(lq, dim=0).float() for x in (k, v))
    dof, qf = do.float(), q.float()
    p = torch.exp((qf * ki).sum(-1) * scale - lse.t())  # [n * lq, Hq]
    ds = p * ((dof * vi).sum(-1) - (dof * o.float()).sum(-1))

    def per_key(x):  # [n * lq, Hq, D] -> [n, Hkv, D], summed in fp32
        return x.unflatten(0, (k.shape[0], lq)).sum(1).unflatten(1, (k.shape[1], rep)).sum(2)

    dq = (ds[..., None] * ki * scale).to(q.dtype)
    return dq, per_key(ds[..., None] * qf * scale).to(k.dtype), per_key(p[..., None] * dof).to(v.dtype)


class CudnnBackend:
    """cuDNN's fused attention through torch, one call per group of equal-shape sequences
    (`Segments.groups`), on [n, H, L, D] views of the packed rows (no copy of q, k, v)."""

    # Whether this cuDNN takes fewer key/value heads than query heads; learnt on the first call.
    native_gqa: bool | None = None
    top_left = True

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

    def _attend(self, q, k, v, qa, ka, n, lq, lk, causal, scale):
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
        return res

    def fwd(self, q, k, v, seg, causal, scale):
        if len(seg.groups) == 1 and seg.groups[0][4] > 1:
            # One group holds every row: cuDNN's own output (token-major, as q) is the result.
            qa, ka, n, lq, lk = seg.groups[0]
            res = self._attend(q, k, v, qa, ka, n, lq, lk, causal, scale)
            out = res[0].transpose(1, 2).reshape(q.shape)  # [n, Lq, H, D] -> rows: a view
            lse = res[1].reshape(n, -1, lq).transpose(0, 1).reshape(q.shape[1], -1)  # [H, n*Lq]
            return out, lse, [(res[1].shape, res[6], res[7])]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        states = []
        for qa, ka, n, lq, lk in seg.groups:
            if lk == 1:  # cuDNN refuses s_q = s_kv = 1; one key per segment has a closed form
                rows = slice(qa, qa + n * lq)
                out[rows], lse[:, rows] = _single_key_fwd(q[rows], k[ka:ka + n], v[ka:ka + n], scale, lq)
                states.append(None)
                continue
            res = self._attend(q, k, v, qa, ka, n, lq, lk, causal, scale)
            o, l = res[0], res[1]
            self._view(out, qa, n, lq).copy_(o)
            lse[:, qa:qa + n * lq].view(-1, n, lq).copy_(l.reshape(n, -1, lq).transpose(0, 1))
            states.append((l.shape, res[6], res[7]))
        return out, lse, states

    def bwd(self, do, q, k, v, o, lse, seg, causal, scale, states):
        single = len(seg.groups) == 1 and states[0] is not None
        if not single:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for (qa, ka, n, lq, lk), state in zip(seg.groups, states):
            if state is None:
                rows = slice(qa, qa + n * lq)
                dq[rows], dk[ka:ka + n], dv[ka:ka + n] = _single_key_bwd(
                    do[rows], q[rows], k[ka:ka + n], v[ka:ka + n], o[rows], lse[:, rows], scale, lq)
                continue
            lshape, seed, offset = state
            qg = self._view(q, qa, n, lq)
            kg, vg = self._kv(q, k, v, ka, n, lk)
            og, dog = self._view(o, qa, n, lq), self._view(do, qa, n, lq)
            lg = lse[:, qa:qa + n * lq].view(-1, n, lq).transpose(0, 1).contiguous().view(lshape)
            g = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dog, qg, kg, vg, og, lg, seed, offset, None, None, None, lq, lk, 0.0, causal, scale=scale)
            gk, gv = self._reduce(g[1], k), self._reduce(g[2], k)
            if single:
                # cuDNN's gradients take q's and k's token-major layout: views, no copies.
                return (g[0].transpose(1, 2).reshape(q.shape), gk.transpose(1, 2).reshape(k.shape),
                        gv.transpose(1, 2).reshape(v.shape))
            self._view(dq, qa, n, lq).copy_(g[0])
            self._view(dk, ka, n, lk).copy_(gk)
            self._view(dv, ka, n, lk).copy_(gv)
        return dq, dk, dv


class ReferenceBackend:
    """The same two operations in plain PyTorch, sequence by sequence (tests, any dtype/device)."""

    top_left = True

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


@functools.cache
def cudnn_top_left() -> bool:
    """Whether ATen's cuDNN attention aligns its causal mask top-left on a piece with more
    queries than keys, forward and backward, as the fused pieces need. torch does not document
    it, so it is checked once, on a small GQA piece, against the reference backend."""
    if not cudnn_usable():
        return False
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(n, h, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for n, h in ((192, 2), (64, 1), (64, 1), (192, 2)))
    seg = Segments.of(torch.tensor([192]), torch.tensor([64])).to("cuda")
    try:
        be = CudnnBackend()
        o, lse, st = be.fwd(q, k, v, seg, True, 0.125)
        got = (o, *be.bwd(do, q, k, v, o, lse, seg, True, 0.125, st))
    except RuntimeError:
        return False
    ref = ReferenceBackend()
    x32 = [t.float() for t in (q, k, v)]
    o32, lse32, _ = ref.fwd(*x32, seg, True, 0.125)
    want = (o32, *ref.bwd(do.float(), *x32, o32, lse32, seg, True, 0.125, None))
    return all(((a.float() - b).norm() / b.norm()).item() < 2e-2 for a, b in zip(got, want))
