"""MSA against dense causal attention: one bf16 attention layer, 48 query heads, 8 KV heads, D=128.

Per length: prefill forward (indexer + sparse attention, each also alone, KV-outer and up to
--query-outer-max query-outer, each checked on sampled rows against an fp32 reference) against
the fastest dense SDPA backend that runs; the sparse attention forward alone on selection
patterns from scattered (random index queries) to coherent (one index query per block of
queries, so a block's queries keep the same blocks), KV-outer and tile-outer, with the tile
work ratio that `order="auto"` reads; forward+backward up to --bwd-max, on scattered and
coherent selections; one decoding step over a full paged cache (bf16 index keys, and fp8 ones
at --fp8-index-dims) against dense SDPA decoding with GQA, timed per call with
--decode-slots calls in one CUDA graph (each on its own index cache) and as a lone replay;
and at the first length, the needle retrieval rate of the Triton indexer. `--sweep T` times
the kernels' launch settings at length T (`--sweep-parts` picks which) and profiles one call
of each. Times are medians of CUDA-event timings; from --few-reps-from tokens every prefill
variant gets one timed call (dense without warm-up). Every row goes to the JSON as soon as it
is measured, so a run cut short still leaves its numbers. All four lengths with --profile
took about 2.5 minutes on an H100.

    PYTHONPATH=. python benchmarks/msa.py --profile --out msa.json
    PYTHONPATH=. python benchmarks/msa.py --sweep 1048576 --sweep-parts tile decode --out msa_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _timing import timed

from forge.kernels.msa import triton_attention, triton_decode, triton_indexer, triton_tile
from forge.kernels.msa.synthetic import needle_case, needle_recall
from forge.kernels.msa.triton_attention import build_work_list, sparse_attention_triton
from forge.kernels.msa.triton_decode import decode_with_selection, msa_decode
from forge.kernels.msa.triton_indexer import select_blocks_triton
from forge.kernels.msa.triton_tile import tile_work_ratio

HQ, HKV, D = 48, 8, 128


def graphed(fns):
    """Capture the calls `fns` back to back in one CUDA graph (decoding launches small kernels); its replay."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph.replay


def per_call_ms(fns) -> tuple[float, float]:
    """(ms per call with the calls `fns` in one graph, ms of a graph replay holding only the first).

    A replay timed alone also holds the graph's launch from the host, about 10-17 us on an H100,
    which a model's step graph pays once for all its layers; several calls in one graph, each on
    its own inputs (so no call finds another's data in L2), divide it among them.
    """
    return timed(graphed(fns), reps=50, warmup=5) / len(fns), timed(graphed(fns[:1]), reps=50, warmup=5)


def dense_fwd(backend, expand: bool):
    def run(q, k, v):  # [B, T, H, D] in, [B, Hq, T, D] out
        if expand:
            k, v = (x.repeat_interleave(HQ // HKV, dim=2) for x in (k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=not expand)
    return run


def pick_dense(q, k, v) -> tuple[str, object]:
    """The fastest SDPA backend that runs this shape (cuDNN on an H100 with torch 2.11).

    A backend without GQA support runs on key/value heads repeated to 48, the copy timed too.
    """
    best = None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for expand in (False, True):
            fn = dense_fwd(backend, expand)
            name = backend.name + ("+repeat_kv" if expand else "")
            try:
                ms = timed(lambda: fn(q, k, v), reps=3)
            except RuntimeError as err:
                print(f"dense {name} does not run here: {str(err).splitlines()[0][:200]}")
                continue
            print(f"dense {name}: {ms:.2f} ms at T={q.shape[1]}")
            if best is None or ms < best[0]:
                best = (ms, name, fn)
            break
    return best[1], best[2]


def kept_pairs(t: int, block_size: int, top_k: int) -> int:
    """(query, key) pairs per head that MSA attends to: k-1 full earlier blocks + own causal part."""
    pos = torch.arange(t, dtype=torch.int64)
    return int((torch.clamp(pos // block_size, max=top_k - 1) * block_size + pos % block_size + 1).sum())


def attend_rows(q, k, v, sel, ts, g, block_size):
    """fp32 reference for the rows (t, group g, its heads) of ts: softmax over the kept tokens."""
    rep = q.shape[2] // k.shape[2]
    outs = []
    for t in ts:
        blocks = sel[0, t, g].long()
        blocks = blocks[blocks >= 0]
        idx = (blocks[:, None] * block_size + torch.arange(block_size, device=q.device)).flatten()
        idx = idx[idx <= t]
        qq = q[0, t, g * rep:(g + 1) * rep].float()  # [rep, D]
        p = torch.softmax(qq @ k[0, idx, g].float().T * q.shape[-1] ** -0.5, dim=-1)
        outs.append(p @ v[0, idx, g].float())
    return torch.stack(outs)  # [len(ts), rep, D]


def row_error(out, q, k, v, sel, block_size, n=48):
    """Relative error of `out` against attend_rows on n sampled rows (last row included)."""
    t = q.shape[1]
    gen = torch.Generator().manual_seed(t)
    ts = torch.cat([torch.randint(0, t, (n - 1,), generator=gen), torch.tensor([t - 1])]).tolist()
    rep = q.shape[2] // k.shape[2]
    err = 0.0
    for g in (0, k.shape[2] - 1):
        ref = attend_rows(q, k, v, sel, ts, g, block_size)
        got = out[0, ts, g * rep:(g + 1) * rep].float()
        err = max(err, ((got - ref).norm() / ref.norm()).item())
    return err


def bench_length(t, args, dense_name, dense, emit):
    # Long lengths: one timed call; dense gets no warm-up (27 s a call at 1M), the MSA pieces one.
    reps, warm = (1, 0) if t >= args.few_reps_from else (args.reps, 1)
    msa_warm = 1
    bs, top_k = args.block_size, args.top_k
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, ik = mk(1, t, HQ, D), mk(1, t, HKV, D), mk(1, t, HKV, D), mk(1, t, max(args.index_dims))
    dense_ms = timed(lambda: dense(q, k, v), reps=reps, warmup=warm)
    dense_flops = 4 * D * HQ * t * (t + 1) / 2
    emit(dict(kind="prefill_dense", T=t, backend=dense_name, ms=dense_ms, tflops=dense_flops / dense_ms / 1e9))
    attn_flops = 4 * D * HQ * kept_pairs(t, bs, top_k)
    for di in args.index_dims:
        iq, ik_d = mk(1, t, HKV, di), ik[..., :di]
        sel = select_blocks_triton(iq, ik_d, block_size=bs, top_k=top_k)
        idx_ms = timed(lambda: select_blocks_triton(iq, ik_d, block_size=bs, top_k=top_k), reps=reps,
                       warmup=msa_warm)
        attn, err = {}, {}
        with torch.no_grad():
            for order in ("kv", "query") if t <= args.query_outer_max else ("kv",):
                err[order] = row_error(sparse_attention_triton(q, k, v, sel, block_size=bs, order=order),
                                       q, k, v, sel, bs)
                attn[order] = timed(lambda: sparse_attention_triton(q, k, v, sel, block_size=bs, order=order),
                                    reps=reps, warmup=msa_warm)
            rep = HQ // HKV
            wl_ms = timed(lambda: build_work_list(sel, bs, rep, D, 2), reps=reps, warmup=msa_warm)
        attn_ms = attn["kv"]
        # The two run back to back in msa_attention; their sum is the layer's prefill time.
        total = idx_ms + attn_ms
        n_blocks = t // bs
        idx_flops = 2 * di * HKV * bs * bs * n_blocks * (n_blocks - 1) / 2
        emit(dict(kind="prefill_msa", T=t, Di=di, ms=total, indexer_ms=idx_ms, attention_ms=attn_ms,
                  attention_query_outer_ms=attn.get("query"), work_list_ms=wl_ms,
                  attention_rel_err=err["kv"], attention_query_outer_rel_err=err.get("query"),
                  speedup=dense_ms / total, attention_tflops=attn_flops / attn_ms / 1e9,
                  indexer_tflops=idx_flops / idx_ms / 1e9))
        del iq, sel
    bench_patterns(t, args, q, k, v, ik, max(reps, 5), emit)
    if t <= args.bwd_max:
        bench_backward(t, args, q, k, v, ik, args.reps, emit)
    del q
    bench_decode(t, args, k, v, ik, emit)


def pattern_iq(t, di, bs, noise, gen):
    """Index queries of a selection pattern: random (noise None), or one per block of queries plus noise.

    Random index inputs scatter every query's blocks. With one index query per block of queries
    (noise 0), all queries of a block keep the same blocks, as the public MSA code's prefill
    benchmark builds its selections; noise in between moves them apart.
    """
    iq = torch.randn(1, t, HKV, di, device="cuda", dtype=torch.bfloat16, generator=gen)
    if noise is None:
        return iq
    base = iq[:, ::bs].repeat_interleave(bs, dim=1)[:, :t]
    return (base + noise * iq).to(torch.bfloat16) if noise else base.contiguous()


def bench_patterns(t, args, q, k, v, ik, reps, emit):
    """The sparse attention forward alone, per selection pattern and forward order (Di=64 selections)."""
    bs, top_k, di = args.block_size, args.top_k, 64
    attn_flops = 4 * D * HQ * kept_pairs(t, bs, top_k)
    gen = torch.Generator(device="cuda").manual_seed(t)
    for name in args.patterns:
        noise = PATTERNS[name]
        sel = select_blocks_triton(pattern_iq(t, di, bs, noise, gen), ik[..., :di], block_size=bs, top_k=top_k)
        ratio = tile_work_ratio(sel)
        row = dict(kind="attention_pattern", T=t, pattern=name, noise=noise, tile_work_ratio=ratio,
                   auto_order=triton_attention.forward_order(sel, "auto"))
        with torch.no_grad():
            for order in ("kv", "tile"):
                if order == "tile" and ratio > args.tile_ratio_max and t > 131072:
                    continue  # seconds a call at long lengths, and never chosen
                row[f"{order}_rel_err"] = row_error(
                    sparse_attention_triton(q, k, v, sel, block_size=bs, order=order), q, k, v, sel, bs)
                ms = timed(lambda: sparse_attention_triton(q, k, v, sel, block_size=bs, order=order),
                           reps=reps, warmup=1)
                row[f"{order}_ms"], row[f"{order}_tflops"] = ms, attn_flops / ms / 1e9
            ms = timed(lambda: tile_work_ratio(sel), reps=reps, warmup=1)
            row["auto_decision_ms"] = ms
        emit(row)
        del sel


def bench_backward(t, args, q, k, v, ik, reps, emit):
    bs, top_k, di = args.block_size, args.top_k, args.index_dims[0]
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    dense_ms, name = None, None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def dense():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).backward(dout.transpose(1, 2))
        try:
            dense_ms, name = timed(dense, reps=reps), backend.name
            break
        except RuntimeError as err:
            print(f"dense fwd+bwd {backend.name} does not run here: {str(err).splitlines()[0][:200]}")

    gen = torch.Generator(device="cuda").manual_seed(t + 1)
    # Scattered selections (random index queries), and coherent ones, where the forward is tile-outer.
    for pattern in ("scattered", "coherent"):
        iq = pattern_iq(t, di, bs, PATTERNS[pattern], gen)

        def msa():
            sel = select_blocks_triton(iq, ik[..., :di], block_size=bs, top_k=top_k)
            sparse_attention_triton(qg, kg, vg, sel, block_size=bs).backward(dout)

        msa_ms = timed(msa, reps=reps)
        emit(dict(kind="fwd_bwd", T=t, Di=di, pattern=pattern, dense_backend=name, dense_ms=dense_ms,
                  msa_ms=msa_ms, speedup=dense_ms / msa_ms if dense_ms else None))


def decode_selection_match(iq, ik, sel, t, bs, top_k):
    """Fraction of the decode's kept blocks that an fp32 torch top-k over the full scores also keeps."""
    scores = iq[0, 0].float() @ ik[0, :t].float().T  # [Hkv, T]
    blocks = scores.view(HKV, t // bs, bs).amax(-1)
    blocks[:, -1] = float("-inf")  # the own block is kept apart
    ref = torch.topk(blocks, top_k - 1, dim=-1).indices.sort(-1).values
    got = sel[0, 0, :, :top_k - 1].long().sort(-1).values
    return (got[:, :, None] == ref[:, None, :]).any(-1).float().mean().item()


def paged_cache(k, v, t, bs):
    """The prefill layout [1, T, Hkv, D] viewed as a paged cache of one block a page, in order."""
    kc, vc = k.view(t // bs, bs, HKV, D), v.view(t // bs, bs, HKV, D)
    pages = torch.arange(t // bs, device="cuda", dtype=torch.int32).view(1, -1)
    kv_len = torch.tensor([t], device="cuda", dtype=torch.int32)
    return kc, vc, pages, kv_len


def decode_variants(args):
    """(index dimension, index-key dtype) pairs timed in decoding."""
    return ([(di, torch.bfloat16) for di in args.index_dims]
            + [(di, torch.float8_e4m3fn) for di in args.fp8_index_dims])


def decode_slots(t, di, ik_dtype, ik, bs, slots):
    """Per call of a decoding graph: its own queries and index queries, and its own index-key cache
    (the first is the prefill's, the others random), so no call reads another's data from L2."""
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    caches = [ik[0, :, :di]] + [mk(t, di) for _ in range(slots - 1)]
    return [(mk(1, 1, HQ, D), mk(1, 1, HKV, di), c.to(ik_dtype).contiguous().view(t // bs, bs, di)) for c in caches]


def bench_decode(t, args, k, v, ik, emit):
    bs, top_k, slots = args.block_size, args.top_k, args.decode_slots
    kc, vc, pages, kv_len = paged_cache(k, v, t, bs)
    kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [1, Hkv, T, D]
    qs = [torch.randn(1, 1, HQ, D, device="cuda", dtype=torch.bfloat16) for _ in range(slots)]
    dense_ms, dense_single = per_call_ms(
        [lambda q=q: F.scaled_dot_product_attention(q.transpose(1, 2), kd, vd, enable_gqa=True) for q in qs])
    dense_bytes = 2 * t * HKV * D * 2
    emit(dict(kind="decode_dense", T=t, ms=dense_ms, ms_single_replay=dense_single, calls_per_graph=slots,
              tb_s=dense_bytes / dense_ms / 1e9))
    del kd, vd
    for di, ik_dtype in decode_variants(args):
        inputs = decode_slots(t, di, ik_dtype, ik, bs, slots)
        q, iq, ikc = inputs[0]
        out, sel = decode_with_selection(q, iq, kc, vc, ikc, pages, kv_len, top_k=top_k)
        match = decode_selection_match(iq, ikc.view(1, t, di), sel, t, bs, top_k)
        ref = torch.cat([attend_rows(_at_last(q, t), k, v, _at_last(sel, t), [t - 1], g, bs)[0] for g in range(HKV)])
        err = ((out[0, 0].float() - ref).norm() / ref.norm()).item()
        ms, single = per_call_ms([lambda x=x: msa_decode(x[0], x[1], kc, vc, x[2], pages, kv_len, top_k=top_k)
                                  for x in inputs])
        moved = t * di * ikc.element_size() + HKV * min(top_k, t // bs) * bs * D * 2 * 2
        emit(dict(kind="decode_msa", T=t, Di=di, index_dtype=str(ik_dtype).split(".")[-1], ms=ms,
                  ms_single_replay=single, calls_per_graph=slots, speedup=dense_ms / ms, tb_s=moved / ms / 1e9,
                  tb_s_single_replay=moved / single / 1e9, selection_match=match, rel_err=err))
        del inputs


def _at_last(x, t):
    """A [1, 1, ...] tensor placed as row t - 1 of a [1, t, ...] view (only that row is read)."""
    return x.expand(1, t, *x.shape[2:])


def bench_retrieval(t, args, emit):
    case = needle_case(t, hkv=HKV, di=128, n_needles=16, n_questions=1024, signal=1.0, device="cuda",
                       dtype=torch.bfloat16)
    sel = select_blocks_triton(case.iq, case.ik, block_size=args.block_size, top_k=args.top_k)
    emit(dict(kind="retrieval", T=t, Di=128, recall=needle_recall(case, sel, args.block_size)))


# Selection patterns of bench_patterns: noise around one index query per block (None: random).
PATTERNS = {"scattered": None, "coherent": 0.0, "noisy-0.1": 0.1, "noisy-0.3": 0.3}

KV_CONFIGS = [dict(BLOCK_M=64, num_warps=4, num_stages=2), dict(BLOCK_M=64, num_warps=4, num_stages=3),
              dict(BLOCK_M=64, num_warps=8, num_stages=2), dict(BLOCK_M=128, num_warps=8, num_stages=2)]


def sweep(t, args, emit):
    """Launch settings of the KV-outer forward, the decode scan and the indexer, timed at length t."""
    bs, top_k = args.block_size, args.top_k
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, ik = mk(1, t, HQ, D), mk(1, t, HKV, D), mk(1, t, HKV, D), mk(1, t, max(args.index_dims))
    if "kv" in args.sweep_parts:
        iq = mk(1, t, HKV, 64)
        sel = select_blocks_triton(iq, ik[..., :64], block_size=bs, top_k=top_k)
        del iq
        sweep_kv(t, args, q, k, v, sel, emit)
        profile(t, "attention", lambda: sparse_attention_triton(q, k, v, sel, block_size=bs))
        del sel
    if "tile" in args.sweep_parts:
        gen = torch.Generator(device="cuda").manual_seed(t)
        sel = select_blocks_triton(pattern_iq(t, 64, bs, 0.0, gen), ik[..., :64], block_size=bs, top_k=top_k)
        sweep_tile(t, args, q, k, v, sel, emit)
        profile(t, "tile attention", lambda: sparse_attention_triton(q, k, v, sel, block_size=bs, order="tile"))
        del sel
    if "bwd" in args.sweep_parts:
        sweep_bwd(t, args, q, k, v, ik, emit)
    if "decode" in args.sweep_parts:
        sweep_decode(t, args, q, k, v, ik, emit)
    if "index" in args.sweep_parts:
        sweep_index(t, args, emit)


def sweep_kv(t, args, q, k, v, sel, emit):
    bs = args.block_size
    attn_flops = 4 * D * HQ * kept_pairs(t, bs, args.top_k)
    saved = (dict(triton_attention.KV_FORWARD), triton_attention.ITEM_QUERIES, triton_attention.PARTIAL_BYTES)
    settings = [(cfg, items, saved[2]) for cfg in KV_CONFIGS for items in (64, 128)]
    settings += [(saved[0], 128, gib << 30) for gib in (3, 12)]
    with torch.no_grad():
        for cfg, items, partial_bytes in settings:
            triton_attention.KV_FORWARD, triton_attention.ITEM_QUERIES = cfg, items
            triton_attention.PARTIAL_BYTES = partial_bytes
            err = row_error(sparse_attention_triton(q, k, v, sel, block_size=bs), q, k, v, sel, bs)
            ms = timed(lambda: sparse_attention_triton(q, k, v, sel, block_size=bs), reps=3)
            emit(dict(kind="sweep_kv", T=t, item_queries=items, partial_gib=partial_bytes / 2**30, ms=ms,
                      tflops=attn_flops / ms / 1e9, rel_err=err, **cfg))
    triton_attention.KV_FORWARD, triton_attention.ITEM_QUERIES, triton_attention.PARTIAL_BYTES = saved


TILE_CONFIGS = [(128, dict(BLOCK_N=64, num_warps=8, num_stages=3)), (128, dict(BLOCK_N=64, num_warps=8, num_stages=4)),
                (128, dict(BLOCK_N=64, num_warps=8, num_stages=2)),
                (128, dict(BLOCK_N=128, num_warps=8, num_stages=2)),
                (128, dict(BLOCK_N=128, num_warps=8, num_stages=3)),
                (128, dict(BLOCK_N=64, num_warps=4, num_stages=3)), (64, dict(BLOCK_N=64, num_warps=4, num_stages=3)),
                (64, dict(BLOCK_N=128, num_warps=4, num_stages=2))]


KV_BWD_CONFIGS = [dict(BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=2),
                  dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=2)]


def sweep_bwd(t, args, q, k, v, ik, emit):
    """Settings of the KV-outer backward, forward and backward timed together on scattered and coherent selections."""
    if t > args.bwd_max:
        print(f"backward settings are timed up to --bwd-max ({args.bwd_max}), not at {t}")
        return
    bs, top_k = args.block_size, args.top_k
    attn_flops = 4 * D * HQ * kept_pairs(t, bs, top_k)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    gen = torch.Generator(device="cuda").manual_seed(t + 2)
    saved = dict(triton_attention.KV_BACKWARD), dict(triton_attention.KV_BACKWARD_DKDV)
    # Scattered selections run the backward with dQ atomics, coherent ones dK and dV alone.
    for pattern in ("scattered", "coherent"):
        sel = select_blocks_triton(pattern_iq(t, 64, bs, PATTERNS[pattern], gen), ik[..., :64], block_size=bs,
                                   top_k=top_k)
        for cfg in KV_BWD_CONFIGS:
            triton_attention.KV_BACKWARD = triton_attention.KV_BACKWARD_DKDV = cfg
            try:
                ms = timed(lambda: sparse_attention_triton(qg, kg, vg, sel, block_size=bs).backward(dout), reps=3)
            except Exception as exc:
                print(f"backward {cfg}: {str(exc).splitlines()[0][:160]}")
                continue
            emit(dict(kind="sweep_bwd", T=t, pattern=pattern, ms=ms, tflops=3.5 * attn_flops / ms / 1e9, **cfg))
    triton_attention.KV_BACKWARD, triton_attention.KV_BACKWARD_DKDV = saved


TILE_BWD_CONFIGS = [dict(BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=3),
                    dict(BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=3)]


def sweep_tile(t, args, q, k, v, sel, emit):
    """Launch settings of the tile forward on a coherent selection (queries of a block share blocks)."""
    bs = args.block_size
    attn_flops = 4 * D * HQ * kept_pairs(t, bs, args.top_k)
    saved = (triton_tile.TILE_QUERIES, dict(triton_tile.TILE_FORWARD))
    with torch.no_grad():
        for tile, cfg in TILE_CONFIGS:
            triton_tile.TILE_QUERIES, triton_tile.TILE_FORWARD = tile, cfg
            try:
                err = row_error(sparse_attention_triton(q, k, v, sel, block_size=bs, order="tile"), q, k, v, sel, bs)
                ms = timed(lambda: sparse_attention_triton(q, k, v, sel, block_size=bs, order="tile"), reps=3)
            except Exception as exc:  # a tile that does not fit shared memory does not launch
                print(f"tile {tile} {cfg}: {str(exc).splitlines()[0][:160]}")
                continue
            emit(dict(kind="sweep_tile", T=t, tile_queries=tile, ms=ms, tflops=attn_flops / ms / 1e9, rel_err=err,
                      work_ratio=tile_work_ratio(sel), **cfg))
    triton_tile.TILE_QUERIES, triton_tile.TILE_FORWARD = saved
    # The backward's tile-outer dQ kernel: forward and backward timed together (fwd + 2.5x fwd flops).
    if t > args.bwd_max:
        print(f"tile backward settings are timed up to --bwd-max ({args.bwd_max}), not at {t}")
        return
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    saved_bwd = dict(triton_tile.TILE_BACKWARD)
    for cfg in TILE_BWD_CONFIGS:
        triton_tile.TILE_BACKWARD = cfg
        try:
            ms = timed(lambda: sparse_attention_triton(qg, kg, vg, sel, block_size=bs, order="tile").backward(dout),
                       reps=3)
        except Exception as exc:
            print(f"tile backward {cfg}: {str(exc).splitlines()[0][:160]}")
            continue
        emit(dict(kind="sweep_tile_bwd", T=t, ms=ms, tflops=3.5 * attn_flops / ms / 1e9, **cfg))
    triton_tile.TILE_BACKWARD = saved_bwd


# Decode settings: (scan programs per multiprocessor, KiB of index-key pages in flight per scan
# program, warps of the attention programs).
DECODE_CONFIGS = [(2, 96, 8), (2, 96, 4), (4, 48, 8), (1, 192, 8)]


def sweep_decode(t, args, q, k, v, ik, emit):
    """Decode steps (CUDA graphs) per scan setting, for each index dimension and the fp8 ones, then a profile."""
    bs, top_k = args.block_size, args.top_k
    kc, vc, pages, kv_len = paged_cache(k, v, t, bs)
    saved = (triton_decode.SCAN_PROGRAMS_PER_SM, triton_decode.SCAN_BYTES_IN_FLIGHT, triton_decode.DECODE_WARPS)
    for di, ik_dtype in decode_variants(args):
        inputs = decode_slots(t, di, ik_dtype, ik, bs, args.decode_slots)
        moved = t * di * inputs[0][2].element_size() + HKV * top_k * bs * D * 2 * 2
        steps = [lambda x=x: msa_decode(x[0], x[1], kc, vc, x[2], pages, kv_len, top_k=top_k) for x in inputs]
        for per_sm, kib, warps in DECODE_CONFIGS:
            triton_decode.SCAN_PROGRAMS_PER_SM, triton_decode.SCAN_BYTES_IN_FLIGHT = per_sm, kib << 10
            triton_decode.DECODE_WARPS = warps
            try:
                ms, single = per_call_ms(steps)
            except Exception as err:  # a pipeline deeper than shared memory holds does not launch
                print(f"decode Di={di} {ik_dtype}: {per_sm}/SM {kib} KiB: {str(err).splitlines()[0][:160]}")
                continue
            emit(dict(kind="sweep_decode", T=t, Di=di, index_dtype=str(ik_dtype).split(".")[-1],
                      programs_per_sm=per_sm, kib_in_flight=kib, warps=warps, ms=ms,
                      ms_single_replay=single, tb_s=moved / ms / 1e9))
        triton_decode.SCAN_PROGRAMS_PER_SM, triton_decode.SCAN_BYTES_IN_FLIGHT, triton_decode.DECODE_WARPS = saved
        profile(t, f"decode Di={di} {ik_dtype}", steps[0])
        del inputs, steps


def sweep_index(t, args, emit):
    """The indexer is compute-bound and the same at every length: time it at 128K, Di=128."""
    bs, top_k = args.block_size, args.top_k
    n = min(t, 131072)
    iq_s, ik_s = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((1, n, HKV, 128), (1, n, 128)))
    idx_flops = 2 * 128 * HKV * bs * bs * (n // bs) * (n // bs - 1) / 2
    saved_index = dict(triton_indexer.INDEX_FORWARD)
    for warps, stages in ((8, 3), (8, 2), (8, 4), (4, 3)):
        triton_indexer.INDEX_FORWARD = dict(num_warps=warps, num_stages=stages)
        ms = timed(lambda: select_blocks_triton(iq_s, ik_s, block_size=bs, top_k=top_k), reps=5)
        emit(dict(kind="sweep_index", T=n, Di=128, num_warps=warps, num_stages=stages, ms=ms,
                  tflops=idx_flops / ms / 1e9))
    triton_indexer.INDEX_FORWARD = saved_index


def profile_at(t, args):
    """Per-kernel GPU time of one sparse attention forward and one decoding step (Di=64) at length t."""
    bs, top_k = args.block_size, args.top_k
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, iq, ik = mk(1, t, HQ, D), mk(1, t, HKV, D), mk(1, t, HKV, D), mk(1, t, HKV, 64), mk(1, t, 64)
    sel = select_blocks_triton(iq, ik, block_size=bs, top_k=top_k)
    profile(t, "attention", lambda: sparse_attention_triton(q, k, v, sel, block_size=bs))
    kc, vc, pages, kv_len = paged_cache(k, v, t, bs)
    ikc = ik[0].contiguous().view(t // bs, bs, 64)
    qd, iqd = q[:, -1:].contiguous(), iq[:, -1:].contiguous()
    profile(t, "decode Di=64", lambda: msa_decode(qd, iqd, kc, vc, ikc, pages, kv_len, top_k=top_k))


def profile(t, name, fn):
    """GPU time per kernel of one call of fn."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    print(f"profile of one {name} call at T={t}:")
    try:
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=10, max_name_column_width=60))
    except (AttributeError, KeyError, ValueError):
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--index-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--bwd-max", type=int, default=131072, help="longest length timed forward+backward")
    parser.add_argument("--few-reps-from", type=int, default=524288, help="from this length, time each prefill once")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--query-outer-max", type=int, default=131072,
                        help="longest length at which the query-outer forward is timed beside the KV-outer one")
    parser.add_argument("--fp8-index-dims", type=int, nargs="*", default=[128],
                        help="index dimensions also timed in decoding with float8_e4m3fn index keys in the cache")
    parser.add_argument("--decode-slots", type=int, default=4,
                        help="decoding calls per CUDA graph, each on its own index-key cache and queries")
    parser.add_argument("--sweep", type=int, default=0,
                        help="instead of the benchmark, time launch settings and profile at this length")
    parser.add_argument("--sweep-parts", nargs="+", choices=["kv", "tile", "bwd", "decode", "index"],
                        default=["kv", "tile", "bwd", "decode", "index"], help="which kernels --sweep times")
    parser.add_argument("--patterns", nargs="*", choices=list(PATTERNS), default=list(PATTERNS),
                        help="selection patterns on which the sparse attention forward is timed alone")
    parser.add_argument("--tile-ratio-max", type=float, default=4.0,
                        help="above 128K, time the tile forward only where its work ratio is at most this")
    parser.add_argument("--profile", action="store_true",
                        help="after the benchmark, profile one attention call and one decoding step at the last length")
    parser.add_argument("--out", default="msa_bench.json")
    args = parser.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"), hq=HQ, hkv=HKV, d=D,
                block_size=args.block_size, top_k=args.top_k)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    if args.sweep:
        sweep(args.sweep, args, emit)
        print_table(rows)
        return
    # Choose the dense backend at a short length: at 512K one trial call of each costs minutes.
    first = min(args.lengths)
    probe = min(first, 32768)
    q, k, v = (torch.randn(1, probe, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    dense_name, dense = pick_dense(q, k, v)
    del q, k, v
    bench_retrieval(first, args, emit)
    for t in args.lengths:
        bench_length(t, args, dense_name, dense, emit)
        torch.cuda.empty_cache()
    if args.profile:
        profile_at(args.lengths[-1], args)
    print_table(rows)


def print_table(rows) -> None:
    print(f"\n{'kind':14} {'T':>8} {'Di':>4} {'ms':>10} {'dense ms':>10} {'speedup':>8}  notes")
    dense = {(r["kind"], r["T"]): r for r in rows if r["kind"] in ("prefill_dense", "decode_dense")}
    for r in rows:
        if r["kind"] == "prefill_msa":
            d = dense[("prefill_dense", r["T"])]
            note = (f"indexer {r['indexer_ms']:.1f} ms ({r['indexer_tflops']:.0f} TF/s), attention "
                    f"{r['attention_ms']:.1f} ms ({r['attention_tflops']:.0f} TF/s, work list "
                    f"{r['work_list_ms']:.1f} ms, err {r['attention_rel_err']:.1e}); dense {d['tflops']:.0f} TF/s")
            if r["attention_query_outer_ms"]:
                note += (f"; query-outer {r['attention_query_outer_ms']:.1f} ms "
                         f"(err {r['attention_query_outer_rel_err']:.1e})")
            print(f"{'prefill':14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.2f} {d['ms']:>10.2f} {r['speedup']:>7.1f}x  {note}")
        elif r["kind"] == "fwd_bwd":
            if r["dense_ms"] is None:
                print(f"{'fwd+bwd':14} {r['T']:>8} {r['Di']:>4} {r['msa_ms']:>10.2f}  (no dense backend ran)")
                continue
            print(f"{'fwd+bwd':14} {r['T']:>8} {r['Di']:>4} {r['msa_ms']:>10.2f} {r['dense_ms']:>10.2f} "
                  f"{r['speedup']:>7.1f}x  {r['pattern']} selections; dense {r['dense_backend']}")
        elif r["kind"] == "decode_msa":
            d = dense[("decode_dense", r["T"])]
            print(f"{'decode ' + r['index_dtype']:14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.3f} {d['ms']:>10.3f} "
                  f"{r['speedup']:>7.1f}x  {r['tb_s']:.2f} TB/s effective ({r['tb_s_single_replay']:.2f} with one "
                  f"call a graph); dense {d['tb_s']:.2f} TB/s; "
                  f"selection match {r['selection_match']:.3f}, err {r['rel_err']:.1e}")
        elif r["kind"] == "sweep_kv":
            print(f"{'sweep kv':14} {r['T']:>8} {'':>4} {r['ms']:>10.2f}  {r['tflops']:.0f} TF/s BLOCK_M {r['BLOCK_M']} warps {r['num_warps']} "
                  f"stages {r['num_stages']} items {r['item_queries']} partials {r['partial_gib']:.0f} GiB "
                  f"err {r['rel_err']:.1e}")
        elif r["kind"] == "attention_pattern":
            parts = [f"{o} {r[o + '_ms']:.1f} ms {r[o + '_tflops']:.0f} TF/s err {r[o + '_rel_err']:.1e}"
                     for o in ("kv", "tile") if o + "_ms" in r]
            print(f"{'attn ' + r['pattern']:14} {r['T']:>8} {'':>4} {'':>10} {'':>10} {'':>8}  tile work ratio "
                  f"{r['tile_work_ratio']:.2f}, auto -> {r['auto_order']} ({r['auto_decision_ms']:.2f} ms); "
                  + "; ".join(parts))
        elif r["kind"] == "sweep_tile":
            print(f"{'sweep tile':14} {r['T']:>8} {'':>4} {r['ms']:>10.2f}  {r['tflops']:.0f} TF/s tile {r['tile_queries']} "
                  f"BLOCK_N {r['BLOCK_N']} warps {r['num_warps']} stages {r['num_stages']} err {r['rel_err']:.1e} "
                  f"work ratio {r['work_ratio']:.2f}")
        elif r["kind"] == "sweep_bwd":
            print(f"{'sweep bwd':14} {r['T']:>8} {'':>4} {r['ms']:>10.2f}  fwd+bwd {r['tflops']:.0f} TF/s, {r['pattern']}, "
                  f"KV-outer backward BLOCK_N {r['BLOCK_N']} warps {r['num_warps']} stages {r['num_stages']}")
        elif r["kind"] == "sweep_tile_bwd":
            print(f"{'sweep tile bwd':14} {r['T']:>8} {'':>4} {r['ms']:>10.2f}  fwd+bwd {r['tflops']:.0f} TF/s, dQ kernel "
                  f"BLOCK_N {r['BLOCK_N']} warps {r['num_warps']} stages {r['num_stages']}")
        elif r["kind"] == "sweep_index":
            print(f"{'sweep index':14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.2f}  {r['tflops']:.0f} TF/s "
                  f"warps {r['num_warps']} stages {r['num_stages']}")
        elif r["kind"] == "sweep_decode":
            print(f"{'sweep decode':14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.3f}  {r['index_dtype']} "
                  f"{r['tb_s']:.2f} TB/s, scan programs/SM {r['programs_per_sm']}, {r['kib_in_flight']} KiB in flight, "
                  f"attention warps {r['warps']} (one call a graph: {r['ms_single_replay']:.3f} ms)")
        elif r["kind"] == "retrieval":
            print(f"{'retrieval':14} {r['T']:>8} {r['Di']:>4} recall {r['recall']:.3f}")


if __name__ == "__main__":
    main()
