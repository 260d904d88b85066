"""Baselines the benchmarks compare against (and the tests use as an oracle).

``unfold_crf``
    The original ConvCRF formulation (Teichmann & Cipolla 2018) written from the paper and its code, driven
    by the original config dict: a materialised ``[B, k, k, h, w]`` Gaussian per kernel and an ``F.unfold``
    message pass (the ``[B, C·k², h·w]`` unfold tensor and an equally large product: memory
    ``~2·B·C·k²·h·w`` elements). Independent of the library's code paths; follows the input dtype and
    device. This is the "unfold baseline" of ``bench/`` and an oracle of ``tests/``.

``densecrf_infer``
    pydensecrf (the permutohedral-lattice fully connected CRF, ``pip install pydensecrf2``, the
    ``compare`` extra) with the pairwise parameters matched to a ConvCRF config: smoothness kernel
    ``addPairwiseGaussian(sxy=pos_sdims, compat=pos_compat)``, appearance kernel
    ``addPairwiseBilateral(sxy=col_sdims, srgb=col_schan, compat=col_compat)`` (dense CRFs always give
    the appearance kernel a position term), unary ``-log softmax(logits)``. With ``module=convcrf_triton.densecrf``
    the same calls run this package's drop-in (``DenseCRF2D``, a windowed CRF) instead. ``densecrf_inputs`` and
    ``densecrf_run`` are its two halves: the numpy arrays pydensecrf takes, and the calls (what the benchmark times).

Shapes: ``unary`` ``[B, C, H, W]`` (logits), ``image`` ``[B, 3, H, W]`` (RGB, scale [0, 255]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CONF", "densecrf_available", "densecrf_infer", "densecrf_inputs", "densecrf_params", "densecrf_run",
           "unfold_crf"]


def blur_padding(n: int, s: int) -> int:
    """Padding per side for pooling a length-``n`` axis by ``s``: ``ceil(((s - n mod s) mod s) / 2)``."""
    return math.ceil(((s - n % s) % s) / 2)


# The original ConvCRF code's default configuration.
DEFAULT_CONF: dict[str, Any] = {
    "filter_size": 11,
    "blur": 4,
    "merge": True,
    "norm": "none",
    "weight": "vector",
    "unary_weight": 1,
    "weight_init": 0.2,
    "trainable": False,
    "convcomp": False,
    "logsoftmax": True,
    "softmax": True,
    "final_softmax": False,
    "pos_feats": {"sdims": 3, "compat": 3},
    "col_feats": {"sdims": 80, "schan": 13, "compat": 10, "use_bias": False},
}


def _unfold_pool(x: torch.Tensor, blur: int, pads: tuple[int, int]) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=blur, stride=blur, padding=pads, count_include_pad=False)


def _unfold_gaussian(feats: torch.Tensor, k: int, blur: int, pads: tuple[int, int]) -> torch.Tensor:
    """Features ``[B, F, H, W]`` → materialised Gaussian ``[B, k, k, h, w]`` (centre kept, = 1)."""
    if blur > 1:
        feats = _unfold_pool(feats, blur, pads)
    B, _, h, w = feats.shape
    span = k // 2
    gaussian = feats.new_zeros(B, k, k, h, w)
    for dy in range(-span, span + 1):
        y0, y1 = max(0, -dy), min(h, h - dy)
        if y0 >= y1:
            continue
        for dx in range(-span, span + 1):
            x0, x1 = max(0, -dx), min(w, w - dx)
            if x0 >= x1:
                continue
            here = feats[:, :, y0:y1, x0:x1]
            there = feats[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
            diff = here - there
            gaussian[:, dy + span, dx + span, y0:y1, x0:x1] = torch.exp(torch.sum(-0.5 * diff * diff, dim=1))
    return gaussian


def _unfold_compute(
    x: torch.Tensor,
    gaussian: torch.Tensor,
    blur: int,
    pads: tuple[int, int],
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Message pass of ``x`` ``[B or 1, C, H, W]`` with ``gaussian`` ``[B, k, k, h, w]``; → ``[B, C, H, W]``.

    ``norm`` (``[B, 1, H, W]``), when given, is applied before pooling and after cropping.
    """
    H, W = x.shape[2], x.shape[3]
    if norm is not None:
        x = x * norm
    if blur > 1:
        x = _unfold_pool(x, blur, pads)
    bx, C, h, w = x.shape
    B, k = gaussian.shape[0], gaussian.shape[1]
    x_col = F.unfold(x, kernel_size=k, dilation=1, padding=k // 2, stride=1).view(bx, C, k, k, h, w)
    product = gaussian.view(B, 1, k, k, h, w) * x_col
    message = product.reshape(B, C, k * k, h, w).sum(2)
    if blur > 1:
        message = F.interpolate(message, scale_factor=blur, mode="bilinear", align_corners=False)
        message = message[:, :, pads[0] : pads[0] + H, pads[1] : pads[1] + W].contiguous()
    if norm is not None:
        message = norm * message
    return message


def unfold_crf(
    unary: torch.Tensor | npt.ArrayLike,
    image: torch.Tensor | npt.ArrayLike,
    conf: dict[str, Any],
    num_classes: int,
    num_iter: int = 5,
    comp_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The original ConvCRF computation (materialised Gaussians + ``F.unfold``), driven by its config dict.

    Args:
        unary: ``[B, C, H, W]`` logits (``conf["logsoftmax"]``) or probabilities (otherwise).
        image: ``[B, 3, H, W]`` RGB.
        conf: the original config dict (see ``DEFAULT_CONF``).
        num_classes: ``C``.
        comp_weight: ``[C, C, 1, 1]`` 1×1-conv weight used with ``conf["convcomp"]``; default filled with
            ``0.1·sqrt(2/C)``.

    Returns:
        ``[B, C, H, W]`` in the dtype of ``unary``.
    """
    unary = torch.as_tensor(unary)
    dtype = unary.dtype if unary.is_floating_point() else torch.float32
    unary = unary.to(dtype)
    image = torch.as_tensor(image).to(device=unary.device, dtype=dtype)
    B, C, H, W = unary.shape
    assert C == num_classes, (C, num_classes)
    k = int(conf["filter_size"])
    blur = int(conf["blur"])
    norm_kind = conf["norm"]
    pads = (blur_padding(H, blur), blur_padding(W, blur)) if blur > 1 else (0, 0)

    # features
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=unary.device),
        torch.arange(W, dtype=dtype, device=unary.device),
        indexing="ij",
    )
    mesh = torch.stack([ys, xs], dim=0)
    pos_feats = torch.stack([mesh / conf["pos_feats"]["sdims"]] * B, dim=0)
    col_feats = image / conf["col_feats"]["schan"]
    if conf["col_feats"]["use_bias"]:
        pos_c = torch.stack([mesh / conf["col_feats"]["sdims"]] * B, dim=0)
        col_feats = torch.cat([pos_c, col_feats], dim=1)

    # gaussians
    weighted: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for feats, compat in (
        (pos_feats, conf["pos_feats"]["compat"]),
        (col_feats, conf["col_feats"]["compat"]),
    ):
        gaussian = _unfold_gaussian(feats, k, blur, pads)
        norm = None
        if norm_kind != "none":
            ones = unary.new_ones(1, 1, H, W)
            norm = 1.0 / torch.sqrt(_unfold_compute(ones, gaussian, blur, pads) + 1e-20)
        weighted.append((compat * gaussian, norm))

    if conf["merge"]:
        if norm_kind != "none":
            raise ValueError("merge=True requires norm='none'")
        kernel = sum(g for g, _ in weighted)

        def total(x: torch.Tensor) -> torch.Tensor:
            return _unfold_compute(x, kernel, blur, pads)
    else:

        def total(x: torch.Tensor) -> torch.Tensor:
            return sum(_unfold_compute(x, g, blur, pads, n) for g, n in weighted)

    # weights
    if conf["weight"] is None:
        w = None
    elif conf["weight"] == "scalar":
        w = unary.new_tensor(float(conf["weight_init"]))
    elif conf["weight"] == "vector":
        w = conf["weight_init"] * unary.new_ones(1, C, 1, 1)
    else:
        raise ValueError(f"unknown weight {conf['weight']!r}")
    if conf["convcomp"] and comp_weight is None:
        comp_weight = unary.new_full((C, C, 1, 1), 0.1 * math.sqrt(2.0 / C))
    if comp_weight is not None:
        comp_weight = comp_weight.to(device=unary.device, dtype=dtype)

    # inference
    if conf["logsoftmax"]:
        lg_unary = F.log_softmax(unary, dim=1)
        prediction = lg_unary
    else:
        lg_unary = torch.log(unary)
        prediction = F.softmax(lg_unary, dim=1)
    for i in range(num_iter):
        message = total(prediction)
        if conf["convcomp"]:
            message = message + F.conv2d(message, comp_weight)
        if w is None:
            prediction = lg_unary + message
        else:
            prediction = (conf["unary_weight"] - w) * lg_unary + w * message
        if (i != num_iter - 1 or conf["final_softmax"]) and conf["softmax"]:
            prediction = F.softmax(prediction, dim=1)
    return prediction


# ---------------------------------------------------------------------------------------------------------
# pydensecrf (optional)
# ---------------------------------------------------------------------------------------------------------


def densecrf_available() -> bool:
    """Whether pydensecrf (``pip install pydensecrf2``) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def densecrf_params(conf: Mapping[str, Any] | None = None) -> dict[str, float]:
    """pydensecrf pairwise parameters matched to an original-style ConvCRF ``conf`` (default: the
    original defaults, i.e. Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10)."""
    c = {**DEFAULT_CONF, **(conf or {})}
    pos = {**DEFAULT_CONF["pos_feats"], **c["pos_feats"]}
    col = {**DEFAULT_CONF["col_feats"], **c["col_feats"]}
    return {"gauss_sxy": float(pos["sdims"]), "gauss_compat": float(pos["compat"]),
            "bilateral_sxy": float(col["sdims"]), "bilateral_srgb": float(col["schan"]),
            "bilateral_compat": float(col["compat"])}


def densecrf_infer(
    unary: npt.ArrayLike, image: npt.ArrayLike, num_iter: int = 5, params: Mapping[str, float] | None = None,
    probabilities: bool = False, module: ModuleType | None = None, **options: Any,
) -> np.ndarray:
    """Full dense-CRF inference with pydensecrf for one image.

    Args:
        unary: ``[C, H, W]`` logits (the unary energy is ``-log softmax(unary)``), or with
            ``probabilities=True`` class probabilities (energy ``-log(unary + 1e-20)``, as the original
            ConvCRF code's ``FullCRF`` feeds its synthetic unaries).
        image: ``[3, H, W]`` RGB in [0, 255] (rounded to uint8, as pydensecrf takes it).
        num_iter: mean-field iterations.
        params: :func:`densecrf_params` (default: the original ConvCRF defaults).
        module: the module whose ``DenseCRF2D`` runs the calls (default ``pydensecrf.densecrf``;
            ``convcrf_triton.densecrf``, this package's drop-in), built with ``options`` besides its three sizes.

    Returns:
        ``Q`` ``[C, H, W]`` float32 marginals.
    """
    energy, rgb = densecrf_inputs(unary, image, probabilities)
    return densecrf_run(energy, rgb, num_iter, params, module, **options)


def densecrf_inputs(unary: npt.ArrayLike, image: npt.ArrayLike, probabilities: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`densecrf_infer`'s arrays as pydensecrf takes them: the unary energy ``[C, H·W]`` float32 and the image
    ``[H, W, 3]`` uint8, both C-contiguous (a float64 log-softmax in numpy: 43 ms at 375×500, C = 21, 2.6 s at
    1024×2048 on this project's CPU, 5-14% of pydensecrf's time with them: the benchmark makes them off the clock)."""
    logits = np.asarray(unary, dtype=np.float64)
    C, H, W = logits.shape
    if probabilities:
        log_prob = np.log(logits + 1e-20)
    else:
        z = logits - logits.max(axis=0, keepdims=True)
        log_prob = z - np.log(np.exp(z).sum(axis=0, keepdims=True))
    energy = np.ascontiguousarray((-log_prob).reshape(C, H * W), dtype=np.float32)
    rgb = np.ascontiguousarray(np.clip(np.rint(np.asarray(image).transpose(1, 2, 0)), 0, 255).astype(np.uint8))
    return energy, rgb


def densecrf_run(energy: np.ndarray, rgb: np.ndarray, num_iter: int = 5, params: Mapping[str, float] | None = None,
                 module: ModuleType | None = None, **options: Any) -> np.ndarray:
    """pydensecrf's calls (or ``module``'s) on :func:`densecrf_inputs`' arrays: ``Q [C, H, W]`` float32 marginals."""
    if module is None:
        import pydensecrf.densecrf as module

    p = {**densecrf_params(), **(params or {})}
    H, W, _ = rgb.shape
    C = energy.shape[0]
    crf = module.DenseCRF2D(W, H, C, **options)
    crf.setUnaryEnergy(energy)
    crf.addPairwiseGaussian(sxy=p["gauss_sxy"], compat=p["gauss_compat"])
    crf.addPairwiseBilateral(sxy=p["bilateral_sxy"], srgb=p["bilateral_srgb"], rgbim=rgb,
                             compat=p["bilateral_compat"])
    return np.asarray(crf.inference(num_iter), dtype=np.float32).reshape(C, H, W)
