"""Pure-PyTorch implementations of the CRF's two hot ops: the oracle for the kernels and the CPU path.

Shapes: features ``F: [B, D, h, w]`` (already divided by their bandwidths, ``D = sum(dims)``: the
feature channels of each Gaussian one after the other), merged kernel ``K: [B, k*k, h, w]``,
label distribution ``Q: [B, C, h, w]``, message ``M: [B, C, h, w]``. Tap ``t = (dy + r)*k + (dx + r)``
with ``r = k // 2`` links pixel ``p`` to its neighbour ``p + (dy, dx)``.

No ``[B, C*k*k, h, w]`` unfold tensor is ever built: the window sum is a loop of k*k in-place
multiply-adds of shifted views (measured ~17x faster than the unfold formulation on 2 CPU threads), over row
bands of a few MB of ``M`` (narrow bands of a few rows measured slower: the per-op overhead outweighs the
cache gain). An inference on the CPU builds the pass as matrix products where they are faster
(:mod:`~convcrf_triton.matrix_pass`); this module's window sums are the definition they are tested against.
Everything here is differentiable and works for float32 and float64 on any device; eager, the two ops' backward is
written out (``_GaussianWeights``, ``_MessagePass``: autograd through their k² in-place ops of shifted views took
7-19× longer at blur 1 on the CPU), traced, autograd differentiates the ops. Traced by
``torch.compile`` or ``torch.export``, nothing specialises on the image size; an inference that ``torch.compile``
traces on the CPU calls both ops as custom ops running this eager code (:func:`~convcrf_triton.resample.opaque_on_cpu`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .resample import opaque_on_cpu, written_backward

# Elements of the largest temporary while building K (~4 MB in float32; measured best of 2^16..2^20).
_CHUNK_ELEMENTS = 1 << 20
# Bytes of M a row band of the message pass. A 2-core AMD EPYC, 375×500, C = 21, 2 threads: one k = 11 pass 104 ms
# unbanded, 79 at 64 rows (2.7 MB), 70 at 128 (5.4 MB), 134 at 16 (the per-op overhead winning); the whole blur-1
# inference (5 iterations) k = 11 860 -> 664 ms at 4 MB (768 at 2 MB, 618 at 8), k = 7 354 -> 288 ms.
_BAND_BYTES = 4 << 20
# The message pass takes a row of taps at a time (one product and sum over a strided view of their windows) instead
# of a tap at a time where M has at most _TAP_ROWS_PER_TAP · k elements (a tap's multiply-add too small to outweigh
# its dispatch) and the row's product at most _TAP_ROWS_MAX_PRODUCT (in cache). One thread of this project's Intel
# Xeon, C = 21, a pass on n × n (rows against taps, ms): k = 31 n = 16 2.1 / 10.3, n = 28 8.2 / 14.3 (32×40, a
# 3.3 MB product: 47 / 26); k = 11 n = 16 1.1 / 1.3, n = 20 1.6 / 1.5; k = 5 n = 12 0.27 / 0.29, n = 16 0.37 / 0.29.
_TAP_ROWS_PER_TAP = 600
_TAP_ROWS_MAX_PRODUCT = 1 << 19
# The weights' mirrored taps are copied through one sheared view a chunk of tap rows at a time, instead of a copy a
# tap, where a tap's plane has at most _SHEAR_PIXELS elements (B·h·w: a copy's dispatch outweighing its bytes; the
# sheared copy reads and writes the half twice more). One thread of this project's Intel Xeon, one call on n × m
# (a copy a tap / sheared, ms, appearance): k = 31 16×16 6.2 / 2.2, 47×63 29 / 23, 64×96 46 / 45, 96×128
# 105 / 105, 128×256 291 / 303; k = 11 32×32 1.7 / 1.2, 128×256 33 / 35.
_SHEAR_PIXELS = 1 << 13


def _settle_mkl_dispatch() -> None:
    """Call MKL's vector math (``exp``, ``log``, ``sqrt``: PyTorch's CPU kernels for contiguous float tensors) once
    on a few elements, in this thread. MKL picks each function's kernel on its first call; when that call runs on
    several of PyTorch's threads at once, one of them can take a low-accuracy kernel for its whole share of that
    call (pytorch/pytorch#188792). Measured here (torch 2.13, 2 threads, fresh processes): the first ``exp`` of
    6084 float32 values off by up to 1.5e-4 relative in 4 processes of 8 (float64 3.3e-9), ``log`` and ``sqrt``
    alike; the CPU path's first inference in a process inherited it (its Gaussian weights)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.ones(8, dtype=dtype, device="cpu")  # (not a default device set before the import)
        for op in (torch.exp, torch.log, torch.sqrt):
            op(x)


_settle_mkl_dispatch()


def _flush_below(dtype: torch.dtype) -> float:
    """Magnitude under which weights and ``Q`` values are zeroed before the multiply-adds.

    Denormal operands (and results) take a ~50-100x slower path on x86 CPUs, and softmax outputs of natural
    images reach them after a few iterations (measured: 3.5 s instead of 2.2 s at k=11, blur 1). At
    ``10·sqrt(tiny)`` (1.1e-18 in float32) a product of two kept values is still normal, and the change to any
    message is below 1e-15 of it.
    """
    return 10.0 * math.sqrt(torch.finfo(dtype).tiny)


def _floored_exp(exponent: torch.Tensor, floor: float | None, in_place: bool = False) -> torch.Tensor:
    """``exp(exponent)`` where that is above ``floor`` (default :func:`_flush_below`), 0 below: a Gaussian's weights
    as :func:`gaussian_weights` keeps them, in a new tensor (``in_place``: in ``exponent``).

    The exponent is clamped at ``log(floor)`` moved up by two of its ulps, so that no ``exp`` computed is a denormal
    (the ``exp`` of ``log(tiny)`` rounded to float32 is 1.17549e-38, and x86 takes its slow path for such: 3.8 ms
    instead of 0.02 for 90 k weights), and the weights at that clamp (within the clamp's rounding above it) are
    zeroed, so that a tap whose weights all lie below the floor is 0 and the message pass can skip it."""
    eps = torch.finfo(exponent.dtype).eps
    clamp = math.log(_flush_below(exponent.dtype) if floor is None else floor) * (1.0 - 2.0 * eps)
    threshold = math.exp(clamp) * (1.0 + (8.0 - clamp) * eps)
    if in_place:
        return F.threshold_(exponent.clamp_min_(clamp).exp_(), threshold, 0.0)
    return F.threshold(exponent.clamp_min(clamp).exp(), threshold, 0.0)


def normalised_weights(dtype: torch.dtype, storage: torch.dtype | None = None) -> tuple[float, float]:
    """``(floor, unit)`` for a ``norm='sym'`` Gaussian's weights on this path: each weight ``unit · g``, 0 below
    ``floor``.

    The normaliser ``n = 1/sqrt(g * 1 + 1e-20)`` scales a weight by up to 1e20, so weights far below
    :func:`_flush_below` still count (a pixel whose weights all lie below it exchanges O(1) messages with its like:
    fuzz case 293664190, whose weights were raised to it, put an output 0.30 off): the floor is the dtype's
    smallest normal number. Weights that small times the pass's operand fall in the denormal range, x86's slow path
    (``DenseCRF2D`` on a 366×500 VOC image, one thread: 4.4 s against 0.6 s with denormals flushed). A power of two
    ``unit`` lifts every weight to at least :func:`_flush_below`, which keeps the products with the operand normal;
    dividing it out is exact, and a weight times ``n`` times the operand's ``n`` is at most 1 (``g ≤ g * 1``), so
    the sums stay far from overflow. ``unit`` is 1 where ``K`` is stored in a dtype of narrower range (float16)."""
    tiny = torch.finfo(dtype).tiny
    if torch.finfo(storage or dtype).tiny != tiny:
        return tiny, 1.0
    return tiny, 2.0 ** math.ceil(math.log2(_flush_below(dtype) / tiny))


def _windows(x: torch.Tensor, start: int, m: int, w: int) -> torch.Tensor:
    """``m`` windows of ``w`` columns of ``x [..., L]``, the ``j``-th from column ``start + j``: ``[..., m, w]``. A
    strided view (``unfold``); traced by ``torch.compile``/``torch.export``, a stack of the slices (``unfold``'s
    shape checks specialise a symbolic width)."""
    if torch.compiler.is_compiling():
        return torch.stack([x.narrow(-1, start + j, w) for j in range(m)], -2)
    return x.narrow(-1, start, m + w - 1).unfold(-1, w, 1)


def gaussian_weights(
    feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor, filter_size: int, keep_centre: bool,
    out_dtype: torch.dtype | None = None, floor: float | None = None,
) -> torch.Tensor:
    """Merged kernel ``K[b, t, p] = sum_g compats[g] * exp(-1/2 |f_g[p] - f_g[p + d_t]|^2)``.

    ``feats: [B, D, h, w]``, ``dims``: feature channels per Gaussian g, ``compats: [G]``. Taps whose
    neighbour lies outside the image are 0; the centre tap is 0 unless ``keep_centre``. Each Gaussian's weights
    below ``floor`` are 0 (default :func:`_flush_below`: normal products with the message pass's ``Q``).
    Returns ``K: [B, k*k, h, w]`` in ``out_dtype`` (default: the dtype of ``feats``), computed in that of
    ``feats``.

    The weight is symmetric, ``K[t(d), p] = K[t(-d), p + d]``: the taps up to the centre are computed, the others
    are their planes shifted by ``d`` (one copy a tap), so ``K`` is symmetric to the bit. One thread of a 2-core
    AMD EPYC, a 375×500 VOC image at blur 1, k = 11: the inference 943 → 763 ms (median of 6, interleaved).
    """
    if opaque_on_cpu(feats, compats):
        return _gaussian_weights_op(feats, list(dims), compats, filter_size, keep_centre, out_dtype, floor)
    if written_backward(feats, compats):
        return _GaussianWeights.apply(feats, compats, tuple(dims), filter_size, keep_centre, out_dtype, floor)
    return _gaussian_weights(feats, dims, compats, filter_size, keep_centre, out_dtype, floor)


def _gaussian_weights(
    feats: torch.Tensor, dims: Sequence[int], compats: torch.Tensor, filter_size: int, keep_centre: bool,
    out_dtype: torch.dtype | None, floor: float | None,
) -> torch.Tensor:
    B, D, h, w = feats.shape
    k, r = filter_size, filter_size // 2
    padded = F.pad(feats, (r, r, r, r))
    inside = F.pad(feats.new_ones(1, h, w), (r, r, r, r))
    K = feats.new_empty(B, k, k, h, w, dtype=out_dtype or feats.dtype)
    # Taps are computed a chunk of dx at a time, as a strided [B, D, h, n, w] view of the padded features,
    # with n chosen to bound the temporaries (n = k on small grids, 1 on large ones).
    # (Traced by torch.compile/export: n = k, as inductor fuses the temporaries away and the sizes may be symbolic.)
    n = k if torch.compiler.is_compiling() else max(1, min(k, _CHUNK_ELEMENTS // (B * D * h * w)))
    # Outside autograd and tracing each chunk's differences go to one contiguous buffer and the arithmetic on them
    # runs in place. (A new difference tensor took the layout of the windows' view, whose tap and column strides
    # are both 1: the taps innermost, every later op strided. One thread, D = 7, the weights: 94×125 at k = 11
    # 15.5 → 8.2 ms, 47×63 at k = 31 25.4 → 20.2, 375×500 at k = 11 190 → 158.)
    in_place = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (feats.requires_grad or compats.requires_grad))
    scratch = feats.new_empty(B, D, h, n, w) if in_place else None
    for dy in range(r + 1):
        taps = k if dy < r else r + 1  # (the centre row: up to the centre)
        for dx in range(0, taps, n):
            m = min(n, taps - dx)
            rows = (slice(None), slice(None), slice(dy, dy + h))
            windows = _windows(padded[rows], dx, m, w)
            if in_place:
                sq = torch.sub(windows, feats.unsqueeze(3), out=scratch[:, :, :, :m]).square_()
            else:
                sq = (windows - feats.unsqueeze(3)).square()
            start, weight = 0, None
            for g, c in enumerate(dims):
                exponent = sq[:, start : start + c].sum(1)
                if in_place:
                    gauss = _floored_exp(exponent.mul_(-0.5), floor, in_place=True).mul_(compats[g])
                    weight = gauss if weight is None else weight.add_(gauss)
                else:
                    gauss = _floored_exp(exponent.mul(-0.5), floor) * compats[g]
                    weight = gauss if weight is None else weight + gauss
                start += c
            mask = _windows(inside[rows[1:]], dx, m, w)
            K[:, dy, dx : dx + m] = (weight.mul_(mask) if in_place else weight * mask).transpose(1, 2)
    K = K.view(B, k * k, h, w)
    centre = k * k // 2
    if not keep_centre:
        K[:, centre] = 0
    if B * h * w <= _SHEAR_PIXELS and not torch.compiler.is_compiling():
        _mirror_sheared(K.view(B, k, k, h, w))
        return K
    # The mirrored taps: K[t(-d), p] = K[t(d), p - d], zero where p - d leaves the image.
    K[:, centre + 1 :] = 0
    for t in range(centre):
        ddy, ddx = t // k - r, t % k - r  # d of tap t; the mirror's is -d
        rows, cols = h - abs(ddy), w - abs(ddx)  # (none: the tap reaches outside the image everywhere)
        if rows > 0 and cols > 0:
            y, x = max(ddy, 0), max(ddx, 0)  # (the first pixel whose p - d lies in the image)
            K[:, k * k - 1 - t, y : y + rows, x : x + cols] = K[:, t, y - ddy : y - ddy + rows,
                                                                x - ddx : x - ddx + cols]
    return K


def _mirror_sheared(K: torch.Tensor) -> None:
    """Fills the mirrored taps of ``K: [B, k, k, h, w]`` (rows ``dy > r`` and the centre row's ``dx > r``) from the
    others, in place: tap ``(r + j, dx)``, whose offset is ``d = (j, dx - r)``, is ``K[r - j, k - 1 - dx]`` at
    ``p + d``. The source rows, their taps reversed (``flip``) and zero-padded by ``r`` (``P``), are read at
    ``P[j, dx, y + r + j, x + dx]``: one strided view whose tap strides carry the shift (a shear), so a chunk of rows
    takes three copies, not one a tap."""
    B, k, _, h, w = K.shape
    r = k // 2
    rows = max(1, min(r + 1, _CHUNK_ELEMENTS // (B * k * (h + 2 * r) * (w + 2 * r))))
    for j0 in range(0, r + 1, rows):
        m = min(rows, r + 1 - j0)
        P = F.pad(K[:, r + 1 - j0 - m : r + 1 - j0].flip(1, 2), (r, r, r, r))  # [B, m, k, h + 2r, w + 2r]
        sB, sJ, sX, sY, _ = P.stride()
        sheared = P.as_strided((B, m, k, h, w), (sB, sJ + sY, sX + 1, sY, 1), P.storage_offset() + (r + j0) * sY)
        if j0 == 0:  # (the centre row: the taps right of the centre)
            K[:, r, r + 1 :] = sheared[:, 0, r + 1 :]
            sheared, j0, m = sheared[:, 1:], 1, m - 1
        K[:, r + j0 : r + j0 + m] = sheared


def message_pass(K: torch.Tensor, Q: torch.Tensor, taps: Sequence[int] | None = None) -> torch.Tensor:
    """``M[b, c, p] = sum_t K[b, t, p] * Q[b, c, p + d_t]`` (zero outside the image).

    ``K: [B, k*k, h, w]``, ``Q: [B, C, h, w]`` → ``M: [B, C, h, w]`` in the dtype of ``Q`` (float32 for a
    bfloat16/float16 ``Q``: a sum of k² values can pass float16's range). The sums run in float32 (float64 when an
    operand is float64) whatever the storage dtypes, like the kernels. ``taps``: the taps to sum, where every
    other tap's weights are 0 (:func:`live_taps`); the same numbers, to the bit. Taps that reach outside the image
    everywhere are skipped either way.
    """
    if opaque_on_cpu(K, Q):
        return _message_pass_op(K, Q)
    if written_backward(K, Q):
        return _MessagePass.apply(K, Q)
    return _message_pass(K, Q, taps)


def live_taps(K: torch.Tensor) -> list[int] | None:
    """The taps of ``K [B, k*k, h, w]`` with a weight other than 0, or None where that is every tap. A Gaussian narrower
    than the window has many of the others: ``DenseCRF2D``'s smoothness term (``sxy=3``, ``filter_size=31`` at
    ``blur=8``) keeps 1 tap in 12 where its weights reach float32's smallest normal number, as ``norm='sym'`` keeps
    them (:func:`normalised_weights`). None where ``torch.compile`` traces (the list depends on the values)."""
    if K.numel() == 0 or torch.compiler.is_compiling():
        return None
    dims = (0, 2, 3)  # (the largest and smallest weight, not |K|'s: no K-sized temporary; 2.3 → 1.0 ms at 47×63)
    live = ((K.amax(dims) != 0) | (K.amin(dims) != 0)).nonzero().flatten().tolist()
    return None if len(live) == K.shape[1] else live


def _message_pass(K: torch.Tensor, Q: torch.Tensor, taps: Sequence[int] | None = None) -> torch.Tensor:
    h, w = Q.shape[-2:]
    k = _filter_size(K)
    r = k // 2
    acc, out_dtype = _message_dtypes(K, Q)
    Q = _pass_operand(Q, acc)
    padded = F.pad(Q, (r, r, r, r))
    M = torch.zeros_like(Q)
    if (M.numel() <= min(_TAP_ROWS_PER_TAP * k, _TAP_ROWS_MAX_PRODUCT // k)
            and not torch.compiler.is_compiling()):
        K_rows = K.to(acc).unflatten(1, (k, k))  # [B, dy, dx, h, w]
        for dy in range(k) if taps is None else sorted({t // k for t in taps}):
            if abs(dy - r) < h:  # (else the row reads only the zeros around Q)
                windows = _windows(padded[:, :, dy : dy + h], 0, k, w)  # [B, C, h, dx, w]
                M.add_((windows * K_rows[:, dy].transpose(1, 2).unsqueeze(1)).sum(3))
        return M.to(out_dtype)
    # Row bands of ~_BAND_BYTES of M, each through every tap while it (and Q's rows around it) stays in cache. One
    # band where torch.compile/export traces the adds (inductor fuses the taps itself; the sizes may be symbolic, and
    # autograd, which differentiates the traced ops, takes a band's in-place adds as views). Each element takes the
    # same multiply-adds in the same order either way.
    for y0, rows in _row_bands(M):
        M_band, K_band = M[:, :, y0 : y0 + rows], K[:, :, y0 : y0 + rows]
        for t in range(k * k) if taps is None else taps:
            dy, dx = divmod(t, k)
            if abs(dy - r) >= h or abs(dx - r) >= w:
                continue  # (the tap reads only the zeros around Q)
            M_band.addcmul_(K_band[:, t : t + 1].to(acc), padded[:, :, y0 + dy : y0 + dy + rows, dx : dx + w])
    return M.to(out_dtype)


def _pass_operand(Q: torch.Tensor, acc: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Q`` as the message pass multiplies it: in ``acc``, 0 where ``|Q|`` is at most the flush floor (one op, where
    abs, < and where took three); into ``out`` where given (outside autograd)."""
    return torch.hardshrink(Q.to(acc), _flush_below(acc), out=out)


def _filter_size(K: torch.Tensor) -> int:
    """``k`` of ``K: [B, k*k, h, w]``."""
    return int(round(K.shape[1] ** 0.5))


def _row_bands(M: torch.Tensor) -> list[tuple[int, int]]:
    """``(first row, rows)`` of the row bands of ``~_BAND_BYTES`` of ``M [B, C, h, w]``; one band when traced."""
    h = M.shape[-2]
    if torch.compiler.is_compiling():
        return [(0, h)]
    band = max(1, _BAND_BYTES // (M.numel() // h * M.element_size()))
    return [(y0, min(band, h - y0)) for y0 in range(0, h, band)]


def _message_dtypes(K: torch.Tensor, Q: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The message pass's accumulation dtype and that of ``M``."""
    acc = torch.float64 if torch.float64 in (K.dtype, Q.dtype) else torch.float32
    return acc, Q.dtype if Q.dtype in (torch.float32, torch.float64) else acc


class _GaussianWeights(torch.autograd.Function):
    """:func:`gaussian_weights` with its gradients written out (:func:`_gaussian_weights_grad`). Autograd's own
    went through the k² in-place writes into ``K`` (each a ``CopySlices`` that cloned ``K``'s gradient)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, compats: torch.Tensor, dims: tuple[int, ...], filter_size: int,  # noqa: ANN001
                keep_centre: bool, out_dtype: torch.dtype | None, floor: float | None) -> torch.Tensor:
        ctx.save_for_backward(feats, compats)
        ctx.args = dims, filter_size, keep_centre, floor
        return _gaussian_weights(feats, dims, compats, filter_size, keep_centre, out_dtype, floor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_K: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        feats, compats = ctx.saved_tensors
        grad_feats, grad_compats = _gaussian_weights_grad(grad_K, feats, compats, *ctx.args)
        return (grad_feats if ctx.needs_input_grad[0] else None,
                grad_compats if ctx.needs_input_grad[1] else None, None, None, None, None, None)


def _gaussian_weights_grad(
    grad_K: torch.Tensor, feats: torch.Tensor, compats: torch.Tensor, dims: Sequence[int], filter_size: int,
    keep_centre: bool, floor: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`gaussian_weights` in ``feats [B, D, h, w]`` and ``compats [G]``, given
    ``grad_K: [B, k*k, h, w]``; in the dtype of ``feats``.

    A mirrored tap is a copy, ``K[t(-d), p] = K[t(d), p - d]``, so its gradient joins tap ``t(d)``'s at ``p - d``:
    ``G_t(p) = grad_K[t(d), p] + grad_K[t(-d), p + d]``, taken where ``p + d`` lies in the image. With
    ``x = f_g[p + d] - f_g[p]`` and ``e_g = exp(-|x|²/2)`` (0 below the floor, as in the forward: no gradient
    there), ``K_t(p) = sum_g compats[g] * e_g`` gives ``d compats[g] = sum_p G_t e_g`` and, with
    ``a = G_t · compats[g] · e_g``, ``d f_g[p] += a x`` and ``d f_g[p + d] -= a x`` (into a padded gradient).
    """
    B, D, h, w = feats.shape
    k, r = filter_size, filter_size // 2
    dtype = feats.dtype
    grad_K = grad_K.to(dtype)
    padded = F.pad(feats, (r, r, r, r))
    inside = F.pad(feats.new_ones(1, h, w), (r, r, r, r))
    # Summed in float64: the position bandwidth's gradient is a sum of these gradients times the positions, which
    # cancels (shifting every pixel changes nothing); float32 sums put it 8.6e-5 off float64 in fuzz case 522000693
    # (autograd's 4.4e-5), float64 ones 3.3e-5.
    grad_padded = torch.zeros_like(padded, dtype=torch.float64)  # d f at p + d; [r : r + h, r : r + w] is d f at p
    grad_compats = compats.new_zeros(compats.shape, dtype=torch.float64)
    centre = k * k // 2
    if keep_centre:  # (every Gaussian is 1 there)
        grad_compats += grad_K[:, centre].sum(dtype=torch.float64)
    for t in range(centre):
        dy, dx = divmod(t, k)
        ddy, ddx = dy - r, dx - r
        rows, cols = h - abs(ddy), w - abs(ddx)
        if rows <= 0 or cols <= 0:
            continue  # (the tap reaches outside the image everywhere: K is 0 there)
        G = grad_K[:, t].clone()
        y, x = max(ddy, 0), max(ddx, 0)  # (the mirror's region, as the forward copies it)
        G[:, y - ddy : y - ddy + rows, x - ddx : x - ddx + cols] += grad_K[:, k * k - 1 - t, y : y + rows,
                                                                           x : x + cols]
        G = (G * inside[:, dy : dy + h, dx : dx + w]).unsqueeze(1)
        diff = padded[:, :, dy : dy + h, dx : dx + w] - feats
        start = 0
        for g, c in enumerate(dims):
            x_g = diff[:, start : start + c]
            exponent = x_g.square().sum(1, keepdim=True).mul_(-0.5)
            e = _floored_exp(exponent, floor)
            a = G * e
            grad_compats[g] += a.sum(dtype=torch.float64)
            a = a.mul_(compats[g].to(dtype)) * x_g
            grad_padded[:, start : start + c, dy : dy + h, dx : dx + w] -= a
            grad_padded[:, start : start + c, r : r + h, r : r + w] += a
            start += c
    grad_feats = grad_padded[:, :, r : r + h, r : r + w].to(dtype).contiguous()  # (to() aliases a same-dtype slice)
    return grad_feats, grad_compats.to(compats.dtype)


class _MessagePass(torch.autograd.Function):
    """:func:`message_pass` with its gradients written out. Autograd's own, through the k² in-place adds of
    shifted views, zero-filled and copied a padded ``Q``-sized tensor a tap (``SliceBackward``)."""

    @staticmethod
    def forward(ctx, K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(K, Q)
        return _message_pass(K, Q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_M: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        K, Q = ctx.saved_tensors
        acc, _ = _message_dtypes(K, Q)
        grad_M = grad_M.to(acc)
        Qs = _pass_operand(Q, acc)
        grad_K = grad_Q = None
        if ctx.needs_input_grad[0]:
            grad_K = _message_weight_grad(grad_M, Qs, _filter_size(K)).to(K.dtype)
        if ctx.needs_input_grad[1]:  # (zero where the forward's hardshrink zeroed Q)
            grad_Q = torch.where(Qs != 0, _message_pass_transposed(K, grad_M), 0).to(Q.dtype)
        return grad_K, grad_Q


def _message_pass_transposed(K: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``X[b, c, q] = sum_t K[b, t, q - d_t] * G[b, c, q - d_t]``, the message pass's adjoint in ``Q`` (the sum runs
    over the pixels ``p = q - d_t`` in the image): each tap adds ``K_t * G`` to a shifted view of a padded ``X``.
    ``K: [B, k*k, h, w]``, ``G: [B, C, h, w]`` → ``X: [B, C, h, w]`` in ``G``'s dtype; row bands as the pass."""
    h, w = G.shape[-2:]
    k = _filter_size(K)
    r = k // 2
    padded = G.new_zeros(*G.shape[:2], h + 2 * r, w + 2 * r)
    for y0, rows in _row_bands(G):
        G_band, K_band = G[:, :, y0 : y0 + rows], K[:, :, y0 : y0 + rows]
        for t in range(k * k):
            dy, dx = divmod(t, k)
            padded[:, :, y0 + dy : y0 + dy + rows, dx : dx + w].addcmul_(K_band[:, t : t + 1].to(G.dtype), G_band)
    return padded[:, :, r : r + h, r : r + w]


def _message_weight_grad(G: torch.Tensor, Q: torch.Tensor, k: int) -> torch.Tensor:
    """``dK[b, t, p] = sum_c G[b, c, p] * Q[b, c, p + d_t]`` (zero where ``p + d_t`` leaves the image), the message
    pass's gradient in ``K``. ``G, Q: [B, C, h, w]`` → ``dK: [B, k*k, h, w]``; row bands as the pass, one product
    buffer a band."""
    B, C, h, w = G.shape
    r = k // 2
    padded = F.pad(Q, (r, r, r, r))
    dK = G.new_empty(B, k * k, h, w)
    for y0, rows in _row_bands(G):
        G_band = G[:, :, y0 : y0 + rows]
        product = torch.empty_like(G_band)
        for t in range(k * k):
            dy, dx = divmod(t, k)
            torch.mul(G_band, padded[:, :, y0 + dy : y0 + dy + rows, dx : dx + w], out=product)
            torch.sum(product, 1, out=dK[:, t, y0 : y0 + rows])
    return dK


def fused_message_pass(
    feats: torch.Tensor,
    dims: Sequence[int],
    compats: torch.Tensor,
    Q: torch.Tensor,
    filter_size: int,
    keep_centre: bool,
) -> torch.Tensor:
    """The message of :func:`message_pass` with ``K`` built from ``feats`` (materialised on this path)."""
    return message_pass(gaussian_weights(feats, dims, compats, filter_size, keep_centre), Q)


@torch.library.custom_op("convcrf_triton::reference_gaussian_weights", mutates_args=())
def _gaussian_weights_op(feats: torch.Tensor, dims: list[int], compats: torch.Tensor, filter_size: int,
                         keep_centre: bool, out_dtype: torch.dtype | None, floor: float | None) -> torch.Tensor:
    return _gaussian_weights(feats, dims, compats, filter_size, keep_centre, out_dtype, floor)


@_gaussian_weights_op.register_fake
def _(feats, dims, compats, filter_size, keep_centre, out_dtype, floor):  # noqa: ANN001, ANN202
    B, _, h, w = feats.shape
    return feats.new_empty(B, filter_size * filter_size, h, w, dtype=out_dtype or feats.dtype)


@torch.library.custom_op("convcrf_triton::reference_message_pass", mutates_args=())
def _message_pass_op(K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return _message_pass(K, Q)


@_message_pass_op.register_fake
def _(K, Q):  # noqa: ANN001, ANN202
    return Q.new_empty(Q.shape, dtype=_message_dtypes(K, Q)[1])
