"""The full-resolution half of a blurred mean-field iteration in one pass (SPEC §1's blur path).

At ``blur = s > 1`` the message is computed on the pooled grid ``[B, C, h, w]``; everything else of an
iteration is full-resolution, elementwise or per pixel, and memory-bound::

    Z  = a · (u - lse) + w · upsample_s(M)   (u: the unary logits [B, C, H, W]; lse = log Σ_c exp(u_c):
                                              [B, 1, H, W]; the factors (a, w) = (unary_weight - w, w): [2, C];
                                              M: the message, compatibility applied, [B, C, h, w])
    Q' = pool_s(softmax_c(Z))                (the next iteration's pooled probabilities, [B, C, h, w])

``a · (u - lse)`` is the loop-invariant unary term ``(unary_weight - w) · log_softmax(u)``, recomputed from
``u`` and one plane of ``lse`` instead of stored: no C×H×W tensor lives between iterations.
``upsample_s`` is bilinear ×s (``align_corners=False``) cropped by the blur padding, ``pool_s`` the s×s
average over the real pixels (``count_include_pad=False``), as :func:`convcrf_triton.functional.blur_upsample`
and :func:`~convcrf_triton.functional.blur_pool`. Composed from PyTorch ops this is ~8 full-resolution
passes per iteration (upsample, add, softmax's reductions, pool); here it is one read of ``u``. The last
iteration stores ``Z`` (or ``softmax(Z)``) at full resolution instead of pooling. The loop's set-up is the
same pass with ``Z = u`` and no message (``START``): it stores ``lse`` and the first iteration's pooled
``softmax(u)`` (or ``log_softmax(u)``), one read of ``u`` instead of PyTorch's log-softmax, softmax, scaling
and pooling (~7 full-resolution passes). At blur 1 (``S = 1``: pooling and upsampling are the identity) the same
set-up hands the one-launch steps of :mod:`.message_passing` their first ``Q`` and the unary term
``a · log_softmax(u)`` (``TERM``; :func:`mean_field_start`): one read and two writes instead of six passes.

Each program owns one pooled row ``i`` and ``BLOCK_J`` pooled columns: a ``[SP, BLOCK_J, SP]`` tile of
full-resolution pixels (``SP``: ``s`` rounded up to a power of two, the rest masked), whose rows are
contiguous runs of ``u``. Softmax needs every class of a pixel, but a tile of all classes does not fit in
registers (254 per thread and spills at C = 21), so the classes are a run-time loop, in blocks of
``BLOCK_C`` (1 on the GPU): once for the running maximum and sum of ``exp`` (online softmax), once more for
the probabilities and their s×s sums (the second pass re-reads the program's tile of ``u`` from L1). The
upsampled message of a class needs pooled rows ``i - 1 .. i + 1`` and columns ``j - 1 .. j + 1`` only: nine
contiguous vectors of ``BLOCK_J``, interpolated in registers, instead of four gathers per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import (
    COMPILE_OPTIONS,
    cdiv,
    check_on_device,
    interpreting,
    library_op,
    needs_int64,
    next_power_of_2,
    tuning_off,
)
from ._math import exp


@triton.jit
def _source_weights(dst, scale, n, centre):
    """PyTorch's bilinear source (``align_corners=False``) of destination index ``dst`` in an input of ``n``, as
    the weights of the three pooled indices ``centre - 1, centre, centre + 1`` (``centre`` within one of
    ``dst``'s cell, so that its two sources are among them). They depend on the pixel only, so they are computed
    once for every class, and a class's interpolation is three multiply-adds an axis, without selects."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = tl.where(i0 < n - 1, i0 + 1, i0)
    frac = src - i0.to(tl.float32)
    d0 = i0 - centre
    d1 = i1 - centre
    before = tl.where(d0 == -1, 1.0 - frac, 0.0) + tl.where(d1 == -1, frac, 0.0)
    same = tl.where(d0 == 0, 1.0 - frac, 0.0) + tl.where(d1 == 0, frac, 0.0)
    return before, same, tl.where(d0 == 1, 1.0 - frac, 0.0) + tl.where(d1 == 1, frac, 0.0)


@triton.jit
def _column(m_rows, dj: tl.constexpr, wy):
    """Column ``jc + dj`` of the three pooled rows at ``m_rows`` (pointers to column ``jc``), interpolated along
    y with the weights ``wy``: one base address a row, the columns at constant offsets from it."""
    return wy[0] * tl.load(m_rows[0] + dj) + wy[1] * tl.load(m_rows[1] + dj) + wy[2] * tl.load(m_rows[2] + dj)


@triton.jit
def _logits(u_cls, m_cls, a_cls, lse, c_ok, offs, ok, C, rows, cols, wx, wy, START: tl.constexpr):
    """``Z = a · (u - lse) + w · upsample(M)`` of a block of classes over the tile (``u`` itself at the ``START``;
    ``a`` at ``a_cls``, ``w`` a row of ``C`` further, in the ``[2, C]`` factors): the full-resolution rows of
    pooled row ``i`` read pooled rows ``i - 1, i, i + 1`` only (``rows``: their offsets, each clamped to the grid)
    weighted by ``wy``, and columns ``jc - 1, jc, jc + 1`` (``cols``: ``jc``, pooled column ``j`` clamped to
    ``[1, mw - 2]``) by ``wx``. No message load needs a mask: clamped rows and columns have weight zero, and the
    classes of ``m_cls`` are clamped to ``C - 1``."""
    z = tl.load(u_cls + offs, mask=c_ok & ok, other=0.0).to(tl.float32)
    if not START:
        # Along y first, at the pooled columns ([BLOCK_C, SP, BLOCK_J, 1]: a thread's run of sub-pixels t
        # shares them), then along x per pixel: 3 multiply-adds a pixel, not 12.
        m_rows = (m_cls + rows[0] + cols, m_cls + rows[1] + cols, m_cls + rows[2] + cols)
        up = wx[0] * _column(m_rows, -1, wy) + wx[1] * _column(m_rows, 0, wy) + wx[2] * _column(m_rows, 1, wy)
        z = tl.load(a_cls, mask=c_ok, other=0.0) * (z - lse) + tl.load(a_cls + C, mask=c_ok, other=0.0) * up
    return z


@triton.jit
def _blur_step_kernel(
    u_ptr, lse_ptr, f_ptr, m_ptr, out_ptr, term_ptr, C, H, W, h, w, mw, pad_y, pad_x,
    S: tl.constexpr, SP: tl.constexpr, START: tl.constexpr, TERM: tl.constexpr, POOL: tl.constexpr,
    SOFTMAX: tl.constexpr, LOG: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
    ONE_PASS: tl.constexpr = False,
):
    # grid: (cdiv(w, BLOCK_J), h, B). Full-resolution pixel (y, x) of pooled cell (i, j), sub-pixel (r, t):
    #   y = i*S + r - pad_y, x = j*S + t - pad_x; its upsampled index is (y + pad_y, x + pad_x).
    # The tile [BLOCK_C, SP, BLOCK_J, SP] is BLOCK_C classes of every full-resolution pixel of BLOCK_J cells.
    # The classes are a run-time loop over blocks of BLOCK_C, twice with the softmax: running max and sum
    # first (online softmax), then the probabilities (LOG: their logarithms, Z - lse(Z)); the second pass
    # re-reads u, from L1 if the program's tile of every class is still there. ONE_PASS (BLOCK_C >= C: a tile
    # of every class in registers, so few pixels a program) reads u once and keeps Z for the second pass.
    # m_ptr: the message [B, C, h, mw], mw = max(w, 3) (narrower grids padded by the launcher, so that the
    # clamped columns jc - 1 .. jc + 1 lie in the row).
    # f_ptr: the factors [2, C], a = unary_weight - w and w (at the START a alone, read with TERM only).
    # START: Z = u, no message (m_ptr unused); the first pass stores lse(u) to lse_ptr, or with TERM the second
    # stores the unary term a * (u - lse(u)) to term_ptr at full resolution (blur 1's steps read it).
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
    jc = tl.minimum(tl.maximum(jv, 1), mw - 2)  # the middle of the three pooled columns a pixel reads
    wy = _source_weights(ys, scale, h, i)
    wx = _source_weights(xs, scale, w, jc)
    cls = tl.arange(0, BLOCK_C)[:, None, None, None]
    u_img = u_ptr + b * C * full + cls * full
    m_plane = h * mw
    if IDX64:
        m_plane = m_plane.to(tl.int64)
    m_img = m_ptr + b * C * m_plane
    lse_img = lse_ptr + b * full + offs
    lse = 0.0
    if not START:
        lse = tl.load(lse_img, mask=ok, other=0.0)  # the unary's, loaded once for every class
    rows = (tl.maximum(i - 1, 0) * mw, i * mw, tl.minimum(i + 1, h - 1) * mw)  # pooled rows i - 1 .. i + 1
    geometry = (offs, ok, C, rows, jc, wx, wy, START)
    if ONE_PASS:
        z_all = _logits(u_img, m_img + tl.minimum(cls, C - 1) * m_plane, f_ptr + cls, lse, cls < C, *geometry)
    if SOFTMAX:
        if ONE_PASS:
            z = tl.where(cls < C, z_all, float("-inf"))
            top = tl.max(z, axis=0)
            total = tl.sum(exp(z - top[None]), axis=0)
        else:
            top = tl.full((SP, BLOCK_J, SP), float("-inf"), tl.float32)
            total = tl.zeros((SP, BLOCK_J, SP), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c_ok = cls + c0 < C
                m_cls = m_img + tl.minimum(cls + c0, C - 1) * m_plane  # classes past C read class C - 1
                z = _logits(u_img + c0 * full, m_cls, f_ptr + c0 + cls, lse, c_ok, *geometry)
                z = tl.where(c_ok, z, float("-inf"))
                new_top = tl.maximum(top, tl.max(z, axis=0))
                total = total * exp(top - new_top) + tl.sum(exp(z - new_top[None]), axis=0)
                top = new_top
        inv_total = 1.0 / total
        if LOG or START:
            z_lse = top + tl.log(total)
        if START and not TERM:
            tl.store(lse_img, z_lse[None], mask=ok)
    if POOL:
        count = tl.sum(tl.sum(ok.to(tl.float32), axis=3), axis=1)  # real pixels per cell: [1, BLOCK_J]
        inv_count = 1.0 / tl.maximum(count, 1.0)
        j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        out_row = out_ptr + b * C * plane + tl.arange(0, BLOCK_C)[:, None] * plane + i * w + j
    for c0 in range(0, C, BLOCK_C):  # ONE_PASS: one block, c0 = 0
        c_ok = cls + c0 < C
        if ONE_PASS:
            z = z_all
        else:
            m_cls = m_img + tl.minimum(cls + c0, C - 1) * m_plane
            z = _logits(u_img + c0 * full, m_cls, f_ptr + c0 + cls, lse, c_ok, *geometry)
        full_offs = b * C * full + (cls + c0) * full + offs
        if TERM:
            term = tl.load(f_ptr + c0 + cls, mask=c_ok, other=0.0) * (z - z_lse[None])
            tl.store(term_ptr + full_offs, term.to(term_ptr.dtype.element_ty), mask=c_ok & ok)
        if SOFTMAX:
            if LOG:
                z = z - z_lse[None]
            else:
                z = exp(z - top[None]) * inv_total[None]
        if POOL:
            q = tl.sum(tl.sum(tl.where(ok, z, 0.0), axis=3), axis=1) * inv_count  # [BLOCK_C, BLOCK_J]
            q_ok = (tl.arange(0, BLOCK_C)[:, None] + c0 < C) & (j < w)
            tl.store(out_row + c0 * plane, q.to(out_ptr.dtype.element_ty), mask=q_ok)
        else:
            tl.store(out_ptr + full_offs, z.to(out_ptr.dtype.element_ty), mask=c_ok & ok)


# Whether the blurred mean-field loop uses blur_step (the benchmark's triton-composed rows turn it off).
BLUR_STEP = True


def blur_step_enabled() -> bool:
    """Whether inference at blur > 1 runs its full-resolution passes as one :func:`blur_step` launch."""
    return BLUR_STEP


def _prune(configs, named_args, **kwargs):
    """Tiles of at least one pooled cell (``SP²`` pixels); the class-tile configs (``BLOCK_C = 0``) get every
    class (``ONE_PASS``) where that keeps at most :data:`ONE_PASS_MAX_VALUES` tile values a thread, and are
    dropped elsewhere; ``CONVCRF_AUTOTUNE=0``: the first, untimed."""
    sp, classes = kwargs["SP"], next_power_of_2(named_args["C"])
    kept = []
    for cfg in configs:
        pixels = cfg.kwargs["BLOCK_PIXELS"]
        if pixels < sp * sp:
            continue
        if cfg.kwargs["BLOCK_C"] == 0:
            if classes * pixels > ONE_PASS_MAX_VALUES * 32 * cfg.num_warps:
                continue
            cfg = triton.Config({"BLOCK_PIXELS": pixels, "BLOCK_C": classes, "ONE_PASS": True}, num_warps=cfg.num_warps)
        kept.append(cfg)
    return tuning_off(kept or [triton.Config({"BLOCK_PIXELS": sp * sp, "BLOCK_C": 1}, num_warps=8)])


# Full-resolution pixels per program and warps; the first is the default (CONVCRF_AUTOTUNE=0). On an H100
# (bench/results/nvidia-h100-run3, C = 21, blur 4) the tuner picked 256 pixels on 2 warps for the pooled
# softmax, whose second pass over the classes then re-reads its tile of A from L1 (21 classes × 256 × 4 B =
# 21 KB), and 1024 on 8 warps for the last iteration's logits (one pass): 261 → 211 µs per call at
# 1024×2048 against the 1024-pixel, 4-warp tile (0.29 of the copy floor: the second pass probably misses L1
# with 16 such programs an SM). Hence the class-tile configs (BLOCK_C = 0: every class, ONE_PASS): few pixels
# a program, u read once; not yet timed. Every config compiles without spills for sm_80/sm_90.
ONE_PASS_MAX_VALUES = 32
TUNE_CONFIGS = ([triton.Config({"BLOCK_PIXELS": bp, "BLOCK_C": 1}, num_warps=nw)
                 for bp, nw in [(256, 2), (1024, 4), (512, 4), (512, 2), (2048, 8), (1024, 8)]]
                + [triton.Config({"BLOCK_PIXELS": bp, "BLOCK_C": 0}, num_warps=nw)
                   for bp, nw in [(64, 2), (128, 4), (256, 8), (64, 4), (128, 8)]])
_blur_step_tuned = triton.autotune(configs=TUNE_CONFIGS,
                                   key=["C", "H", "W", "S", "START", "TERM", "POOL", "SOFTMAX", "LOG"],
                                   prune_configs_by={"early_config_prune": _prune})(_blur_step_kernel)


# Under the interpreter, whose cost is per operation, not per element: one program per pooled row of a
# test image (or 1024 pixels of it), all classes (up to 64) at once.
INTERPRETER_BLOCK_J = 64
INTERPRETER_PIXELS = 1024
INTERPRETER_MAX_BLOCK_C = 64


def _launch(unary: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor, message: torch.Tensor, out: torch.Tensor,
            term: torch.Tensor | None, blur: int, *, start: bool, pool: bool, softmax: bool, log: bool) -> None:
    """One launch. ``factors``: ``[2, C]`` (a; w), at the start ``a`` alone (``TERM``) or unused, like the message
    there and ``lse`` or ``term``: unused pointers are any tensor."""
    B, C, H, W = unary.shape
    h, w = -(-H // blur), -(-W // blur)
    sp = next_power_of_2(blur)
    pad_y, pad_x = (h * blur - H + 1) // 2, (w * blur - W + 1) // 2
    mw = max(w, 3)  # the kernel reads three pooled columns from a clamped middle one
    if not start and w < mw:
        message = F.pad(message, (0, mw - w))
    args = (unary, lse, factors, message, out, out if term is None else term, C, H, W, h, w, mw, pad_y, pad_x)
    consts = dict(S=blur, SP=sp, START=start, TERM=term is not None, POOL=pool, SOFTMAX=softmax, LOG=log,
                  IDX64=needs_int64(unary, out))
    if interpreting():
        block_j = max(INTERPRETER_BLOCK_J, INTERPRETER_PIXELS // (sp * sp))
        grid = (cdiv(w, block_j), h, B)
        block_c = min(next_power_of_2(C), INTERPRETER_MAX_BLOCK_C)
        _blur_step_kernel[grid](*args, BLOCK_PIXELS=block_j * sp * sp, BLOCK_C=block_c, ONE_PASS=block_c >= C,
                                **consts, **COMPILE_OPTIONS)
    else:
        def grid(meta):
            return (cdiv(w, meta["BLOCK_PIXELS"] // (sp * sp)), h, B)

        _blur_step_tuned[grid](*args, **consts, **COMPILE_OPTIONS)


@library_op("convcrf_triton::blur_start")
def _blur_start_op(unary: torch.Tensor, blur: int, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = unary.shape
    lse = unary.new_empty((B, 1, H, W), dtype=torch.float32)
    pooled = unary.new_empty((B, C, -(-H // blur), -(-W // blur)))
    _launch(unary, lse, unary, unary, pooled, None, blur, start=True, pool=True, softmax=True, log=log)
    return lse, pooled


@_blur_start_op.op.register_fake
def _(unary, blur, log):
    B, C, H, W = unary.shape
    return (unary.new_empty((B, 1, H, W), dtype=torch.float32),
            unary.new_empty((B, C, -(-H // blur), -(-W // blur))))


@library_op("convcrf_triton::blur_step")
def _blur_step_op(unary: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor, message: torch.Tensor, blur: int,
                  pool: bool, softmax: bool, out_dtype: torch.dtype) -> torch.Tensor:
    B, C, H, W = unary.shape
    out = unary.new_empty((B, C, *message.shape[-2:]) if pool else (B, C, H, W), dtype=out_dtype)
    _launch(unary, lse, factors, message, out, None, blur, start=False, pool=pool, softmax=softmax, log=False)
    return out


@_blur_step_op.op.register_fake
def _(unary, lse, factors, message, blur, pool, softmax, out_dtype):
    B, C, H, W = unary.shape
    return unary.new_empty((B, C, *message.shape[-2:]) if pool else (B, C, H, W), dtype=out_dtype)


@library_op("convcrf_triton::mean_field_start")
def _mean_field_start_op(unary: torch.Tensor, a: torch.Tensor, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    Q, term = torch.empty_like(unary), torch.empty_like(unary)
    B, C, H, W = unary.shape
    flat = unary.view(B, C, 1, H * W)  # pixels are independent without a message: one row, no ragged row ends
    _launch(flat, Q, a, flat, Q, term, 1, start=True, pool=True, softmax=True, log=log)
    return Q, term


@_mean_field_start_op.op.register_fake
def _(unary, a, log):
    return torch.empty_like(unary), torch.empty_like(unary)


def _check_unary(unary: torch.Tensor, blur: int | None = None) -> tuple[int, int, int, int]:
    """``unary``'s shape, or a ValueError; ``blur``: the blurred kernels' factor, checked when given."""
    if blur is not None and (not isinstance(blur, int) or blur < 2):
        raise ValueError(f"blur must be an int >= 2, got {blur!r}")
    if unary.dim() != 4:
        raise ValueError(f"unary must be 4-D [B, C, H, W], got shape {tuple(unary.shape)}")
    return tuple(unary.shape)


def blur_start(unary: torch.Tensor, blur: int, *, log: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The blurred loop's set-up in one read of the unary logits ``u: [B, C, H, W]``: their per-pixel
    log-sum-exp ``lse = log Σ_c exp(u_c)`` (``[B, 1, H, W]``, float32) and the first iteration's pooled input,
    ``pool(softmax(u))`` (``log=True``: ``pool(log_softmax(u))``, ConvCRF's first pass on the
    log-probabilities), ``[B, C, ceil(H/blur), ceil(W/blur)]`` in the dtype of ``u``. float32 arithmetic."""
    check_on_device(unary=unary)
    _check_unary(unary, blur)
    return _blur_start_op(unary.contiguous(), blur, log)


def _check_factors(name: str, factors: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(factors.shape) != shape:
        raise ValueError(f"{name} must hold the classes' unary factors (and message weights), shape {shape}, got "
                         f"{tuple(factors.shape)}")


def mean_field_start(unary: torch.Tensor, a: torch.Tensor, *, log: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The set-up of the one-launch steps at blur 1 (:func:`~convcrf_triton.kernels.mean_field_step`) in one read
    of the unary logits ``u: [B, C, H, W]``: the first iteration's input ``Q = softmax(u)`` (``log=True``:
    ``log_softmax(u)``) and the loop-invariant unary term ``A = a · log_softmax(u)`` (``a: [C]``, the
    per-class ``unary_weight - w``), both ``[B, C, H, W]`` in the dtype of ``u``. float32 arithmetic."""
    check_on_device(unary=unary, a=a)
    _check_factors("a", a, (_check_unary(unary)[1],))
    return _mean_field_start_op(unary.contiguous(), a.float().contiguous(), log)


def blur_step(unary: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor, message: torch.Tensor, blur: int, *,
              pool: bool, softmax: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Z = a · (unary - lse) + w · upsample(message)``: ``unary: [B, C, H, W]`` logits, ``lse: [B, 1, H, W]``
    their log-sum-exp from :func:`blur_start`, ``factors: [2, C]`` the per-class ``a = unary_weight - w`` (row 0)
    and ``w`` (row 1), ``message: [B, C, ceil(H/blur), ceil(W/blur)]`` (the compatibility applied). Returned as
    ``pool(softmax(Z))`` (``pool=True``: the next iteration's pooled probabilities, ``[B, C, h, w]``; needs
    ``softmax``), else ``softmax(Z)`` or ``Z`` at full resolution. float32 arithmetic; the result in
    ``out_dtype`` (default: that of ``unary``). Not differentiable (inference: training composes the PyTorch
    ops). One tensor of factors, so that the kernel holds one pointer for both (a second spilled on sm_90)."""
    check_on_device(unary=unary, lse=lse, factors=factors, message=message)
    B, C, H, W = _check_unary(unary, blur)
    pooled = (B, C, -(-H // blur), -(-W // blur))
    if tuple(message.shape) != pooled:
        raise ValueError(f"message must be the pooled grid {pooled} of unary {tuple(unary.shape)} at "
                         f"blur={blur}, got {tuple(message.shape)}")
    if tuple(lse.shape) != (B, 1, H, W):
        raise ValueError(f"lse must be the unary's per-pixel log-sum-exp {(B, 1, H, W)}, got {tuple(lse.shape)}")
    _check_factors("factors", factors, (2, C))
    if pool and not softmax:
        raise ValueError("pool=True pools the probabilities: it needs softmax=True")
    return _blur_step_op(unary.contiguous(), lse.float().contiguous(), factors.float().contiguous(),
                         message.float().contiguous(), blur, pool, softmax, out_dtype or unary.dtype)
