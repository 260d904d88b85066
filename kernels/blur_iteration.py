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

Each program owns one pooled row ``i`` and ``BLOCK_J`` pooled columns: the ``s`` full-resolution rows of ``BLOCK_J``
cells (``SP``: ``s`` rounded up to a power of two, the rest masked), held as one flat dimension of pixels, each
row a contiguous run of ``u``. Softmax needs every class of a pixel, but a tile of all classes does not fit in
registers, so the classes are a run-time loop, in blocks of ``BLOCK_C`` (1 on the GPU): once for the running
maximum and sum of exponentials (online softmax), once more for the probabilities and their s×s sums. The upsampled
message of a class needs pooled rows ``i - 1 .. i + 1`` and the columns either side of a pixel's cell only: each
pixel's two bilinear sources along x, at the three rows, then along y. Where a thread holds whole cells (the
tuner's 16-pixel configs at blur 4) the sources and weights are constants of its registers and the pooling adds
in registers: 31 instructions an element (sm_90, both passes; 57 with the cells' rows across lanes). For up to 24
classes the one-pass configs hold every class of 4 pixels a thread in registers instead, and read ``u`` once.
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
    interpreting,
    library_op,
    needs_int64,
    next_power_of_2,
    tuning_off,
)
from ._math import LN2, LOG2E, as_stored, flag_nonfinite


@triton.jit
def _sources(pos, S: tl.constexpr):
    """PyTorch's bilinear source (``align_corners=False``, scale ``s``) of sub-pixel ``pos`` of a cell, relative to
    the cell: ``src = cell + (pos + 0.5) / s - 0.5``, between the cell and the one before (``before``) or after it,
    and the weight of the second of the two. Where ``pos`` is a constant of each register (a thread's sub-pixels,
    ``s`` a power of two) both are constants: the selects and weights fold away. With each neighbour index
    clamped to the grid the pair is right at the borders too (PyTorch clamps the source, which reads the edge)."""
    centre = (pos.to(tl.float32) + 0.5) * (1.0 / S)
    before = 2 * pos + 1 < S
    return before, tl.where(before, centre + 0.5, centre - 0.5)


@triton.jit
def _lerp(lo, hi, frac):
    return lo + frac * (hi - lo)


@triton.jit
def _logits(c, u_img, m_img, f_ptr, lse, full, m_plane, offs, ok, C, rows, col_lo, col_hi, fx, below, fy,
            START: tl.constexpr, UNIT: tl.constexpr, EVICT: tl.constexpr):
    """``Z = a · (u - lse) + w · upsample(M)`` of a block of classes over the tile, in units of ``UNIT`` (``log2 e``
    for the softmax, which then exponentiates in base 2; ``u`` itself at the ``START``); ``a`` at ``f_cls``, ``w``
    a row of ``C`` further, in the ``[2, C]`` factors; ``c``: the classes (``[1]`` or ``[BLOCK_C, 1]``; those past
    ``C`` masked, their message read at class ``C - 1``). The message: at each of the pooled rows ``i - 1, i, i + 1``
    (``rows``, clamped to the grid) along x between the columns ``col_lo`` and ``col_hi`` (clamped) of each pixel
    with weight ``fx``; then along y between the rows that ``below`` picks, with weight ``fy``. ``w · UNIT`` scales
    the loaded values (nine a thread where it holds whole cells), not the pixels. ``EVICT``: the L2 eviction
    policy of ``u``'s loads."""
    c_ok = c < C
    f_cls = f_ptr + c
    m_cls = m_img + tl.minimum(c, C - 1) * m_plane
    z = tl.load(u_img + c * full + offs, mask=c_ok & ok, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if START:
        z = z * UNIT
    else:
        wm = tl.load(f_cls + C, mask=c_ok, other=0.0) * UNIT
        x0 = _lerp(wm * tl.load(m_cls + rows[0] + col_lo), wm * tl.load(m_cls + rows[0] + col_hi), fx)
        x1 = _lerp(wm * tl.load(m_cls + rows[1] + col_lo), wm * tl.load(m_cls + rows[1] + col_hi), fx)
        x2 = _lerp(wm * tl.load(m_cls + rows[2] + col_lo), wm * tl.load(m_cls + rows[2] + col_hi), fx)
        up = _lerp(tl.where(below, x0, x1), tl.where(below, x1, x2), fy)
        z = (tl.load(f_cls, mask=c_ok, other=0.0) * UNIT) * (z - lse) + up
    return z


@triton.jit
def _blur_step_kernel(
    u_ptr, lse_ptr, f_ptr, m_ptr, out_ptr, term_ptr, flag_ptr, C, H, W, h, w, pad_y, pad_x,
    S: tl.constexpr, SP: tl.constexpr, START: tl.constexpr, TERM: tl.constexpr, POOL: tl.constexpr,
    SOFTMAX: tl.constexpr, LOG: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
    CLASSES: tl.constexpr = 0, CHECK: tl.constexpr = False,
):
    # grid: (cdiv(w, BLOCK_J), h, B). Full-resolution pixel (y, x) of pooled cell (i, j), sub-pixel (r, t):
    #   y = i*S + r - pad_y, x = j*S + t - pad_x; its upsampled index is (y + pad_y, x + pad_x).
    # A program's pixels are the SP full-resolution rows of BLOCK_J cells: BLOCK_X = BLOCK_J * SP pixels a row, held
    # flat, p = r * BLOCK_X + (x - x0): one dimension, so that the compiler lays u's 16-byte chunks and the
    # message's gathers alike, consecutive chunks on consecutive lanes (with a dimension per axis triton 3.6 and
    # 3.9 order the gathers' dimensions differently, and convert them through shared memory). Where BLOCK_X is 4
    # pixels a thread, a thread holds one column of whole cells: its rows r and sub-columns t are constants of its
    # registers, and so are the bilinear pairs and weights (_sources), and the pooling adds in registers.
    # The classes are a run-time loop over blocks of BLOCK_C (1 on the GPU: [BLOCK_PIXELS] tiles; every class
    # under the interpreter: [BLOCK_C, BLOCK_PIXELS]), twice with the softmax: the running maximum and sum of
    # exponentials first (online softmax, in base 2), then the probabilities (LOG: their logarithms), re-reading u.
    # CLASSES = C > 0 (the one-pass configs, few classes): every class's tile in registers, u read once.
    # m_ptr: the message [B, C, h, w]; f_ptr: the factors [2, C], a = unary_weight - w and w (at the START a
    # alone, read with TERM only). START: Z = u, no message (m_ptr unused); the first pass stores lse(u) to
    # lse_ptr, or with TERM the second stores the unary term a * (u - lse(u)) to term_ptr at full resolution.
    # CHECK (at the START): flag_ptr[0] = 1 where a pixel's logits do not sum to a finite number (a NaN or an Inf
    # among them, or an overflow), the input check's test of u made as the first loop reads it (one add an element).
    tl.static_assert(not CHECK or (START and SOFTMAX))
    BLOCK_X: tl.constexpr = BLOCK_PIXELS // SP  # full-resolution columns per program
    BLOCK_J: tl.constexpr = BLOCK_X // SP  # pooled columns per program
    UNIT: tl.constexpr = LOG2E if SOFTMAX else 1.0
    NUMERATORS: tl.constexpr = SOFTMAX and not LOG and not TERM  # what is stored: exp2(z - top) / total
    i = tl.program_id(1)
    b = tl.program_id(2)
    full = H * W
    m_plane = h * w
    if IDX64:
        i = i.to(tl.int64)
        b = b.to(tl.int64)
        full = full.to(tl.int64)
        m_plane = m_plane.to(tl.int64)
    p = tl.arange(0, BLOCK_PIXELS)
    r = p // BLOCK_X
    xi = p % BLOCK_X
    jv = tl.program_id(0) * BLOCK_J + xi // SP
    t = xi % SP
    if S == SP:
        xs = tl.program_id(0) * BLOCK_X + xi  # = jv * S + t, contiguous as written
    else:
        xs = jv * S + t
    y = i * S + r - pad_y
    x = xs - pad_x
    # (Cells past the grid, j >= w, hold pixels x >= w * S - pad_x >= W only.)
    ok = (r < S) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    if S != SP:
        ok = ok & (t < S)
    offs = y * W + x
    if BLOCK_C == 1:
        cls = tl.arange(0, 1)  # [1]: broadcast against the pixels, the tiles stay one-dimensional
    else:
        cls = tl.arange(0, BLOCK_C)[:, None]
    u_img = u_ptr + b * C * full
    m_img = m_ptr + b * C * m_plane
    lse_img = lse_ptr + b * full + offs
    lse = 0.0
    if not START:
        lse = tl.load(lse_img, mask=ok, other=0.0)  # the unary's, loaded once for every class
    before_x, fx = _sources(t, S)
    col = tl.minimum(jv, w - 1)  # the cell's column (the last one for the tile's cells past the grid)
    col_lo = tl.where(before_x, tl.maximum(col - 1, 0), col)
    col_hi = tl.where(before_x, col, tl.minimum(col + 1, w - 1))
    before_y, fy = _sources(r, S)
    rows = (tl.maximum(i - 1, 0) * w, i * w, tl.minimum(i + 1, h - 1) * w)  # pooled rows i - 1 .. i + 1
    geometry = (u_img, m_img, f_ptr, lse, full, m_plane, offs, ok, C, rows, col_lo, col_hi, fx, before_y, fy, START,
                UNIT)
    z_lse = 0.0
    inv_total = 0.0
    u_sum = tl.zeros((BLOCK_PIXELS,), dtype=tl.float32)  # CHECK: each pixel's sum of u (times UNIT)
    if CLASSES > 0:
        # Every class in registers (a tuple, one tile a class): u read once, all its loads in flight at once.
        zs = ()
        for c in tl.static_range(CLASSES):
            zs = zs + (_logits(cls + c, *geometry, "evict_first"),)
        if SOFTMAX:
            top = zs[0]
            for c in tl.static_range(1, CLASSES):
                top = tl.maximum(top, zs[c])
            es = ()
            for c in tl.static_range(CLASSES):
                es = es + (tl.exp2(zs[c] - top),)
            total = es[0]
            for c in tl.static_range(1, CLASSES):
                total += es[c]
            if CHECK:
                for c in tl.static_range(CLASSES):
                    u_sum += zs[c]
    elif SOFTMAX:
        top = tl.full((BLOCK_PIXELS,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_PIXELS,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            # u is read again by the second loop: kept in L2 before the lines the second loop has read.
            z = _logits(cls + c0, *geometry, "evict_last")
            if CHECK:
                u_sum += z if BLOCK_C == 1 else tl.sum(z, axis=0)  # (past C and outside the image: 0)
            if BLOCK_C == 1:
                # One exponential an element: of -|z - top|, the smaller term relative to the larger.
                d = z - top
                e = tl.exp2(-tl.abs(d))
                total = tl.where(d > 0, total * e + 1.0, total + e)
                top = tl.maximum(top, z)
            else:
                z = tl.where(cls + c0 < C, z, float("-inf"))
                new_top = tl.maximum(top, tl.max(z, axis=0))
                total = total * tl.exp2(top - new_top) + tl.sum(tl.exp2(z - new_top), axis=0)
                top = new_top
    if SOFTMAX:
        inv_total = 1.0 / total
        if LOG or START:
            z_lse = top + tl.log2(total)  # in base 2
        if START and not TERM:
            tl.store(lse_img, z_lse * LN2, mask=ok)
    if CHECK:
        flag_nonfinite(flag_ptr, u_sum)
    count = 0.0
    if POOL:
        count = tl.sum(tl.sum(tl.reshape(ok.to(tl.float32), (1, SP, BLOCK_J, SP)), axis=3), axis=1)  # [1, BLOCK_J]
    outputs = (f_ptr, out_ptr, term_ptr, b, C, full, m_plane, i, w, offs, ok, 1.0 / tl.maximum(count, 1.0), z_lse,
               inv_total)
    if CLASSES > 0:
        for c in tl.static_range(CLASSES):
            _output(es[c] if NUMERATORS else zs[c], cls + c, *outputs, SP, BLOCK_J, BLOCK_C, TERM, POOL, SOFTMAX, LOG,
                    NUMERATORS)
    else:
        for c0 in range(0, C, BLOCK_C):
            z = _logits(cls + c0, *geometry, "evict_first" if SOFTMAX else "")
            if NUMERATORS:
                z = tl.exp2(_below_top(z - top, BLOCK_C))
            _output(z, cls + c0, *outputs, SP, BLOCK_J, BLOCK_C, TERM, POOL, SOFTMAX, LOG, NUMERATORS)


@triton.jit
def _below_top(d, BLOCK_C: tl.constexpr):
    """``d = z - top`` (or ``z - lse``), at most 0 for every class; in a block of several classes (the
    interpreter's) also the padding rows past ``C``, whose ``z`` is 0 and whose exponential, never stored, would
    overflow where the real classes' logits lie below -128 in these base-2 units (-89 natural: the message of the
    log-probabilities in mode='convcrf')."""
    return tl.minimum(d, 0.0) if BLOCK_C > 1 else d


@triton.jit
def _output(z, c, f_ptr, out_ptr, term_ptr, b, C, full, m_plane, i, w, offs, ok, inv_count, z_lse, inv_total,
            SP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, TERM: tl.constexpr, POOL: tl.constexpr,
            SOFTMAX: tl.constexpr, LOG: tl.constexpr, NUMERATORS: tl.constexpr):
    """Store the classes ``c`` (``[1]`` or ``[BLOCK_C, 1]``) of the tile's logits ``z`` (in base-2 units with the
    softmax; ``NUMERATORS``: ``exp2(z - top)``) as the launch asks: the unary term (``TERM``), the probabilities,
    their logarithms (``LOG``) or the logits, pooled (``POOL``) or at full resolution."""
    c_ok = c < C
    full_offs = b * C * full + c * full + offs
    if TERM:
        term = tl.load(f_ptr + c, mask=c_ok, other=0.0) * ((z - z_lse) * LN2)
        tl.store(term_ptr + full_offs, term.to(term_ptr.dtype.element_ty), mask=c_ok & ok)
    if SOFTMAX:
        if LOG:
            z = (z - z_lse) * LN2
        else:
            z = z * inv_total if NUMERATORS else tl.exp2(_below_top(z - z_lse, BLOCK_C))
    if POOL:
        cells = tl.reshape(tl.where(ok, z, 0.0), (BLOCK_C, SP, BLOCK_J, SP))
        q = tl.sum(tl.sum(cells, axis=3), axis=1) * inv_count  # [BLOCK_C, BLOCK_J]
        j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        q_ok = (tl.reshape(c, (BLOCK_C, 1)) < C) & (j < w)
        out = out_ptr + b * C * m_plane + tl.reshape(c, (BLOCK_C, 1)) * m_plane + i * w + j
        tl.store(out, as_stored(q, out_ptr), mask=q_ok)
    else:
        tl.store(out_ptr + full_offs, z.to(out_ptr.dtype.element_ty), mask=c_ok & ok)


# Whether the blurred mean-field loop uses blur_step (the benchmark's triton-composed rows turn it off).
BLUR_STEP = True


def blur_step_enabled() -> bool:
    """Whether inference at blur > 1 runs its full-resolution passes as one :func:`blur_step` launch."""
    return BLUR_STEP


def _prune(configs, named_args, **kwargs):
    """Tiles of at least one pooled cell (``SP²`` pixels); 16-pixel threads only where they pool (at full resolution
    the softmax's 16 pixels spilled with int64 offsets on sm_80, triton 3.6) and not at blur 2 (their pixels are
    halves of two cells' rows, not whole cells: 53 instructions an element against 55 with 8); the one-pass configs
    (``BLOCK_C = 0``) get every class (``CLASSES = C``) where that keeps at most :data:`ONE_PASS_MAX_VALUES` tile
    values a thread, and are dropped elsewhere; ``CONVCRF_AUTOTUNE=0``: the first, untimed."""
    sp, C = kwargs["SP"], named_args["C"]
    kept = []
    for cfg in configs:
        pixels, per_thread = cfg.kwargs["BLOCK_PIXELS"], cfg.kwargs["BLOCK_PIXELS"] // (32 * cfg.num_warps)
        if pixels < sp * sp or (per_thread > 8 and (sp == 2 or not kwargs["POOL"])):
            continue
        if cfg.kwargs["BLOCK_C"] == 0:
            if C * per_thread > ONE_PASS_MAX_VALUES or not kwargs["SOFTMAX"]:  # without the softmax: one pass anyway
                continue
            cfg = triton.Config({"BLOCK_PIXELS": pixels, "BLOCK_C": 1, "CLASSES": C}, num_warps=cfg.num_warps)
        kept.append(cfg)
    return tuning_off(kept or [triton.Config({"BLOCK_PIXELS": sp * sp, "BLOCK_C": 1}, num_warps=1)])


# Full-resolution pixels per program and warps; the first is the default (CONVCRF_AUTOTUNE=0). 16 pixels a thread
# (first four) or 8. At blur 4 a 16-pixel config's rows are 4 pixels a thread, so each thread holds the 16 pixels of
# one cell: 31 instructions an element over both class loops (sm_90, triton 3.6 and 3.9; 57 for the former
# layout's tuned pick, H100 run 3: 211 µs a call at 1024×2048, C = 21), but 178-234 registers (~11 warps an SM);
# the 8-pixel configs split a cell's rows between warps (50-53 an element, 80-128 registers). Both read u twice:
# unless the second read hits L2, whose ~50 MB the ~60 MB of tiles that ~11 warps an SM read between a tile's two
# passes (C = 21) exceed, the traffic doubles. The one-pass configs (BLOCK_C = 0; C <= 24) hold every class of 4
# pixels a thread: u read once, every class's load in flight at once; 35 instructions an element in all, 140
# registers (on 2 warps a cell's rows span both, and the pooling crosses shared memory: 43 barriers at C = 21;
# on 4, 87: not kept). Untimed: the tuner weighs them.
ONE_PASS_MAX_VALUES = 96
TUNE_CONFIGS = ([triton.Config({"BLOCK_PIXELS": bp, "BLOCK_C": 1}, num_warps=nw)
                 for bp, nw in [(1024, 2), (2048, 4), (512, 1), (4096, 8), (512, 2), (1024, 4), (2048, 8)]]
                + [triton.Config({"BLOCK_PIXELS": bp, "BLOCK_C": 0}, num_warps=nw)
                   for bp, nw in [(128, 1), (256, 2)]])
_blur_step_tuned = triton.autotune(configs=TUNE_CONFIGS,
                                   key=["C", "H", "W", "S", "START", "TERM", "POOL", "SOFTMAX", "LOG"],
                                   prune_configs_by={"early_config_prune": _prune})(_blur_step_kernel)
_blur_step_launch = DirectLaunch(_blur_step_tuned, sizes=("H", "W", "h", "w"))


# Under the interpreter, whose cost is per operation, not per element: one program per pooled row of a
# test image (or 1024 pixels of it), all classes (up to 64) at once; or, where tests set it, one of the GPU's
# configs (as the tuner's pruning makes it for the launch).
INTERPRETER_BLOCK_J = 64
INTERPRETER_PIXELS = 1024
INTERPRETER_MAX_BLOCK_C = 64
INTERPRETER_CONFIG: triton.Config | None = None


def _launch(unary: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor, message: torch.Tensor, out: torch.Tensor,
            term: torch.Tensor | None, blur: int, *, start: bool, pool: bool, softmax: bool, log: bool,
            nonfinite: torch.Tensor | None = None) -> None:
    """One launch. ``factors``: ``[2, C]`` (a; w), at the start ``a`` alone (``TERM``) or unused, like the message
    there and ``lse`` or ``term``: unused pointers are any tensor. ``nonfinite`` (at the start): the flag ``CHECK``
    sets, or None."""
    B, C, H, W = unary.shape
    h, w = -(-H // blur), -(-W // blur)
    sp = next_power_of_2(blur)
    pad_y, pad_x = (h * blur - H + 1) // 2, (w * blur - W + 1) // 2
    args = (unary, lse, factors, message, out, out if term is None else term, out if nonfinite is None else nonfinite,
            C, H, W, h, w, pad_y, pad_x)
    consts = dict(S=blur, SP=sp, START=start, TERM=term is not None, POOL=pool, SOFTMAX=softmax, LOG=log,
                  IDX64=needs_int64(unary, out), CHECK=nonfinite is not None)

    def grid(meta):
        return (cdiv(w, meta["BLOCK_PIXELS"] // (sp * sp)), h, B)

    if interpreting() and INTERPRETER_CONFIG is not None:
        tile = _prune([INTERPRETER_CONFIG], {"C": C}, **consts)[0].kwargs
        _blur_step_kernel[grid(tile)](*args, **tile, **consts, **COMPILE_OPTIONS)
    elif interpreting():
        block_j = max(INTERPRETER_BLOCK_J, INTERPRETER_PIXELS // (sp * sp))
        tile = dict(BLOCK_PIXELS=block_j * sp * sp, BLOCK_C=min(next_power_of_2(C), INTERPRETER_MAX_BLOCK_C))
        _blur_step_kernel[grid(tile)](*args, **tile, **consts, **COMPILE_OPTIONS)
    else:
        _blur_step_launch[grid](*args, **consts, **COMPILE_OPTIONS)


@library_op("convcrf_triton::blur_start", mutates_args=("nonfinite",))
def _blur_start_op(unary: torch.Tensor, blur: int, log: bool, nonfinite: torch.Tensor | None, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = unary.shape
    lse = unary.new_empty((B, 1, H, W), dtype=torch.float32)
    pooled = unary.new_empty((B, C, -(-H // blur), -(-W // blur)), dtype=out_dtype)
    _launch(unary, lse, unary, unary, pooled, None, blur, start=True, pool=True, softmax=True, log=log,
            nonfinite=nonfinite)
    return lse, pooled


@_blur_start_op.op.register_fake
def _(unary, blur, log, nonfinite, out_dtype):
    B, C, H, W = unary.shape
    return (unary.new_empty((B, 1, H, W), dtype=torch.float32),
            unary.new_empty((B, C, -(-H // blur), -(-W // blur)), dtype=out_dtype))


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


@library_op("convcrf_triton::mean_field_start", mutates_args=("nonfinite",))
def _mean_field_start_op(unary: torch.Tensor, a: torch.Tensor, log: bool, nonfinite: torch.Tensor | None,
                         out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    Q, term = torch.empty_like(unary, dtype=out_dtype), torch.empty_like(unary)
    B, C, H, W = unary.shape
    flat = unary.view(B, C, 1, H * W)  # pixels are independent without a message: one row, no ragged row ends
    _launch(flat, Q, a, flat, Q, term, 1, start=True, pool=True, softmax=True, log=log, nonfinite=nonfinite)
    return Q, term


@_mean_field_start_op.op.register_fake
def _(unary, a, log, nonfinite, out_dtype):
    return torch.empty_like(unary, dtype=out_dtype), torch.empty_like(unary)


def _check_unary(unary: torch.Tensor, blur: int | None = None) -> tuple[int, int, int, int]:
    """``unary``'s shape, or a ValueError; ``blur``: the blurred kernels' factor, checked when given."""
    if blur is not None and (not isinstance(blur, int) or blur < 2):
        raise ValueError(f"blur must be an int >= 2, got {blur!r}")
    if unary.dim() != 4:
        raise ValueError(f"unary must be 4-D [B, C, H, W], got shape {tuple(unary.shape)}")
    return tuple(unary.shape)


def blur_start(unary: torch.Tensor, blur: int, *, log: bool = False, nonfinite: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The blurred loop's set-up in one read of the unary logits ``u: [B, C, H, W]``: their per-pixel
    log-sum-exp ``lse = log Σ_c exp(u_c)`` (``[B, 1, H, W]``, float32) and the first iteration's pooled input,
    ``pool(softmax(u))`` (``log=True``: ``pool(log_softmax(u))``, ConvCRF's first pass on the
    log-probabilities), ``[B, C, ceil(H/blur), ceil(W/blur)]`` in ``out_dtype`` (default: that of ``u``; float16
    saturated at ±65504). float32 arithmetic. ``nonfinite``: a one-element float32 tensor set to 1 where a pixel's
    logits do not sum to a finite float32 number (a NaN or an Inf among them, or an overflow), else left as it
    is."""
    check_on_device(unary=unary)
    B, _, H, _ = _check_unary(unary, blur)
    check_grid(batch=B, pooled_rows=-(-H // blur))
    check_flag(nonfinite, unary)
    return _blur_start_op(unary.contiguous(), blur, log, nonfinite, out_dtype or unary.dtype)


def _check_factors(name: str, factors: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(factors.shape) != shape:
        raise ValueError(f"{name} must hold the classes' unary factors (and message weights), shape {shape}, got "
                         f"{tuple(factors.shape)}")


def mean_field_start(unary: torch.Tensor, a: torch.Tensor, *, log: bool = False,
                     nonfinite: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The set-up of the one-launch steps at blur 1 (:func:`~convcrf_triton.kernels.mean_field_step`) in one read
    of the unary logits ``u: [B, C, H, W]``: the first iteration's input ``Q = softmax(u)`` (``log=True``:
    ``log_softmax(u)``) and the loop-invariant unary term ``A = a · log_softmax(u)`` (``a: [C]``, the
    per-class ``unary_weight - w``), both ``[B, C, H, W]``: ``A`` in the dtype of ``u``, ``Q`` in ``out_dtype``
    (default: that of ``u``; float16 saturated at ±65504). float32 arithmetic. ``nonfinite``: as
    :func:`blur_start`'s."""
    check_on_device(unary=unary, a=a)
    B, C, _, _ = _check_unary(unary)
    check_grid(batch=B)  # (the pixels of an image are one row of the grid)
    _check_factors("a", a, (C,))
    check_flag(nonfinite, unary)
    return _mean_field_start_op(unary.contiguous(), a.float().contiguous(), log, nonfinite, out_dtype or unary.dtype)


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
    check_grid(batch=B, pooled_rows=-(-H // blur))
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
