"""Decoupled training (the paper's §4.2): a fixed unary source, the CRF's parameters learned on top.

The unaries are SPEC §6's synthetic noisy unaries, drawn fresh each epoch from a seeded stream that
never produces the evaluation protocol's noise (``default_rng(noise_seed)`` per image), so the
evaluation is on noise the CRF was not trained on. Loss: cross-entropy of the CRF's output logits
against the labels (255 ignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE, ConfusionMatrix, read_image, read_labels, synthetic_unary
from .module import ConvCRF


@dataclass
class Sample:
    """One image/label pair: ``image [3, H, W]`` float32 in [0, 255], ``labels [H, W]`` int64."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def load_samples(images: str | Path, labels: str | Path) -> list[Sample]:
    """Image/label pairs of two folders, matched by file stem (images of any PIL format, PNG labels)."""
    images, labels = Path(images), Path(labels)
    for name, folder in (("images", images), ("labels", labels)):
        if not folder.is_dir():
            raise ValueError(f"{name} folder not found: {folder}")
    label_files = {p.stem: p for p in labels.iterdir() if p.suffix.lower() == ".png"}
    pairs = [(p, label_files[p.stem]) for p in sorted(images.iterdir()) if p.stem in label_files]
    if not pairs:
        raise ValueError(f"no image in {images} has a label PNG of the same name in {labels}")
    return [Sample(img.stem, read_image(img), read_labels(lab)) for img, lab in pairs]


def _training_seed(seed: int, epoch: int, index: int) -> int:
    # A stream disjoint (with overwhelming probability) from the evaluation seeds 0, 1, 2, ...
    return int(np.random.SeedSequence([seed, epoch, index, 0xC0FFEE]).generate_state(1, np.uint64)[0])


def _forward(crf: ConvCRF, sample: Sample, noise_seed: int, device: torch.device) -> torch.Tensor:
    unary = torch.from_numpy(synthetic_unary(sample.labels, crf.num_classes, noise_seed)).float()[None]
    return crf(unary.to(device), torch.from_numpy(sample.image)[None].to(device))


@torch.no_grad()
def evaluate(crf: ConvCRF, samples: Sequence[Sample], noise_seed: int = 0) -> dict[str, float]:
    """SPEC §6 accuracy and mIoU (fractions) and the mean training loss of ``crf`` on ``samples``, with the
    evaluation noise ``default_rng(noise_seed)`` per image."""
    device = next(iter(crf.buffers()), next(iter(crf.parameters()), torch.empty(0))).device
    cm, losses = ConfusionMatrix(crf.num_classes), []
    for sample in samples:
        logits = _forward(crf, sample, noise_seed, device)
        target = torch.from_numpy(sample.labels)[None].to(device)
        losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE).item())
        cm.add(sample.labels, logits[0].argmax(0).cpu().numpy())
    return {"acc": cm.accuracy(), "miou": cm.miou(), "loss": float(np.mean(losses))}


def train(
    crf: ConvCRF,
    samples: Sequence[Sample],
    *,
    epochs: int = 10,
    lr: float = 0.01,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train ``crf`` (built with ``trainable=True``) on fresh noisy unaries each epoch; Adam, one image per
    step, gradients clipped to ``max_grad_norm`` (the original-compatible mode's logits reach the hundreds,
    and unclipped steps on them diverge: the original code's known instability). Returns one record per
    epoch: mean loss, training-noise mIoU and accuracy, seconds."""
    if not any(p.requires_grad for p in crf.parameters()):
        raise ValueError("crf has no trainable parameters: build it with trainable=True")
    if epochs < 1 or not lr > 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    device = next(crf.parameters()).device
    optimiser = torch.optim.Adam(crf.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        t0, losses, cm = time.perf_counter(), [], ConfusionMatrix(crf.num_classes)
        order = rng.permutation(len(samples))
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i in bar:
            sample = samples[i]
            logits = _forward(crf, sample, _training_seed(seed, epoch, int(i)), device)
            target = torch.from_numpy(sample.labels)[None].to(device)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(crf.parameters(), max_grad_norm)
            optimiser.step()
            losses.append(loss.item())
            cm.add(sample.labels, logits[0].detach().argmax(0).cpu().numpy())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "miou": cm.miou(), "acc": cm.accuracy(),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log(f"epoch {epoch + 1:3d}  loss {record['loss']:.4f}  train mIoU {100 * record['miou']:.2f}  "
            f"acc {100 * record['acc']:.2f}  ({record['seconds']:.1f} s)")
    return history
