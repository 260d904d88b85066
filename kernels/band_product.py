"""Message passing on tensor cores: the window sum as a banded matrix product (issue #6, item 2).

``M[b, c, p] = sum_t K[b, t, p] * Q[b, c, p + d_t]`` is, over a patch of ``PH × PW`` pixels ``p`` and the
``(PH + k - 1) × (PW + k - 1)`` neighbours ``n`` their windows cover, a product with a sparse band matrix::

    M[p, c] = sum_n  W[p, n] · Q[n, c],      W[p, n] = K[t(n - p), p] if n - p lies in the k×k window, else 0

which ``tl.dot`` runs on tensor cores, one row of the patch's neighbourhood (``PW + k - 1`` neighbours, a power
of two) per product. The direct kernel (:mod:`.message_passing`) issues one 4-byte load per multiply-add and is
bound by load issue (~3.3 TFLOP/s on an H100/H200); here each weight is loaded once, as a masked gather into
``W`` (k = 11, 10 × 6 patch: 341 loads per pixel against 2541 at C = 21), and the band's zeros cost MMA time,
which is cheap. The column part of the gather (pointers, window mask) is the same for every row and is built
once; a first layout (8 × 8 patches, 32 neighbours in any rows per product) recomputed it per element and
was 1.2-1.9× slower at k = 3..11 (H100, bench/NOTES.md).

Precision: the products run in ``PRECISION`` (``"tf32x3"``: three tf32 products per float32 product, close to
float32; ``"tf32"``: one, on operands rounded to the nearest tf32, ~1e-4 relative; ``"ieee"``: plain FMAs),
accumulated in float32. On an H100 tf32x3 is about as fast as the direct kernel (the operand splits double the
work) and tf32 (before its operands were rounded) 1.5-3.1× faster from k = 7: :func:`band_precision` says which
passes run here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    COMPILE_OPTIONS,
    DirectLaunch,
    cdiv,
    check_grid,
    check_on_device,
    interpreting,
    message_dtype,
    needs_int64,
    next_power_of_2,
)
from .message_passing import _step_epilogue, step_mixing

PRECISIONS = ("tf32x3", "tf32", "ieee")
# Inference's message passes (the blur-1 step, the pooled-grid passes of blur > 1; K materialised, nothing to
# differentiate) run here instead of the direct kernel
# - for every filter size, in tf32x3, when BAND is switched on (off: on an H100 tf32x3 is no faster than the
#   direct kernel but at k = 31; the benchmark's triton-band rows switch it on);
# - for the filter sizes of TF32_FILTER_SIZES, in tf32, when the model asks for precision="tf32", the message
#   passes but not the blur-1 step: one tf32 product per product on rounded operands, messages within 2.2e-4 of
#   float64 relative to the largest (k = 7; less for larger k; 3.3e-4 at k = 5, outside the 3e-4). With
#   truncated operands (Triton's tf32) the pass measured 1.5-3.1x faster than the direct kernel on an H100 at
#   k = 7, 11, 15 (1024 × 2048 and 256 × 512, C = 21 and 64), and at k = 21 below the direct kernel's k = 15
#   time; the rounding (two integer operations per operand) has not been timed. The band step was 1.3 ms an
#   iteration slower than the direct planar step at equal message-pass speed (tf32x3, 1024 × 2048, k = 11), more
#   than tf32 saves, so the blur-1 step stays on the direct kernel (bench/NOTES.md).
BAND = False
TF32_FILTER_SIZES = range(7, 22)


def band_precision(filter_size: int, precision: str = "float32", step: bool = False) -> str | None:
    """The products' precision of the band kernel for inference's message passes (``step``: the blur-1
    one-launch step) of ``filter_size`` under the model's ``precision`` (``'float32'`` or ``'tf32'``), or None
    where the direct kernel runs them."""
    if BAND:
        return "tf32x3"
    if precision == "tf32" and filter_size in TF32_FILTER_SIZES and not step:
        return "tf32"
    return None


@triton.jit
def _round_to_tf32(x):
    # float32 -> the nearest tf32 (10 mantissa bits, ties away from zero), as float32. Tensor cores drop the low
    # 13 bits of float32 operands: a bias, ~7e-4 of a sum of positive products at k = 11; rounded first, the
    # products' errors are unbiased and largely cancel (1.4e-4).
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _band_message_pass_kernel(
    q_ptr, k_ptr, m_ptr, a_ptr, w_ptr, cm_ptr, C, h, w,
    KSIZE: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, IDX64: tl.constexpr, STEP: tl.constexpr = False, W_STRIDE: tl.constexpr = 0,
    HAS_COMPAT: tl.constexpr = False, SOFTMAX: tl.constexpr = False,
):
    # grid: (cdiv(w, PW) * cdiv(h, PH), cdiv(C, BLOCK_C), B). Pixel p < PH * PW of the patch: (y0 + p // PW,
    # x0 + p % PW). Product j takes row j of the patch's neighbourhood, ROW_W = PW + 2R neighbours (a power of
    # two): n at (y0 - R + j, x0 - R + n), and W[p, n] = K[tap, p] with tap = (j - p // PW) * KSIZE + (n - p % PW)
    # when both parts lie in [0, KSIZE). The column part (pointers and mask) is the same for every row, so it is
    # built once, before the loop; a row adds a scalar offset and a per-pixel row test.
    # With STEP (one class block: BLOCK_C >= C) the epilogue is the direct kernel's mean-field step
    # (message_passing._step_epilogue), classes on axis 1.
    R: tl.constexpr = KSIZE // 2
    ROW_W: tl.constexpr = PW + 2 * R
    tiles_w = tl.cdiv(w, PW)
    y0 = tl.program_id(0) // tiles_w * PH
    x0 = tl.program_id(0) % tiles_w * PW
    b = tl.program_id(2)
    plane = h * w
    if IDX64:
        b = b.to(tl.int64)
        plane = plane.to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    py = y0 + p // PW
    px = x0 + p % PW
    p_ok = (p < PH * PW) & (py < h) & (px < w)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cls < C
    n = tl.arange(0, ROW_W)
    nx = x0 - R + n
    nx_ok = (nx >= 0) & (nx < w)
    q_row = q_ptr + b * C * plane + cls[None, :] * plane + ((y0 - R) * w + nx)[:, None]  # [ROW_W, BLOCK_C]
    tap_x = n[None, :] - (p % PW)[:, None]  # [BLOCK_P, ROW_W]
    col_ok = (tap_x >= 0) & (tap_x < KSIZE) & nx_ok[None, :]
    # W[p, n] of row j: K[tap, p] at k_band, which starts at tap row -(p // PW) and moves one tap row (KSIZE
    # planes) a row; the start in int64 (up to PH - 1 tap rows before K, further than K's own offsets reach).
    k_band = (k_ptr + b * (KSIZE * KSIZE) * plane + (py * w + px)[:, None] + tap_x * plane
              - ((p // PW) * KSIZE).to(tl.int64)[:, None] * plane)
    row_n = tl.full([ROW_W], y0 - R, tl.int32)  # the neighbourhood's first row, per neighbour and per pixel
    row_p = py - p // PW - R
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for j in range(0, PH + 2 * R):
        n_ok = nx_ok & (row_n + j >= 0) & (row_n + j < h)
        q = tl.load(q_row + j * w, mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # [ROW_W, BLOCK_C]
        tap_y = j - p // PW
        pix_ok = p_ok & (tap_y >= 0) & (tap_y < KSIZE) & (row_p + j >= 0) & (row_p + j < h)
        band = tl.load(k_band, mask=col_ok & pix_ok[:, None], other=0.0).to(tl.float32)  # W[p, n]
        q = q.to(tl.float32)
        if PRECISION == "tf32":
            band = _round_to_tf32(band)
            q = _round_to_tf32(q)
        acc = tl.dot(band, q, acc, input_precision=PRECISION)
        k_band += KSIZE * plane
    offs = b * C * plane + cls[None, :] * plane + (py * w + px)[:, None]
    mask = p_ok[:, None] & c_ok[None, :]
    if STEP:
        acc = _step_epilogue(acc, cls, C, cm_ptr, w_ptr, a_ptr, offs, mask, W_STRIDE, HAS_COMPAT, SOFTMAX, 1)
    tl.store(m_ptr + offs, acc.to(m_ptr.dtype.element_ty), mask=mask)


_band_launch = DirectLaunch(_band_message_pass_kernel)

# GPU tile: 64 pixels (the M dimension of the product, the width of a Hopper warpgroup MMA) in a PH × PW patch
# whose neighbourhood rows are ROW_W = PW + 2R wide, 16 or 32 (a power of two of at least 16, the MMA's minimum;
# 64-wide rows spill on sm_80 at k = 31), one row per product; up to 32 classes per program; 4 warps. The step
# holds every class and its epilogue: 8 warps.
BLOCK_P = 64
ROW_WIDTHS = (16, 32)
# The narrowest patch where there is a choice: K is read PW pixels at a time, so a 2-wide patch reads a quarter
# of each 32-byte sector (H100, k = 15: 7.44 ms 2 wide against 5.44 ms 50 wide, tf32x3; bench/NOTES.md). Only
# k = 31 has no other (26.5 ms in tf32, 13.3 ms with the first layout's 8 × 8 patch).
MIN_PW = 4
NUM_WARPS = 4
STEP_NUM_WARPS = 8


def band_tile(k: int) -> dict[str, int]:
    """The patch of filter size ``k`` (constexprs ``PH``, ``PW``, ``BLOCK_P``): of the row widths
    ``ROW_W = PW + 2R`` in :data:`ROW_WIDTHS` (with ``PW >= MIN_PW`` where one has it), the one that loads the
    fewest band entries per output pixel, ``(PH + 2R) · ROW_W · BLOCK_P / (PH · PW)`` with ``PH = BLOCK_P // PW``
    (k = 11: a 10 × 6 patch, 16-wide rows: 341 entries, against 2541 loads of the direct kernel at C = 21)."""
    r = k // 2
    tiles = [{"PH": BLOCK_P // (rw - 2 * r), "PW": rw - 2 * r, "BLOCK_P": BLOCK_P}
             for rw in ROW_WIDTHS if rw - 2 * r > 0]
    if not tiles:
        raise ValueError(f"the band kernel takes filter sizes up to {ROW_WIDTHS[-1] - 1}, got k={k}")
    tiles = [t for t in tiles if t["PW"] >= MIN_PW] or tiles
    return min(tiles, key=lambda t: (t["PH"] + 2 * r) * (t["PW"] + 2 * r) / (t["PH"] * t["PW"]))


def band_blocks(C: int) -> int:
    """Classes per program: all of them up to 32 (at least 16, the MMA's minimum), else 32 per program."""
    return min(max(16, next_power_of_2(C)), 32)


def _check_operands(K: torch.Tensor, Q: torch.Tensor) -> int:
    """The filter size of ``K: [B, k*k, h, w]`` for ``Q: [B, C, h, w]``, or a ValueError."""
    k = int(round(K.shape[1] ** 0.5)) if K.dim() == 4 else 0
    if Q.dim() != 4 or k * k != K.shape[1] or k % 2 == 0 or K.shape[0] != Q.shape[0] or K.shape[2:] != Q.shape[2:]:
        raise ValueError(f"K must be [B, k*k, h, w] with k odd and Q [B, C, h, w] on the same grid, got "
                         f"{tuple(K.shape)} and {tuple(Q.shape)}")
    return k


def _launch(K: torch.Tensor, Q: torch.Tensor, k: int, precision: str, out: torch.Tensor, block_c: int,
            step: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool] | None = None) -> torch.Tensor:
    """One launch (``k``: the filter size, from :func:`_check_operands`): the message pass into ``out``, or
    with ``step = (A, weight, compat_matrix, softmax)`` the mean-field step."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: expected one of {', '.join(PRECISIONS)}")
    B, C, h, w = Q.shape
    tile = band_tile(k)
    consts = {}
    a, weight, mix = K, K, K  # (the message pass's unused slots hold an operand, never read)
    if step is not None:
        a, weight, compat, softmax = step
        mix = weight if compat is None else compat
        consts = dict(STEP=True, W_STRIDE=int(weight.numel() > 1), HAS_COMPAT=compat is not None, SOFTMAX=softmax)
    grid = (cdiv(h, tile["PH"]) * cdiv(w, tile["PW"]), cdiv(C, block_c), B)
    _band_launch[grid](
        Q, K, out, a, weight, mix, C, h, w, KSIZE=k, **tile, BLOCK_C=block_c, PRECISION=precision,
        IDX64=needs_int64(Q, K, out), **consts, **COMPILE_OPTIONS,
        **({} if interpreting() else {"num_warps": NUM_WARPS if step is None else STEP_NUM_WARPS}),
    )
    return out


def band_message_pass(K: torch.Tensor, Q: torch.Tensor, precision: str = "tf32x3") -> torch.Tensor:
    """:func:`~convcrf_triton.kernels.message_pass` as banded tensor-core products: ``K: [B, k*k, h, w]``,
    ``Q: [B, C, h, w]`` → ``M: [B, C, h, w]`` (:func:`message_dtype` of Q's), products in ``precision`` (one of
    :data:`PRECISIONS`), float32 sums. Inference only (not differentiable)."""
    check_on_device(K=K, Q=Q)
    k = _check_operands(K, Q)
    check_grid(batch=Q.shape[0])
    Q = Q.contiguous()
    return _launch(K.contiguous(), Q, k, precision, torch.empty_like(Q, dtype=message_dtype(Q.dtype)),
                   band_blocks(Q.shape[1]))


# Classes the band step holds in one tile (its [64, C] accumulator and, with a compatibility, [C, C]): no
# spills up to 64, or 32 with the compatibility (sm_80/sm_90, 8 warps).
STEP_MAX_CLASSES = 64
STEP_MAX_CLASSES_COMPAT = 32


def band_step_max_classes(has_compat: bool) -> int:
    """The most classes :func:`band_mean_field_step` takes, with or without a compatibility matrix."""
    return STEP_MAX_CLASSES_COMPAT if has_compat else STEP_MAX_CLASSES


def band_mean_field_step(
    Q: torch.Tensor, unary_term: torch.Tensor, weight: torch.Tensor, compat_matrix: torch.Tensor | None,
    K: torch.Tensor, softmax: bool, out_dtype: torch.dtype | None = None, precision: str = "tf32x3",
) -> torch.Tensor:
    """:func:`~convcrf_triton.kernels.mean_field_step` (two-pass weights, planar ``[B, C, h, w]`` tensors) with
    the message pass as banded tensor-core products: ``Z = A + w·(M + compat·M)``, returned as ``softmax(Z)`` or
    ``Z`` in ``out_dtype`` (default: Q's). At most :data:`STEP_MAX_CLASSES` classes, :data:`STEP_MAX_CLASSES_COMPAT`
    with ``compat_matrix`` (one tile holds them all)."""
    check_on_device(Q=Q, unary_term=unary_term, K=K, weight=weight, compat_matrix=compat_matrix)
    k = _check_operands(K, Q)
    check_grid(batch=Q.shape[0])
    C = Q.shape[1]
    max_classes = band_step_max_classes(compat_matrix is not None)
    if C > max_classes or unary_term.shape != Q.shape:
        raise ValueError(f"band_mean_field_step takes up to {max_classes} classes ({STEP_MAX_CLASSES_COMPAT} with a "
                         f"compat_matrix) and unary_term shaped like Q, got Q {tuple(Q.shape)} and unary_term "
                         f"{tuple(unary_term.shape)}")
    weight, compat = step_mixing(weight, compat_matrix, C)
    Q = Q.contiguous()
    out = torch.empty_like(Q, dtype=out_dtype or Q.dtype)
    return _launch(K.contiguous(), Q, k, precision, out, max(16, next_power_of_2(C)),
                   (unary_term.contiguous(), weight, compat, softmax))
