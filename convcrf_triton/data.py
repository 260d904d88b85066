"""Data for the synthetic benchmark (SPEC §6): noisy unaries, image/label IO, segmentation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE = 255
SUBSAMPLE = 8


def pascal_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``[n, 3]`` uint8 (class c's colour from the bits of c)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= ((v >> 0) & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        palette[c] = (r, g, b)
    return palette


def _resample(x: torch.Tensor, H: int, W: int, h: int, w: int, down: bool) -> torch.Tensor:
    """``[C, ·, ·]`` float64: optionally area-down to ``h × w``, then bilinear up to ``H × W``."""
    x = x[None]
    if down:
        x = F.interpolate(x, size=(h, w), mode="area")
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)[0]


def synthetic_unary(labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """The paper's synthetic noisy unary for a label map ``[H, W]`` (255 = ignore, taken as class 0).

    ``rng = default_rng(seed)``; on the ``max(H//8, 1) × max(W//8, 1)`` grid: the clean one-hot is
    area-downsampled, a random label map ``rng.integers(0, C)`` one-hot and a keep mask
    ``floor(0.8 + rng.random())`` are drawn (in that order); all three are upsampled bilinearly
    (align_corners=False) and mixed, ``p = keep·clean + (1 − keep)·noise``. Returns ``p``
    ``[C, H, W]`` float64, used as the unary logits as in the original code.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D label map [H, W], got shape {labels.shape}")
    H, W = labels.shape
    h, w = max(H // SUBSAMPLE, 1), max(W // SUBSAMPLE, 1)
    rng = np.random.default_rng(seed)
    lab = torch.from_numpy(np.where(labels == IGNORE, 0, labels).astype(np.int64))
    if int(lab.max()) >= num_classes:
        raise ValueError(f"labels contain class {int(lab.max())} but num_classes={num_classes}")
    clean = _resample(F.one_hot(lab, num_classes).permute(2, 0, 1).double(), H, W, h, w, down=True)
    noise_lab = torch.from_numpy(rng.integers(0, num_classes, (h, w)))
    noise = _resample(F.one_hot(noise_lab, num_classes).permute(2, 0, 1).double(), H, W, h, w, down=False)
    keep = _resample(torch.from_numpy(np.floor(0.8 + rng.random((h, w))))[None], H, W, h, w, down=False)
    return (keep * clean + (1 - keep) * noise).numpy()


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as ``[3, H, W]`` float32 in [0, 255]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()


def read_labels(path: str | Path) -> np.ndarray:
    """A label map ``[H, W]`` int64 from a palette (indices) or grey PNG; 255 = ignore."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: a label map must be a palette or grey PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.int64).copy()


def write_labels(path: str | Path, labels: np.ndarray) -> None:
    """Save ``[H, W]`` integer labels as a PASCAL-palette PNG."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(pascal_palette().reshape(-1).tolist())
    im.save(path)


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` confusion matrix (rows: truth) over a set; 255 pixels are ignored."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} must have one shape")
        valid = truth != IGNORE
        idx = truth[valid].astype(np.int64) * self.num_classes + pred[valid].astype(np.int64)
        self.matrix += np.bincount(idx, minlength=self.num_classes**2).reshape(self.matrix.shape)

    def accuracy(self) -> float:
        """Pixel accuracy in [0, 1]."""
        return float(np.trace(self.matrix) / max(self.matrix.sum(), 1))

    def iou(self) -> np.ndarray:
        """``[C]`` each class's IoU in [0, 1]; NaN for the classes absent from the ground truth of the set."""
        tp = np.diag(self.matrix).astype(np.float64)
        present = self.matrix.sum(1) > 0
        union = self.matrix.sum(1) + self.matrix.sum(0) - tp
        return np.where(present, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU in [0, 1] over the classes present in the ground truth of the set."""
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
