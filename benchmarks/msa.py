"""MSA against dense causal attention: one bf16 attention layer, 48 query heads, 8 KV heads, D=128.

Per length: prefill forward (indexer + sparse attention, each also alone) against the fastest
dense SDPA backend that runs; forward+backward up to --bwd-max; one decoding step over a full
paged cache against dense SDPA decoding with GQA; and at the first length, the needle
retrieval rate of the Triton indexer. Times are medians of CUDA-event timings; above
--few-reps-from tokens every prefill variant gets one timed call (dense without warm-up). Every row goes to the JSON as soon as
it is measured, so a run cut short still leaves its numbers.

    PYTHONPATH=. python benchmarks/msa.py --lengths 32768 131072 --out msa.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _timing import timed

from forge.kernels.msa.synthetic import needle_case, needle_recall
from forge.kernels.msa.triton_attention import sparse_attention_triton
from forge.kernels.msa.triton_decode import msa_decode
from forge.kernels.msa.triton_indexer import select_blocks_triton

HQ, HKV, D = 48, 8, 128


def graphed(fn):
    """Capture `fn` in a CUDA graph (decoding launches many small kernels); replay to time it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
        attn = {}
        with torch.no_grad():
            for order in ("kv", "query") if t <= args.query_outer_max else ("kv",):
                attn[order] = timed(lambda: sparse_attention_triton(q, k, v, sel, block_size=bs, order=order),
                                    reps=reps, warmup=msa_warm)
        attn_ms = attn["kv"]
        # The two run back to back in msa_attention; their sum is the layer's prefill time.
        total = idx_ms + attn_ms
        n_blocks = t // bs
        idx_flops = 2 * di * HKV * bs * bs * n_blocks * (n_blocks - 1) / 2
        emit(dict(kind="prefill_msa", T=t, Di=di, ms=total, indexer_ms=idx_ms, attention_ms=attn_ms,
                  attention_query_outer_ms=attn.get("query"),
                  speedup=dense_ms / total, attention_tflops=attn_flops / attn_ms / 1e9,
                  indexer_tflops=idx_flops / idx_ms / 1e9))
        del iq, sel
    if t <= args.bwd_max:
        bench_backward(t, args, q, k, v, ik, args.reps, emit)
    del q
    bench_decode(t, args, k, v, ik, emit)


def bench_backward(t, args, q, k, v, ik, reps, emit):
    bs, top_k, di = args.block_size, args.top_k, args.index_dims[0]
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    iq = torch.randn(1, t, HKV, di, device="cuda", dtype=torch.bfloat16)
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

    def msa():
        sel = select_blocks_triton(iq, ik[..., :di], block_size=bs, top_k=top_k)
        sparse_attention_triton(qg, kg, vg, sel, block_size=bs).backward(dout)

    msa_ms = timed(msa, reps=reps)
    emit(dict(kind="fwd_bwd", T=t, Di=di, dense_backend=name, dense_ms=dense_ms, msa_ms=msa_ms,
              speedup=dense_ms / msa_ms if dense_ms else None))


def bench_decode(t, args, k, v, ik, emit):
    bs, top_k = args.block_size, args.top_k
    q = torch.randn(1, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    # A page is one block: the prefill layout [1, T, Hkv, D] viewed as [T / bs, bs, Hkv, D].
    kc, vc = k.view(t // bs, bs, HKV, D), v.view(t // bs, bs, HKV, D)
    pages = torch.arange(t // bs, device="cuda", dtype=torch.int32).view(1, -1)
    kv_len = torch.tensor([t], device="cuda", dtype=torch.int32)
    kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [1, Hkv, T, D]
    dense = graphed(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kd, vd, enable_gqa=True))
    dense_ms = timed(dense, reps=50, warmup=5)
    dense_bytes = 2 * t * HKV * D * 2
    emit(dict(kind="decode_dense", T=t, ms=dense_ms, tb_s=dense_bytes / dense_ms / 1e9))
    del kd, vd
    for di in args.index_dims:
        ikc = ik[0, :, :di].contiguous().view(t // bs, bs, di)
        iq = torch.randn(1, 1, HKV, di, device="cuda", dtype=torch.bfloat16)
        step = graphed(lambda: msa_decode(q, iq, kc, vc, ikc, pages, kv_len, top_k=top_k))
        ms = timed(step, reps=50, warmup=5)
        moved = t * di * 2 + HKV * min(top_k, t // bs) * bs * D * 2 * 2
        emit(dict(kind="decode_msa", T=t, Di=di, ms=ms, speedup=dense_ms / ms, tb_s=moved / ms / 1e9))


def bench_retrieval(t, args, emit):
    case = needle_case(t, hkv=HKV, di=128, n_needles=16, n_questions=1024, signal=1.0, device="cuda",
                       dtype=torch.bfloat16)
    sel = select_blocks_triton(case.iq, case.ik, block_size=args.block_size, top_k=args.top_k)
    emit(dict(kind="retrieval", T=t, Di=128, recall=needle_recall(case, sel, args.block_size)))


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
    print_table(rows)


def print_table(rows) -> None:
    print(f"\n{'kind':14} {'T':>8} {'Di':>4} {'ms':>10} {'dense ms':>10} {'speedup':>8}  notes")
    dense = {(r["kind"], r["T"]): r for r in rows if r["kind"] in ("prefill_dense", "decode_dense")}
    for r in rows:
        if r["kind"] == "prefill_msa":
            d = dense[("prefill_dense", r["T"])]
            note = (f"indexer {r['indexer_ms']:.1f} ms ({r['indexer_tflops']:.0f} TF/s), attention "
                    f"{r['attention_ms']:.1f} ms ({r['attention_tflops']:.0f} TF/s); dense {d['tflops']:.0f} TF/s")
            if r["attention_query_outer_ms"]:
                note += f"; query-outer attention {r['attention_query_outer_ms']:.1f} ms"
            print(f"{'prefill':14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.2f} {d['ms']:>10.2f} {r['speedup']:>7.1f}x  {note}")
        elif r["kind"] == "fwd_bwd":
            if r["dense_ms"] is None:
                print(f"{'fwd+bwd':14} {r['T']:>8} {r['Di']:>4} {r['msa_ms']:>10.2f}  (no dense backend ran)")
                continue
            print(f"{'fwd+bwd':14} {r['T']:>8} {r['Di']:>4} {r['msa_ms']:>10.2f} {r['dense_ms']:>10.2f} "
                  f"{r['speedup']:>7.1f}x  dense {r['dense_backend']}")
        elif r["kind"] == "decode_msa":
            d = dense[("decode_dense", r["T"])]
            print(f"{'decode':14} {r['T']:>8} {r['Di']:>4} {r['ms']:>10.3f} {d['ms']:>10.3f} {r['speedup']:>7.1f}x  "
                  f"{r['tb_s']:.2f} TB/s effective; dense {d['tb_s']:.2f} TB/s")
        elif r["kind"] == "retrieval":
            print(f"{'retrieval':14} {r['T']:>8} {r['Di']:>4} recall {r['recall']:.3f}")


if __name__ == "__main__":
    main()
