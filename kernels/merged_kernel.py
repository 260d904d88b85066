"""Merged Gaussian kernel ``K[b, t, p]`` from the per-pixel features (SPEC §3, kernel 1).

For tap ``t`` (offset ``d_t = (t // k - r, t % k - r)``) and pixel ``p``::

    K[b, t, p] = c1 * exp(-1/2 |f1[p] - f1[p + d_t]|^2) + c2 * exp(-1/2 |f2[p] - f2[p + d_t]|^2)

where ``f1`` is the first ``D1`` feature channels and ``f2`` the next ``D2`` (``D2 = 0``: one Gaussian);
``K`` is 0 where ``p + d_t`` leaves the image, and at the centre tap unless ``KEEP_CENTRE``.
``_pixel_block``, ``_inside``, ``_own_features``, ``_tap_weight`` and ``_load_compats`` are shared
with the message-passing kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import (
    COMPILE_OPTIONS,
    DirectLaunch,
    cdiv,
    check_grid,
    check_on_device,
    interpreter_blocks,
    interpreting,
    library_op,
    needs_int64,
)
from ._math import gaussian

# Pixels per program on the GPU (4 warps): 4 consecutive pixels a thread, so that the weights' stores are
# 16 bytes wide. The tap loop (sm_90, k = 7): 38 instructions per pixel and tap (triton 3.6 and 3.9), 89
# before the own features were hoisted by hand and the taps walked as rows × columns. The columns are a
# run-time loop: unrolled (31 per pixel and tap) they spilled at k = 31.
WEIGHTS_BLOCK_P = 512


@triton.jit
def _pixel_block(b, h, w, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Every kernel's prologue: image ``b``, plane size, this program's flat pixels, whether they lie in the
    image, and their rows and columns; pixels past the image get a row far below it, so that every neighbour
    test (:func:`_inside`) rejects them. With ``IDX64`` the batch and plane offsets are int64 (tensors of 2^31
    elements or more)."""
    plane = h * w
    if IDX64:
        b = b.to(tl.int64)
        plane = tl.cast(plane, tl.int64)  # a plain int where h = w = 1
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_img = offs < plane
    return b, plane, offs, in_img, tl.where(in_img, offs // w, 1 << 30), offs % w


@triton.jit
def _inside(v, n):
    """``0 <= v < n`` as one unsigned compare. ``n`` may be a plain int: a launch specialises a size of 1 to a
    constant."""
    return v.to(tl.uint32, bitcast=True) < tl.cast(n, tl.uint32, bitcast=True)


@triton.jit
def _own_features(f_ptr, offs, in_img, plane, D: tl.constexpr):
    """The pixels' ``D`` feature channels (``f_ptr``: the image's ``[D, h, w]``), a tuple of ``[BLOCK_P]``
    float32 vectors loaded once before a tap loop: a loop that stores (the weights kernel) keeps the compiler
    from hoisting them itself, since the store may alias them."""
    own = ()
    for i in tl.static_range(D):
        own = own + (tl.load(f_ptr + i * plane + offs, mask=in_img, other=0.0).to(tl.float32),)
    return own


@triton.jit
def _tap_weight(f_ptr, own, nb, valid, plane, c1, c2, D1: tl.constexpr, D2: tl.constexpr):
    """Weight of one tap for a block of pixels: the (up to two) Gaussians of SPEC §1, compat-weighted.

    ``f_ptr + nb`` points at the neighbours' first feature channel (``f_ptr``: this image's features
    ``[D1 + D2, h, w]`` and ``nb`` their offsets, or ``f_ptr`` a pointer per pixel and ``nb`` one offset),
    ``valid: [BLOCK_P]`` where they lie in the image; ``own`` holds the pixels' features (from
    :func:`_own_features`). The feature loop is unrolled
    (D ≤ 10) and each channel is a 1-D vector, so the squared distance sums within a thread. Returns
    ``[BLOCK_P]`` float32.
    """
    e1 = tl.zeros(valid.shape, dtype=tl.float32)
    e2 = tl.zeros(valid.shape, dtype=tl.float32)
    for i in tl.static_range(D1 + D2):
        diff = tl.load(f_ptr + i * plane + nb, mask=valid, other=0.0).to(tl.float32) - own[i]
        if i < D1:
            e1 += diff * diff
        else:
            e2 += diff * diff
    weight = c1 * gaussian(e1)
    if D2 > 0:
        weight += c2 * gaussian(e2)
    return tl.where(valid, weight, 0.0)


@triton.jit
def _load_compats(compat_ptr, D2: tl.constexpr):
    """The compat weights ``c1`` (and ``c2`` when there is a second Gaussian) as float32 scalars."""
    c1 = tl.load(compat_ptr).to(tl.float32)
    c2 = 0.0
    if D2 > 0:
        c2 = tl.load(compat_ptr + 1).to(tl.float32)
    return c1, c2


@triton.jit
def _gaussian_weights_kernel(
    f_ptr, compat_ptr, k_ptr, h, w,
    KSIZE: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    KEEP_CENTRE: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr,
):
    # grid: (cdiv(h*w, BLOCK_P), B); one program writes all k*k taps of BLOCK_P pixels, as rows × columns of
    # taps (no division per tap); a neighbour is valid when 0 <= y + dy < h and 0 <= x + dx < w.
    b, plane, offs, in_img, y, x = _pixel_block(tl.program_id(1), h, w, BLOCK_P, IDX64)
    f_ptr += b * (D1 + D2) * plane
    c1, c2 = _load_compats(compat_ptr, D2)
    own = _own_features(f_ptr, offs, in_img, plane, D1 + D2)
    out = k_ptr + b * (KSIZE * KSIZE) * plane + offs
    # The block's first pixel added to the pointer before the threads' lane offsets: a thread's pixels are
    # then constant offsets from one address (no 64-bit address per element and tap).
    f_tile = (f_ptr + tl.program_id(0) * BLOCK_P) + tl.arange(0, BLOCK_P)
    R: tl.constexpr = KSIZE // 2
    for i in range(KSIZE):
        row_ok = _inside(y + (i - R), h)
        for j in range(KSIZE):
            valid = row_ok & _inside(x + (j - R), w)
            weight = _tap_weight(f_tile, own, (i - R) * w + (j - R), valid, plane, c1, c2, D1, D2)
            t = i * KSIZE + j
            if not KEEP_CENTRE:
                weight = tl.where(t == KSIZE * KSIZE // 2, 0.0, weight)
            tl.store(out + t * plane, weight.to(k_ptr.dtype.element_ty), mask=in_img)


_gaussian_weights_launch = DirectLaunch(_gaussian_weights_kernel)


def feature_meta(feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor) -> dict:
    """Constexprs describing the Gaussians: ``D1`` and ``D2`` feature channels (``D2 = 0``: one Gaussian)."""
    if len(dims) not in (1, 2) or sum(dims) != feats.shape[1] or compats.numel() != len(dims):
        raise ValueError(f"dims={tuple(dims)} must split the {feats.shape[1]} feature channels into 1 or 2 "
                         f"Gaussians, with one compat weight each (got {compats.numel()})")
    d1, d2 = dims[0], (dims[1] if len(dims) == 2 else 0)
    return {"D1": d1, "D2": d2}


@library_op("convcrf_triton::gaussian_weights")
def _gaussian_weights_op(feats: torch.Tensor, compats: torch.Tensor, dims: list[int], filter_size: int,
                         keep_centre: bool, out_dtype: torch.dtype) -> torch.Tensor:
    B, _, h, w = feats.shape
    K = feats.new_empty(B, filter_size * filter_size, h, w, dtype=out_dtype)
    block_p = interpreter_blocks(1, h * w)[1] if interpreting() else WEIGHTS_BLOCK_P
    grid = (cdiv(h * w, block_p), B)
    _gaussian_weights_launch[grid](
        feats, compats, K, h, w, KSIZE=filter_size, KEEP_CENTRE=keep_centre, BLOCK_P=block_p,
        IDX64=needs_int64(feats, K), **feature_meta(feats, dims, compats), **COMPILE_OPTIONS,
    )
    return K


@_gaussian_weights_op.op.register_fake
def _(feats, compats, dims, filter_size, keep_centre, out_dtype):
    B, _, h, w = feats.shape
    return feats.new_empty(B, filter_size * filter_size, h, w, dtype=out_dtype)


K_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gaussian_weights(
    feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor, filter_size: int, keep_centre: bool,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``feats: [B, D, h, w]`` → ``K: [B, k*k, h, w]`` (see the module docstring), computed in float32 and
    stored as ``out_dtype`` (float32, bfloat16 or float16; default float32). Not differentiable: learn the
    weights through the fused message pass."""
    check_on_device(feats=feats, compats=compats)
    check_grid(batch=feats.shape[0])
    out_dtype = out_dtype or torch.float32
    if out_dtype not in K_DTYPES:
        raise ValueError(f"out_dtype must be one of {K_DTYPES}, got {out_dtype}")
    return _gaussian_weights_op(feats.contiguous().float(), compats.contiguous().float(), list(dims), filter_size,
                                keep_centre, out_dtype)
