"""Decoupled training: a step descends on its objective, checkpoints round-trip, bad set-ups are clear
errors. (That it raises held-out mIoU on real images is measured by the report run, not asserted here.)"""

import math
import warnings

import numpy as np
import pytest
import torch

from convcrf_triton import ConvCRF
from convcrf_triton.data import write_labels
from convcrf_triton.train import Sample, _training_seed, evaluate, load_samples, lovasz_softmax, train


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


def _lovasz_oracle(probs: np.ndarray, labels: np.ndarray) -> float:
    """The Lovász-softmax of one image from its definition, in float64: for each class c the labels show, the
    Lovász extension of the Jaccard loss J(S) = 1 - |G \\ S| / |G ∪ S| (S: the pixels taken as mistakes, G: the
    class's pixels) at the error vector e = |1[y = c] - p_c|, i.e. Σ_i e_(i) (J(S_i) - J(S_(i-1))) over the
    pixels in decreasing order of error, S_i the first i of them; averaged over the classes."""
    keep = labels != 255
    probs, labels = probs[:, keep], labels[keep]
    out = []
    for c in np.unique(labels):
        G = set(np.flatnonzero(labels == c).tolist())
        errors = np.abs((labels == c) - probs[c])
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        total, S, previous = 0.0, set(), 0.0
        for i in order:
            S.add(i)
            jaccard = 1 - len(G - S) / len(G | S)
            total += errors[i] * (jaccard - previous)
            previous = jaccard
        out.append(total)
    return float(np.mean(out))


def test_lovasz_softmax_against_its_definition_and_the_iou():
    """Soft probabilities: the loss equals the Lovász extension summed out from its definition (float64, two
    images, ignored pixels, classes absent from an image). Hard probabilities: the mean over the classes
    present of 1 - IoU. Its gradient reaches every logit of a counted pixel and no ignored one."""
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(0, 2, (2, 4, 5, 6)))
    labels = torch.from_numpy(rng.integers(0, 3, (2, 5, 6)))
    labels[0, 0, :3] = 255
    probs = logits.softmax(1).numpy().reshape(2, 4, -1)
    expected = np.mean([_lovasz_oracle(probs[b], labels[b].flatten().numpy()) for b in range(2)])
    logits.requires_grad_(True)
    loss = lovasz_softmax(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert (logits.grad[0, :, 0, :3] == 0).all() and (logits.grad[:, :, 1:].abs().sum(1) > 0).all()

    pred = torch.from_numpy(rng.integers(0, 4, (2, 5, 6)))
    hard = 80.0 * torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).double()
    ious = []
    for b in range(2):
        y, p = labels[b][labels[b] != 255], pred[b][labels[b] != 255]
        ious.append(np.mean([1 - ((y == c) & (p == c)).sum().item() / ((y == c) | (p == c)).sum().item()
                             for c in torch.unique(y).tolist()]))
    assert lovasz_softmax(hard, labels).item() == pytest.approx(np.mean(ious), rel=1e-12)
    assert lovasz_softmax(hard, torch.full_like(labels, 255)).item() == 0  # nothing counted
    with pytest.raises(ValueError, match=r"labels \[B, H, W\]"):
        lovasz_softmax(hard, labels[0])


@pytest.mark.parametrize("loss", ["lovasz", "cross_entropy"])
def test_a_step_descends_on_either_loss(loss):
    """One small Adam step lowers the chosen loss on the unary it was computed on; evaluate() reports that loss."""
    sample = _scene(3)
    crf = ConvCRF(4, filter_size=5, blur=2, num_iter=3, weight="scalar", trainable=True, backend="torch")
    noise = _training_seed(7, 0, 0)
    before = evaluate(crf, [sample], noise_seed=noise, loss=loss)["loss"]
    train(crf, [sample], epochs=1, lr=1e-3, seed=7, loss=loss, progress=False, log=lambda s: None)
    after = evaluate(crf, [sample], noise_seed=noise, loss=loss)["loss"]
    assert after < before
    other = evaluate(crf, [sample], noise_seed=noise, loss={"lovasz": "cross_entropy"}.get(loss, "lovasz"))["loss"]
    assert other != after


def test_training_needs_trainable_parameters():
    crf = ConvCRF(4, filter_size=3, blur=1, backend="torch")
    with pytest.raises(ValueError, match="trainable=True"):
        train(crf, [_scene(0)], epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(ConvCRF(4, trainable=True), [_scene(0)], epochs=0, progress=False)
    with pytest.raises(ValueError, match="schedule='linear' is not allowed: expected one of cosine, constant"):
        train(ConvCRF(4, trainable=True), [_scene(0)], epochs=1, schedule="linear", progress=False)
    with pytest.raises(ValueError, match="loss='dice' is not allowed: expected one of lovasz, cross_entropy"):
        train(ConvCRF(4, trainable=True), [_scene(0)], epochs=1, loss="dice", progress=False)


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
