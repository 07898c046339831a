"""MSA Triton kernels against naive.py: indexer, sparse attention forward and backward, decode.

On the CPU these run through Triton's interpreter at tiny sizes (block 16, top_k 2-3, a few
blocks plus an odd tail); the `gpu` tests repeat them at the benchmark's shape.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forge.kernels.msa import triton_attention, triton_decode, triton_tile
from forge.kernels.msa.naive import select_blocks_naive, sparse_attention_naive
from forge.kernels.msa.triton_attention import sparse_attention_triton
from forge.kernels.msa.triton_decode import decode_with_selection, msa_decode, select_blocks_decode
from forge.kernels.msa.triton_indexer import select_blocks_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(device=DEV, dtype=dtype)


def _canonical(sel: torch.Tensor) -> torch.Tensor:
    """Ascending block indices with -1 at the end, as select_blocks_naive returns them."""
    big = 1 << 30
    s = torch.where(sel < 0, big, sel.long()).sort(-1).values
    return torch.where(s == big, -1, s)


def _nan_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel never writes fails the comparison."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))


def _nan_empty(empty):
    """torch.empty whose floating-point tensors start as NaN (the kernels' partial buffers)."""
    def fill(*args, **kw):
        x = empty(*args, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    return fill


def _tol(dtype):
    # bf16: the kernel rounds p to bf16 before P @ V, about what the reference loses in bf16.
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 3], ids=["own-block-only", "top3"])
def test_indexer_keeps_the_same_blocks_as_naive(dtype, top_k):
    gen = torch.Generator().manual_seed(1)
    b, t, hkv, di = 2, 16 * 5 + 7, 2, 16
    iq, ik = _randn(b, t, hkv, di, dtype=dtype, gen=gen), _randn(b, t, di, dtype=dtype, gen=gen)
    got = select_blocks_triton(iq, ik, block_size=16, top_k=top_k)
    assert got.shape == (b, t, hkv, top_k)
    assert (got[..., -1].long() == (torch.arange(t, device=DEV) // 16).view(1, t, 1)).all()
    assert torch.equal(_canonical(got).cpu(), select_blocks_naive(iq, ik, block_size=16, top_k=top_k).cpu())


def test_indexer_breaks_ties_towards_the_lower_block():
    b, t, hkv, di = 1, 16 * 6, 1, 16
    iq = torch.ones(b, t, hkv, di, device=DEV)
    ik = torch.ones(b, t, di, device=DEV)  # every block scores the same
    got = _canonical(select_blocks_triton(iq, ik, block_size=16, top_k=3))
    assert got[0, -1, 0].tolist() == [0, 1, 5]
    assert torch.equal(got.cpu(), select_blocks_naive(iq, ik, block_size=16, top_k=3).cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("work", ["one-range", "four-ranges-items-of-3"])
def test_sparse_attention_output_and_gradients_match_naive(dtype, work, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    b, t, hq, hkv, d = 2, 16 * 3 + 5, 6, 2, 16
    q, k, v = (_randn(b, t, h, d, dtype=dtype, gen=gen).requires_grad_() for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 16, dtype=dtype, gen=gen), _randn(b, t, 16, dtype=dtype, gen=gen)
    sel = select_blocks_triton(iq, ik, block_size=16, top_k=2)
    dout = _randn(b, t, hq, d, dtype=dtype, gen=gen)
    with monkeypatch.context() as m:
        _nan_outputs(m)
        m.setattr(torch, "empty", _nan_empty(torch.empty))
        if work != "one-range":
            # Ranges of one block (16 queries), so partials are reused across ranges, and
            # work items of at most 3 queries, so a block's queries span several programs.
            m.setattr(triton_attention, "PARTIAL_BYTES", 1)
            m.setattr(triton_attention, "ITEM_QUERIES", 3)
        out = sparse_attention_triton(q, k, v, sel, block_size=16, order="kv")
        grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_matches_naive(out, grads, (q, k, v), sel, dout, dtype)


def _assert_matches_naive(out, grads, qkv, sel, dout, dtype):
    """Output and input gradients against naive.py in fp32 from the same (rounded) inputs."""
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in qkv)
    ref = sparse_attention_naive(q32, k32, v32, sel.long(), block_size=16)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    torch.testing.assert_close(out.float(), ref, **_tol(dtype))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), r, **_tol(dtype), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("order", ["kv", "tile"])
def test_backward_with_a_block_split_among_programs_matches_naive(order, monkeypatch):
    # Blocks of 32 keys, 16 per backward program: two programs share each block's dK and dV.
    gen = torch.Generator().manual_seed(18)
    b, t, hq, hkv, d = 1, 32 * 3 + 5, 4, 2, 16
    q, k, v = (_randn(b, t, h, d, dtype=torch.float32, gen=gen).requires_grad_() for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 16, dtype=torch.float32, gen=gen), _randn(b, t, 16, dtype=torch.float32, gen=gen)
    sel = select_blocks_triton(iq, ik, block_size=32, top_k=2)
    dout = _randn(b, t, hq, d, dtype=torch.float32, gen=gen)
    for name in ("KV_BACKWARD", "KV_BACKWARD_DKDV"):
        monkeypatch.setattr(triton_attention, name, dict(getattr(triton_attention, name), BLOCK_N=16))
    out = sparse_attention_triton(q, k, v, sel, block_size=32, order=order)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (x.detach().requires_grad_() for x in (q, k, v))
    ref_grads = torch.autograd.grad(sparse_attention_naive(q32, k32, v32, sel.long(), block_size=32),
                                    (q32, k32, v32), dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, **_tol(torch.float32), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_outer_forward_matches_naive(dtype, monkeypatch):
    # The query-outer forward is the decode kernel; its backward is the KV-outer one tested above.
    gen = torch.Generator().manual_seed(6)
    b, t, hq, hkv, d = 1, 16 * 2 + 5, 6, 2, 16
    q, k, v = (_randn(b, t, h, d, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 16, dtype=dtype, gen=gen), _randn(b, t, 16, dtype=dtype, gen=gen)
    sel = select_blocks_triton(iq, ik, block_size=16, top_k=2)
    with monkeypatch.context() as m:
        _nan_outputs(m)
        out = sparse_attention_triton(q, k, v, sel, block_size=16, order="query")
    ref = sparse_attention_naive(q.float(), k.float(), v.float(), sel.long(), block_size=16)
    torch.testing.assert_close(out.float(), ref, **_tol(dtype))


def _coherent(iq: torch.Tensor, block_size: int) -> torch.Tensor:
    """Index queries equal within each block of queries: every query of a block keeps the same blocks."""
    b, t, hkv, di = iq.shape
    first = iq[:, ::block_size]  # [B, n_blocks, Hkv, Di]
    return first.repeat_interleave(block_size, dim=1)[:, :t].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,tile", [("scattered", 16), ("coherent", 16), ("scattered", 32)],
                         ids=["scattered", "coherent", "scattered-tiles-of-two-blocks"])
def test_tile_forward_output_and_gradients_match_naive(dtype, pattern, tile, monkeypatch):
    # The tile forward, and in the backward the tile-outer dQ beside KV-outer dK and dV.
    # Scattered selections give tiles whose union holds blocks most rows did not keep: the
    # per-row mask is what keeps them out. Tiles of 32 queries span two own blocks.
    gen = torch.Generator().manual_seed(15)
    b, t, hq, hkv, d = 2, 16 * 6 + 5, 6, 2, 16
    q, k, v = (_randn(b, t, h, d, dtype=dtype, gen=gen).requires_grad_() for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 16, dtype=dtype, gen=gen), _randn(b, t, 16, dtype=dtype, gen=gen)
    if pattern == "coherent":
        iq = _coherent(iq, 16)
    sel = select_blocks_triton(iq, ik, block_size=16, top_k=3)
    dout = _randn(b, t, hq, d, dtype=dtype, gen=gen)
    with monkeypatch.context() as m:
        _nan_outputs(m)
        m.setattr(triton_tile, "INTERPRET_TILE_QUERIES", tile)
        out = sparse_attention_triton(q, k, v, sel, block_size=16, order="tile")
        grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_matches_naive(out, grads, (q, k, v), sel, dout, dtype)


def test_tile_unions_and_work_ratio():
    # One batch row, 2 tiles of 4 queries, one group, top 2; -1 is an empty slot.
    sel = torch.tensor([[0, -1], [0, -1], [1, 0], [1, 0],  # tile 0: union {0, 1}
                        [2, 0], [2, 1], [2, 0], [2, 1]], dtype=torch.int32).view(1, 8, 1, 2)
    ptr, mid, blocks = triton_tile.tile_unions(sel, 4, block_size=4)
    assert ptr.tolist() == [0, 2, 5] and blocks.tolist() == [0, 1, 0, 1, 2]
    # Tile 0's own block is 0: both of its blocks need the causal mask; tile 1's is 1.
    assert mid.tolist() == [0, 3]
    # Tiles compute 4 rows x (2 + 3) blocks = 20 (query, block) pairs for 14 kept slots.
    assert triton_tile.tile_work_ratio(sel, 4) == pytest.approx(20 / 14)
    # Every query of a tile keeping the same blocks: the tile does only kept work.
    same = torch.tensor([[0, 1]] * 4 + [[2, 0]] * 4, dtype=torch.int32).view(1, 8, 1, 2)
    assert triton_tile.tile_work_ratio(same, 4) == 1.0
    # A tail tile: 6 queries in tiles of 4, the padding rows count for nothing kept.
    ptr, mid, blocks = triton_tile.tile_unions(same[:, :6], 4, block_size=2)
    assert ptr.tolist() == [0, 2, 4] and mid.tolist() == [0, 3]  # tile 1: block 0 is before its own block 2
    assert triton_tile.tile_work_ratio(same[:, :6], 4) == pytest.approx(16 / 12)


def test_auto_order_takes_the_tile_forward_only_for_shared_selections():
    gen = torch.Generator().manual_seed(16)
    b, t, hkv = 1, 16 * 32, 2
    iq, ik = _randn(b, t, hkv, 16, dtype=torch.float32, gen=gen), _randn(b, t, 16, dtype=torch.float32, gen=gen)
    scattered = select_blocks_triton(iq, ik, block_size=16, top_k=3)
    coherent = select_blocks_triton(_coherent(iq, 16), ik, block_size=16, top_k=3)
    assert triton_tile.tile_work_ratio(coherent) == 1.0
    assert triton_tile.tile_work_ratio(scattered) > triton_tile.TILE_WORK_LIMIT
    assert triton_attention.forward_order(coherent, "auto") == "tile"
    assert triton_attention.forward_order(scattered, "auto") == "kv"
    assert triton_attention.forward_order(coherent, "kv") == "kv"
    with pytest.raises(ValueError, match="'auto' picks"):
        sparse_attention_triton(iq, iq, iq, coherent, block_size=16, order="tiles")


def test_sparse_attention_equals_dense_causal_when_every_block_is_kept():
    gen = torch.Generator().manual_seed(3)
    b, t, hq, hkv, d = 1, 16 * 2 + 9, 4, 2, 16
    q, k, v = (_randn(b, t, h, d, dtype=torch.float32, gen=gen) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 16, dtype=torch.float32, gen=gen), _randn(b, t, 16, dtype=torch.float32, gen=gen)
    sel = select_blocks_triton(iq, ik, block_size=16, top_k=math.ceil(t / 16))
    out = sparse_attention_triton(q, k, v, sel, block_size=16)
    kt, vt = (x.transpose(1, 2).repeat_interleave(hq // hkv, 1) for x in (k, v))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)


def _paged_cache(k, v, ik, block_size, gen):
    """Lay sequences out in shuffled pages of one block each, as a paged KV cache would."""
    return _paged_cache_of([k, v, ik], block_size, gen)


def _paged_cache_of(tensors, block_size, gen):
    b, t = tensors[0].shape[:2]
    n_blocks = math.ceil(t / block_size)
    pad = n_blocks * block_size - t
    pages = torch.randperm(b * n_blocks, generator=gen).view(b, n_blocks).to(DEV)
    caches = []
    for x in tensors:
        xp = F.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, pad))
        xp = xp.reshape(b * n_blocks, block_size, *x.shape[2:])
        cache = torch.full_like(xp, float("nan"))
        cache[pages.reshape(-1)] = xp
        caches.append(cache)
    return caches, pages.to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_new", [1, 3], ids=["one-token", "three-tokens-across-a-page"])
def test_decode_over_a_paged_cache_matches_naive(dtype, n_new, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    b, t, hq, hkv, d, di = 2, 16 * 4 + 1, 4, 2, 16, 16
    q, k, v = (_randn(b, t, h, d, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, di, dtype=dtype, gen=gen), _randn(b, t, di, dtype=dtype, gen=gen)
    # Unused page slots are NaN: a read past a sequence's own tokens would show.
    (kc, vc, ikc), pages = _paged_cache(k, v, ik, 16, gen)
    # The second sequence is 16 tokens shorter; each decodes its last n_new cached tokens.
    lens = [t, t - 16]
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q_new = torch.stack([q[i, n - n_new:n] for i, n in enumerate(lens)])
    iq_new = torch.stack([iq[i, n - n_new:n] for i, n in enumerate(lens)])
    with monkeypatch.context() as m:
        _nan_outputs(m)
        m.setattr(torch, "empty", _nan_empty(torch.empty))
        out, got_sel = decode_with_selection(q_new, iq_new, kc, vc, ikc, pages, kv_len, top_k=2)
    for i, n in enumerate(lens):
        sel = select_blocks_naive(iq[i:i + 1, :n], ik[i:i + 1, :n], block_size=16, top_k=2)
        assert torch.equal(_canonical(got_sel[i]).cpu(), sel[0, -n_new:].cpu()), f"sequence {i}"
        ref = sparse_attention_naive(*(x[i:i + 1, :n].float() for x in (q, k, v)), sel, block_size=16)
        torch.testing.assert_close(out[i].float(), ref[0, -n_new:], **_tol(dtype))


@pytest.mark.parametrize("merge", ["ranked", "ranked-bound-of-2-groups", "one-by-one"])
@pytest.mark.parametrize("pages_per_program", [1, 2, 3], ids=lambda n: f"{n}-pages-a-scan-program")
def test_decode_selection_equals_naive(pages_per_program, merge, monkeypatch):
    # The scan keeps a top list per program and the merge picks among them: the result must be
    # the prefill definition's (ties to the lower block) whatever the split. The merge's bound
    # comes from one group per scan program, or from 2 groups of several; "one-by-one" is its
    # fallback, taken when more candidates reach the bound than it ranks at once.
    if merge == "ranked-bound-of-2-groups":
        monkeypatch.setattr(triton_decode, "MERGE_GROUPS", 2)
    if merge == "one-by-one":
        monkeypatch.setattr(triton_decode, "MERGE_CAP", 2)
    gen = torch.Generator().manual_seed(5)
    b, t, hkv, di, n_new = 2, 16 * 7 + 3, 2, 16, 3
    iq, ik = _randn(b, t, hkv, di, dtype=torch.float32, gen=gen), _randn(b, t, di, dtype=torch.float32, gen=gen)
    # Sequence 1 has equal index keys: every block ties, the lowest ones must win.
    ik[1] = 1.0
    iq[1] = 1.0
    (ikc,), pages = _paged_cache_of([ik], 16, gen)
    lens = [t, t - 16]
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEV)
    iq_new = torch.stack([iq[i, n - n_new:n] for i, n in enumerate(lens)])
    got = select_blocks_decode(iq_new, ikc, pages, kv_len, block_size=16, top_k=4,
                               pages_per_program=pages_per_program)
    own = (torch.tensor(lens).view(b, 1) - n_new + torch.arange(n_new)) // 16  # [B, Tn]
    assert (got[..., -1].long().cpu() == own.unsqueeze(-1)).all()
    for i, n in enumerate(lens):
        ref = select_blocks_naive(iq[i:i + 1, :n], ik[i:i + 1, :n], block_size=16, top_k=4)[0, -n_new:]
        assert torch.equal(_canonical(got[i]).cpu(), ref.cpu()), f"sequence {i}"


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all()
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _check_selection(sel: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, block_size: int, top_k: int):
    """Every kept set is own block + k-1 best earlier blocks, up to rounding of near-equal scores."""
    from forge.kernels.msa.naive import block_scores_naive

    scores = block_scores_naive(iq, ik, block_size).permute(0, 2, 1, 3)  # [B, T, Hkv, NB]
    b, t, hkv, nb = scores.shape
    own = (torch.arange(t, device=iq.device) // block_size).view(1, t, 1)
    sel = sel.long()
    assert (sel[..., -1] == own).all()
    canon = _canonical(sel)
    assert ((canon[..., 1:] != canon[..., :-1]) | (canon[..., 1:] < 0)).all(), "a block kept twice"
    assert ((sel >= 0).sum(-1) == torch.clamp(own + 1, max=top_k)).all()
    kept = torch.zeros(b, t, hkv, nb + 1, dtype=torch.bool, device=iq.device)
    kept.scatter_(-1, torch.where(sel < 0, nb, sel), True)
    kept = kept[..., :nb]
    blocks = torch.arange(nb, device=iq.device)
    earlier = blocks.view(1, 1, 1, nb) < own.unsqueeze(-1)
    inf = torch.tensor(float("inf"), device=iq.device)
    worst_kept = torch.where(kept & earlier, scores, inf).amin(-1)
    best_left = torch.where(~kept & earlier, scores, -inf).amax(-1)
    tol = 1e-3 * scores[torch.isfinite(scores)].abs().max()
    assert (worst_kept >= best_left - tol).all()


@pytest.mark.gpu
@pytest.mark.parametrize("di", [128, 64])
def test_gpu_indexer_full_size(di):
    gen = torch.Generator().manual_seed(10)
    b, t, hkv = 1, 4096 + 77, 8
    iq = _randn(b, t, hkv, di, dtype=torch.bfloat16, gen=gen)
    ik = _randn(b, t, di, dtype=torch.bfloat16, gen=gen)
    sel = select_blocks_triton(iq, ik, block_size=128, top_k=16)
    _check_selection(sel, iq, ik, 128, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["kv", "kv-ranges", "query", "tile", "tile-coherent"])
def test_gpu_sparse_attention_full_size_forward_backward(order, monkeypatch):
    if order == "kv-ranges":
        # Query ranges of 256 queries (9 of them) and items of at most 40 queries.
        monkeypatch.setattr(triton_attention, "PARTIAL_BYTES", 256 * 8 * 8 * 6 * (128 * 2 + 4))
        monkeypatch.setattr(triton_attention, "ITEM_QUERIES", 40)
        order = "kv"
    gen = torch.Generator().manual_seed(11)
    b, t, hq, hkv, d = 1, 2048 + 77, 48, 8, 128
    q, k, v = (_randn(b, t, h, d, dtype=torch.bfloat16, gen=gen).requires_grad_() for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 128, dtype=torch.bfloat16, gen=gen), _randn(b, t, 128, dtype=torch.bfloat16, gen=gen)
    if order == "tile-coherent":
        iq, order = _coherent(iq, 128), "tile"
    sel = select_blocks_triton(iq, ik, block_size=128, top_k=8)
    dout = _randn(b, t, hq, d, dtype=torch.bfloat16, gen=gen)
    out = sparse_attention_triton(q, k, v, sel, block_size=128, order=order)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = sparse_attention_naive(q32, k32, v32, sel.long(), block_size=128)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    assert _rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n_new", [1, 4])
def test_gpu_decode_full_size(n_new):
    gen = torch.Generator().manual_seed(12)
    b, t, hq, hkv, d, di = 2, 4096 + 77, 48, 8, 128, 128
    q, k, v = (_randn(b, t, h, d, dtype=torch.bfloat16, gen=gen) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, di, dtype=torch.bfloat16, gen=gen), _randn(b, t, di, dtype=torch.bfloat16, gen=gen)
    (kc, vc, ikc), pages = _paged_cache(k, v, ik, 128, gen)
    kv_len = torch.full((b,), t, dtype=torch.int32, device=DEV)
    out, got_sel = decode_with_selection(q[:, -n_new:], iq[:, -n_new:], kc, vc, ikc, pages, kv_len, top_k=16)
    sel = select_blocks_triton(iq, ik, block_size=128, top_k=16)
    # Both select in bf16 and may round near-equal block scores apart.
    assert (_canonical(got_sel) == _canonical(sel[:, -n_new:])).float().mean() > 0.99
    # Reference over the full sequence, last n_new rows (selection by the same prefill indexer).
    full = sparse_attention_naive(q.float(), k.float(), v.float(), sel.long(), block_size=128)
    assert _rel_err(out, full[:, -n_new:]) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_with_fp8_index_keys():
    # The cache may hold fp8 index keys; the reference selects with the same (rounded) keys.
    gen = torch.Generator().manual_seed(14)
    b, t, hq, hkv, d, di = 2, 4096 + 77, 48, 8, 128, 128
    q, k, v = (_randn(b, t, h, d, dtype=torch.bfloat16, gen=gen) for h in (hq, hkv, hkv))
    iq = _randn(b, t, hkv, di, dtype=torch.bfloat16, gen=gen)
    ik8 = _randn(b, t, di, dtype=torch.bfloat16, gen=gen).to(torch.float8_e4m3fn)
    (kc, vc, ikc), pages = _paged_cache_of([k, v, ik8.to(torch.bfloat16)], 128, gen)
    ikc = ikc.to(torch.float8_e4m3fn)
    kv_len = torch.full((b,), t, dtype=torch.int32, device=DEV)
    out = msa_decode(q[:, -1:], iq[:, -1:], kc, vc, ikc, pages, kv_len, top_k=16)
    sel = select_blocks_triton(iq, ik8.to(torch.bfloat16), block_size=128, top_k=16)
    got_sel = select_blocks_decode(iq[:, -1:], ikc, pages, kv_len, block_size=128, top_k=16)
    assert (_canonical(got_sel) == _canonical(sel[:, -1:])).float().mean() > 0.99
    full = sparse_attention_naive(q.float(), k.float(), v.float(), sel.long(), block_size=128)
    assert _rel_err(out, full[:, -1:]) < 1e-2


@pytest.mark.gpu
def test_gpu_msa_equals_dense_when_top_k_covers_the_sequence():
    from forge.kernels.msa import msa_attention

    gen = torch.Generator().manual_seed(13)
    b, t, hq, hkv, d = 1, 2048, 48, 8, 128
    q, k, v = (_randn(b, t, h, d, dtype=torch.bfloat16, gen=gen) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 128, dtype=torch.bfloat16, gen=gen), _randn(b, t, 128, dtype=torch.bfloat16, gen=gen)
    out = msa_attention(q, k, v, iq, ik, block_size=128, top_k=16)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
    assert _rel_err(out, dense) < 1e-2
