"""Message passing ``M[b, c, p] = sum_t K[b, t, p] * Q[b, c, p + d_t]`` (SPEC §3, kernels 2 and 3).

One kernel body, two ways of getting the tap weight (constexpr ``FUSED``):
- two-pass (``FUSED=False``): read it from the materialised ``K: [B, k*k, h, w]``;
- fused (``FUSED=True``): compute it on the fly from the features ``[B, D, h, w]`` with the same
  ``_tap_weight`` as the merged-kernel kernel, so no k*k-sized tensor exists at all.

Each program owns a tile of ``BLOCK_C`` classes × ``BLOCK_P`` pixels (flattened row-major, so every
neighbour load is a contiguous run) and walks the k×k window by tap rows and columns with run-time loops
(:func:`_window_sum`; unrolling all k² taps explodes compile time and spills for k ≥ 7), accumulating in
float32. A block whose pixels and neighbours all lie inside the image (most blocks of a large image) runs
the loop without a single mask; the others test each neighbour against the image's bounds. The Gaussian
kernel is symmetric (``K[p, d] = K[p + d, -d]``), so the gradient w.r.t. ``Q`` is the message pass of the
output gradient.

With the constexpr ``STEP`` the same kernel ends in a whole mean-field iteration (:func:`mean_field_step`:
compatibility as an in-kernel ``tl.dot``, weighting, unary add and the softmax of the next iteration), one
launch per iteration at blur 1 for inference.

Backward: ``dL/dQ`` is a message pass of ``dL/dM``; the features' and compat weights' gradients come from
one more kernel (:func:`_weight_grad_kernel`) that recomputes the weights. Every launch is a
``torch.library`` custom op with a fake implementation, so ``torch.compile`` captures it whole; where neither
compilation nor autograd needs the op, its function is called without the dispatcher (``LibraryOp``).

Which variant is faster: the two-pass kernel streams ``k*k`` weights per pixel from memory, the fused
one recomputes them (``D`` loads and one or two ``exp`` per tap) once per class block. On an H200 the
two-pass path won except on small grids at large k; :func:`prefer_fused` encodes that measurement, and
picks fused whenever ``K`` would be large (it never allocates k*k memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
    message_dtype,
    needs_int64,
    next_power_of_2,
    tuning_off,
)
from ._math import exp, gaussian
from .merged_kernel import (
    K_DTYPES,
    _inside,
    _load_compats,
    _own_features,
    _pixel_block,
    _tap_weight,
    feature_meta,
)

# prefer_fused's thresholds (measured, see there): fused for k >= 15 on grids of at most 128² pixels, and
# whenever the materialised K would take more than 2 GiB.
FUSED_MIN_FILTER_SIZE = 15
FUSED_MAX_PIXELS = 128 * 128
FUSED_ABOVE_K_BYTES = 2 << 30
# Taps of an interior row the two-pass loops unroll together (whole rows at k >= 11 took up to 168 registers).
TWO_PASS_ROW_CHUNK = tl.constexpr(8)
# The fused pass's border blocks (all of a 128-wide grid's at k >= 11) walk the window unmasked, each tap's
# weights outside the image zeroed by a select (EDGE), up to k = 21 in the tiles of 8 classes whose threads hold
# 4 pixels (BLOCK_P <= 16 * BLOCK_C, at _prune's 16 elements a thread: 8 × 128), 64-128 registers (sm_90, triton
# 3.6 and 3.9). With it, the other tiles took 200-255 registers (32 classes, from k = 15) or spilled (8 × 256,
# 8 pixels a thread each with its own features: k = 31, and k = 3 with triton 3.6; 16 × 128: k = 7 with 3.6).
FUSED_EDGE_MAX_BLOCK_C = tl.constexpr(8)
FUSED_EDGE_MAX_FILTER_SIZE = tl.constexpr(21)


@triton.jit
def _class_offsets(b, cls, C, plane, CS: tl.constexpr):
    """Offsets of image ``b`` (a scalar) and of its classes ``cls`` (``[BLOCK_C, 1]``; add
    :func:`_pixel_offsets`), and the load mask over classes: planar ``[B, C, h, w]``, or channels-last
    ``[B, h, w, CS]`` (CS > 0), whose mask is constant over 4 classes (the padding is zero) so that loads and
    stores are 16 bytes wide. The scalar is kept apart so that it is added to the base pointer first (one
    64-bit add, not a 64-bit offset per element)."""
    if CS > 0:
        return b * plane * CS, cls[:, None], (cls < CS)[:, None]
    return b * C * plane, cls[:, None] * plane, (cls < C)[:, None]


@triton.jit
def _pixel_offsets(pix, CS: tl.constexpr):
    """``[1, BLOCK_P]`` offsets of pixels ``pix`` in the layout of :func:`_class_offsets`."""
    if CS > 0:
        return pix[None, :] * CS
    return pix[None, :]


@triton.jit
def _step_epilogue(acc, cls, C, cm_ptr, w_ptr, a_ptr, offs, mask, W_STRIDE: tl.constexpr, HAS_COMPAT: tl.constexpr,
                   SOFTMAX: tl.constexpr, CLASS_AXIS: tl.constexpr):
    """The mean-field step after the message ``acc`` (every class of its pixels, classes ``cls`` on axis
    ``CLASS_AXIS`` of the 2-D tile; ``offs``/``mask`` address the tile in ``A``), shared by the direct and the
    band kernels::

        M' = M + compat @ M (HAS_COMPAT, a tl.dot over the class block)
        Z  = A + w * M'     (A = (u - w) L, precomputed; w per class, or one: W_STRIDE = 0)
        out = softmax_c(Z) if SOFTMAX else Z
    """
    c_ok = cls < C
    if HAS_COMPAT:
        if CLASS_AXIS == 0:  # acc[c, p] += sum_d compat[c, d] acc[d, p]
            mix = tl.load(cm_ptr + cls[:, None] * C + cls[None, :], mask=c_ok[:, None] & c_ok[None, :], other=0.0)
            acc += tl.dot(mix.to(tl.float32), acc, input_precision="ieee")
        else:  # acc[p, c] += sum_d acc[p, d] compat[c, d]
            mix = tl.load(cm_ptr + cls[None, :] * C + cls[:, None], mask=c_ok[None, :] & c_ok[:, None], other=0.0)
            acc += tl.dot(acc, mix.to(tl.float32), input_precision="ieee")
    w_c = tl.load(w_ptr + cls * W_STRIDE, mask=c_ok, other=0.0).to(tl.float32)
    acc = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.expand_dims(w_c, 1 - CLASS_AXIS) * acc
    if SOFTMAX:
        z = tl.where(tl.expand_dims(c_ok, 1 - CLASS_AXIS), acc, float("-inf"))
        e = exp(z - tl.expand_dims(tl.max(z, axis=CLASS_AXIS), CLASS_AXIS))
        acc = e * tl.expand_dims(1.0 / tl.sum(e, axis=CLASS_AXIS), CLASS_AXIS)  # a division a pixel, not a class
    return acc


@triton.jit
def _tap_weights(k_row, f_ptr, own, c1, c2, nb, valid, tap_ok, plane, rows0, t,
                 KSIZE: tl.constexpr, FUSED: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 KEEP_CENTRE: tl.constexpr, CS: tl.constexpr):
    """Tap ``t``'s weights of this block's pixels, in a shape that broadcasts over the class rows: computed from
    the features (``FUSED``: ``own``, the pixels' own) or read from ``K`` (``[k*k, h, w]`` at ``k_row``)."""
    if FUSED:
        weight = _tap_weight(f_ptr, own, nb, valid, plane, c1, c2, D1, D2)
        if not KEEP_CENTRE:
            weight = tl.where(t == KSIZE * KSIZE // 2, 0.0, weight)
        weight = weight[None, :]
    elif CS > 0:
        weight = tl.load(k_row + t * plane, mask=valid, other=0.0)[None, :]  # a thread's pixels: strided
    else:
        # Planar: loaded in the tile's own shape (each thread its run of pixels' weights, the same address
        # for every class row it holds: one load). As a [BLOCK_P] vector it takes a layout of its own and a
        # trip through shared memory, two barriers, at every tap.
        weight = tl.load(k_row[None, :] + t * plane + rows0, mask=tap_ok[None, :], other=0.0)
    return weight.to(tl.float32)


@triton.jit
def _reads_in_tensor(before, rest, p0, plane, reach, BLOCK_P: tl.constexpr):
    """Whether flat pixels ``p0 - reach .. p0 + BLOCK_P + reach - 1`` of a tensor's planes lie in it (an unmasked
    read there is safe): ``before`` planes of ``plane`` pixels precede the first plane read, ``rest`` run from the
    last plane read to the tensor's end."""
    return (before * plane + p0 >= reach) & (p0 + BLOCK_P + reach <= rest * plane)


@triton.jit
def _split4(x):
    """``x: [N, 4]`` float32 (a thread's runs of 4 consecutive pixels, in its registers) as 4 vectors ``[N]``,
    one per pixel of the run: each the sum over the run of its bits where the index matches
    and 0 elsewhere. The selects have constant conditions in every register and integer ``v + 0`` folds, so it
    compiles to nothing. (``tl.split`` of a reshape took triton 3.6 to 4-byte loads; float sums with -0.0 left
    it an ``FADD`` from +0.0 per value.)"""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.arange(0, 4)[None, :]
    parts = ()
    for i in tl.static_range(4):
        parts = parts + (tl.sum(tl.where(e == i, bits, 0), axis=1).to(tl.float32, bitcast=True),)
    return parts


@triton.constexpr_function
def _chunk(dx):
    """The aligned 4-pixel chunk, relative to a run's own, that holds the pixel ``dx`` from the run's start."""
    return dx // 4


@triton.jit
def _interior_rows(q_img, cls0, C, k_img, p0, h, w, plane, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   KSIZE: tl.constexpr, EDGE: tl.constexpr):
    """The two-pass window sum of a block without masks, planar: ``[BLOCK_C, BLOCK_P]``. ``EDGE=False``: an
    interior block, every neighbour in the image. ``EDGE=True``: a block whose window may leave the image but
    whose reads all lie in ``Q`` (the caller's test): each loaded value outside the image (a row above or below
    it, or a column past either side, read from wherever the flat index falls) is replaced by zero, one select,
    so that the taps there add nothing whatever ``K`` holds, as the masked loop's zero fill does.

    The tile is held as ``[N, 4]``, ``N = BLOCK_C * BLOCK_P // 4`` rows of 4 consecutive pixels, row
    ``c * BLOCK_P // 4 + r`` the run ``r`` of class ``c``: the only dimension with contiguous addresses is the
    last, so every triton version lays consecutive runs of a class on a warp's consecutive lanes (each load
    instruction 512 contiguous bytes of 2 class rows, and a thread's class rows share their weights' loads).
    As ``[BLOCK_C, BLOCK_P // 4, 4]`` triton 3.6 broke the tie between the first two dimensions toward the
    classes: 32 class rows a warp, each load 32 cache lines for 16 bytes of each, and 4 weight loads a tap.

    A tap row's neighbours of a run, shifted by ``dx = -R .. R``, lie in the aligned 4-pixel chunks
    ``floor(dx / 4)`` to ``floor((dx + 3) / 4)`` of the same row: each is one 16-byte load (``ALIGNED``: the
    launcher's :func:`_aligned`), split into its 4 values, and every tap of the row (``ROW_CHUNK`` at a time, as
    in :func:`_window_sum`) picks its 4 operands among them by a constant index. k = 7: 3 loads of 16 bytes for
    a class row's 28 multiply-adds, where 4-byte loads of shifted runs took 10, each touching 4-5 sectors a warp
    (lanes 16 bytes apart) for 128 useful bytes.
    ``cls0``: the block's first class (rows past ``C`` read class ``C - 1``; never stored)."""
    R: tl.constexpr = KSIZE // 2
    ROW_CHUNK: tl.constexpr = TWO_PASS_ROW_CHUNK
    BQ: tl.constexpr = BLOCK_P // 4
    N: tl.constexpr = BLOCK_C * BQ
    run = tl.arange(0, N) % BQ
    lanes = (run * 4)[:, None] + tl.arange(0, 4)[None, :]
    cls = tl.minimum(cls0 + tl.arange(0, N) // BQ, C - 1)
    q_tile = (q_img + p0) + (cls * plane)[:, None] + lanes
    k_tile = (k_img + p0) + lanes
    if EDGE:  # each run's row and first column (a run of 4 lies in one row: w % 4 == 0)
        y_run = (p0 + run * 4) // w
        x_run = (p0 + run * 4) % w
    a0 = tl.zeros([N], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for i in range(KSIZE):
        q_row = q_tile + (i - R) * w
        k_row = k_tile + (i * KSIZE) * plane
        if EDGE:
            row_ok = _inside(y_run + (i - R), h)
        for j0 in tl.static_range(0, KSIZE, ROW_CHUNK):
            # The n = min(ROW_CHUNK, KSIZE - j0) taps from j0: the chunks from that of the first tap's first
            # pixel (dx = j0 - R) to that of the last tap's last (dx = j0 + n - 1 - R, plus 3).
            v = ()
            for m in tl.static_range(_chunk(j0 - R), _chunk(j0 + min(ROW_CHUNK, KSIZE - j0) + 2 - R) + 1):
                values = _split4(tl.load(q_row + 4 * m).to(tl.float32))
                if EDGE:  # value e of chunk m: column x_run + 4 m + e
                    for e in tl.static_range(4):
                        v = v + (tl.where(row_ok & _inside(x_run + (4 * m + e), w), values[e], 0.0),)
                else:
                    v = v + values
            for u in tl.static_range(min(ROW_CHUNK, KSIZE - j0)):
                # pixel e of a run at tap j0 + u: v[s + e], s its shift from the first chunk's first pixel
                k0, k1, k2, k3 = _split4(tl.load(k_row).to(tl.float32))
                k_row += plane  # the next tap's weights: one 64-bit add
                a0 += k0 * v[j0 + u - R - 4 * _chunk(j0 - R)]
                a1 += k1 * v[j0 + u - R - 4 * _chunk(j0 - R) + 1]
                a2 += k2 * v[j0 + u - R - 4 * _chunk(j0 - R) + 2]
                a3 += k3 * v[j0 + u - R - 4 * _chunk(j0 - R) + 3]
    e = tl.arange(0, 4)[None, :]
    runs = tl.where(e == 0, a0[:, None], tl.where(e == 1, a1[:, None], tl.where(e == 2, a2[:, None], a3[:, None])))
    return tl.reshape(runs, [BLOCK_C, BLOCK_P])


@triton.jit
def _window_sum(acc, q_rows, q_mask, k_img, f_ptr, c1, c2, p0, offs, in_img, y, x, h, w, plane,
                KSIZE: tl.constexpr, FUSED: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                KEEP_CENTRE: tl.constexpr, UNROLL: tl.constexpr, CS: tl.constexpr, BORDER: tl.constexpr,
                EDGE: tl.constexpr = False):
    """``acc[c, p] += sum_t weight[t, p] * Q[c, p + d_t]`` over the k×k window of the pixels ``offs``.

    The window is walked a tap row at a time. ``BORDER=False``: the caller has checked that every pixel and
    every neighbour lies inside the image, so no load is masked (no predicates, no zero fills). In the planar
    layout the taps of a row are then unrolled, ``ROW_CHUNK`` at a time (aligned two-pass blocks take
    :func:`_interior_rows` instead, the kernel's choice): the neighbours are addressed by constant offsets
    from one pointer a chunk: the taps read overlapping runs of a thread's
    consecutive pixels, and the compiler loads each value once for all of them (k = 7, 4 pixels a thread: 10
    4-byte loads for a class row's 28 multiply-adds) with no address arithmetic. (Whole rows at k >= 11 took up to 168
    registers; the fused pass, which computes each tap's weights, unrolls 4: with 8, k = 31 spilled. The
    channels-last step, whose thread holds one pixel's classes, reuses nothing that way and went from 127 to
    168-255 registers, spilling with triton 3.6: it keeps the loop below.)
    ``EDGE`` (``BORDER=False``; the two-pass message pass at widths that are not multiples of 4, and the fused
    pass in the tiles of ``FUSED_EDGE_MAX_BLOCK_C``): the pixels lie in the image but their window may not; every
    read lies in ``Q`` and in the features (the caller's test), and each neighbour outside the image is zeroed by
    a select: its value in the two-pass pass (``K`` there may be anything), its weight in the fused one (one
    select a pixel, not one a class; a NaN or Inf in ``Q`` outside the window, which validated inputs never
    hold, would then reach the sum). (Not in the step, which spilled.)
    Otherwise ``UNROLL`` taps at a time (the last group masked), so that ``UNROLL`` independent neighbour
    loads are in flight before the first multiply-add; with ``BORDER=True`` a neighbour is valid when
    ``0 <= y + dy < h`` and ``0 <= x + dx < w``, two unsigned compares (:func:`_pixel_block` has moved the
    rows ``y`` of pixels past the image far below it, so that nothing else, in particular no per-pixel state
    carried across taps, is needed).
    """
    R: tl.constexpr = KSIZE // 2
    ROW_CHUNK: tl.constexpr = 4 if FUSED else TWO_PASS_ROW_CHUNK  # taps unrolled together in a planar interior row
    rows0 = tl.zeros(q_mask.shape, tl.int32)
    every = tl.full(offs.shape, True, tl.int1)
    pix_ok = in_img if BORDER else every
    own = ()
    if FUSED:
        own = _own_features(f_ptr, offs, pix_ok, plane, D1 + D2)
    k_row = k_img + offs
    if not BORDER and CS == 0:
        # The block's first pixel added to the row pointers first, then each thread's small lane offsets: the
        # compiler then sees a thread's neighbours as constant offsets from one address.
        q_tile = (q_rows + p0) + tl.arange(0, offs.shape[0])[None, :]
        for i in range(KSIZE):
            if EDGE:
                row_ok = _inside(y + (i - R), h)
            for j0 in tl.static_range(0, KSIZE, ROW_CHUNK):
                q_row = q_tile + ((i - R) * w + (j0 - R))  # tap (i, j0)'s neighbours
                for u in tl.static_range(min(ROW_CHUNK, KSIZE - j0)):
                    j = j0 + u
                    weight = _tap_weights(k_row, f_ptr, own, c1, c2, offs + ((i - R) * w + (j - R)), every, every,
                                          plane, rows0, i * KSIZE + j, KSIZE, FUSED, D1, D2, KEEP_CENTRE, CS)
                    q = tl.load(q_row + u).to(tl.float32)
                    if EDGE and FUSED:  # a neighbour outside the image: its weight zero (one select a pixel)
                        weight = tl.where((row_ok & _inside(x + (j - R), w))[None, :], weight, 0.0)
                    elif EDGE:  # a neighbour outside the image: zero, as the masked loop's zero fill
                        q = tl.where((row_ok & _inside(x + (j - R), w))[None, :], q, 0.0)
                    acc += weight * q
        return acc
    for i in range(KSIZE):
        for j0 in range(0, KSIZE, UNROLL):
            for u in tl.static_range(UNROLL):
                j = j0 + u
                if BORDER:
                    valid = _inside(y + (i - R), h) & _inside(x + (j - R), w)
                else:
                    valid = every
                tap_ok = pix_ok  # the planar weights' mask: constant over a thread's run of pixels (16-byte loads)
                if KSIZE % UNROLL != 0:
                    in_window = tl.zeros_like(offs) + j < KSIZE  # a tensor mask (interpreter)
                    valid = valid & in_window
                    tap_ok = tap_ok & in_window
                nb = offs + ((i - R) * w + (j - R))
                weight = _tap_weights(k_row, f_ptr, own, c1, c2, nb, valid, tap_ok, plane, rows0,
                                      i * KSIZE + j, KSIZE, FUSED, D1, D2, KEEP_CENTRE, CS)
                q = tl.load(q_rows + _pixel_offsets(nb, CS), mask=q_mask & valid[None, :], other=0.0)
                acc += weight * q.to(tl.float32)
    return acc


@triton.jit
def _message_pass_kernel(
    q_ptr, k_ptr, f_ptr, compat_ptr, m_ptr, a_ptr, w_ptr, cm_ptr, C, h, w,
    KSIZE: tl.constexpr, FUSED: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KEEP_CENTRE: tl.constexpr,
    STEP: tl.constexpr, W_STRIDE: tl.constexpr, HAS_COMPAT: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr, UNROLL: tl.constexpr = 1,
    CS: tl.constexpr = 0, ALIGNED: tl.constexpr = 0,
):
    # grid: (cdiv(h*w, BLOCK_P), cdiv(C, BLOCK_C), B); the window sum is _window_sum's.
    # Q, M (and A) are [B, C, h, w], or with CS > 0 channels-last [B, h, w, CS]: the classes of a pixel
    # contiguous and zero-padded to CS (a multiple of 4), so that a thread reads 4 classes of a neighbour
    # with one 16-byte load instead of 4 (the padding is loaded, computed and stored as zeros).
    # With STEP, the epilogue is a whole mean-field step (_step_epilogue; one program holds every class of its
    # pixels: BLOCK_C >= C).
    if ALIGNED == 4:  # w % 4 == 0 (_aligned), stated so that the compiler knows every row is 16 bytes aligned
        w = (w // 4) * 4
    b, plane, offs, in_img, y, x = _pixel_block(tl.program_id(2), h, w, BLOCK_P, IDX64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    img_off, cls_off, io_mask = _class_offsets(b, cls, C, plane, CS)
    # The neighbour loads' rows: planar rows past C read class C - 1 instead of being masked (their sums are
    # never stored, and no per-element class predicate joins the pixel's in the loop).
    if CS > 0:
        q_rows, q_mask = q_ptr + img_off + cls_off, io_mask
    else:
        q_rows = q_ptr + img_off + tl.minimum(cls, C - 1)[:, None] * plane
        q_mask = tl.full(io_mask.shape, True, tl.int1)
    k_img = k_ptr + b * (KSIZE * KSIZE) * plane  # the two-pass weights (FUSED: k_ptr is a dummy)
    f_ptr += b * (D1 + D2) * plane  # the fused pass's features (two-pass: a dummy)
    c1, c2 = 0.0, 0.0
    if FUSED:
        c1, c2 = _load_compats(compat_ptr, D2)
    # A block whose every pixel and neighbour lies inside the image (one image row, R columns and rows
    # from the edges: most blocks of a large image) walks the window without a single mask.
    p0 = tl.program_id(0) * BLOCK_P
    x0 = p0 % w
    interior = (x0 >= KSIZE // 2) & (x0 + BLOCK_P + KSIZE // 2 <= w)
    interior = interior & (p0 >= (KSIZE // 2) * w) & (p0 + (KSIZE // 2 + 1) * w <= plane)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    ROWS: tl.constexpr = ALIGNED > 0 and CS == 0 and not FUSED  # aligned 16-byte chunks, split in registers
    EDGE: tl.constexpr = CS == 0 and (not FUSED or (BLOCK_C <= FUSED_EDGE_MAX_BLOCK_C and BLOCK_P <= 16 * BLOCK_C
                                                    and KSIZE <= FUSED_EDGE_MAX_FILTER_SIZE and not STEP))
    if EDGE:
        # A planar border block whose pixels lie in the image and whose reads (up to R rows and R + 3 columns
        # away) all lie in Q (every block but those near the batch's two ends), and in the features when fused,
        # takes an unmasked loop too, the two-pass pass's 16-byte chunks or the 4-byte one, each neighbour
        # outside the image zeroed by a select (EDGE).
        cls0 = tl.program_id(1) * BLOCK_C
        reach = (KSIZE // 2) * (w + 1) + 3
        in_q = (p0 + BLOCK_P <= plane) & _reads_in_tensor(
            b * C + cls0, tl.num_programs(2) * C - b * C - tl.minimum(cls0 + BLOCK_C, C) + 1, p0, plane, reach, BLOCK_P)
        if FUSED:
            D: tl.constexpr = D1 + D2
            in_q = in_q & _reads_in_tensor(b * D, tl.num_programs(2) * D - b * D - D + 1, p0, plane, reach, BLOCK_P)
    if ROWS and interior:
        acc = _interior_rows(q_ptr + img_off, cls0, C, k_img, p0, h, w, plane, BLOCK_C, BLOCK_P, KSIZE, False)
    elif ROWS and in_q:
        acc = _interior_rows(q_ptr + img_off, cls0, C, k_img, p0, h, w, plane, BLOCK_C, BLOCK_P, KSIZE, True)
    elif interior:
        acc = _window_sum(acc, q_rows, q_mask, k_img, f_ptr, c1, c2, p0, offs, in_img, y, x, h, w, plane,
                          KSIZE, FUSED, D1, D2, KEEP_CENTRE, UNROLL, CS, False)
    elif EDGE and not ROWS and not STEP and in_q:  # (the unaligned step spilled with it)
        acc = _window_sum(acc, q_rows, q_mask, k_img, f_ptr, c1, c2, p0, offs, in_img, y, x, h, w, plane,
                          KSIZE, FUSED, D1, D2, KEEP_CENTRE, UNROLL, CS, False, True)
    else:
        acc = _window_sum(acc, q_rows, q_mask, k_img, f_ptr, c1, c2, p0, offs, in_img, y, x, h, w, plane,
                          KSIZE, FUSED, D1, D2, KEEP_CENTRE, UNROLL, CS, True)
    out_offs = img_off + cls_off + _pixel_offsets(offs, CS)
    out_mask = io_mask & in_img[None, :]
    if STEP:
        acc = _step_epilogue(acc, cls, C, cm_ptr, w_ptr, a_ptr, out_offs, out_mask, W_STRIDE, HAS_COMPAT, SOFTMAX, 0)
    tl.store(m_ptr + out_offs, acc.to(m_ptr.dtype.element_ty), mask=out_mask)


@triton.constexpr_function
def _equal_chunk(n, most):
    """The size of the fewest equal chunks of at most ``most`` that cover ``n`` (the last may run past it); a
    constexpr function, so that kernels and launchers share it."""
    return -(-n // -(-n // most))


@triton.constexpr_function
def weight_grad_taps(k, masked):
    """Taps of a row the weight-gradient kernel takes at a time, unrolled: the row in the fewest equal chunks of
    at most 8 (4 masked) (k = 7: 7; 11: 6 + 6, the last past the row by one)."""
    return _equal_chunk(k, 4 if masked else 8)


@triton.jit
def _tap_valid(row_ok, x, w, i, j, lane, KSIZE: tl.constexpr, KEEP_CENTRE: tl.constexpr, N: tl.constexpr):
    """Whether tap ``(i, j)`` of the pixels (columns ``x``, their tap row's test ``row_ok``; ``N`` taps a chunk)
    lies in the window and the image (and, without ``KEEP_CENTRE``, is not the centre)."""
    ok = row_ok & _inside(x + (j - KSIZE // 2), w)
    if KSIZE % N != 0:  # a row's last chunk of N taps runs past it
        ok = ok & (tl.zeros_like(lane) + j < KSIZE)
    if not KEEP_CENTRE:
        ok = ok & (tl.zeros_like(lane) + i * KSIZE + j != KSIZE * KSIZE // 2)  # a tensor mask (interpreter)
    return ok


@triton.jit
def _weight_grad_window(q_img, g_img, f_img, own, C, p0, offs, in_img, y, x, h, w, plane, KSIZE: tl.constexpr,
                        D1: tl.constexpr, D2: tl.constexpr, KEEP_CENTRE: tl.constexpr, BLOCK_C: tl.constexpr,
                        CLASS_TAIL: tl.constexpr, BLOCK_P: tl.constexpr, MASKED: tl.constexpr):
    """The window loop of :func:`_weight_grad_kernel`: ``(sum_t e_g A diff_g per feature channel, sum_t e_1 A,
    sum_t e_2 A)``, each ``[BLOCK_P]``.

    The window is walked by tap rows, ``n`` taps of a row at a time (:func:`weight_grad_taps`; the last
    chunk of a row may run past it, its extra taps dropped like those outside the image). For those taps ``A``
    sums over the classes, ``BLOCK_C`` at a time (a static loop: a class's neighbours are constant offsets from
    one pointer, which a thread's run of pixels shares between taps), then the Gaussians and the gradients
    take each tap once, whatever ``C``. Unmasked (``MASKED=False``: the caller has checked that every address
    read lies in the tensors), a neighbour outside the image is read from wherever its flat index falls, and
    its tap is dropped by a select on ``A`` and on the neighbour's features; masked, it is not read at all."""
    R: tl.constexpr = KSIZE // 2
    n: tl.constexpr = weight_grad_taps(KSIZE, MASKED)
    lane = tl.arange(0, BLOCK_P)
    zero = tl.zeros([BLOCK_P], tl.float32)
    sum1 = zero
    sum2 = zero
    grad = ()
    for _d in tl.static_range(D1 + D2):
        grad = grad + (zero,)
    for i in range(KSIZE):
        row_ok = _inside(y + (i - R), h)
        for j0 in range(0, KSIZE, n):
            first = p0 + (i - R) * w + (j0 - R)  # the block's first pixel's neighbour at tap (i, j0)
            valid = ()
            a = ()
            for u in tl.static_range(n):
                if MASKED:
                    valid = valid + (_tap_valid(row_ok, x, w, i, j0 + u, lane, KSIZE, KEEP_CENTRE, n),)
                a = a + (zero,)
            for c0 in range(0, C, BLOCK_C):
                for v in tl.static_range(BLOCK_C):
                    if CLASS_TAIL:  # classes past C: their own values zero, their neighbours class C - 1's
                        cls_off = tl.minimum(c0 + v, C - 1) * plane
                        own_ok = in_img & (tl.zeros_like(lane) + (c0 + v) < C)  # a tensor mask (interpreter)
                    else:
                        cls_off = (c0 + v) * plane
                        own_ok = in_img
                    if MASKED or CLASS_TAIL:
                        q_own = tl.load(q_img + cls_off + offs, mask=own_ok, other=0.0).to(tl.float32)
                        g_own = tl.load(g_img + cls_off + offs, mask=own_ok, other=0.0).to(tl.float32)
                    else:  # pixels past the image read what lies there (their taps are dropped)
                        q_own = tl.load(q_img + cls_off + offs).to(tl.float32)
                        g_own = tl.load(g_img + cls_off + offs).to(tl.float32)
                    q_nb = (q_img + cls_off + first) + lane
                    g_nb = (g_img + cls_off + first) + lane
                    a_next = ()
                    for u in tl.static_range(n):
                        if MASKED:
                            q = tl.load(q_nb + u, mask=valid[u], other=0.0).to(tl.float32)
                            g = tl.load(g_nb + u, mask=valid[u], other=0.0).to(tl.float32)
                        else:
                            q = tl.load(q_nb + u).to(tl.float32)
                            g = tl.load(g_nb + u).to(tl.float32)
                        a_next = a_next + (a[u] + g_own * q + q_own * g,)
                    a = a_next
            for u in tl.static_range(n):
                if MASKED:
                    ok = valid[u]
                else:
                    ok = _tap_valid(row_ok, x, w, i, j0 + u, lane, KSIZE, KEEP_CENTRE, n)
                a_u = tl.where(ok, a[u], 0.0)
                sq1 = zero
                sq2 = zero
                diffs = ()
                for d in tl.static_range(D1 + D2):
                    f_nb = (f_img + d * plane + first) + lane + u
                    if MASKED:
                        diff = own[d] - tl.load(f_nb, mask=ok, other=0.0).to(tl.float32)
                    else:
                        diff = own[d] - tl.where(ok, tl.load(f_nb).to(tl.float32), own[d])
                    diffs = diffs + (diff,)
                    if d < D1:
                        sq1 += diff * diff
                    else:
                        sq2 += diff * diff
                s1 = gaussian(sq1) * a_u
                sum1 += s1
                s2 = zero
                if D2 > 0:
                    s2 = gaussian(sq2) * a_u
                    sum2 += s2
                grad_next = ()
                for d in tl.static_range(D1 + D2):
                    grad_next = grad_next + (grad[d] + (s1 if d < D1 else s2) * diffs[d],)
                grad = grad_next
    return grad, sum1, sum2


@triton.jit
def _weight_grad_kernel(
    q_ptr, g_ptr, f_ptr, compat_ptr, gf_ptr, gc_ptr, C, h, w,
    KSIZE: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KEEP_CENTRE: tl.constexpr,
    BLOCK_C: tl.constexpr, CLASS_TAIL: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr,
):
    # Gradient of L(M) w.r.t. the features and compat weights of the fused pass, from G = dL/dM.
    # With e_g[p, t] = exp(-1/2 |f_g[p] - f_g[p + d_t]|^2), symmetric in (p, p + d_t), and
    #     A[p, t] = sum_c G[c, p] Q[c, p + d_t] + Q[c, p] G[c, p + d_t]
    # (p as the centre and as the neighbour of the mirrored tap):
    #     dL/df_g[p] = -c_g sum_t e_g[p, t] A[p, t] (f_g[p] - f_g[p + d_t])
    #     dL/dc_g    = 1/2 sum_{p, t} e_g[p, t] A[p, t]
    # The weights are recomputed, never stored. grid: (cdiv(h*w, BLOCK_P), B); each program writes its
    # pixels' feature gradients and its partial compat sums (reduced on the host: deterministic). Every value
    # is a [BLOCK_P] vector of the program's pixels in one layout: nothing crosses threads before the partial
    # sums. A program reads its window unmasked unless a read would leave Q, G or the features (the first and
    # last R rows and R pixels of the batch).
    b, plane, offs, in_img, y, x = _pixel_block(tl.program_id(1), h, w, BLOCK_P, IDX64)
    D: tl.constexpr = D1 + D2
    p0 = tl.program_id(0) * BLOCK_P
    f_img = f_ptr + b * D * plane
    q_img = q_ptr + b * C * plane
    g_img = g_ptr + b * C * plane
    c1, c2 = _load_compats(compat_ptr, D2)
    own = _own_features(f_img, offs, in_img, plane, D)
    # the farthest neighbour's flat distance (a row's last chunk of taps may run past the window)
    reach = (KSIZE // 2) * (w + 1) + (-KSIZE) % weight_grad_taps(KSIZE, False)
    # Q and G hold C planes an image, the features D: the test over min(C, D) planes an image implies both (the
    # two tests apart took sm_90 to 168 registers and a spill at k = 31)
    planes = tl.minimum(C, D)
    inside = _reads_in_tensor(b * planes, (tl.num_programs(1) - 1 - b) * planes + 1, p0, plane, reach, BLOCK_P)
    if inside:
        grad, sum1, sum2 = _weight_grad_window(q_img, g_img, f_img, own, C, p0, offs, in_img, y, x, h, w, plane,
                                               KSIZE, D1, D2, KEEP_CENTRE, BLOCK_C, CLASS_TAIL, BLOCK_P, False)
    else:
        grad, sum1, sum2 = _weight_grad_window(q_img, g_img, f_img, own, C, p0, offs, in_img, y, x, h, w, plane,
                                               KSIZE, D1, D2, KEEP_CENTRE, BLOCK_C, CLASS_TAIL, BLOCK_P, True)
    out = gf_ptr + b * D * plane + offs
    for d in tl.static_range(D):
        tl.store(out + d * plane, -(c1 if d < D1 else c2) * grad[d], mask=in_img)
    partial = gc_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 2
    tl.store(partial, 0.5 * tl.sum(sum1, axis=0))
    tl.store(partial + 1, 0.5 * tl.sum(sum2, axis=0))


def _prune(configs, named_args, **kwargs):
    """Drop class blocks far wider than C, and tiles over 16 elements per thread: each element of the
    ``[BLOCK_C, BLOCK_P]`` tile costs ~7 registers (accumulator, loaded value, 64-bit address, predicate),
    so 16 per thread is ~120 registers (measured for sm_80/sm_90), 32 per thread ~235. The 8-warp tiles only up
    to ``EIGHT_WARPS_MAX_FILTER_SIZE``: beyond it they spilled (sm_90, capped at 128 registers; triton 3.9: the
    two-pass 32 × 128 at k = 15, 16 × 256 at k = 21, the fused 16 × 256 at k = 31; triton 3.6: the two-pass
    16 × 256 at k = 11 and 21), where no 4-warp tile did."""
    c_block = max(8, next_power_of_2(named_args["C"]))
    kept = [
        cfg for cfg in configs
        if cfg.kwargs["BLOCK_C"] <= c_block and cfg.kwargs["BLOCK_C"] * cfg.kwargs["BLOCK_P"] <= 16 * 32 * cfg.num_warps
        and (cfg.num_warps < 8 or kwargs["KSIZE"] <= EIGHT_WARPS_MAX_FILTER_SIZE)
    ]
    return tuning_off(kept or configs[:1])


EIGHT_WARPS_MAX_FILTER_SIZE = 7


# Tile shapes and tap unroll factors for the GPU; the first is the default (one class block for C <= 32,
# ~120 registers). Registers measured for sm_90 at k = 7 (AOT, no spills anywhere): 8x128 U1 32, U4 62;
# 8x256 U2 80; 16x128 U2 96; 32x64 U1 120. The H200 run of 2026-11-26 picked 8x128 / 8x256 (U1, the only
# factor then) for nearly every key: narrow class blocks, more resident warps. 32 pixels on 2 warps (untimed):
# on the narrow grids of blur > 1 (128 wide at 512², blur 4) a block takes the interior loop only if it lies R
# pixels from both edges, which no 64-pixel block of a 128-wide row does, and two 32-pixel ones do (widths that
# are multiples of 4 now run their other blocks in the chunked loop too, with selects: EDGE).
TUNE_CONFIGS = [
    triton.Config({"BLOCK_C": bc, "BLOCK_P": bp, "UNROLL": u}, num_warps=nw)
    for bc, bp, nw, u in [
        (32, 64, 4, 1), (8, 128, 4, 1), (8, 128, 4, 4), (8, 256, 4, 1), (8, 256, 4, 2), (16, 128, 4, 2),
        (16, 256, 8, 2), (32, 128, 8, 1), (32, 32, 2, 1),
    ]
]
DEFAULT_CONFIG = TUNE_CONFIGS[0]
# The weight-gradient kernel on the GPU: pixels a program (4 warps, two consecutive pixels a thread: four spilled),
# and the most classes its static class loop takes at a time.
WEIGHT_GRAD_BLOCK_P = 256
WEIGHT_GRAD_MAX_CLASSES = 8
# Tap unroll factor under the interpreter (tests set it to exercise the masked last group).
INTERPRETER_UNROLL = 1

_message_pass_tuned = triton.autotune(
    configs=TUNE_CONFIGS, key=["KSIZE", "FUSED", "C", "h", "w"], prune_configs_by={"early_config_prune": _prune}
)(_message_pass_kernel)


def _prune_step(configs, named_args, **kwargs):
    """The mean-field step's tile is fixed by :func:`step_blocks`; only its warps' count must match it."""
    args = {**named_args, **kwargs}
    num_warps = step_blocks(args["C"], args["HAS_COMPAT"])[2]
    return tuning_off([cfg for cfg in configs if cfg.num_warps == num_warps] or configs[:1])


# The mean-field step tunes the tap unroll factor only (its tile holds every class, see step_blocks).
STEP_CONFIGS = [triton.Config({"UNROLL": u}, num_warps=nw) for nw in (4, 8) for u in (1, 2)]
_mean_field_step_tuned = triton.autotune(
    configs=STEP_CONFIGS, key=["KSIZE", "FUSED", "C", "h", "w", "HAS_COMPAT", "CS"],
    prune_configs_by={"early_config_prune": _prune_step},
)(_message_pass_kernel)
_message_pass_launch = DirectLaunch(_message_pass_tuned, sizes=("h", "w"))
_mean_field_step_launch = DirectLaunch(_mean_field_step_tuned, sizes=("h", "w"))
_weight_grad_launch = DirectLaunch(_weight_grad_kernel)


def _launch(Q: torch.Tensor, K: torch.Tensor | None, feats: torch.Tensor | None, compats: torch.Tensor | None,
            dims: Sequence[int], filter_size: int, keep_centre: bool, config: triton.Config | None = None
            ) -> torch.Tensor:
    """One message pass: autotuned on the GPU, one large tile under the interpreter, or the given ``config``
    (the tests run every tuned config against the reference)."""
    B, C, h, w = Q.shape
    Q = Q.contiguous()
    M = torch.empty_like(Q, dtype=message_dtype(Q.dtype))
    args, consts = _operands(Q, K, feats, compats, dims, filter_size, keep_centre, w)
    dummy = args[1] if K is None else args[2]
    args = (*args, M, dummy, dummy, dummy, C, h, w)
    consts.update(STEP=False, W_STRIDE=0, HAS_COMPAT=False, SOFTMAX=False)
    if config is not None:
        tile = config.kwargs
        grid = (cdiv(h * w, tile["BLOCK_P"]), cdiv(C, tile["BLOCK_C"]), B)
        _message_pass_kernel[grid](*args, **tile, **consts, num_warps=config.num_warps, **COMPILE_OPTIONS)
    elif interpreting():
        block_c, block_p = interpreter_blocks(C, h * w)
        grid = (cdiv(h * w, block_p), cdiv(C, block_c), B)
        _message_pass_kernel[grid](*args, BLOCK_C=block_c, BLOCK_P=block_p, UNROLL=INTERPRETER_UNROLL, **consts,
                                   **COMPILE_OPTIONS)
    else:
        def grid(meta):
            return (cdiv(h * w, meta["BLOCK_P"]), cdiv(C, meta["BLOCK_C"]), B)

        _message_pass_launch[grid](*args, **consts, **COMPILE_OPTIONS)
    return M


def _aligned(w: int, *tensors: torch.Tensor | None) -> int:
    """``ALIGNED``, whether the two-pass kernels read 16-byte chunks: 16 or 4, the largest of the two that divides
    ``w``, with 16-byte aligned data; else 0. A launch tells the compiler the pointers' alignment, and a width's
    only when it is a multiple of 16; at 4 the kernel restates ``w`` as ``(w // 4) * 4``, from which triton 3.6
    and 3.9 alike derive that every row starts 16 bytes aligned (``tl.multiple_of`` hints on the offsets made
    3.9 vectorise, not 3.6; restated at 16 too, 3.6's border loop took 12% more instructions)."""
    if any(t is not None and t.data_ptr() % 16 for t in tensors):
        return 0
    return 16 if w % 16 == 0 else 4 if w % 4 == 0 else 0


def _operands(Q, K, feats, compats, dims, filter_size, keep_centre, w) -> tuple[tuple, dict]:
    """The weight operands (``K``, or ``feats`` and ``compats``; another operand in the unused slots) and the
    constexprs every message-passing launch shares (``w``: the grid's width)."""
    fused = K is None
    meta = feature_meta(feats, dims, compats) if fused else {"D1": 1, "D2": 0}
    args = (Q, feats, feats, compats) if fused else (Q, K, K, K)  # (the unused slots hold an operand, never read)
    consts = dict(KSIZE=filter_size, FUSED=fused, KEEP_CENTRE=keep_centre, IDX64=needs_int64(Q, K if K is not None
                  else feats), ALIGNED=0 if fused else _aligned(w, Q, K), **meta)
    return args, consts


def step_blocks(C: int, has_compat: bool) -> tuple[int, int, int]:
    """GPU ``(BLOCK_C, BLOCK_P, num_warps)`` of the mean-field step: every class in one tile (≥ 16 for
    ``tl.dot``), ~16 tile elements per thread (see :func:`_prune`), 4 with the ``[C, C]`` compatibility
    (whose ``tl.dot`` operands also live in registers: measured 160 registers at C = 32, spills beyond)."""
    block_c = max(16, next_power_of_2(C))
    num_warps = 4 if block_c <= 64 else 8
    per_thread = 4 if has_compat else 16
    return block_c, max(16, per_thread * 32 * num_warps // block_c), num_warps


@library_op("convcrf_triton::mean_field_step")
def _mean_field_step_op(
    Q: torch.Tensor, unary_term: torch.Tensor, weight: torch.Tensor, compat_matrix: torch.Tensor | None,
    K: torch.Tensor | None, feats: torch.Tensor | None, compats: torch.Tensor | None, dims: list[int],
    filter_size: int, keep_centre: bool, softmax: bool, out_dtype: torch.dtype, num_classes: int,
    channels_last: bool,
) -> torch.Tensor:
    """The launch behind :func:`mean_field_step` (contiguous operands; float32 but ``Q``/``K``)."""
    if channels_last:
        B, h, w, cs = Q.shape
    else:
        B, _, h, w = Q.shape
        cs = 0
    C = num_classes
    args, consts = _operands(Q, K, feats, compats, dims, filter_size, keep_centre, w)
    consts["CS"] = cs
    mix = weight if compat_matrix is None else compat_matrix  # (without a compatibility: never read)
    out = torch.empty_like(Q, dtype=out_dtype)
    step = dict(STEP=True, W_STRIDE=int(weight.numel() > 1), HAS_COMPAT=compat_matrix is not None, SOFTMAX=softmax)
    if interpreting():
        block_c, block_p = interpreter_blocks(max(C, cs, 16), max(h * w, 16))
        grid = (cdiv(h * w, block_p), 1, B)
        _message_pass_kernel[grid](*args, out, unary_term, weight, mix, C, h, w, BLOCK_C=block_c, BLOCK_P=block_p,
                                   UNROLL=INTERPRETER_UNROLL, **step, **consts, **COMPILE_OPTIONS)
    else:
        block_c, block_p, _ = step_blocks(max(C, cs), compat_matrix is not None)
        grid = (cdiv(h * w, block_p), 1, B)
        _mean_field_step_launch[grid](*args, out, unary_term, weight, mix, C, h, w, BLOCK_C=block_c,
                                      BLOCK_P=block_p, **step, **consts, **COMPILE_OPTIONS)
    return out


@_mean_field_step_op.op.register_fake
def _(Q, unary_term, weight, compat_matrix, K, feats, compats, dims, filter_size, keep_centre, softmax, out_dtype,
      num_classes, channels_last):
    return Q.new_empty(Q.shape, dtype=out_dtype)


def step_mixing(weight: torch.Tensor, compat_matrix: torch.Tensor | None, C: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A step's ``w`` (one or ``C`` values, flat) and ``[C, C]`` compatibility as its kernels read them
    (float32, contiguous), or a ValueError naming the weight."""
    weight = (weight if weight.dim() == 1 else weight.reshape(-1)).float().contiguous()  # (1-D: the same tensor)
    if weight.numel() not in (1, C):
        raise ValueError(f"weight must hold 1 or C={C} values, got {weight.numel()}")
    return weight, None if compat_matrix is None else compat_matrix.float().contiguous()


def mean_field_step(
    Q: torch.Tensor, unary_term: torch.Tensor, weight: torch.Tensor, compat_matrix: torch.Tensor | None,
    K: torch.Tensor | None, feats: torch.Tensor | None, compats: torch.Tensor | None, dims: Sequence[int],
    filter_size: int, keep_centre: bool, softmax: bool, out_dtype: torch.dtype | None = None,
    channels_last: int | None = None,
) -> torch.Tensor:
    """One mean-field iteration in one launch (blur 1, inference): ``Z = A + w·(M + compat·M)`` with ``M``
    the message of ``Q [B, C, h, w]`` (from ``K``, or fused from ``feats``), returned as ``softmax(Z)`` or
    ``Z`` in ``out_dtype`` (default: that of ``Q``). ``unary_term``: ``A [B, C, h, w]``; ``weight``: one or
    ``C`` values; ``compat_matrix``: ``[C, C]``. ``Q`` and ``K`` may be stored in bfloat16/float16; the
    arithmetic is float32. Not differentiable: training uses the separate ops.

    ``channels_last=C``: ``Q``, ``unary_term`` and the result are ``[B, h, w, CS]`` instead, the ``C`` classes
    of a pixel contiguous and zero-padded to ``CS`` (a multiple of 4; see :func:`to_channels_last`)."""
    check_on_device(Q=Q, unary_term=unary_term, weight=weight, compat_matrix=compat_matrix, K=K, feats=feats,
                    compats=compats)
    check_grid(batch=Q.shape[0])
    C = Q.shape[1] if channels_last is None else channels_last
    if channels_last is not None and (Q.shape[-1] % 4 or not 0 < C <= Q.shape[-1] or unary_term.shape != Q.shape):
        raise ValueError(f"channels_last={C}: Q and unary_term must be [B, h, w, CS] with CS a multiple of 4 "
                         f">= C, got {tuple(Q.shape)} and {tuple(unary_term.shape)}")
    weight, compat_matrix = step_mixing(weight, compat_matrix, C)
    if feats is not None:
        feats, compats = feats.contiguous().float(), compats.contiguous().float()
    return _mean_field_step_op(
        Q.contiguous(), unary_term.contiguous(), weight, compat_matrix,
        None if K is None else _weights_operand(K), feats, compats, list(dims), filter_size, keep_centre,
        softmax, out_dtype or Q.dtype, C, channels_last is not None,
    )


# The one-launch step's layout: False, the default, planar; True channels-last (the benchmark's triton-cl rows,
# the tests).
STEP_CHANNELS_LAST = False


def step_channels_last() -> bool:
    """Whether the mean-field loop runs the one-launch step on channels-last tensors (16-byte class vectors, two
    layout conversions per call): only where forced (``STEP_CHANNELS_LAST``). Measured on an H200, C = 21, blur
    1, 5 iterations, eager, the planar step with its 16-byte rows was faster at every size and k timed from
    k = 7 on: 1024×2048 (``bench/results/nvidia-h200-run4``) k = 7 4.19 vs 6.14 ms, k = 11 8.37 vs 11.70, k = 15
    12.69 vs 19.75; 512² (``nvidia-h200-run5``) k = 11 1.58 vs 2.27, k = 15 2.67 vs 3.15, k = 21 4.04 vs 4.98.
    (Before those rows, in ``nvidia-h200-run3``, channels-last had won at 512² k = 15 and 21.)"""
    return STEP_CHANNELS_LAST


def class_stride(num_classes: int) -> int:
    """The channels-last class stride: ``num_classes`` rounded up to a multiple of 4 (16 bytes of float32)."""
    return -(-num_classes // 4) * 4


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h, w, class_stride(C)]``, the padding classes zero."""
    C = x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, class_stride(C) - C)).permute(0, 2, 3, 1).contiguous()


def from_channels_last(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse of :func:`to_channels_last`: ``[B, h, w, CS]`` → ``[B, C, h, w]``."""
    return x[..., :num_classes].permute(0, 3, 1, 2).contiguous()


def weight_grad_classes(C: int) -> int:
    """Classes a trip of the weight-gradient kernel's class loop: ``C`` in equal parts of at most
    ``WEIGHT_GRAD_MAX_CLASSES`` (C = 21: 3 × 7, no padding class)."""
    return _equal_chunk(C, WEIGHT_GRAD_MAX_CLASSES)


def _weight_grad(Q: torch.Tensor, G: torch.Tensor, feats: torch.Tensor, compats: torch.Tensor,
                 dims: Sequence[int], filter_size: int, keep_centre: bool, block_p: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dfeats [B, D, h, w], dL/dcompats [G])`` of the fused pass, from ``G = dL/dM``: ``block_p`` pixels a
    program (default: ``WEIGHT_GRAD_BLOCK_P`` on the GPU, one large block under the interpreter)."""
    B, C, h, w = Q.shape
    Q, G = Q.contiguous(), G.contiguous()
    meta = feature_meta(feats, dims, compats)
    block_c = weight_grad_classes(C)
    if block_p is None:
        block_p = interpreter_blocks(C, h * w)[1] if interpreting() else WEIGHT_GRAD_BLOCK_P
    grid = (cdiv(h * w, block_p), B)
    grad_f = torch.empty_like(feats)
    partials = feats.new_empty(B * grid[0], 2)
    _weight_grad_launch[grid](
        Q, G, feats, compats, grad_f, partials, C, h, w, KSIZE=filter_size, KEEP_CENTRE=keep_centre,
        BLOCK_C=block_c, CLASS_TAIL=C % block_c != 0, BLOCK_P=block_p, IDX64=needs_int64(Q, feats), **meta,
        **COMPILE_OPTIONS,
    )
    return grad_f, partials.sum(0)[: len(dims)]


# The ops are registered with torch.library, so that torch.compile treats each launch as one opaque
# node (no graph break; shapes from the fake implementations) and autograd uses the backward below
# (LibraryOp: the plain function where neither is involved, at half the host time a call).


@library_op("convcrf_triton::message_pass")
def _message_pass_op(Q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    return _launch(Q, K, None, None, (), int(round(K.shape[1] ** 0.5)), True)


@library_op("convcrf_triton::fused_message_pass")
def _fused_message_pass_op(Q: torch.Tensor, feats: torch.Tensor, compats: torch.Tensor, dims: list[int],
                           filter_size: int, keep_centre: bool) -> torch.Tensor:
    return _launch(Q, None, feats, compats, dims, filter_size, keep_centre)


@library_op("convcrf_triton::fused_weight_grad")
def _weight_grad_op(Q: torch.Tensor, G: torch.Tensor, feats: torch.Tensor, compats: torch.Tensor, dims: list[int],
                    filter_size: int, keep_centre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _weight_grad(Q, G, feats, compats, dims, filter_size, keep_centre)


@library_op("convcrf_triton::learned_message_pass")
def _learned_message_pass_op(Q: torch.Tensor, K: torch.Tensor, feats: torch.Tensor, compats: torch.Tensor,
                             dims: list[int], filter_size: int, keep_centre: bool) -> torch.Tensor:
    return _launch(Q, K, None, None, (), filter_size, True)


@_message_pass_op.op.register_fake
def _(Q, K):
    return Q.new_empty(Q.shape, dtype=message_dtype(Q.dtype))


@_learned_message_pass_op.op.register_fake
def _(Q, K, feats, compats, dims, filter_size, keep_centre):
    return Q.new_empty(Q.shape, dtype=message_dtype(Q.dtype))


@_fused_message_pass_op.op.register_fake
def _(Q, feats, compats, dims, filter_size, keep_centre):
    return Q.new_empty(Q.shape, dtype=message_dtype(Q.dtype))


@_weight_grad_op.op.register_fake
def _(Q, G, feats, compats, dims, filter_size, keep_centre):
    return feats.new_empty(feats.shape), feats.new_empty(len(dims))


def _message_pass_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _message_pass_backward(ctx, grad_m):
    """Two-pass, differentiable w.r.t. ``Q`` only: ``dL/dQ = message_pass(K, dL/dM)`` (K is symmetric).
    To learn the weights use :func:`learned_message_pass` (the same pass, differentiating the features) or the
    fused op (no k*k values stored); both recompute the weights for their gradient."""
    (K,) = ctx.saved_tensors
    return _message_pass_op(grad_m.contiguous(), K), None


def _fused_setup(ctx, inputs, output):
    Q, feats, compats, *meta = inputs
    ctx.save_for_backward(Q, feats, compats)
    ctx.meta = meta


def _feature_grads(ctx, Q, grad_m, feats, compats, at):
    """``(dL/dfeats, dL/dcompats)`` from :func:`_weight_grad_kernel` when the op's inputs ``at`` and ``at + 1``
    (the features and compat weights) need them, else ``(None, None)``."""
    if ctx.needs_input_grad[at] or ctx.needs_input_grad[at + 1]:
        return _weight_grad_op(Q, grad_m, feats, compats, *ctx.meta)
    return None, None


def _fused_backward(ctx, grad_m):
    """``dL/dQ`` is the fused pass of ``dL/dM``; the features' and compat weights' gradients come from
    :func:`_weight_grad_kernel`."""
    Q, feats, compats = ctx.saved_tensors
    grad_m = grad_m.contiguous()
    grad_q = _fused_message_pass_op(grad_m, feats, compats, *ctx.meta) if ctx.needs_input_grad[0] else None
    return grad_q, *_feature_grads(ctx, Q, grad_m, feats, compats, 1), None, None, None


def _learned_setup(ctx, inputs, output):
    Q, K, feats, compats, *meta = inputs
    ctx.save_for_backward(Q, K, feats, compats)
    ctx.meta = meta


def _learned_backward(ctx, grad_m):
    """``dL/dQ`` is the two-pass message pass of ``dL/dM`` with the same ``K``; the features' and compat weights'
    gradients come from :func:`_weight_grad_kernel`, as for the fused pass."""
    Q, K, feats, compats = ctx.saved_tensors
    grad_m = grad_m.contiguous()
    grad_q = _message_pass_op(grad_m, K) if ctx.needs_input_grad[0] else None
    return grad_q, None, *_feature_grads(ctx, Q, grad_m, feats, compats, 2), None, None, None


_message_pass_op.op.register_autograd(_message_pass_backward, setup_context=_message_pass_setup)
_learned_message_pass_op.op.register_autograd(_learned_backward, setup_context=_learned_setup)
_fused_message_pass_op.op.register_autograd(_fused_backward, setup_context=_fused_setup)


def message_pass(K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Two-pass: ``K: [B, k*k, h, w]`` (float32, or bfloat16/float16 storage), ``Q: [B, C, h, w]`` → ``M: [B, C,
    h, w]`` (Q's dtype; float32 for bfloat16/float16 ``Q``: :func:`message_dtype`); the sums run in float32."""
    check_on_device(K=K, Q=Q)
    check_grid(batch=Q.shape[0])
    if K.requires_grad and torch.is_grad_enabled():
        raise ValueError("message_pass does not differentiate K: use learned_message_pass or fused_message_pass to "
                         "learn the weights")
    return _message_pass_op(Q.contiguous(), _weights_operand(K))


def learned_message_pass(
    K: torch.Tensor, feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor, Q: torch.Tensor,
    filter_size: int, keep_centre: bool,
) -> torch.Tensor:
    """The two-pass message pass ``M = message_pass(K, Q)`` with ``K`` the :func:`gaussian_weights` of ``feats:
    [B, D, h, w]``, ``dims`` and ``compats`` (built once by the caller, without gradient, and shared by every
    iteration), differentiable like :func:`fused_message_pass`: w.r.t. ``Q`` (the two-pass pass of the output
    gradient with the same ``K``) and w.r.t. ``feats`` and ``compats`` (the weight-gradient kernel, recomputing
    the weights). Training at the cost of the two-pass loop, where ``K``'s memory is allowed."""
    check_on_device(K=K, feats=feats, compats=compats, Q=Q)
    check_grid(batch=Q.shape[0])
    if K.shape[1] != filter_size * filter_size or K.shape[2:] != Q.shape[2:] or K.shape[2:] != feats.shape[2:]:
        raise ValueError(f"K must be [B, {filter_size}², h, w] on the grid of Q {tuple(Q.shape)} and feats "
                         f"{tuple(feats.shape)}, got {tuple(K.shape)}")
    return _learned_message_pass_op(Q.contiguous(), _weights_operand(K.detach()), feats.contiguous().float(),
                                    compats.contiguous().float(), list(dims), filter_size, keep_centre)


def _weights_operand(K: torch.Tensor) -> torch.Tensor:
    """``K`` as the kernels read it: contiguous, in one of the storage dtypes (float64 becomes float32)."""
    return K.contiguous() if K.dtype in K_DTYPES else K.contiguous().float()


def fused_message_pass(
    feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor, Q: torch.Tensor, filter_size: int,
    keep_centre: bool,
) -> torch.Tensor:
    """Fused: the weights of :func:`gaussian_weights` computed in-kernel from ``feats: [B, D, h, w]``."""
    check_on_device(feats=feats, compats=compats, Q=Q)
    check_grid(batch=Q.shape[0])
    feats = feats.contiguous().float()
    compats = compats.contiguous().float()
    return _fused_message_pass_op(Q.contiguous(), feats, compats, list(dims), filter_size, keep_centre)


def prefer_fused(filter_size: int, num_pixels: int, element_size: int = 4) -> bool:
    """Fused or two-pass for ``num_pixels = B·h·w`` (the pooled grid), as measured on an H200
    (``bench/results/nvidia-h200``, C = 21, 5 iterations): two-pass was faster at every k on the
    512² and 1024×2048 grids (1.2-1.8× at blur 1), fused at k >= 15 on a 128² grid (k = 31: 2.6 vs 3.5 ms),
    where building ``K`` is not paid back. Fused also whenever ``K`` would pass ``FUSED_ABOVE_K_BYTES``
    (k = 31 at 1024×2048: 7.9 GB in float32), trading up to 2× time for no k²-sized memory. ``element_size``:
    bytes per stored weight (2 with bfloat16/float16 storage)."""
    k_bytes = element_size * filter_size * filter_size * num_pixels
    return k_bytes > FUSED_ABOVE_K_BYTES or (filter_size >= FUSED_MIN_FILTER_SIZE and num_pixels <= FUSED_MAX_PIXELS)
