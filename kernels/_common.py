"""Triton helpers shared by several kernels."""

import triton
import triton.language as tl


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """Cast float32 ``x`` to ``dtype``, rounding to nearest even.

    For bfloat16 the rounding is done with integer ops: Triton's interpreter
    truncates in ``x.to(tl.bfloat16)`` (its cast passes no rounding mode), and the
    CPU tests must measure the rounding the GPU does. Adding 0x7FFF plus the lowest
    kept bit, then dropping the low 16 bits, is round-to-nearest-even on the bit
    pattern (overflow to inf included); NaN keeps the plain cast.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))
    else:
        return x.to(dtype)


# Host-side integer helpers for the launchers. Triton's own ``triton.cdiv`` and
# ``triton.next_power_of_2`` are constexpr functions (Triton >= 3.4) that cost several
# microseconds per host call, a large share of a launcher's host path; these are the
# same integer maths as plain Python.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
