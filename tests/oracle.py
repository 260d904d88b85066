"""Two independent oracles for ConvCRF mean-field inference (SPEC §1), used to test the real implementation.

``naive_crf``
    Explicit Python loops in float64 numpy (no torch in the maths): pooling, the k×k Gaussian window,
    bilinear upsampling and the mean-field loop are all written out pixel by pixel. Meant for tiny inputs
    (about 12×12, C ≤ 4). Two modes: ``"textbook"`` (centre tap 0, first pass on ``softmax(L)``) and
    ``"convcrf"`` (the original ConvCRF code's behaviour: centre tap kept, first pass on ``L``).

``unfold_crf``
    The original ConvCRF formulation (Teichmann & Cipolla) in torch, driven by the original config dict:
    a materialised ``[B, k, k, h, w]`` Gaussian per kernel and an ``F.unfold`` message pass (memory
    ``B·C·k²·h·w``). Follows the input dtype (float32 or float64). It lives in
    :mod:`convcrf_triton.baselines` (the benchmarks' "unfold baseline") and is re-exported here with
    ``DEFAULT_CONF``.

Shapes: ``unary`` ``[B, C, H, W]`` (logits), ``image`` ``[B, 3, H, W]`` (RGB, scale [0, 255]); both return
``[B, C, H, W]``. With blur ``s > 1`` message passing runs on the pooled ``[ceil(H/s), ceil(W/s)]`` grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from convcrf_triton.baselines import DEFAULT_CONF, unfold_crf

Array = npt.NDArray[np.float64]


def convcrf_conf(**kw: Any) -> dict[str, Any]:
    """The original ConvCRF default config with some keys replaced (nested dicts are updated)."""
    conf = copy.deepcopy(DEFAULT_CONF)
    for key, val in kw.items():
        if isinstance(val, dict):
            conf[key].update(val)
        else:
            conf[key] = val
    return conf

__all__ = [
    "DEFAULT_CONF",
    "convcrf_conf",
    "blur_padding",
    "naive_avg_pool",
    "naive_crf",
    "naive_upsample_bilinear",
    "unfold_crf",
]


# ---------------------------------------------------------------------------------------------------------
# naive float64 oracle
# ---------------------------------------------------------------------------------------------------------


def blur_padding(n: int, s: int) -> int:
    """Padding per side for pooling a length-``n`` axis by ``s``: ``ceil(((s - n mod s) mod s) / 2)``."""
    return math.ceil(((s - n % s) % s) / 2)


def _pooled_size(n: int, s: int) -> int:
    """``ceil(n / s)``, checked against the avg_pool2d output-size formula with ``blur_padding``."""
    pad = blur_padding(n, s)
    size = -(-n // s)
    assert (n + 2 * pad - s) // s + 1 == size, (n, s, pad)
    return size


def naive_avg_pool(x: Array, s: int) -> Array:
    """Average-pool ``x`` ``[ch, H, W]`` by ``s`` (stride ``s``, ``blur_padding``, count_include_pad=False).

    Returns ``[ch, ceil(H/s), ceil(W/s)]``: each output is the mean over the real pixels of its window.
    """
    ch, H, W = x.shape
    pad_y, pad_x = blur_padding(H, s), blur_padding(W, s)
    h, w = _pooled_size(H, s), _pooled_size(W, s)
    out = np.zeros((ch, h, w), dtype=np.float64)
    for c in range(ch):
        for i in range(h):
            for j in range(w):
                total = 0.0
                count = 0
                for y in range(i * s - pad_y, i * s - pad_y + s):
                    for xx in range(j * s - pad_x, j * s - pad_x + s):
                        if 0 <= y < H and 0 <= xx < W:
                            total += x[c, y, xx]
                            count += 1
                assert count > 0
                out[c, i, j] = total / count
    return out


def _bilinear_taps(n_in: int, s: int) -> list[tuple[int, int, float]]:
    """For each output index of an ×``s`` align_corners=False upsampling: (i0, i1, lambda)."""
    taps = []
    for dst in range(n_in * s):
        src = (dst + 0.5) / s - 0.5
        if src < 0.0:
            src = 0.0
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        taps.append((i0, i1, src - i0))
    return taps


def naive_upsample_bilinear(x: Array, s: int) -> Array:
    """Bilinear ×``s`` upsampling of ``x`` ``[ch, h, w]`` (align_corners=False) → ``[ch, h·s, w·s]``.

    Source coordinate ``src = (dst + 0.5)/s − 0.5``, clamped at 0 below; the upper neighbour is clamped to
    the last index.
    """
    ch, h, w = x.shape
    ty, tx = _bilinear_taps(h, s), _bilinear_taps(w, s)
    out = np.zeros((ch, h * s, w * s), dtype=np.float64)
    for c in range(ch):
        for oy, (y0, y1, ly) in enumerate(ty):
            for ox, (x0, x1, lx) in enumerate(tx):
                top = (1.0 - lx) * x[c, y0, x0] + lx * x[c, y0, x1]
                bottom = (1.0 - lx) * x[c, y1, x0] + lx * x[c, y1, x1]
                out[c, oy, ox] = (1.0 - ly) * top + ly * bottom
    return out


def _gaussian_window(feats: Array, k: int, keep_centre: bool) -> Array:
    """``G[dy+r, dx+r, y, x] = exp(-½ Σ_i (f_i[y, x] − f_i[y+dy, x+dx])²)`` for ``feats`` ``[F, h, w]``.

    Zero where the neighbour is outside the grid; the centre is 1 (``keep_centre``) or 0.
    Returns ``[k, k, h, w]``.
    """
    nf, h, w = feats.shape
    r = k // 2
    g = np.zeros((k, k, h, w), dtype=np.float64)
    for y in range(h):
        for x in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    ny, nx = y + dy, x + dx
                    if not (0 <= ny < h and 0 <= nx < w):
                        continue
                    if dy == 0 and dx == 0 and not keep_centre:
                        continue
                    sq = 0.0
                    for i in range(nf):
                        diff = feats[i, y, x] - feats[i, ny, nx]
                        sq += diff * diff
                    g[dy + r, dx + r, y, x] = math.exp(-0.5 * sq)
    return g


def _blur_pass(x: Array, kern: Array, s: int) -> Array:
    """Message pass of ``x`` ``[ch, H, W]`` through the blur path with window ``kern`` ``[k, k, h, w]``.

    Pool by ``s``, ``M[c, p] = Σ_d kern[d, p]·X[c, p+d]`` on the pooled grid, upsample ×``s``, crop.
    """
    ch, H, W = x.shape
    k = kern.shape[0]
    r = k // 2
    xp = naive_avg_pool(x, s)
    _, h, w = xp.shape
    m = np.zeros((ch, h, w), dtype=np.float64)
    for c in range(ch):
        for y in range(h):
            for xx in range(w):
                acc = 0.0
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        ny, nx = y + dy, xx + dx
                        if 0 <= ny < h and 0 <= nx < w:
                            acc += kern[dy + r, dx + r, y, xx] * xp[c, ny, nx]
                m[c, y, xx] = acc
    up = naive_upsample_bilinear(m, s)
    pad_y, pad_x = blur_padding(H, s), blur_padding(W, s)
    return up[:, pad_y : pad_y + H, pad_x : pad_x + W]


def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _log_softmax(z: Array) -> Array:
    zs = z - z.max(axis=0, keepdims=True)
    return zs - np.log(np.exp(zs).sum(axis=0, keepdims=True))


def _per_channel(bandwidth: float | npt.ArrayLike) -> Array:
    """A bandwidth, or one a channel, as ``[n, 1, 1]`` (``n`` = 1 or the channels)."""
    return np.asarray(bandwidth, dtype=np.float64).reshape(-1, 1, 1)


def _compat_times(cw: float | npt.ArrayLike, m: Array) -> Array:
    """A Gaussian's compat weight times its message ``m [C, H, W]``: a number's product, or a ``[C, C]`` matrix's
    product over the classes at each pixel."""
    if np.ndim(cw) == 2:
        return np.einsum("ij,jyx->iyx", np.asarray(cw, dtype=np.float64), m)
    return cw * m


def naive_crf(
    unary: npt.ArrayLike,
    image: npt.ArrayLike,
    *,
    filter_size: int,
    blur: int,
    num_iter: int,
    pos_sdims: float | npt.ArrayLike = 3.0,
    pos_compat: float | npt.ArrayLike = 3.0,
    col_sdims: float | npt.ArrayLike = 80.0,
    col_schan: float | npt.ArrayLike = 13.0,
    col_compat: float | npt.ArrayLike = 10.0,
    col_use_pos: bool = False,
    weight: float | Sequence[float] | npt.ArrayLike = 0.2,
    unary_weight: float = 1.0,
    norm: str = "none",
    merge: bool = True,
    compat: npt.ArrayLike | None = None,
    mode: str = "textbook",
    final_softmax: bool = False,
) -> Array:
    """Explicit-loop float64 ConvCRF mean-field inference (SPEC §1).

    Args:
        unary: logits ``[B, C, H, W]``.
        image: RGB ``[B, 3, H, W]``.
        pos_sdims, col_sdims, col_schan: a bandwidth, or one a channel (positions: rows, columns; colours: r, g, b).
        pos_compat, col_compat: a Gaussian's compat weight, or (``merge=False``) a ``[C, C]`` label-compatibility
            matrix ``μ``: its term of the message is then ``μ @ M_g``.
        weight: scalar or per-class ``[C]`` weight ``w``.
        compat: ``None`` or a ``[C, C]`` 1×1-conv matrix; the message becomes ``M + compat @ M``.
        mode: ``"textbook"`` (centre tap 0, first pass on ``softmax(L)``) or ``"convcrf"`` (centre tap
            kept, first pass on ``L``, as the original ConvCRF code).
        final_softmax: return ``softmax(Z)`` instead of ``Z``.

    Returns:
        ``[B, C, H, W]`` float64: the last ``Z`` (or its softmax). With ``num_iter == 0``: ``L``.
    """
    if mode not in ("textbook", "convcrf"):
        raise ValueError(f"mode must be 'textbook' or 'convcrf', got {mode!r}")
    if norm not in ("none", "sym"):
        raise ValueError(f"norm must be 'none' or 'sym', got {norm!r}")
    if norm == "sym" and merge:
        raise ValueError("norm='sym' requires merge=False")
    if filter_size % 2 != 1:
        raise ValueError("filter_size must be odd")
    if blur != 1 and (blur < 1 or blur % 2 != 0):
        raise ValueError("blur must be 1 or even")
    un = np.asarray(unary, dtype=np.float64)
    im = np.asarray(image, dtype=np.float64)
    B, C, H, W = un.shape
    assert im.shape == (B, 3, H, W), im.shape
    w_arr = np.asarray(weight, dtype=np.float64).reshape(-1, 1, 1)
    assert w_arr.shape[0] in (1, C), w_arr.shape
    cm = None if compat is None else np.asarray(compat, dtype=np.float64)
    keep_centre = mode == "convcrf"
    s = blur

    out = np.zeros((B, C, H, W), dtype=np.float64)
    for b in range(B):
        pos = np.zeros((2, H, W), dtype=np.float64)
        for y in range(H):
            for x in range(W):
                pos[0, y, x] = y
                pos[1, y, x] = x
        pos_f = pos / _per_channel(pos_sdims)
        col_f = im[b] / _per_channel(col_schan)
        if col_use_pos:
            col_f = np.concatenate([pos / _per_channel(col_sdims), col_f], axis=0)
        kernels = [
            (pos_compat, _gaussian_window(naive_avg_pool(pos_f, s), filter_size, keep_centre)),
            (col_compat, _gaussian_window(naive_avg_pool(col_f, s), filter_size, keep_centre)),
        ]
        if merge:
            if any(np.ndim(cw) for cw, _ in kernels):
                raise ValueError("a label-compatibility matrix needs merge=False")
            merged = sum(cw * g for cw, g in kernels)

            def message(x: Array, merged: Array = merged) -> Array:
                return _blur_pass(x, merged, s)
        elif norm == "none":

            def message(x: Array, kernels: list = kernels) -> Array:
                return sum(_compat_times(cw, _blur_pass(x, g, s)) for cw, g in kernels)
        else:
            ones = np.ones((1, H, W), dtype=np.float64)
            normed = [(cw, g, 1.0 / np.sqrt(_blur_pass(ones, g, s) + 1e-20)) for cw, g in kernels]

            def message(x: Array, normed: list = normed) -> Array:
                return sum(n * _compat_times(cw, _blur_pass(n * x, g, s)) for cw, g, n in normed)

        L = _log_softmax(un[b])
        Z = L
        q = L if mode == "convcrf" else _softmax(L)
        for it in range(num_iter):
            M = message(q)
            if cm is not None:
                M = M + np.einsum("ij,jyx->iyx", cm, M)
            Z = (unary_weight - w_arr) * L + w_arr * M
            if it != num_iter - 1:
                q = _softmax(Z)
        out[b] = _softmax(Z) if final_softmax else Z
    return out
