"""The Gaussians' features and compat weights in one launch (SPEC §1: the blur pooling of the features).

Pooled pixel ``(i, j)`` of blur ``s`` covers rows ``[i·s - pad_y, i·s - pad_y + s)`` and columns
``[j·s - pad_x, j·s - pad_x + s)``, clipped to the image (``blur_pool``: average pooling that counts the real
pixels only). Its features, in order::

    y / pos_sdims, x / pos_sdims,                      (smoothness: the mean row and column of the cell)
    [y / col_sdims, x / col_sdims,]                    (appearance, with col_use_pos)
    r / col_schan, g / col_schan, b / col_schan        (appearance: the cell's mean colour)

where the mean of the rows ``lo..hi-1`` is ``(lo + hi - 1) / 2``, exact in float32. Every division is rounded
as PyTorch's (``div_rn``), and the colours are summed in PyTorch's order (rows, then columns), so the PyTorch path
(``functional.features``: ~10 launches on the GPU, each ~5-10 µs of host time) gives the same features. The
five scalars (bandwidths and the two compat weights) are numbers or one-element tensors on the image's device
(a module's parameters, read by the kernel: no host sync, no fill). The kernel also tests the image's values for
the input check (``nonfinite``: set where a cell's colours do not sum to a finite number).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    COMPILE_OPTIONS,
    DirectLaunch,
    cdiv,
    check_flag,
    check_grid,
    check_on_device,
    interpreter_blocks,
    interpreting,
    library_op,
    needs_int64,
)
from ._math import flag_nonfinite

# Pooled pixels per program on the GPU (4 warps): the kernel reads the image once and writes D + 2 channels a
# pixel; a tiny share of an inference.
FEATURES_BLOCK_P = 256
# The scalars' order in the launch, and their bit in ``POINTERS``.
SCALARS = ("pos_sdims", "col_sdims", "col_schan", "pos_compat", "col_compat")


@triton.jit
def _scalar(s, IS_PTR: tl.constexpr):
    """A launch argument that is a number, or a pointer to one (a one-element tensor), as float32."""
    if IS_PTR:
        return tl.load(s).to(tl.float32)
    else:
        return s


@triton.jit
def _features_kernel(
    image, feats, compats, nonfinite, pos_sdims, col_sdims, col_schan, pos_compat, col_compat,
    stride_b, stride_c, stride_y, stride_x, H, W, h, w, pad_y, pad_x,
    S: tl.constexpr, POINTERS: tl.constexpr, COL_POS: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr,
    CHECK: tl.constexpr = False,
):
    # grid: (cdiv(h*w, BLOCK_P), B). A program's pixels average their cells' S × S window (S: the blur; see the
    # module docstring); program (0, 0) also writes the compat weights. CHECK: nonfinite[0] = 1 where a cell's
    # colours do not sum to a finite number (a NaN or an Inf among them, or an overflow).
    b = tl.program_id(1)
    plane = h * w
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_img = p < plane
    y0 = (p // w) * S - pad_y
    x0 = (p % w) * S - pad_x
    if IDX64:
        b = b.to(tl.int64)
        plane = tl.cast(plane, tl.int64)
        y0 = y0.to(tl.int64)
        x0 = x0.to(tl.int64)
    pixels = image + b * stride_b
    red = tl.zeros([BLOCK_P], dtype=tl.float32)
    green = tl.zeros([BLOCK_P], dtype=tl.float32)
    blue = tl.zeros([BLOCK_P], dtype=tl.float32)
    for dy in range(S):
        row_ok = in_img & (y0 + dy >= 0) & (y0 + dy < H)
        for dx in range(S):
            ok = row_ok & (x0 + dx >= 0) & (x0 + dx < W)
            px = pixels + (y0 + dy) * stride_y + (x0 + dx) * stride_x
            red += tl.load(px, mask=ok, other=0.0).to(tl.float32)
            green += tl.load(px + stride_c, mask=ok, other=0.0).to(tl.float32)
            blue += tl.load(px + 2 * stride_c, mask=ok, other=0.0).to(tl.float32)
    y_lo, y_hi = tl.maximum(y0, 0), tl.minimum(y0 + S, H)
    x_lo, x_hi = tl.maximum(x0, 0), tl.minimum(x0 + S, W)
    count = tl.where(in_img, (y_hi - y_lo) * (x_hi - x_lo), 1).to(tl.float32)
    y = (y_lo + y_hi - 1).to(tl.float32) * 0.5
    x = (x_lo + x_hi - 1).to(tl.float32) * 0.5
    s_pos = _scalar(pos_sdims, POINTERS & 1)
    s_chan = _scalar(col_schan, (POINTERS >> 2) & 1)
    out = feats + b * (7 if COL_POS else 5) * plane + p
    tl.store(out, tl.div_rn(y, s_pos), mask=in_img)
    tl.store(out + plane, tl.div_rn(x, s_pos), mask=in_img)
    if COL_POS:
        s_col = _scalar(col_sdims, (POINTERS >> 1) & 1)
        tl.store(out + 2 * plane, tl.div_rn(y, s_col), mask=in_img)
        tl.store(out + 3 * plane, tl.div_rn(x, s_col), mask=in_img)
        out += 2 * plane
    tl.store(out + 2 * plane, tl.div_rn(tl.div_rn(red, count), s_chan), mask=in_img)
    tl.store(out + 3 * plane, tl.div_rn(tl.div_rn(green, count), s_chan), mask=in_img)
    tl.store(out + 4 * plane, tl.div_rn(tl.div_rn(blue, count), s_chan), mask=in_img)
    if CHECK:
        flag_nonfinite(nonfinite, red + green + blue)  # (outside the image: 0)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(compats, _scalar(pos_compat, (POINTERS >> 3) & 1))
        tl.store(compats + 1, _scalar(col_compat, (POINTERS >> 4) & 1))


_features_launch = DirectLaunch(_features_kernel)


def takes_scalar(value: float | torch.Tensor, image: torch.Tensor) -> bool:
    """Whether the kernel reads ``value`` as it is: a number, or a one-element tensor on ``image``'s device."""
    return not isinstance(value, torch.Tensor) or (value.numel() == 1 and value.device == image.device)


def _features_shape(image: torch.Tensor, blur: int, col_use_pos: bool) -> tuple[int, int, int, int]:
    """The features' shape ``[B, 5|7, ceil(H / blur), ceil(W / blur)]``."""
    B, _, H, W = image.shape
    return B, 7 if col_use_pos else 5, -(-H // blur), -(-W // blur)


@library_op("convcrf_triton::gaussian_features", mutates_args=("nonfinite",))
def _gaussian_features_op(image: torch.Tensor, blur: int, col_use_pos: bool, numbers: list[float],
                          tensors: list[torch.Tensor], pointers: int, nonfinite: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind :func:`gaussian_features`: scalar ``i`` (of :data:`SCALARS`) is the next of ``tensors``
    where bit ``i`` of ``pointers`` is set, else ``numbers[i]``."""
    B, _, h, w = shape = _features_shape(image, blur, col_use_pos)
    H, W = image.shape[-2:]
    feats = image.new_empty(shape, dtype=torch.float32)
    compats = image.new_empty(2, dtype=torch.float32)
    given = iter(tensors)
    scalars = [next(given) if pointers >> i & 1 else numbers[i] for i in range(len(SCALARS))]
    block_p = interpreter_blocks(1, h * w)[1] if interpreting() else FEATURES_BLOCK_P
    grid = (cdiv(h * w, block_p), B)
    _features_launch[grid](
        image, feats, compats, compats if nonfinite is None else nonfinite, *scalars, *image.stride(), H, W, h, w,
        (h * blur - H + 1) // 2, (w * blur - W + 1) // 2, S=blur, POINTERS=pointers, COL_POS=col_use_pos,
        BLOCK_P=block_p, IDX64=needs_int64(image, feats), CHECK=nonfinite is not None, **COMPILE_OPTIONS,
    )
    return feats, compats


@_gaussian_features_op.op.register_fake
def _(image, blur, col_use_pos, numbers, tensors, pointers, nonfinite):
    return (image.new_empty(_features_shape(image, blur, col_use_pos), dtype=torch.float32),
            image.new_empty(2, dtype=torch.float32))


def gaussian_features(
    image: torch.Tensor, blur: int, *, pos_sdims: float | torch.Tensor, col_sdims: float | torch.Tensor,
    col_schan: float | torch.Tensor, pos_compat: float | torch.Tensor, col_compat: float | torch.Tensor,
    col_use_pos: bool, nonfinite: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image: [B, 3, H, W]`` (any float dtype and strides) → the features ``[B, D, h, w]`` (float32; ``D = 5``,
    7 with ``col_use_pos``; ``h, w = ceil(H / blur), ceil(W / blur)``) of the module docstring, and the compat
    weights ``[pos_compat, col_compat]`` (``[2]``, float32). Each scalar is a number or a one-element tensor on
    the image's device. Not differentiable (inference; training builds the features with PyTorch ops,
    ``functional.features``). ``nonfinite``: a one-element float32 tensor set to 1 where a cell's colours do not sum
    to a finite float32 number (a NaN or an Inf among them, or an overflow), else left as it is."""
    check_on_device(image=image)
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a floating-point [B, 3, H, W] tensor, got {image.dtype} "
                         f"{tuple(image.shape)}")
    if not isinstance(blur, int) or blur < 1:
        raise ValueError(f"blur must be an int >= 1, got {blur!r}")
    check_grid(batch=image.shape[0])
    check_flag(nonfinite, image)
    grad = torch.is_grad_enabled()
    numbers, tensors, pointers = [], [], 0
    values = (pos_sdims, col_sdims, col_schan, pos_compat, col_compat)
    for i, (name, value) in enumerate(zip(SCALARS, values, strict=True)):
        if isinstance(value, torch.Tensor):
            if not takes_scalar(value, image):
                raise ValueError(f"{name} must be a number or a one-element tensor on {image.device}, got "
                                 f"shape {tuple(value.shape)} on {value.device}")
            if grad and value.requires_grad:
                raise ValueError(f"gaussian_features does not differentiate {name}: call it under torch.no_grad(), "
                                 "or build the features with convcrf_triton.functional.features to learn it")
            tensors.append(value)
            numbers.append(0.0)
            pointers |= 1 << i
        else:
            numbers.append(float(value))
    if grad and image.requires_grad:
        raise ValueError("gaussian_features does not differentiate image: call it under torch.no_grad(), or build "
                         "the features with convcrf_triton.functional.features")
    return _gaussian_features_op(image, blur, bool(col_use_pos), numbers, tensors, pointers, nonfinite)
