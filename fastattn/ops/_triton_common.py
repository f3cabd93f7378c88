"""Triton device helpers shared by several ops' kernels (imported only by the ops' triton.py).

No `from __future__ import annotations` here: Triton 3.0's interpreter needs real annotations.
"""

import triton
import triton.language as tl


@triton.jit
def cast_for(x, ptr):
    # fp32 -> the element type of ptr, round-to-nearest-even as torch's .to() does. For bf16
    # the rounding is done here on the bits (add 0x7fff plus the lowest kept bit, clear the
    # low half; NaN and inf survive) so that the final cast is exact: the GPU's cvt.rn would
    # round the same way, but the interpreter truncates fp32 -> bf16.
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = (bits >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def tanh(x):
    # |x| >= 0.125: tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1], which cannot
    # overflow; 1 - e cancels as |x| -> 0 (at 0.125 it costs about 3 bits), so below that the
    # odd Taylor series to x^9 is used instead (its truncation error there is ~1e-13 relative).
    a = tl.abs(x)
    e = tl.exp2(-2.0 * 1.4426950408889634 * a)
    big = (1.0 - e) / (1.0 + e)
    z = a * a
    small = a * (1.0 + z * (-1.0 / 3.0 + z * (2.0 / 15.0 + z * (-17.0 / 315.0 + z * (62.0 / 2835.0)))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(x < 0.0, -t, t)
