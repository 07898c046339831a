"""Kernels compile once per model shape, not once per batch.

Triton compiles a kernel anew for each distinct specialization of its integer arguments (equal to
1, divisible by 16) and pointer alignments. Token counts change every step (a merged tree's size,
a padded batch's width, a micro-batch's row count), so a kernel that specialized on them
compiled again on the steps that brought a new residue: on an H100 the 100M recipe's first three
trainer steps built 3 binaries of each MSA index-loss kernel where one serves. The kernels now
mark those arguments `do_not_specialize` (with it, 1 binary per kernel over 5 steps, same card).
This test launches the trainer's kernels (through the interpreter) at several token counts and
asks Triton's own binder which binary each launch would need: no new one after the first size.
"""

from __future__ import annotations

import collections
import inspect
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from forge.kernels.moe.triton_experts import moe_experts_triton  # noqa: E402
from forge.kernels.moe.triton_router import route_triton  # noqa: E402
from forge.kernels.msa import triton_tree_index_loss  # noqa: E402
from forge.kernels.msa.tree_triton import msa_tree_triton  # noqa: E402
from forge.kernels.norm import fused_rms_norm  # noqa: E402
from forge.kernels.tree_attention.triton_tree import tree_attention_triton  # noqa: E402
from forge.prefix_tree import build_tree  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through Triton's CPU interpreter")

LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "grid", "warmup"}


def _binary_key(kernel, args, kwargs) -> tuple:
    """What Triton's JIT keys its compiled binaries on, for this launch."""
    jit = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items()
                                    if k in ("do_not_specialize", "do_not_specialize_on_alignment")})
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, specialization, _ = binder(**bound.arguments)
    return tuple(str(s) for s in specialization)


@pytest.fixture
def launches(monkeypatch):
    seen: dict[str, set] = collections.defaultdict(set)
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__].add(_binary_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording)
    return seen


def _tree(n_tokens: int, seed: int):
    """A prefix tree of a prompt and two branches, `n_tokens` tokens in all."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 200, (n_tokens // 3,), generator=g).tolist()
    rest = n_tokens - len(prompt)
    a = torch.randint(3, 200, (rest // 2,), generator=g).tolist()
    b = torch.randint(3, 200, (rest - len(a),), generator=g).tolist()
    tree = build_tree([prompt + a, prompt + b])
    assert tree.num_tokens == n_tokens
    return tree.subtree_end[None].to(torch.int32), tree.position[None].to(torch.int32)


def _step(t: int, seed: int) -> None:
    """One layer's trainer kernels, forward and backward, over a merged tree of t tokens."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, di, hidden, experts, width = 4, 2, 16, 16, 32, 4, 16
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    se, pos = _tree(t, seed)
    q, k, v, iq, ik = mk(1, t, hq, d), mk(1, t, hkv, d), mk(1, t, hkv, d), mk(1, t, hkv, di), mk(1, t, di)
    out, loss = msa_tree_triton(q, k, v, iq, ik, se, pos, block_size=16, top_k=2, dense_below=16,
                                with_index_loss=True)
    dense = tree_attention_triton(q, k, v, se)
    x = fused_rms_norm(mk(t, hidden).detach(), torch.ones(hidden), 1e-6).requires_grad_()
    weights, chosen, _ = route_triton(x @ mk(hidden, experts).detach(), torch.zeros(experts), 2)
    y = moe_experts_triton(x, weights, chosen, mk(experts, hidden, width), mk(experts, hidden, width),
                           mk(experts, width, hidden))
    (out.sum() + loss + dense.sum() + y.sum()).backward()


def test_trainer_kernels_compile_once_across_token_counts(launches, monkeypatch):
    # Both ways the MSA backward runs: attention and index loss as one node (the dK/dV kernel
    # gives d ik), and apart (the index loss's own d ik kernel); the later sizes alternate.
    _step(37, seed=0)
    monkeypatch.setattr(triton_tree_index_loss, "FUSED_BACKWARD", False)
    _step(37, seed=0)
    first = {name: set(keys) for name, keys in launches.items()}
    # Sizes of every residue class the JIT tells apart: divisible by 16 or not, and sizes whose
    # derived counts (tiles, blocks, work-list widths) fall on either side too.
    for i, t in enumerate((48, 53, 64, 80)):
        monkeypatch.setattr(triton_tree_index_loss, "FUSED_BACKWARD", i % 2 == 1)
        _step(t, seed=i + 1)
    for name in ("msa_tree_index_fwd_kernel", "msa_tree_fwd_kernel", "msa_tree_bwd_dq_kernel",
                 "msa_tree_bwd_dkdv_kernel", "tree_index_loss_fwd_kernel", "tree_index_loss_bwd_dik_kernel",
                 "tree_attention_fwd_kernel", "tree_attention_bwd_dq_kernel", "tree_attention_bwd_dkdv_kernel",
                 "_rms_norm_fwd", "route_fwd_kernel", "route_bwd_kernel", "moe_count_kernel", "moe_scatter_kernel",
                 "moe_grouped_mm_kernel"):
        assert name in first, f"{name} was not launched; launched: {sorted(first)}"
    # A kernel launched from several call sites (forward, backward) has one binary per site.
    again = {name: len(keys - first.get(name, set())) for name, keys in launches.items()}
    again = {name: n for name, n in again.items() if n}
    assert not again, (f"new binaries at later token counts: {again}; mark the argument that carries the count "
                       "do_not_specialize in the kernel's @triton.jit")
