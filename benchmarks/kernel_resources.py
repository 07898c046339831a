"""Registers, spills and shared memory of the MSA and tree-attention Triton kernels on an H100,
read on a machine without a GPU.

Runs one layer's forward and backward of the trainer's kernels (`msa_tree_triton` with the index
loss, and the dense `tree_attention_triton`) on CPU tensors shaped by a model preset, with
Triton's launch replaced: each launch is bound by Triton's own binder (so the arguments, their
specialization and the constexprs are the ones a GPU launch would compile), compiled for sm_90
by Triton's NVIDIA backend and ptxas, and not run. A kernel that spills (STACK above 0 bytes) or
sits at 255 registers is where a change to its body should be timed first. The numbers come
from this machine's Triton, which may differ from the GPU machine's.

    PYTHONPATH=. python benchmarks/kernel_resources.py [--presets msa_100m,msa_1b]
        [--kernels msa_tree_fwd_kernel,...] [--out kernel_resources.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

# Launches must reach the JIT's binder, not the interpreter.
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_resources.py compiles for the GPU: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from forge.policy.config import ModelConfig  # noqa: E402
from forge.prefix_tree import build_tree  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"no cuobjdump at {path}: this Triton wheel lacks the NVIDIA tools")
    return str(path)


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    """Compile one launch for sm_90 as JITFunction.run would, and read its resource usage."""
    backend = make_backend(TARGET)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"forge_{fn.fn.__name__}_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    finally:
        cubin.unlink()
    match = RESOURCES.search(out)
    if match is None:
        raise RuntimeError(f"no resource line in cuobjdump's output for {fn.fn.__name__}: {out[-300:]}")
    regs, stack, shared, local = (int(x) for x in match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "shared_bytes": kernel.metadata.shared, "num_warps": options.num_warps, "num_stages": options.num_stages}


def layer_launches(cfg: ModelConfig, tokens: int) -> list[tuple[JITFunction, tuple, dict]]:
    """The launches of one layer's forward and backward over a GRPO-like tree of about `tokens`
    tokens (a prompt and two branches), bf16, recorded without running."""
    from forge.kernels.msa.tree_triton import msa_tree_triton
    from forge.kernels.tree_attention.triton_tree import tree_attention_triton

    launches = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    prompt = tokens // 2
    tree = build_tree([[1] * prompt + [2] * (tokens - prompt), [1] * prompt + [3] * (tokens // 3)])
    se, pos = tree.subtree_end[None], tree.position[None]
    n, m = tree.num_tokens, cfg.msa
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_()

    q, k, v = make(1, n, cfg.num_heads, cfg.head_dim), make(1, n, cfg.num_kv_heads, cfg.head_dim), \
        make(1, n, cfg.num_kv_heads, cfg.head_dim)
    iq, ik = make(1, n, cfg.num_kv_heads, m.index_dim), make(1, n, m.index_dim)
    JITFunction.run = record
    try:
        out, loss = msa_tree_triton(q, k, v, iq, ik, se, pos, block_size=m.block_size, top_k=m.top_k,
                                    dense_below=m.dense_below_tokens, with_index_loss=True)
        (out.float().sum() + loss).backward()
        tree_attention_triton(q, k, v, se.to(torch.int32)).float().sum().backward()
    finally:
        JITFunction.run = real_run
    return launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="msa_100m,msa_1b")
    parser.add_argument("--kernels", default="", help="only these kernels, comma-separated (default: all launched)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the recorded tree")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    wanted = {x for x in args.kernels.split(",") if x}
    rows = []
    print(f"{'preset':<10} {'kernel':<34} {'regs':>4} {'stack B':>7} {'shared B':>8} {'warps':>5}")
    for preset in args.presets.split(","):
        if not hasattr(ModelConfig, preset) or not getattr(ModelConfig, preset)().msa.enabled:
            parser.error(f"--presets: {preset!r} is not a ModelConfig preset with MSA (e.g. msa_100m, msa_1b)")
        seen = set()
        for fn, call_args, call_kwargs in layer_launches(getattr(ModelConfig, preset)(), args.tokens):
            name = fn.fn.__name__
            key = (name, tuple(sorted((k, str(v)) for k, v in call_kwargs.items())))
            if (wanted and name not in wanted) or key in seen:
                continue
            seen.add(key)
            row = {"preset": preset, "kernel": name, **compile_launch(fn, call_args, call_kwargs)}
            rows.append(row)
            print(f"{preset:<10} {name:<34} {row['registers']:>4} {row['stack_bytes']:>7} {row['shared_bytes']:>8} "
                  f"{row['num_warps']:>5}", flush=True)
    if wanted - {r["kernel"] for r in rows}:
        parser.error(f"--kernels: not launched: {sorted(wanted - {r['kernel'] for r in rows})}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "triton": triton.__version__, "target": "sm_90",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
