"""Decoupled training: a step descends on its objective, checkpoints round-trip, bad set-ups are clear
errors. (That it raises held-out mIoU on real images is measured by the report run, not asserted here.)"""

import math
import warnings

import numpy as np
import pytest
import torch

from convcrf_triton import ConvCRF
from convcrf_triton.data import write_labels
from convcrf_triton.train import Sample, _training_seed, evaluate, load_samples, train


def _scene(seed: int, H: int = 48, W: int = 56) -> Sample:
    """Three flat-coloured blobs on a background, sensor noise: colour edges are label edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    labels = np.zeros((H, W), dtype=np.int64)
    colours = np.array([[30, 40, 50], [200, 30, 30], [30, 200, 60], [40, 60, 220]], dtype=np.float32)
    for c in (1, 2, 3):
        cy, cx, r = rng.uniform(8, H - 8), rng.uniform(8, W - 8), rng.uniform(6, 12)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = c
    image = colours[labels].transpose(2, 0, 1) + rng.normal(0, 8, (3, H, W)).astype(np.float32)
    return Sample(f"scene{seed}", np.clip(image, 0, 255), labels)


def test_a_training_step_descends_on_its_own_noise():
    """One Adam step (small lr) lowers the loss of the very unary it was computed on: train() follows the
    gradient of its objective, through every learnable parameter."""
    sample = _scene(0)
    crf = ConvCRF(4, filter_size=5, blur=2, num_iter=3, trainable=True, convcomp=True, backend="torch")
    noise = _training_seed(7, 0, 0)
    before = evaluate(crf, [sample], noise_seed=noise)["loss"]
    initial = {k: v.detach().clone() for k, v in crf.named_parameters()}
    train(crf, [sample], epochs=1, lr=1e-3, seed=7, progress=False, log=lambda s: None)
    assert evaluate(crf, [sample], noise_seed=noise)["loss"] < before
    assert all(not torch.equal(v, initial[k]) for k, v in crf.named_parameters())


def test_training_runs_and_checkpoints_round_trip(tmp_path):
    samples = [_scene(s) for s in range(3)]
    crf = ConvCRF(4, filter_size=5, blur=2, num_iter=3, weight="scalar", trainable=True, backend="torch")
    lines = []
    history = train(crf, samples, epochs=3, lr=0.01, seed=1, progress=False, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3] and len(lines) == 3 and "loss" in lines[0]
    assert all(np.isfinite(r["loss"]) and 0 <= r["miou"] <= 1 for r in history)

    crf.save(tmp_path / "crf.pt")
    loaded = ConvCRF.load(tmp_path / "crf.pt")
    unary, image = torch.randn(1, 4, 20, 21), torch.rand(1, 3, 20, 21) * 255
    torch.testing.assert_close(loaded(unary, image), crf(unary, image), rtol=0, atol=0)
    assert loaded.config == crf.config


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_follows_its_schedule(schedule):
    """Each epoch's record holds the rate of its last step: cosine decays from lr towards 0 over the run's
    steps (epochs × images), constant keeps lr."""
    samples = [_scene(s, 20, 24) for s in range(2)]
    crf = ConvCRF(4, filter_size=3, blur=2, num_iter=2, weight="scalar", trainable=True, backend="torch")
    history = train(crf, samples, epochs=3, lr=0.02, schedule=schedule, progress=False, log=lambda s: None)
    steps = 3 * len(samples)
    last = [(e + 1) * len(samples) - 1 for e in range(3)]  # the step index of each epoch's last step
    expected = [0.02 * 0.5 * (1 + math.cos(math.pi * i / steps)) if schedule == "cosine" else 0.02 for i in last]
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-12)
    assert (history[-1]["lr"] < 0.002) == (schedule == "cosine")


def test_per_class_parameters_warn_of_classes_no_label_shows():
    """Scenes label classes 0-3: a 5-class CRF learning a per-class weight or a compatibility is told that
    class 4 appears in no training label; a scalar weight without compatibility learns no class."""
    samples = [_scene(s, 20, 24) for s in range(2)]
    kw = dict(filter_size=3, blur=2, num_iter=2, trainable=True, backend="torch")
    run = dict(epochs=1, progress=False, log=lambda s: None)
    with pytest.warns(UserWarning, match=r"1 of 5 classes \(4\) appear in no training label: the learned weight "
                      r"and compat_matrix will learn to suppress them"):
        train(ConvCRF(5, convcomp=True, **kw), samples, **run)
    with pytest.warns(UserWarning, match=r"1 of 5 classes \(4\) .* learned compat_matrix will"):
        train(ConvCRF(5, weight="scalar", convcomp=True, **kw), samples, **run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(ConvCRF(5, weight="scalar", **kw), samples, **run)
        train(ConvCRF(4, convcomp=True, **kw), samples, **run)  # every class shown


def test_training_needs_trainable_parameters():
    crf = ConvCRF(4, filter_size=3, blur=1, backend="torch")
    with pytest.raises(ValueError, match="trainable=True"):
        train(crf, [_scene(0)], epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(ConvCRF(4, trainable=True), [_scene(0)], epochs=0, progress=False)
    with pytest.raises(ValueError, match="schedule='linear' is not allowed: expected one of cosine, constant"):
        train(ConvCRF(4, trainable=True), [_scene(0)], epochs=1, schedule="linear", progress=False)


def test_load_is_strict_about_what_it_reads(tmp_path):
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a convcrf-triton checkpoint"):
        ConvCRF.load(tmp_path / "other.pt")


def test_load_samples_pairs_by_stem(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    for name in ("a", "c", "d"):
        write_labels(tmp_path / "lab" / f"{name}.png", np.ones((5, 6), dtype=np.int64))
    samples = load_samples(tmp_path / "img", tmp_path / "lab")
    assert [s.name for s in samples] == ["a", "c"]
    assert samples[0].image.shape == (3, 5, 6) and samples[0].labels.shape == (5, 6)
    with pytest.raises(ValueError, match="folder not found"):
        load_samples(tmp_path / "nope", tmp_path / "lab")
    (tmp_path / "other").mkdir()
    write_labels(tmp_path / "other" / "z.png", np.ones((5, 6), dtype=np.int64))
    with pytest.raises(ValueError, match="no image"):
        load_samples(tmp_path / "img", tmp_path / "other")
