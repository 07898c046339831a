"""What `tl.dot` computes on fp32 inputs: IEEE fp32 unless TF32 is switched on explicitly.

Triton's `tl.dot` rounds fp32 inputs to TF32 (10 mantissa bits) unless told otherwise, so an
"fp32" kernel would silently compute products to about 1e-3 relative: enough to move MSA block
selections near ties and to part merged from unmerged training by 0.2 in a logprob (issue 14).
Every Forge kernel passes `input_precision=dot_precision(dtype)` to every `tl.dot`; the test
`tests/test_kernel_precision.py` fails on a `tl.dot` that does not.

TF32 is a speed switch, off by default: `FORGE_ALLOW_TF32=1` in the environment, or
`allow_tf32(True)` (also a context manager) in the process. bf16 and fp16 inputs are unaffected:
their products are exact in the fp32 accumulator either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_ENV = "FORGE_ALLOW_TF32"
_override: bool | None = None


def tf32_allowed() -> bool:
    """Whether Forge's Triton kernels may round fp32 inputs to TF32 (default: no)."""
    if _override is not None:
        return _override
    return os.environ.get(_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _restore(previous: bool | None) -> Iterator[None]:
    global _override
    try:
        yield
    finally:
        _override = previous


def allow_tf32(enabled: bool | None) -> contextlib.AbstractContextManager[None]:
    """Let fp32 kernels use TF32 (True), forbid it (False), or defer to FORGE_ALLOW_TF32 (None).

    Takes effect at once; used as `with allow_tf32(True): ...` it restores the previous setting.
    """
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"allow_tf32 takes True, False or None, got {enabled!r}")
    previous, _override = _override, enabled
    return _restore(previous)


def dot_precision(dtype: torch.dtype) -> str:
    """The `input_precision` for `tl.dot` on inputs of `dtype`: "ieee" for fp32 unless TF32 is
    allowed; "tf32" (Triton's default, meaningless for 16-bit inputs) otherwise."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"
