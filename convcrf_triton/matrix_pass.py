"""The PyTorch path's message pass as matrix products, on the CPU, where they beat the window sums.

The message ``M[b, c, p] = sum_t K[b, t, p] Q[b, c, p + d_t]`` (:func:`~convcrf_triton.reference.message_pass`) is
``Q``'s pixels times the sparse matrix ``A[p, p + d_t] = K[t, p]``. Its window sums (one multiply-add a tap and
pixel over shifted views, re-reading ``M`` and a shifted ``Q`` for each tap) run at 1-3 GFLOP/s on one core of this
project's Intel Xeon; a matrix product at 20-40. ``K`` is the same in every iteration, so one inference builds the
form once and each pass is products:

- :class:`DensePass`, all of ``A: [h·w, h·w]``, where the grid is small against the window (the pydensecrf drop-in's
  31×31 window at blur 8 covers most of a small image's pooled grid);
- :class:`BandPass`, the blocks of ``A`` between a tile of ``T`` pixels of a row and the pixels ``dy`` rows away:
  ``[T, T + 2 rx]``, banded (tap ``(dy, dx)`` on the ``dx``-th diagonal); a pass is one batched product a row offset,
  every tile of the image at once;
- :class:`TracedPass`, either of them where ``torch.compile`` traces a CPU inference (custom ops).

They sum the same products as the window sums in another order (float32 rounding apart), in the message pass's
dtypes, with its flushed operand (``reference._pass_operand``). No gradient reaches ``K`` (:func:`matrix_pass`
builds none where ``K`` requires one); a form whose ``differentiable`` is True passes ``Q``'s (the dense one
autograd's, through the product; the banded one the same pass of ``M``'s gradient, where ``K`` is symmetric), the
others are for ``Q`` outside autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import _filter_size, _message_dtypes, _message_pass, _pass_operand
from .resample import opaque_on_cpu

# DensePass where the grid has at most _DENSE_PER_TAP pixels a tap that reaches inside it and A at most
# _DENSE_ELEMENTS elements. One thread of this project's Intel Xeon, C = 21, a pass window sums / product, the build
# (ms; pixels a tap): 47×63 k = 31 25 / 4.9, 25 (3.1); k = 21 11.5 / 4.9, 21 (6.7); k = 15 5.8 / 5.0, 19 (13);
# 32×32 k = 11 1.7 / 0.7, 0.6 (8.5); k = 7 0.7 / 0.7, 0.4 (21).
_DENSE_PER_TAP = 8
_DENSE_ELEMENTS = 1 << 25
# BandPass: tiles of _TILE pixels (T = 4, 6, 8, 12, 16, 32 measured; 8 best or within 10% of it everywhere), where its
# products take at most _BAND_PER_TAP times the window's multiply-adds (rows of live taps × (T + 2 rx) against the
# live taps) and the bands at most _BAND_ELEMENTS elements. One thread, C = 21, a pass window sums / bands, the build
# (ms): 375×500 k = 11 182 / 54, 141; k = 5 46 / 23, 34; 128×256 k = 31 249 / 46, 188; 94×125 k = 11 10 / 3.4, 2.6.
# Whole inferences at 375×500 (window / bands, ms): blur 1 k = 3 176-187 / 228-241 (10 products a pixel against 3
# sums: excluded), k = 5 316-323 / 298-309, k = 11 1115-1125 / 663-667.
_TILE = 8
_BAND_PER_TAP = 3
_BAND_ELEMENTS = 1 << 26
# BandPass's products, [h · L, C] an image, go to the planar M through a planar copy of the whole ([C, h · L], PyTorch's
# blocked 2-D transpose) where they have at least _TRANSPOSE_ELEMENTS, else as one permuted copy of M's pixels. C = 21,
# one thread / two (ms): 94×125 0.17 / 0.16 → 0.36 / 0.40 (in cache), 128×256 1.41 / 1.45 → 0.97 / 1.13, 256×512
# 8.1 / 3.8 → 3.9 / 3.6, 375×500 11.6 / 5.1 → 6.7 / 5.6.
_TRANSPOSE_ELEMENTS = 1 << 19


def matrix_pass(K: torch.Tensor, taps: Sequence[int] | None = None, symmetric: bool = False
                ) -> DensePass | BandPass | TracedPass | None:
    """The message pass of ``K: [B, k*k, h, w]`` (CPU) as a :class:`DensePass` or a :class:`BandPass`, whichever the
    sizes call for, or None: the window sums. ``taps``: those with a weight (``reference.live_taps``; None: every
    tap); ``symmetric``: ``K`` is (a Gaussian's weights: the bands pass ``Q``'s gradient). None where ``K`` requires
    a gradient; where ``torch.compile`` traces a CPU inference, a :class:`TracedPass` (custom ops that choose when
    they run), and None where else it traces."""
    if K.requires_grad or K.device.type != "cpu" or K.numel() == 0:
        return None
    if torch.compiler.is_compiling():
        return TracedPass(K) if opaque_on_cpu(K) else None
    plan = _plan(K.shape, taps)
    if plan is None:
        return None
    return DensePass(K) if plan == "dense" else BandPass(K, plan, symmetric=symmetric)


def _plan(shape: Sequence[int], taps: Sequence[int] | None) -> str | list[int] | None:
    """Which form the sizes of ``K: [B, k*k, h, w]`` call for: ``"dense"``, the tap rows of a :class:`BandPass`,
    or None (the window sums)."""
    B, kk, h, w = shape
    k, r, ry, rx = _reach(shape)
    live = [t for t in (range(kk) if taps is None else taps) if abs(t // k - r) <= ry and abs(t % k - r) <= rx]
    if not live:
        return None
    if h * w <= _DENSE_PER_TAP * len(live) and B * (h * w) ** 2 <= _DENSE_ELEMENTS:
        return "dense"
    rows = sorted({t // k for t in live})
    tiles = -(-(w + 2 * rx) // _TILE)
    if (len(rows) * (_TILE + 2 * rx) <= _BAND_PER_TAP * len(live)
            and B * len(rows) * h * tiles * _TILE * (_TILE + 2 * rx) <= _BAND_ELEMENTS):
        return rows
    return None


def _reach(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """``(k, r, ry, rx)`` of ``K: [B, k*k, h, w]``: the window, its radius, and the row and column offsets that reach
    inside the grid (``min(r, h - 1)``, ``min(r, w - 1)``: the taps further away reach outside it from every pixel)."""
    _, kk, h, w = shape
    k = round(kk**0.5)
    r = k // 2
    return k, r, min(r, h - 1), min(r, w - 1)


def _acc(K: torch.Tensor) -> torch.dtype:
    return torch.float64 if K.dtype == torch.float64 else torch.float32


class DensePass:
    """``M[b, c] = A[b] Q[b, c]`` over the flattened pixels with all of ``A: [B, h*w, h*w]``.

    ``A`` is built a row offset ``dy`` at a time (up to ``ry = min(r, h - 1)``, ``rx`` likewise): its taps are
    copied into ``T: [B, h - |dy|, w, w + 2 rx]`` at ``T[b, i, x, x + dx + rx]`` through one sheared view, and
    ``T``'s centre columns are the block of ``A`` where ``q``'s row is ``p``'s plus ``dy`` (another view)."""

    differentiable = True

    def __init__(self, K: torch.Tensor, A: torch.Tensor | None = None) -> None:
        """``A``: built before from this ``K`` (:class:`TracedPass`'s), else built here."""
        self.A = self._matrix(K) if A is None else A

    @staticmethod
    def _matrix(K: torch.Tensor) -> torch.Tensor:
        B, _, h, w = K.shape
        k, r, ry, rx = _reach(K.shape)
        acc = _acc(K)
        # (where dy reaches every row, the blocks cover A)
        A = (K.new_empty if ry == h - 1 else K.new_zeros)(B, h * w, h * w, dtype=acc)
        sB, sP, sQ = A.stride()
        taps_by_row = K.unflatten(1, (k, k))[:, :, r - rx : r + rx + 1]  # [B, k, 2 rx + 1, h, w]
        for dy in range(-ry, ry + 1):
            y0, rows = max(0, -dy), h - abs(dy)  # (the rows y whose y + dy lies in the grid)
            T = K.new_zeros(B, rows, w, w + 2 * rx, dtype=acc)
            tB, tI, tX, tQ = T.stride()
            T.as_strided((B, 2 * rx + 1, rows, w), (tB, tQ, tI, tX + tQ)).copy_(
                taps_by_row[:, r + dy, :, y0 : y0 + rows])
            A.as_strided((B, rows, w, w), (sB, w * (sP + sQ), sP, sQ), (y0 * sP + (y0 + dy) * sQ) * w).copy_(
                T[..., rx : rx + w])
        return A

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        """``Q: [B, C, h, w]`` → ``M``, in the message pass's dtypes."""
        acc, out_dtype = _message_dtypes(self.A, Q)
        return torch.bmm(_pass_operand(Q, acc).flatten(2), self.A.mT).view_as(Q).to(out_dtype)


class BandPass:
    """The message pass as one batched product a row offset ``dy`` over tiles of ``T`` pixels.

    A row's tiles start every ``T`` pixels of a row padded to ``L = tiles · T >= w + 2 rx`` columns. For the tile at
    ``(y, x0)``, ``M[y, x0 + i] += sum_j bands[dy][i, j] · Q[y + dy - r, x0 + j - rx]`` with ``bands[dy][i, j] =
    K[(dy, j - i + r - rx), (y, x0 + i)]``: ``[T, T + 2 rx]``, nonzero on its ``2 rx + 1`` diagonals. In the
    channels-last, zero-padded ``Q``, ``[h + 2 ry + 1, L, C]``, tile ``b = y · tiles + t``'s ``[T + 2 rx, C]``
    neighbours start ``b · T · C`` elements after row ``dy``'s first, so every tile's is one strided view (the last
    reads ``2 rx`` values into the row below, times zero weights). ``bands: [B, rows, h · tiles, T, T + 2 rx]`` for
    the tap rows ``rows`` (those with a weight: :func:`matrix_pass`) that reach inside the grid.

    Differentiable in ``Q`` where ``K`` is ``symmetric``, ``K[t(d), p] = K[t(-d), p + d]`` (a Gaussian's weights, as
    ``reference.gaussian_weights`` builds them, to the bit): then ``A`` is its own transpose and ``Q``'s gradient is
    the same pass of ``M``'s (:class:`_SymmetricBandPass`)."""

    def __init__(self, K: torch.Tensor, rows: Sequence[int], bands: torch.Tensor | None = None,
                 symmetric: bool = False) -> None:
        """``bands``: built before from this ``K`` and ``rows`` (:class:`TracedPass`'s, any shape of as many
        elements), else built here."""
        self.differentiable = symmetric
        B, _, h, w = K.shape
        T = _TILE
        _, r, self.ry, rx = _reach(K.shape)
        self.r, self.rx = r, rx
        rows = self.rows = [dy for dy in rows if abs(dy - r) <= self.ry]  # (the others read only zeros)
        self.tiles = -(-(w + 2 * rx) // T)
        self._scratch: tuple[torch.Tensor, ...] | None = None  # (the padded Q, the products, M planar: _buffers)
        shape = (B, len(rows), h * self.tiles, T, T + 2 * rx)
        self.bands = self._bands(K, shape) if bands is None else bands.view(shape)

    def _bands(self, K: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        B, _, h, w = K.shape
        k, r, rx, T = _filter_size(K), self.r, self.rx, _TILE
        rows = self.rows
        bands = K.new_zeros(B, len(rows), h, self.tiles, T, T + 2 * rx, dtype=_acc(K))
        sB, sR, sY, sT, sI, sJ = bands.stride()
        whole = w // T  # (tiles wholly inside the image; then the part of one)
        for n, dy in enumerate(rows):
            src = K.unflatten(1, (k, k))[:, dy, r - rx : r + rx + 1]  # [B, 2 rx + 1, h, w]
            dst = bands[:, n].as_strided((B, 2 * rx + 1, h, self.tiles, T), (sB, sJ, sY, sT, sI + sJ),
                                         bands.storage_offset() + n * sR)
            dst[..., :whole, :].copy_(src[..., : whole * T].unflatten(-1, (whole, T)))
            if whole * T < w:
                dst[..., whole, : w - whole * T].copy_(src[..., whole * T :])
        return bands.view(shape)

    def _buffers(self, Q: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The zero-padded, channels-last ``Q``, the products' ``[B, h · tiles, T, C]`` and their planar copy
        ``[B, C, h, tiles · T]`` (never touched where unused), kept from the last call of the same shape (each pass
        rewrites ``Q``'s part and every product; fresh ones took their page faults and their zero fill every
        pass)."""
        B, C, h, _ = Q.shape
        L = self.tiles * _TILE
        if self._scratch is None or self._scratch[0].shape[-1] != C or self._scratch[0].dtype != acc:
            self._scratch = (Q.new_zeros(B, h + 2 * self.ry + 1, L, C, dtype=acc),
                             Q.new_empty(B, h * self.tiles, _TILE, C, dtype=acc), Q.new_empty(B, C, h, L, dtype=acc))
        return self._scratch

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        """``Q: [B, C, h, w]`` → ``M``, in the message pass's dtypes."""
        if self.differentiable and torch.is_grad_enabled() and Q.requires_grad:
            return _SymmetricBandPass.apply(Q, self)
        return self._products(Q)

    def _products(self, Q: torch.Tensor, flush: bool = True) -> torch.Tensor:
        """The pass of ``Q`` (``flush``: as the message pass's operand; the gradient's pass takes every value)."""
        B, C, h, w = Q.shape
        T, r, rx, ry = _TILE, self.r, self.rx, self.ry
        acc, out_dtype = _message_dtypes(self.bands, Q)
        L = self.tiles * T
        padded, M, planar = self._buffers(Q, acc)
        interior = padded[:, ry : ry + h, rx : rx + w].permute(0, 3, 1, 2)
        if flush:  # (the flush and the move to channels-last one op: 4.5 → 2.6 ms at 375×500)
            _pass_operand(Q, acc, out=interior)
        else:
            interior.copy_(Q)
        if not self.rows:
            M.zero_()
        for b in range(B):
            for n, dy in enumerate(self.rows):
                near = padded[b].as_strided((h * self.tiles, T + 2 * rx, C), (T * C, C, 1),
                                            padded[b].storage_offset() + (dy - r + ry) * L * C)
                if n == 0:
                    torch.bmm(self.bands[b, n], near, out=M[b])
                else:
                    M[b].baddbmm_(self.bands[b, n], near)
        out = Q.new_empty(B, C, h, w, dtype=out_dtype)
        if h * L * C < _TRANSPOSE_ELEMENTS:
            return out.copy_(M.view(B, h, L, C)[:, :, :w].permute(0, 3, 1, 2))
        for b in range(B):  # (a 2-D transpose: PyTorch's blocked copy)
            planar[b].view(C, h * L).copy_(M[b].view(h * L, C).t())
        return out.copy_(planar[..., :w])


class _SymmetricBandPass(torch.autograd.Function):
    """A symmetric :class:`BandPass` under autograd: ``Q``'s gradient is ``A^T G = A G``, zero where the pass's flush
    zeroed ``Q`` (as ``reference``'s written-out backward)."""

    @staticmethod
    def forward(ctx, Q: torch.Tensor, form: BandPass) -> torch.Tensor:  # noqa: ANN001
        ctx.form = form
        ctx.save_for_backward(Q)
        return form._products(Q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_M: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (Q,) = ctx.saved_tensors
        acc, _ = _message_dtypes(ctx.form.bands, Q)
        grad_Q = ctx.form._products(grad_M.to(acc), flush=False)
        return torch.where(_pass_operand(Q, acc) != 0, grad_Q, 0).to(Q.dtype), None


class TracedPass:
    """The matrix forms where ``torch.compile`` traces a CPU inference: two custom ops, opaque to the tracer, that run
    the eager code. ``convcrf_triton::matrix_pass_weights`` builds what :func:`matrix_pass` would for ``K``'s sizes
    (every tap counted live) as one flat tensor, of a size known when it runs (empty: the window sums);
    ``convcrf_triton::matrix_message_pass`` passes ``Q`` through it, or through ``K``'s window sums. Neither
    specialises the traced graph on the image size. Inference only (a gradient traces ATen ops)."""

    differentiable = False

    def __init__(self, K: torch.Tensor) -> None:
        self.K, self.form = K, _weights_op(K)

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        return _pass_op(self.K, self.form, Q)


@torch.library.custom_op("convcrf_triton::matrix_pass_weights", mutates_args=())
def _weights_op(K: torch.Tensor) -> torch.Tensor:
    plan = _plan(K.shape, None)
    if plan is None:
        return K.new_empty(0, dtype=_acc(K))
    return (DensePass(K).A if plan == "dense" else BandPass(K, plan).bands).flatten()


@_weights_op.register_fake
def _(K):  # noqa: ANN001, ANN202
    return K.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=_acc(K))


@torch.library.custom_op("convcrf_triton::matrix_message_pass", mutates_args=())
def _pass_op(K: torch.Tensor, form: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    plan = _plan(K.shape, None)
    if plan is None:
        return _message_pass(K, Q)
    B, _, h, w = K.shape
    return (DensePass(K, form.view(B, h * w, h * w)) if plan == "dense" else BandPass(K, plan, form))(Q)


@_pass_op.register_fake
def _(K, form, Q):  # noqa: ANN001, ANN202
    return Q.new_empty(Q.shape, dtype=_message_dtypes(K, Q)[1])
