"""Elementwise maths the kernels share, each lowered to as few instructions as it can be.

``tl.exp`` compiles to ``ex2.approx.f32`` of ``x · log2 e``: ptxas wraps that ``MUFU.EX2`` in a range test and
two predicated multiplies, to return subnormal results (below 2⁻¹²⁶) exactly: six instructions an ``exp``.
``tl.exp2`` compiles to ``ex2.approx.ftz.f32``, the ``MUFU.EX2`` alone, and flushes those results to zero,
far under every tolerance here (a softmax sums terms up to 1; a Gaussian weight below 1e-38 is no weight). So
the kernels exponentiate in base 2, with ``log2 e`` folded into a factor they multiply by anyway where there
is one (:func:`gaussian`).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)


@triton.jit
def exp(x):
    """``e^x`` (results below 2⁻¹²⁶ flushed to zero): a multiply and one ``MUFU.EX2``."""
    return tl.exp2(x * LOG2E)


@triton.jit
def gaussian(sq):
    """``exp(-sq / 2)`` of squared feature distances ``sq``: one multiply and one ``MUFU.EX2``."""
    return tl.exp2(sq * NEG_HALF_LOG2E)


@triton.jit
def flag_nonfinite(flag_ptr, sums):
    """``flag_ptr[0] = 1`` if any of the block's ``sums`` (an input's values, summed as a kernel reads them) is not
    finite: a NaN or an Inf among the values, or an overflow (the input check's test, see
    ``functional.ValueCheck``). A NaN compares false."""
    bad = tl.where(tl.abs(sums) < float("inf"), 0, 1)
    tl.store(flag_ptr, 1.0, mask=tl.max(bad, axis=0) > 0)


@triton.jit
def as_stored(x, ptr):
    """``x`` in the element type of ``ptr``, float16 saturated at ±65504 (``functional.to_storage``'s rule: a value
    beyond it is a log-probability of a class of probability 0, or next to nothing a message passes)."""
    if ptr.dtype.element_ty == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    return x.to(ptr.dtype.element_ty)
