"""fp32 means IEEE fp32 in every Triton kernel; TF32 only behind forge.kernels.precision's switch.

On the CPU: every `tl.dot` in forge/ passes `input_precision=PRECISION`, every launch sets
PRECISION from `dot_precision` (or passes a kernel's own PRECISION on), and the switch behaves.
On a GPU: fp32 kernels match an fp64 reference to fp32 rounding, and the same call with TF32
allowed does not, which shows these tests would catch a kernel that silently used TF32.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from forge.kernels import precision
from forge.kernels.precision import allow_tf32, dot_precision, tf32_allowed

ROOT = pathlib.Path(__file__).resolve().parents[1] / "forge"


def _calls(attr: str):
    """(file, call) for every call of `<x>.<attr>(...)` or `<attr>(...)` under forge/."""
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name == attr:
                    yield path.relative_to(ROOT.parent), node


def test_every_tl_dot_names_its_input_precision():
    dots = list(_calls("dot"))
    assert len(dots) >= 25, "the scan found too few tl.dot calls: is it reading forge/?"
    bad = [f"{p}:{c.lineno}" for p, c in dots
           if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") == "tl"
           and not any(kw.arg == "input_precision" and isinstance(kw.value, ast.Name) and kw.value.id == "PRECISION"
                       for kw in c.keywords)]
    assert not bad, f"tl.dot without input_precision=PRECISION (fp32 would silently be TF32): {bad}"


def test_every_launch_takes_precision_from_the_switch():
    launches = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "PRECISION":
                        launches.append((f"{path.relative_to(ROOT.parent)}:{node.lineno}", kw.value))
    assert len(launches) >= 10
    bad = [where for where, v in launches
           if not (isinstance(v, ast.Name) and v.id == "PRECISION")
           and not (isinstance(v, ast.Call) and getattr(v.func, "id", None) == "dot_precision")]
    assert not bad, f"PRECISION set other than from dot_precision(...): {bad}"


def test_the_switch_is_off_by_default_and_scoped(monkeypatch):
    monkeypatch.delenv("FORGE_ALLOW_TF32", raising=False)
    monkeypatch.setattr(precision, "_override", None)
    assert not tf32_allowed()
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.bfloat16) == "tf32"  # 16-bit products are exact either way
    with allow_tf32(True):
        assert dot_precision(torch.float32) == "tf32"
        with allow_tf32(False):
            assert dot_precision(torch.float32) == "ieee"
        assert tf32_allowed()
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("FORGE_ALLOW_TF32", "1")
    assert dot_precision(torch.float32) == "tf32"
    with allow_tf32(False):
        assert dot_precision(torch.float32) == "ieee"
    with pytest.raises(TypeError, match="True, False or None"):
        allow_tf32("yes")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _both(run, ref) -> tuple[float, float]:
    """Relative error of `run()` against `ref` in IEEE fp32 and with TF32 allowed."""
    with allow_tf32(False):
        ieee = _rel(run(), ref)
    with allow_tf32(True):
        tf32 = _rel(run(), ref)
    return ieee, tf32


def _randn(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["kv", "tile", "query"])
def test_gpu_fp32_sparse_attention_is_ieee(order):
    from forge.kernels.msa.naive import select_blocks_naive, sparse_attention_naive
    from forge.kernels.msa.triton_attention import sparse_attention_triton

    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = 1, 1024 + 33, 8, 2, 64
    q, k, v = (_randn(b, t, h, d, gen=gen, scale=2.0) for h in (hq, hkv, hkv))
    iq, ik = _randn(b, t, hkv, 64, gen=gen), _randn(b, t, 64, gen=gen)
    sel = select_blocks_naive(iq.float(), ik.float(), block_size=64, top_k=4).int()
    ref = sparse_attention_naive(q, k, v, sel.long(), block_size=64)
    ieee, tf32 = _both(lambda: sparse_attention_triton(q.float(), k.float(), v.float(), sel, block_size=64,
                                                       order=order), ref)
    assert ieee < 2e-6, f"fp32 sparse attention ({order}) is {ieee:.1e} from fp64: not IEEE fp32"
    assert tf32 > 20 * ieee, "TF32 would not be detected at this size"


@pytest.mark.gpu
def test_gpu_fp32_tree_attention_is_ieee():
    from forge.kernels.tree_attention import tree_attention_naive
    from forge.kernels.tree_attention.triton_tree import tree_attention_triton

    gen = torch.Generator().manual_seed(1)
    b, t, hq, hkv, d = 1, 700, 8, 2, 64
    q, k, v = (_randn(b, t, h, d, gen=gen, scale=2.0) for h in (hq, hkv, hkv))
    se = torch.full((b, t), t, device="cuda")
    ref = tree_attention_naive(q, k, v, se)
    ieee, tf32 = _both(lambda: tree_attention_triton(q.float(), k.float(), v.float(), se), ref)
    assert ieee < 2e-6, f"fp32 tree attention is {ieee:.1e} from fp64: not IEEE fp32"
    assert tf32 > 20 * ieee


@pytest.mark.gpu
def test_gpu_fp32_moe_experts_are_ieee():
    from forge.kernels.moe import route
    from forge.kernels.moe.naive import moe_experts_naive
    from forge.kernels.moe.triton_experts import moe_experts_triton

    gen = torch.Generator().manual_seed(2)
    n, h, e, f, top = 512, 256, 8, 192, 2
    x = _randn(n, h, gen=gen)
    wg, wu, wd = _randn(e, h, f, gen=gen, scale=0.1), _randn(e, h, f, gen=gen, scale=0.1), _randn(e, f, h, gen=gen, scale=0.1)
    weights, experts, _ = route(_randn(n, e, gen=gen).float(), torch.zeros(e, device="cuda"), top)
    ref = moe_experts_naive(x, weights.double(), experts, wg, wu, wd)
    ieee, tf32 = _both(lambda: moe_experts_triton(x.float(), weights, experts, wg.float(), wu.float(), wd.float()), ref)
    assert ieee < 2e-6, f"fp32 MoE experts are {ieee:.1e} from fp64: not IEEE fp32"
    assert tf32 > 20 * ieee
