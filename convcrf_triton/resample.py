"""The blur path's resampling (SPEC §1): ``[B, C, H, W] ↔ [B, C, h, w]``, ``h, w = ceil(H / blur), ceil(W / blur)``.

The pooled grid's cells are centred on the image: ``blur_padding`` rows (columns) of padding come before the first,
so cell ``i`` covers rows ``[i·blur - pad, (i + 1)·blur - pad)`` clipped to the image. ``blur_pool`` averages each
cell's real pixels (``avg_pool2d(..., count_include_pad=False)``); ``blur_upsample`` is ``interpolate(...,
scale_factor=blur, mode='bilinear', align_corners=False)`` cropped back to ``H × W``.

On CPU tensors both run as separable passes over strided views, one elementwise op per phase of a cell (the
``blur`` rows, or columns, a cell holds): PyTorch's CPU kernels compute each output's source indices and weights as
they go. One thread of a 2-core AMD EPYC, ``C = 21``, 375×500 at blur 4 (the loop runs one of each an iteration at
full resolution): ``interpolate`` 12-15 ms, the lerps ~6; ``avg_pool2d`` 7 ms, the adds ~2.5-3.5. Differentiated,
each is an ``autograd.Function`` whose backward is its adjoint, separable too (``interpolate``'s CPU backward took
23 ms a call; a training step's backward at blur 4, k = 7, one thread: 355-389 → 171-187 ms). Elsewhere (CUDA)
PyTorch's kernels: one launch each.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The separable passes run a chunk of (image, class) planes at a time whose intermediate (rows pooled, or columns
# upsampled) takes about this many bytes (_in_plane_chunks).
_CHUNK_BYTES = 4 << 20


def blur_padding(n: int, blur: int) -> int:
    """Padding before the first cell so that ``blur`` tiles ``n`` pixels: ``ceil(((blur - n % blur) % blur) / 2)``,
    in integer arithmetic (a symbolic ``n`` of ``torch.compile``/``torch.export`` stays symbolic: no guard)."""
    return ((blur - n % blur) % blur + 1) // 2


def _phases(fine: int, cells: int, blur: int, dim: int) -> list[tuple[int, int, int, tuple[slice, ...]]]:
    """The phases of ``cells`` cells over ``fine`` rows along ``dim`` (cell ``i``'s phase ``r`` is row ``i·blur - pad
    + r``, ``pad = blur_padding(fine, blur)``), each that holds a real row: ``(r, first cell, cells, the index of
    their rows)``. A phase is real from the first cell on, or from the second where ``r < pad`` (``pad < blur``),
    up to the last cell whose row lies below ``fine``."""
    pad, phases = blur_padding(fine, blur), []
    for r in range(blur):
        first = 0 if r >= pad else 1
        count = min((fine - 1 + pad - r) // blur, cells - 1) + 1 - first
        if count > 0:
            start = first * blur - pad + r
            rows = (slice(None),) * dim + (slice(start, start + (count - 1) * blur + 1, blur),)
            phases.append((r, first, count, rows))
    return phases


def _host_cell_counts(cells: int, fine: int, blur: int, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Each cell's count of real rows (``blur`` inside, fewer in the border cells), shaped to divide along ``dim``:
    counted on the host (a CPU tensor: no device op; the traced form's counts are ops on symbolic sizes,
    :func:`_cell_counts`)."""
    counts = host_cell_counts(cells, fine, blur)
    return torch.tensor(counts, dtype=like.dtype, device=like.device).view(cells, *[1] * (like.dim() - 1 - dim))


def host_cell_counts(cells: int, fine: int, blur: int) -> list[int]:
    """Each of the ``cells`` cells' count of real rows (of ``fine``): ``blur`` inside, fewer in the border cells."""
    pad = blur_padding(fine, blur)
    return [min((i + 1) * blur - pad, fine) - max(i * blur - pad, 0) for i in range(cells)]


def _pool_axis(x: torch.Tensor, blur: int, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of each cell's real rows along ``dim``: ``[..., L, ...] → [..., ceil(L / blur), ...]``: one strided add
    a phase, over the cells that hold it, then a division by the cells' counts (into ``out`` where given)."""
    L = x.shape[dim]
    n = -(-L // blur)
    shape = list(x.shape)
    shape[dim] = n
    out = x.new_zeros(shape) if out is None else out.zero_()
    for _, first, count, rows in _phases(L, n, blur, dim):
        out.narrow(dim, first, count).add_(x[rows])
    return out.div_(_host_cell_counts(n, L, blur, x, dim))


def _cell_counts(n: int, L: int, pad: int, blur: int, like: torch.Tensor) -> torch.Tensor:
    """The real pixels of each of the ``n`` cells along an axis of ``L`` pixels: ``[n]`` in ``like``'s dtype."""
    first = torch.arange(n, device=like.device, dtype=like.dtype) * blur - pad
    return (first + blur).clamp(max=L) - first.clamp(min=0)


def _lerp_weight(r: int, blur: int) -> tuple[int, float]:
    """Phase ``r`` samples the grid at ``j + s``, ``s = (r + 0.5) / blur - 0.5`` (in ``(-0.5, 0.5)``): the offset
    ``floor(s)`` of its left cell and the weight ``s - floor(s)`` of the next."""
    s = (r + 0.5) / blur - 0.5
    return math.floor(s), s - math.floor(s)


def _upsample_axis(x: torch.Tensor, blur: int, n: int, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Linear ×blur along ``dim`` (align_corners=False), cropped to ``n``: ``[..., L, ...] → [..., n, ...]``
    (contiguous; into ``out`` where given).

    Phase ``r`` of cell ``j`` (output row ``j·blur + r - pad``) is one lerp a phase between the cells ``j + left``
    and the next (:func:`_lerp_weight`), over the cells whose row lies in the crop. Source cells beyond the grid are
    its edge cells (PyTorch clamps the source index). (Writing the crop only, not the whole grid then a view of it:
    one thread, 375×500 at blur 4, C = 21, the upsampling and the add that follows 7.6 → 6.4 ms, bitwise the same.)
    """
    L = x.shape[dim]
    edged = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, L - 1, 1)], dim)
    shape = list(x.shape)
    shape[dim] = n
    out = x.new_empty(shape) if out is None else out
    for r, first, count, rows in _phases(n, L, blur, dim):
        left, weight = _lerp_weight(r, blur)
        torch.lerp(edged.narrow(dim, 1 + left + first, count), edged.narrow(dim, 2 + left + first, count), weight,
                   out=out[rows])
    return out


def _pool_axis_adjoint(g: torch.Tensor, blur: int, L: int, dim: int) -> torch.Tensor:
    """The adjoint of :func:`_pool_axis` (its gradient): ``[..., ceil(L / blur), ...] → [..., L, ...]``, each row
    its cell's value over the cell's count (one strided copy a phase: every row lies in one cell)."""
    n = g.shape[dim]
    g = g / _host_cell_counts(n, L, blur, g, dim)
    shape = list(g.shape)
    shape[dim] = L
    out = g.new_empty(shape)
    for _, first, count, rows in _phases(L, n, blur, dim):
        out[rows] = g.narrow(dim, first, count)
    return out


def _upsample_axis_adjoint(g: torch.Tensor, blur: int, L: int, dim: int) -> torch.Tensor:
    """The adjoint of :func:`_upsample_axis` (its gradient): ``[..., n, ...] → [..., L, ...]``. Each phase's rows
    go back to the two cells its lerp read, weighted ``1 - weight`` and ``weight``; the edge cells also take what
    was read beyond the grid."""
    shape = list(g.shape)
    shape[dim] = L + 2
    edged = g.new_zeros(shape)
    for r, first, count, rows in _phases(g.shape[dim], L, blur, dim):
        left, weight = _lerp_weight(r, blur)
        edged.narrow(dim, 1 + left + first, count).add_(g[rows], alpha=1 - weight)
        edged.narrow(dim, 2 + left + first, count).add_(g[rows], alpha=weight)
    out = edged.narrow(dim, 1, L).clone()
    out.narrow(dim, 0, 1).add_(edged.narrow(dim, 0, 1))
    out.narrow(dim, L - 1, 1).add_(edged.narrow(dim, L + 1, 1))
    return out


def _in_plane_chunks(x: torch.Tensor, out: torch.Tensor, plane_bytes: int,
                     fn: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
    """``fn(xs, outs)`` over chunks of the ``[B, C]`` planes of ``x`` and ``out`` (``[n, rows, cols]`` views), as many
    planes a chunk as put ``_CHUNK_BYTES`` in the intermediate of a separable pass (``plane_bytes`` a plane): it
    stays in cache, and is no tensor of the whole's size, which took its page faults anew each time where it
    passed malloc's 32 MB (1024×2048, C = 21, blur 4: one thread of this project's Intel Xeon, the upsampling of a
    reused output 89 → 42 ms, the pooling 59 → 46, the inference at k = 11 3.0 → 2.3 s)."""
    B, C = x.shape[:2]
    xs, outs = x.reshape(B * C, *x.shape[2:]), out.view(B * C, *out.shape[2:])
    step = max(1, _CHUNK_BYTES // plane_bytes)
    for i in range(0, B * C, step):
        fn(xs[i : i + step], outs[i : i + step])
    return out


def _separable_pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    """Rows first (the strided column adds on 1/blur of ``x``), then columns, a chunk of planes at a time."""
    B, C, H, W = x.shape
    h = -(-H // blur)
    return _in_plane_chunks(x, x.new_empty(B, C, h, -(-W // blur)), h * W * x.element_size(),
                            lambda xs, outs: _pool_axis(_pool_axis(xs, blur, 1), blur, 2, outs))


def _separable_upsample(m: torch.Tensor, blur: int, H: int, W: int) -> torch.Tensor:
    """Columns first (their strided writes on ``h`` rows), then rows, a chunk of planes at a time."""
    B, C, h, _ = m.shape
    return _in_plane_chunks(m, m.new_empty(B, C, H, W), h * W * m.element_size(),
                            lambda ms, outs: _upsample_axis(_upsample_axis(ms, blur, W, 2), blur, H, 1, outs))


class _SeparablePool(torch.autograd.Function):
    """:func:`_separable_pool` with its gradient written out (autograd's own, through the strided in-place adds,
    zero-filled and copied an ``x``-sized gradient a phase)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blur: int) -> torch.Tensor:  # noqa: ANN001
        ctx.blur, ctx.size = blur, x.shape[-2:]
        return _separable_pool(x, blur)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (H, W), blur = ctx.size, ctx.blur
        return _pool_axis_adjoint(_pool_axis_adjoint(g, blur, W, 3), blur, H, 2), None


class _SeparableUpsample(torch.autograd.Function):
    """:func:`_separable_upsample` with its gradient written out (``lerp``'s ``out=`` has none; ``interpolate``'s
    CPU backward took 23 ms a call at 375×500, C = 21, blur 4, one thread)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, blur: int, H: int, W: int) -> torch.Tensor:  # noqa: ANN001
        ctx.blur, ctx.size = blur, m.shape[-2:]
        return _separable_upsample(m, blur, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        (h, w), blur = ctx.size, ctx.blur
        return _upsample_axis_adjoint(_upsample_axis_adjoint(g, blur, h, 2), blur, w, 3), None, None, None


def written_backward(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an eager op on these tensors: then this path's hand-written ops (the separable
    passes here, ``reference``'s weights and message pass) run as an ``autograd.Function`` whose backward is
    written out. (Traced by ``torch.compile``/``torch.export``, autograd differentiates the traced ops.)"""
    return _tracked(*tensors) and not torch.compiler.is_compiling()


def _tracked(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def opaque_on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.compile`` (not ``torch.export``) traces an inference on the CPU: there this path's costly ops
    (the resampling here, ``reference``'s weights and message pass) run as custom ops whose implementation is the
    eager code, opaque to inductor. Inductor's own code for them, a 2-core AMD EPYC, 375×500, C = 21, blur 4, k = 7,
    5 iterations: 140 s to compile and 125 ms an inference against eager's 62 (symbolic sizes: 590 s, 374 ms
    against 77); with the custom ops 13 s and 62 ms against 75 (symbolic sizes 15 s, 65 against 77). The exported
    graph of ``torch.export`` keeps the ATen ops (it needs no import of this package), and a gradient the traced
    ops."""
    return (torch.compiler.is_compiling() and not _exporting() and tensors[0].device.type == "cpu"
            and not _tracked(*tensors))


def _exporting() -> bool:
    """``torch.compiler.is_exporting()``, read from the flag it returns: torch 2.11's tracer (the GPU image's) folds the
    call to True in every trace, ``torch.compile``'s too, which took a CPU inference to inductor's code for the traced
    ops (a C++ compile error there: ``decltype(...)::blendv`` of a float)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def eager_cpu(t: torch.Tensor) -> bool:
    """Where this path's hand-written forms of PyTorch ops run (the separable passes here, the loop's in-place
    softmax): a CPU tensor outside ``torch.compile``, whose inductor fuses the plain ops itself and whose tracer
    takes no strided ``out=``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def blur_pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, C, ceil(H/blur), ceil(W/blur)]`` averages over the real pixels only."""
    if blur == 1:
        return x
    if opaque_on_cpu(x):
        return _pool_op(x, blur)
    if eager_cpu(x):
        return _SeparablePool.apply(x, blur) if written_backward(x) else _separable_pool(x, blur)
    H, W = x.shape[-2:]
    pad = (blur_padding(H, blur), blur_padding(W, blur))
    if torch.compiler.is_compiling():
        return _traced_pool(x, blur, pad)
    return F.avg_pool2d(x, blur, stride=blur, padding=pad, count_include_pad=False)


def _traced_pool(x: torch.Tensor, blur: int, pad: tuple[int, int]) -> torch.Tensor:
    """:func:`blur_pool` as ``torch.compile``/``torch.export`` trace it: the cells' sums over the zero-padded tensor,
    divided by their counts of real pixels. ``avg_pool2d`` takes its padding as ints, which specialised a graph to
    the image size's remainder modulo ``blur``; these ops keep symbolic sizes symbolic (inductor fuses them)."""
    (H, W), (py, px) = x.shape[-2:], pad
    h, w = -(-H // blur), -(-W // blur)
    sums = F.pad(x, (px, w * blur - W - px, py, h * blur - H - py)).unflatten(-1, (w, blur)).sum(-1)
    sums = sums.unflatten(-2, (h, blur)).sum(-2)
    return sums / (_cell_counts(h, H, py, blur, x)[:, None] * _cell_counts(w, W, px, blur, x))


def blur_upsample(m: torch.Tensor, blur: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`blur_pool`: bilinear ×blur (align_corners=False), cropped back to ``H × W``."""
    if blur == 1:
        return m
    if opaque_on_cpu(m):
        return _upsample_op(m, blur, H, W)
    if eager_cpu(m):
        if written_backward(m):
            return _SeparableUpsample.apply(m, blur, H, W)
        return _separable_upsample(m, blur, H, W)
    if torch.compiler.is_compiling():
        return _traced_upsample(_traced_upsample(m, blur, W, 3), blur, H, 2)
    up = F.interpolate(m, scale_factor=blur, mode="bilinear", align_corners=False)
    py, px = blur_padding(H, blur), blur_padding(W, blur)
    return up[:, :, py : py + H, px : px + W]


def _traced_upsample(x: torch.Tensor, blur: int, n: int, dim: int) -> torch.Tensor:
    """:func:`blur_upsample` along ``dim`` as ``torch.compile``/``torch.export`` trace it: ``interpolate``'s source
    coordinates (``(i + 0.5) / blur - 0.5``, clamped at 0) computed for the ``n`` kept outputs only, each a lerp
    between two gathered cells. Cropping ``interpolate``'s output took a slice whose bound a symbolic size could
    not prove, and so specialised the graph to it."""
    L = x.shape[dim]
    i = torch.arange(n, device=x.device, dtype=x.dtype) + blur_padding(n, blur)
    src = ((i + 0.5) * (1.0 / blur) - 0.5).clamp(min=0)
    left = src.floor()
    weight = (src - left).view(n, *[1] * (x.dim() - 1 - dim))
    left = left.long()
    right = (left + 1).clamp(max=L - 1)
    return torch.lerp(x.index_select(dim, left), x.index_select(dim, right), weight)


@torch.library.custom_op("convcrf_triton::reference_blur_pool", mutates_args=())
def _pool_op(x: torch.Tensor, blur: int) -> torch.Tensor:
    return _separable_pool(x, blur)


@_pool_op.register_fake
def _(x, blur):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-2], -(-x.shape[-2] // blur), -(-x.shape[-1] // blur))


@torch.library.custom_op("convcrf_triton::reference_blur_upsample", mutates_args=())
def _upsample_op(m: torch.Tensor, blur: int, H: int, W: int) -> torch.Tensor:
    return _separable_upsample(m, blur, H, W)


@_upsample_op.register_fake
def _(m, blur, H, W):  # noqa: ANN001, ANN202
    return m.new_empty(*m.shape[:-2], H, W)

