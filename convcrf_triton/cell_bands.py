"""The PyTorch path's mean-field loop at blur > 1 on the CPU, a band of pooled rows at a time (inference only).

An iteration's full-resolution work is elementwise per pixel or per class column: upsample each Gaussian's pooled
message, scale it by the Gaussian's normaliser and sum, add the unary term, take the softmax, and pool each
Gaussian's normalised probabilities for the next pass. Done a whole ``[B, C, H, W]`` tensor an op at a time, each op
streams its operands through memory (15.7 MB each at 375×500, C = 21). Here it runs a band of pooled rows (``blur``
image rows each) at a time on buffers that stay in the core's cache, so an iteration reads one full-resolution tensor
(the unary term, kept in the output's memory) and writes none until the output. (375×500, C = 21, one thread:
``DenseCRF2D``'s inference 304 → 224 ms; 1024×2048, blur 4, k = 11: 2.2 → 1.3-1.4 s, 1.2 → 0.7 with two threads.
bench/README.md has the rest.)

The band's rows are those of the padded grid: ``[h·blur, w·blur]``, the image at ``(blur_padding(H), blur_padding(W))``
(:mod:`~convcrf_triton.resample`'s cells, whole). The Gaussians' normalisers are zero outside the image (without them
the input is zeroed there), so a cell's pooled sum over its whole ``blur × blur`` block holds only its real pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .resample import _lerp_weight, _upsample_axis, blur_padding, host_cell_counts

# A band's buffers (the sum being built, a second Gaussian's upsampled term, the pooling's product) each take about
# _BAND_BYTES on one thread and _THREAD_BAND_BYTES a thread on more (PyTorch splits each band's ops between its
# threads, and the ops' fixed costs weigh more there), at least one pooled row. 375×500, C = 21, blur 8, one
# thread: 512 KB 263 ms an inference, 1 MB 236, 2 MB 242, 4 MB 249 (blur 4: 97-101, 90-93, 91-99, 97-100); two
# threads, a thread: 1 MB blur 4 62-71 ms, blur 2 129-144, 2 MB 54-57, 122-134 (blur 8 and `DenseCRF2D` even).
_BAND_BYTES = 1024 << 10
_THREAD_BAND_BYTES = 2048 << 10

PooledMessage = Callable[[torch.Tensor], torch.Tensor]


def cell_band_loop(unary: torch.Tensor, passes: Sequence[tuple[PooledMessage, torch.Tensor | None]], blur: int,
                   factor: float | torch.Tensor, mode: str, num_iter: int, final_softmax: bool) -> torch.Tensor:
    """``num_iter`` (≥ 1) mean-field iterations of ``unary [B, C, H, W]`` (the logits out; probabilities with
    ``final_softmax``), as the loop of :func:`~convcrf_triton.functional.mean_field` computes them.

    ``passes``: per Gaussian, the function from its pooled input ``P [B, C, h, w]`` to its term of the logits on the
    pooled grid (message pass, compat weight, ``w`` and the compatibility), and its normaliser ``n [B, 1, H, W]``
    (None: none; its input is ``Q``, its term is not scaled); ``factor``: ``unary_weight - w`` (a number or
    ``[1, C, 1, 1]``); ``mode='convcrf'``: the first input is ``log_softmax(u)``, not ``softmax(u)``.
    """
    B, C, H, W = unary.shape
    b = blur
    h, w = -(-H // b), -(-W // b)
    py, px = blur_padding(H, b), blur_padding(W, b)
    wp = w * b

    def padded(n: torch.Tensor) -> torch.Tensor:  # [B, 1, H, W] → [B, 1, h·b, w·b], zero outside the image
        out = n.new_zeros(B, 1, h * b, wp)
        out[:, :, py : py + H, px : px + W] = n
        return out

    # What multiplies each Gaussian's input and term on the padded grid (None: nothing; its input is Q zeroed outside
    # the image, in place: the mask's product at the cost of its pads).
    weights = [None if n is None else padded(n) for _, n in passes]
    masked = any(n is None for n in weights)
    counts = [unary.new_tensor(host_cell_counts(n, fine, b)) for n, fine in ((h, H), (w, W))]
    inverse_counts = 1 / (counts[0][:, None] * counts[1])  # [h, w]
    threads = torch.get_num_threads()
    band_bytes = _BAND_BYTES if threads == 1 else _THREAD_BAND_BYTES * threads
    cells = max(1, band_bytes // (B * C * b * wp * unary.element_size()))
    bands = [(c0, min(c0 + cells, h)) for c0 in range(0, h, cells)]
    Z = unary.new_zeros(B, C, cells * b, wp)
    T = None if all(n is None for n in weights) else unary.new_empty(B, C, cells * b, wp)  # (n ⊙ Q)
    U = unary.new_empty(B, C, cells * b, wp) if len(passes) > 1 else None
    R = unary.new_empty(B, C, cells, wp)  # (the pooling's rows)
    pooled = [unary.new_empty(B, C, h, w) for _ in passes]
    lerps = _row_lerps(b, unary)
    out = unary.new_empty(B, C, H, W)  # (the unary term until the last iteration writes a band's output over it)

    def image_rows(c0: int, c1: int) -> tuple[int, int, int]:  # the band's image rows [r0, r1), r0's in the band
        r0, r1 = max(c0 * b - py, 0), min(c1 * b - py, H)
        return r0, r1, r0 + py - c0 * b

    def pool(Q: torch.Tensor, c0: int, c1: int) -> None:  # each Gaussian's input, summed over the band's cells
        if masked:
            r0, r1, o = image_rows(c0, c1)
            for pad in (Q[..., :px], Q[..., px + W :], Q[:, :, :o], Q[:, :, o + r1 - r0 :]):
                if pad.numel():
                    pad.zero_()
        for P, weight in zip(pooled, weights, strict=True):
            Tb = Q if weight is None else torch.mul(Q, weight[:, :, c0 * b : c1 * b], out=T[:, :, : Q.shape[2]])
            if b > 4:  # (a sum over each cell's rows, then its columns)
                rows = Tb.view(B, C, c1 - c0, b, wp).sum(3)
                torch.sum(rows.view(B, C, c1 - c0, w, b), dim=4, out=P[:, :, c0:c1])
            else:  # (a strided add a phase: PyTorch's sum over 2-4 contiguous values took 2-6x longer)
                rows = _phase_sum(Tb, b, 2, R[:, :, : c1 - c0])
                _phase_sum(rows, b, 3, P[:, :, c0:c1])

    for c0, c1 in bands:  # the set-up: the unary term and the first input
        Zb = Z[:, :, : (c1 - c0) * b]
        r0, r1, o = image_rows(c0, c1)
        L = F.log_softmax(unary[:, :, r0:r1], dim=1)
        torch.mul(L, factor, out=out[:, :, r0:r1])
        Zi = Zb[:, :, o : o + r1 - r0, px : px + W]
        if mode == "convcrf":
            Zi.copy_(L)
        else:
            torch.exp(L, out=Zi)  # (softmax(u), at a third of torch.softmax's time)
        pool(Zb, c0, c1)
    for i in range(num_iter):
        for P in pooled:
            P.mul_(inverse_counts)
        upsampled = [_upsampled_columns(message(P), b, wp) for (message, _), P in zip(passes, pooled, strict=True)]
        last = i == num_iter - 1
        for c0, c1 in bands:
            Zb = Z[:, :, : (c1 - c0) * b]
            for g, (X, weight) in enumerate(zip(upsampled, weights, strict=True)):
                Ub = Zb if g == 0 else U[:, :, : (c1 - c0) * b]
                phases = Ub.view(B, C, c1 - c0, b, wp)
                for left, p0, p1, t in lerps:  # (phases p0..p1 of each cell: a lerp between two rows of cells)
                    first = c0 + left + 1  # (X's row of the band's first cell's left cell)
                    torch.lerp(X[:, :, first : first + c1 - c0, None], X[:, :, first + 1 : first + 1 + c1 - c0, None],
                               t, out=phases[:, :, :, p0:p1])
                if g == 0:
                    if weight is not None:
                        Zb.mul_(weight[:, :, c0 * b : c1 * b])
                elif weight is None:
                    Zb.add_(Ub)
                else:
                    Zb.addcmul_(Ub, weight[:, :, c0 * b : c1 * b])
            r0, r1, o = image_rows(c0, c1)
            Zi = Zb[:, :, o : o + r1 - r0, px : px + W]
            Zi.add_(out[:, :, r0:r1])  # (the unary term is zero on the pads)
            if not last or final_softmax:
                softmax_(Zb)
            if last:
                out[:, :, r0:r1] = Zi
            else:
                pool(Zb, c0, c1)
    return out


def softmax_(Z: torch.Tensor) -> torch.Tensor:
    """``Z [B, C, ...]`` replaced by its softmax over the classes (dim 1), with no probability below ``C · tiny`` (the
    dtype's smallest normal number: x86 takes a slow path on denormal numbers; see
    :func:`~convcrf_triton.functional.softmax_of_sum`)."""
    Z.sub_(Z.amax(1, keepdim=True)).clamp_min_(math.log(torch.finfo(Z.dtype).tiny * Z.shape[1])).exp_()
    return Z.mul_(Z.sum(1, keepdim=True).reciprocal_())  # (a division took 3x the product: 279 against 85 µs)


def _row_lerps(b: int, like: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """The phases of a cell's ``b`` rows grouped by their left cell (:func:`~convcrf_triton.resample._lerp_weight`):
    ``(left, p0, p1, t)``, ``t [p1 - p0, 1]`` the weights of the next cell, one lerp a group where one a phase took
    ``b`` (one thread, 375×500, C = 21: ``DenseCRF2D`` (blur 8) 229-231 → 221 ms, blur 8 k = 11 130-142 → 120-123;
    blur 2 and 4 within the noise). Bitwise the same."""
    phases = [_lerp_weight(r, b) for r in range(b)]
    groups = []
    for left in sorted({left for left, _ in phases}):
        rows = [r for r, (of, _) in enumerate(phases) if of == left]
        groups.append((left, rows[0], rows[-1] + 1, like.new_tensor([phases[r][1] for r in rows]).view(-1, 1)))
    return groups


def _upsampled_columns(M: torch.Tensor, b: int, wp: int) -> torch.Tensor:
    """``M [B, C, h, w]`` upsampled ×b along its columns onto the padded grid's ``wp = w·b`` (no padding before its
    first cell: :func:`~convcrf_triton.resample._upsample_axis`'s lerps, uncropped) with an edge row before and
    after: ``[B, C, h + 2, wp]``, the rows' lerps reading their cell ``j`` at row ``j + 1`` (PyTorch's clamped source
    index at the edges)."""
    B, C, h, _ = M.shape
    X = M.new_empty(B, C, h + 2, wp)
    _upsample_axis(M, b, wp, 3, out=X[:, :, 1:-1])
    X[:, :, :1] = X[:, :, 1:2]
    X[:, :, -1:] = X[:, :, -2:-1]
    return X


def _phase_sum(x: torch.Tensor, b: int, dim: int, out: torch.Tensor) -> torch.Tensor:
    """The sum of each run of ``b`` along ``dim`` into ``out``: one strided add a phase."""
    phase = [slice(None)] * dim
    torch.add(x[(*phase, slice(0, None, b))], x[(*phase, slice(1, None, b))], out=out)
    for r in range(2, b):
        out.add_(x[(*phase, slice(r, None, b))])
    return out
