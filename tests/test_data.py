"""SPEC §6: the synthetic noisy unaries, the metrics, label IO, and the reference figures on voc7."""

import numpy as np
import pytest
import torch

from convcrf_triton import ConvCRF
from convcrf_triton.data import ConfusionMatrix, read_image, read_labels, synthetic_unary, write_labels


def test_synthetic_unary_is_a_seeded_distribution():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, (37, 29))
    labels[:3] = 255
    p = synthetic_unary(labels, 4, seed=3)
    assert p.shape == (4, 37, 29) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-12)
    assert p.min() >= 0
    assert np.array_equal(p, synthetic_unary(labels, 4, seed=3))
    assert not np.array_equal(p, synthetic_unary(labels, 4, seed=4))
    # Tiny maps: the noise grid is at least 1 × 1.
    assert synthetic_unary(np.zeros((3, 5), dtype=np.int64), 2).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_unary(labels, 3)


def test_confusion_matrix_metrics():
    cm = ConfusionMatrix(3)
    truth = np.array([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 0]])
    cm.add(truth, pred)
    assert cm.matrix.sum() == 7
    assert cm.accuracy() == pytest.approx(5 / 7)
    # IoU: class 0: tp 2, fp 1 (the 2 predicted 0), fn 1 → 2/4; class 1: tp 3, fp 1 → 3/4; class 2: 0/1.
    assert cm.miou() == pytest.approx((2 / 4 + 3 / 4 + 0) / 3)
    # Classes absent from the truth are left out of the mean.
    cm2 = ConfusionMatrix(5)
    cm2.add(np.array([1, 1]), np.array([1, 4]))
    assert cm2.miou() == pytest.approx(0.5)


def test_label_png_round_trip(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, (13, 17))
    labels[0, 0] = 255
    write_labels(tmp_path / "l.png", labels)
    assert np.array_equal(read_labels(tmp_path / "l.png"), labels)


@pytest.mark.parametrize("mode,want_miou,want_acc", [
    ("unary", 73.9, 88.3),
    ("convcrf", 89.4, 97.0),
    ("textbook", 86.0, 96.0),
])
def test_reference_figures_on_voc7(voc7, mode, want_miou, want_acc):
    """SPEC §6: k=7, blur=4, 5 iterations, seed 0 per image: within 0.2 points of the float64 oracle."""
    if mode == "convcrf":
        crf = ConvCRF.from_convcrf_conf({"filter_size": 7, "blur": 4}, num_classes=21, backend="torch")
    else:
        crf = ConvCRF(21, filter_size=7, blur=4, backend="torch")
    cm = ConfusionMatrix(21)
    images = sorted((voc7 / "images").glob("*.png"))
    assert len(images) == 7
    for path in images:
        labels = read_labels(voc7 / "labels" / path.name)
        unary = synthetic_unary(labels, 21, seed=0)
        if mode != "unary":
            image = torch.from_numpy(read_image(path))[None]
            unary = crf(torch.from_numpy(unary)[None].float(), image)[0].numpy()
        cm.add(labels, unary.argmax(0))
    assert 100 * cm.miou() == pytest.approx(want_miou, abs=0.2)
    assert 100 * cm.accuracy() == pytest.approx(want_acc, abs=0.2)


@pytest.mark.parametrize("storage,min_agreement", [("bfloat16", 0.999), ("float16", 0.9999)])
@pytest.mark.parametrize("blur", [1, 4])
def test_low_precision_storage_keeps_the_labels_on_voc7(voc7, storage, min_agreement, blur):
    """bfloat16/float16 storage (K and the message pass's Q) against float32, SPEC §6 unaries, k=7: the
    labels agree on all but 0.1% (bfloat16) / 0.01% (float16) of the pixels, and mIoU moves < 0.1 point."""
    crf32 = ConvCRF(21, filter_size=7, blur=blur, backend="torch")
    crf16 = ConvCRF(21, filter_size=7, blur=blur, backend="torch", storage=storage)
    cm32, cm16, agree, total = ConfusionMatrix(21), ConfusionMatrix(21), 0, 0
    for path in sorted((voc7 / "images").glob("*.png"))[:3]:
        labels = read_labels(voc7 / "labels" / path.name)
        unary = torch.from_numpy(synthetic_unary(labels, 21, seed=0))[None].float()
        image = torch.from_numpy(read_image(path))[None]
        with torch.no_grad():
            want, got = crf32(unary, image)[0].argmax(0).numpy(), crf16(unary, image)[0].argmax(0).numpy()
        cm32.add(labels, want)
        cm16.add(labels, got)
        agree, total = agree + int((want == got).sum()), total + want.size
    assert agree / total >= min_agreement
    assert abs(cm16.miou() - cm32.miou()) < 1e-3
