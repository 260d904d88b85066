"""The full-resolution half of a blurred mean-field iteration in one pass (SPEC §1's blur path).

At ``blur = s > 1`` the message is computed on the pooled grid ``[B, C, h, w]``; everything else of an
iteration is full-resolution, elementwise or per pixel, and memory-bound::

    Z  = A + upsample_s(M)          (A = (u - w) L: [B, C, H, W]; M: the mixed message, [B, C, h, w])
    Q' = pool_s(softmax_c(Z))       (the next iteration's pooled probabilities, [B, C, h, w])

``upsample_s`` is bilinear ×s (``align_corners=False``) cropped by the blur padding, ``pool_s`` the s×s
average over the real pixels (``count_include_pad=False``), as :func:`convcrf_triton.functional.blur_upsample`
and :func:`~convcrf_triton.functional.blur_pool`. Composed from PyTorch ops this is ~8 full-resolution
passes per iteration (upsample, add, softmax's reductions, pool); here it is one read of ``A``. The last
iteration stores ``Z`` (or ``softmax(Z)``) at full resolution instead of pooling.

Each program owns one pooled row ``i`` and ``BLOCK_J`` pooled columns: a ``[SP, BLOCK_J, SP]`` tile of
full-resolution pixels (``SP``: ``s`` rounded up to a power of two, the rest masked), whose rows are
contiguous runs of ``A``. Softmax needs every class of a pixel, but a tile of all classes does not fit in
registers (254 per thread and spills at C = 21), so the classes are a run-time loop, in blocks of
``BLOCK_C`` (1 on the GPU): once for the running maximum and sum of ``exp`` (online softmax), once more for
the probabilities and their s×s sums (the second pass re-reads the program's tile of ``A`` from L1). The
upsampled message of a class needs pooled rows ``i - 1 .. i + 1`` and columns ``j - 1 .. j + 1`` only: nine
contiguous vectors of ``BLOCK_J``, interpolated in registers, instead of four gathers per pixel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_on_device, interpreting, needs_int64, tuning_off


@triton.jit
def _source_index(dst, scale, n):
    """PyTorch's bilinear source index (``align_corners=False``) of destination index ``dst`` in an input of
    ``n``: the two neighbours and the weight of the second."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = tl.where(i0 < n - 1, i0 + 1, i0)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _row_lerp(m_row, q, h, jv, jx0, jx1, lx, w, c_ok):
    """Pooled row ``q`` of a block of classes' message (``m_row``: ``[BLOCK_C, 1, 1, 1]`` pointers to it),
    interpolated along x at the columns with neighbours ``jx0``, ``jx1`` and weight ``lx`` (``[1, 1, BLOCK_J,
    SP]``): both neighbours are among ``jv - 1, jv, jv + 1`` (``jv``: the pooled columns), loaded as three
    contiguous vectors instead of gathered per full-resolution pixel. Zero where the row is outside the grid."""
    qv = tl.zeros_like(jv) + q  # a tensor, not a scalar, in the masks (interpreter)
    row_ok = c_ok & (qv >= 0) & (qv < h)
    left = tl.load(m_row + jv - 1, mask=row_ok & (jv >= 1) & (jv <= w), other=0.0)
    mid = tl.load(m_row + jv, mask=row_ok & (jv < w), other=0.0)
    right = tl.load(m_row + jv + 1, mask=row_ok & (jv + 1 < w), other=0.0)
    return (1.0 - lx) * tl.where(jx0 < jv, left, mid) + lx * tl.where(jx1 > jv, right, mid)


@triton.jit
def _logits(a_cls, m_cls, c_ok, offs, ok, i, h, w, jv, jx0, jx1, lx, iy0, iy1, ly):
    """``Z = A + upsample(M)`` of a block of classes over the tile: the full-resolution rows of pooled row
    ``i`` read pooled rows ``i - 1, i, i + 1`` only (``iy0 ∈ {i-1, i}``, ``iy1 ∈ {i, i+1}``)."""
    above = _row_lerp(m_cls + (i - 1) * w, i - 1, h, jv, jx0, jx1, lx, w, c_ok)
    same = _row_lerp(m_cls + i * w, i, h, jv, jx0, jx1, lx, w, c_ok)
    below = _row_lerp(m_cls + (i + 1) * w, i + 1, h, jv, jx0, jx1, lx, w, c_ok)
    up = (1.0 - ly) * tl.where(iy0 < i, above, same) + ly * tl.where(iy1 > i, below, same)
    return tl.load(a_cls + offs, mask=c_ok & ok, other=0.0).to(tl.float32) + up


@triton.jit
def _blur_step_kernel(
    a_ptr, m_ptr, out_ptr, C, H, W, h, w, pad_y, pad_x,
    S: tl.constexpr, SP: tl.constexpr, POOL: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_PIXELS: tl.constexpr,
    BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    # grid: (cdiv(w, BLOCK_J), h, B). Full-resolution pixel (y, x) of pooled cell (i, j), sub-pixel (r, t):
    #   y = i*S + r - pad_y, x = j*S + t - pad_x; its upsampled index is (y + pad_y, x + pad_x).
    # The tile [BLOCK_C, SP, BLOCK_J, SP] is BLOCK_C classes of every full-resolution pixel of BLOCK_J cells.
    # The classes are a run-time loop over blocks of BLOCK_C (1 on the GPU: the registers hold one class's
    # tile; all of them under the interpreter, whose cost is per operation), twice with the softmax: running
    # max and sum first (online softmax), then the probabilities.
    BLOCK_J: tl.constexpr = BLOCK_PIXELS // (SP * SP)  # pooled columns per program
    i = tl.program_id(1)
    b = tl.program_id(2)
    full = H * W
    plane = h * w
    if IDX64:
        i = i.to(tl.int64)
        b = b.to(tl.int64)
        full = full.to(tl.int64)
        plane = plane.to(tl.int64)
    scale = 1.0 / S
    r = tl.arange(0, SP)[None, :, None, None]
    jv = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)[None, None, :, None]
    t = tl.arange(0, SP)[None, None, None, :]
    ys = i * S + r
    xs = jv * S + t
    y = ys - pad_y
    x = xs - pad_x
    ok = (r < S) & (y >= 0) & (y < H) & (t < S) & (jv < w) & (x >= 0) & (x < W)
    offs = y * W + x
    iy0, iy1, ly = _source_index(ys, scale, h)
    jx0, jx1, lx = _source_index(xs, scale, w)
    cls = tl.arange(0, BLOCK_C)[:, None, None, None]
    a_img = a_ptr + b * C * full + cls * full
    m_img = m_ptr + b * C * plane + cls * plane
    geometry = (offs, ok, i, h, w, jv, jx0, jx1, lx, iy0, iy1, ly)
    if SOFTMAX:
        top = tl.full((SP, BLOCK_J, SP), float("-inf"), tl.float32)
        total = tl.zeros((SP, BLOCK_J, SP), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c_ok = cls + c0 < C
            z = _logits(a_img + c0 * full, m_img + c0 * plane, c_ok, *geometry)
            z = tl.where(c_ok, z, float("-inf"))
            new_top = tl.maximum(top, tl.max(z, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top[None]), axis=0)
            top = new_top
        inv_total = 1.0 / total
    if POOL:
        count = tl.sum(tl.sum(ok.to(tl.float32), axis=3), axis=1)  # real pixels per cell: [1, BLOCK_J]
        j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        out_row = out_ptr + b * C * plane + tl.arange(0, BLOCK_C)[:, None] * plane + i * w + j
    for c0 in range(0, C, BLOCK_C):
        c_ok = cls + c0 < C
        z = _logits(a_img + c0 * full, m_img + c0 * plane, c_ok, *geometry)
        if SOFTMAX:
            z = tl.exp(z - top[None]) * inv_total[None]
        if POOL:
            q = tl.sum(tl.sum(tl.where(ok, z, 0.0), axis=3), axis=1) / tl.maximum(count, 1.0)  # [BLOCK_C, BLOCK_J]
            q_ok = (tl.arange(0, BLOCK_C)[:, None] + c0 < C) & (j < w)
            tl.store(out_row + c0 * plane, q.to(out_ptr.dtype.element_ty), mask=q_ok)
        else:
            tl.store(out_ptr + b * C * full + (cls + c0) * full + offs, z.to(out_ptr.dtype.element_ty),
                     mask=c_ok & ok)


# Whether the blurred mean-field loop uses blur_step (the benchmark's triton-composed rows turn it off).
BLUR_STEP = True


def blur_step_enabled() -> bool:
    """Whether inference at blur > 1 runs its full-resolution passes as one :func:`blur_step` launch."""
    return BLUR_STEP


def _prune(configs, named_args, **kwargs):
    """Tiles of at least one pooled cell (``SP²`` pixels); ``CONVCRF_AUTOTUNE=0``: the first, untimed."""
    sp = kwargs["SP"]
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_PIXELS"] >= sp * sp] or [
        triton.Config({"BLOCK_PIXELS": sp * sp}, num_warps=8)]
    return tuning_off(kept)


# Full-resolution pixels per program and warps; the first is the default (CONVCRF_AUTOTUNE=0). On an H100
# (bench/results/nvidia-h100-run3, C = 21, blur 4) the tuner picked 256 pixels on 2 warps for the pooled
# softmax, whose second pass over the classes then re-reads its tile of A from L1 (21 classes × 256 × 4 B =
# 21 KB), and 1024 on 8 warps for the last iteration's logits (one pass): 261 → 211 µs per call at
# 1024×2048 against the 1024-pixel, 4-warp tile. Every config compiles without spills for sm_80/sm_90.
TUNE_CONFIGS = [triton.Config({"BLOCK_PIXELS": bp}, num_warps=nw)
                for bp, nw in [(256, 2), (1024, 4), (512, 4), (512, 2), (2048, 8), (1024, 8)]]
_blur_step_tuned = triton.autotune(configs=TUNE_CONFIGS, key=["C", "H", "W", "S", "POOL", "SOFTMAX"],
                                   prune_configs_by={"early_config_prune": _prune})(_blur_step_kernel)


# Under the interpreter, whose cost is per operation, not per element: one program per pooled row of a
# test image, all classes (up to 64) at once.
INTERPRETER_BLOCK_J = 64
INTERPRETER_MAX_BLOCK_C = 64


@torch.library.custom_op("convcrf_triton::blur_step", mutates_args=())
def _blur_step_op(unary_term: torch.Tensor, message: torch.Tensor, blur: int, pool: bool, softmax: bool,
                  out_dtype: torch.dtype) -> torch.Tensor:
    B, C, H, W = unary_term.shape
    h, w = message.shape[-2:]
    out = unary_term.new_empty((B, C, h, w) if pool else (B, C, H, W), dtype=out_dtype)
    sp = triton.next_power_of_2(blur)
    pad_y, pad_x = (h * blur - H + 1) // 2, (w * blur - W + 1) // 2
    args = (unary_term, message, out, C, H, W, h, w, pad_y, pad_x)
    consts = dict(S=blur, SP=sp, POOL=pool, SOFTMAX=softmax, IDX64=needs_int64(unary_term, out))
    if interpreting():
        grid = (triton.cdiv(w, INTERPRETER_BLOCK_J), h, B)
        _blur_step_kernel[grid](*args, BLOCK_PIXELS=INTERPRETER_BLOCK_J * sp * sp,
                                BLOCK_C=min(triton.next_power_of_2(C), INTERPRETER_MAX_BLOCK_C), **consts)
    else:
        def grid(meta):
            return (triton.cdiv(w, meta["BLOCK_PIXELS"] // (sp * sp)), h, B)

        _blur_step_tuned[grid](*args, BLOCK_C=1, **consts)
    return out


@_blur_step_op.register_fake
def _(unary_term, message, blur, pool, softmax, out_dtype):
    B, C, H, W = unary_term.shape
    return unary_term.new_empty((B, C, *message.shape[-2:]) if pool else (B, C, H, W), dtype=out_dtype)


def blur_step(unary_term: torch.Tensor, message: torch.Tensor, blur: int, *, pool: bool, softmax: bool,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Z = unary_term + upsample(message)`` (``unary_term: [B, C, H, W]``, ``message: [B, C, ceil(H/blur),
    ceil(W/blur)]``), returned as ``pool(softmax(Z))`` (``pool=True``: the next iteration's pooled
    probabilities, ``[B, C, h, w]``; needs ``softmax``), else ``softmax(Z)`` or ``Z`` at full resolution.
    float32 arithmetic; the result in ``out_dtype`` (default: that of ``unary_term``). Not differentiable
    (inference: training composes the PyTorch ops)."""
    check_on_device(unary_term=unary_term, message=message)
    if not isinstance(blur, int) or blur < 2:
        raise ValueError(f"blur must be an int >= 2, got {blur!r}")
    if unary_term.dim() != 4 or message.dim() != 4:
        raise ValueError(f"unary_term and message must be 4-D, got {tuple(unary_term.shape)} and "
                         f"{tuple(message.shape)}")
    B, C, H, W = unary_term.shape
    pooled = (B, C, -(-H // blur), -(-W // blur))
    if tuple(message.shape) != pooled:
        raise ValueError(f"message must be the pooled grid {pooled} of unary_term {tuple(unary_term.shape)} at "
                         f"blur={blur}, got {tuple(message.shape)}")
    if pool and not softmax:
        raise ValueError("pool=True pools the probabilities: it needs softmax=True")
    return _blur_step_op(unary_term.contiguous(), message.float().contiguous(), blur, pool, softmax,
                         out_dtype or unary_term.dtype)
