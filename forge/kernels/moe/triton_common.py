"""Small helpers the MoE Triton kernels share: interpreter detection and a rounding store cast.

Triton's CPU interpreter converts float32 to bfloat16 by truncation, where the GPU rounds to
nearest even; truncation biases every bf16 output towards zero (about 0.2% per rounding), which
shows up as a systematic error in the interpreter tests. `cast_out` rounds to nearest even by
hand under the interpreter, so the tests see what the GPU computes.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def is_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def cast_out(x, dtype: tl.constexpr, IS_INTERPRET: tl.constexpr):
    """x cast to dtype, rounding to nearest even on the interpreter as on the GPU."""
    if IS_INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            # Adding 0x7FFF plus the lowest kept bit makes the truncation below round half to even.
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
