"""The full-resolution half of a blurred mean-field iteration in one pass (SPEC §1, blur ``s > 1``).

With blur the message is computed on the pooled ``[h, w]`` grid; what remains at full resolution is

    Z[c, Y, X] = A[c, Y, X] + up_s(M)[c, Y + py, X + px]      (A = (u - w) L; M the mixed pooled message)
    Q'         = pool_s(softmax_c(Z))                          (the next iteration's pooled Q)

with ``up_s`` the bilinear ×s upsampling (``align_corners=False``) cropped by the pooling padding
``(py, px)``, and ``pool_s`` the s×s average over the real pixels. Composed from PyTorch ops this is five
full-resolution passes (upsample, crop-add, softmax, pool, ...) per iteration; here it is one kernel that
reads ``A`` once and writes only the pooled ``Q'`` (constexpr ``POOL``). The last iteration instead
writes ``Z`` (or ``softmax(Z)``) at full resolution (``POOL=False``). ``Z`` never exists in memory
between iterations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_on_device, interpreter_blocks, interpreting, needs_int64
from .message_passing import step_blocks

MAX_CLASSES = 256  # every class of a pixel in one register tile (the softmax)


@triton.jit
def _upsampled_logits(a_rows, m_rows, Y, X, ok, c_mask, H, W, h, w, py, px, inv_s, plane):
    # Z = A + bilinear(M) at full-resolution pixels (Y, X): [BLOCK_C, BLOCK_P], float32. The source
    # coordinate follows PyTorch's upsample_bilinear2d (align_corners=False): s = max(scale·(d + ½) - ½, 0),
    # i0 = floor(s), i1 = min(i0 + 1, n - 1), weights (1 - (s - i0), s - i0).
    sy = tl.maximum(inv_s * ((Y + py).to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(inv_s * ((X + px).to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = tl.minimum(sy.to(tl.int32), h - 1)
    x0 = tl.minimum(sx.to(tl.int32), w - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.where(y0 < h - 1, y0 + 1, y0)
    x1 = tl.where(x0 < w - 1, x0 + 1, x0)
    mask = c_mask & ok[None, :]
    m00 = tl.load(m_rows + (y0 * w + x0)[None, :], mask=mask, other=0.0).to(tl.float32)
    m01 = tl.load(m_rows + (y0 * w + x1)[None, :], mask=mask, other=0.0).to(tl.float32)
    m10 = tl.load(m_rows + (y1 * w + x0)[None, :], mask=mask, other=0.0).to(tl.float32)
    m11 = tl.load(m_rows + (y1 * w + x1)[None, :], mask=mask, other=0.0).to(tl.float32)
    top = (1.0 - lx)[None, :] * m00 + lx[None, :] * m01
    bottom = (1.0 - lx)[None, :] * m10 + lx[None, :] * m11
    a = tl.load(a_rows + (Y * W + X)[None, :], mask=mask, other=0.0).to(tl.float32)
    return a + (1.0 - ly)[None, :] * top + ly[None, :] * bottom


@triton.jit
def _softmax_classes(z, c_mask):
    z = tl.where(c_mask, z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _blur_step_kernel(
    a_ptr, m_ptr, out_ptr, C, H, W, h, w, py, px, inv_s,
    S: tl.constexpr, POOL: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr,
):
    # grid: (cdiv(pixels, BLOCK_P), B); pixels are pooled ones with POOL, full-resolution ones otherwise.
    # A, out(full): [B, C, H, W]; M, out(pooled): [B, C, h, w]. Every class of a pixel is in the tile.
    b = tl.program_id(1)
    big = H * W
    small = h * w
    if IDX64:
        b = b.to(tl.int64)
        big = big.to(tl.int64)
        small = small.to(tl.int64)
    cls = tl.arange(0, BLOCK_C)
    c_mask = (cls < C)[:, None]
    a_rows = a_ptr + b * C * big + cls[:, None] * big
    m_rows = m_ptr + b * C * small + cls[:, None] * small
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    if POOL:
        in_grid = offs < small
        i = offs // w
        j = offs % w
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        count = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for sub in range(S * S):
            Y = i * S - py + sub // S
            X = j * S - px + sub % S
            ok = in_grid & (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
            z = _upsampled_logits(a_rows, m_rows, Y, X, ok, c_mask, H, W, h, w, py, px, inv_s, small)
            acc += tl.where(ok[None, :], _softmax_classes(z, c_mask), 0.0)
            count += ok.to(tl.float32)
        out = acc / tl.maximum(count, 1.0)[None, :]
        tl.store(out_ptr + b * C * small + cls[:, None] * small + offs[None, :], out, mask=c_mask & in_grid[None, :])
    else:
        ok = offs < big
        z = _upsampled_logits(a_rows, m_rows, offs // W, offs % W, ok, c_mask, H, W, h, w, py, px, inv_s, small)
        if SOFTMAX:
            z = _softmax_classes(z, c_mask)
        tl.store(out_ptr + b * C * big + cls[:, None] * big + offs[None, :], z, mask=c_mask & ok[None, :])


@torch.library.custom_op("convcrf_triton::blur_step", mutates_args=())
def _blur_step_op(A: torch.Tensor, M: torch.Tensor, blur: int, pool: bool, softmax: bool) -> torch.Tensor:
    from ..functional import blur_padding  # the layer above owns the pooling geometry

    B, C, H, W = A.shape
    h, w = M.shape[-2:]
    out = A.new_empty(B, C, h, w) if pool else torch.empty_like(A)
    pixels = h * w if pool else H * W
    if interpreting():
        block_c, block_p = interpreter_blocks(C, pixels)
        num_warps = 4
    else:
        block_c, block_p, num_warps = step_blocks(C, False)
    _blur_step_kernel[(triton.cdiv(pixels, block_p), B)](
        A, M, out, C, H, W, h, w, blur_padding(H, blur), blur_padding(W, blur), 1.0 / blur, S=blur, POOL=pool,
        SOFTMAX=softmax, BLOCK_C=block_c, BLOCK_P=block_p, IDX64=needs_int64(A, M), num_warps=num_warps,
    )
    return out


@_blur_step_op.register_fake
def _(A, M, blur, pool, softmax):
    return A.new_empty(*A.shape[:2], *M.shape[-2:]) if pool else A.new_empty(A.shape)


def blur_step(A: torch.Tensor, M: torch.Tensor, blur: int, pool: bool, softmax: bool = True) -> torch.Tensor:
    """``Z = A + up_blur(M)`` at full resolution; returns ``pool_blur(softmax(Z))`` ``[B, C, h, w]`` with
    ``pool`` (then ``softmax`` must be True), else ``softmax(Z)`` or ``Z`` ``[B, C, H, W]``.

    ``A: [B, C, H, W]``, ``M: [B, C, ceil(H/blur), ceil(W/blur)]``, float32, ``C <= 256``. Inference only.
    """
    check_on_device(A=A, M=M)
    B, C, H, W = A.shape
    if blur < 2:
        raise ValueError(f"blur must be >= 2 for the blur step, got {blur}")
    if M.shape != (B, C, -(-H // blur), -(-W // blur)):
        raise ValueError(f"M must be [B, C, ceil(H/blur), ceil(W/blur)] = {(B, C, -(-H // blur), -(-W // blur))}, "
                         f"got {tuple(M.shape)}")
    if C > MAX_CLASSES:
        raise ValueError(f"the blur step holds every class in one tile: C must be <= {MAX_CLASSES}, got {C}")
    if pool and not softmax:
        raise ValueError("pool=True pools probabilities: softmax must be True")
    return _blur_step_op(A.contiguous().float(), M.contiguous().float(), blur, pool, softmax)
