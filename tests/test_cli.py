"""The command line (SPEC §5), run in-process through ``main([...])``: demo, refine (one image, folders,
resuming), eval (the JSON line, the SPEC §6 figures on voc7), bench dispatch, and every user error as one
line on stderr with exit code 2 and no partial output."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convcrf_triton import ConvCRF, cli
from convcrf_triton.data import ConfusionMatrix, read_labels, synthetic_unary, write_labels
from convcrf_triton.scene import make_scene

FAST = ["--backend", "torch", "--filter-size", "5", "--blur", "2", "--iters", "3"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on busy cores (see test_densecrf)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, out: str, err: str, *needles: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert rc == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convcrf-triton") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images/`` (4 small scenes, one of another size, plus an image without inputs), ``labels/``, ``probs/``
    (SPEC §6 probabilities, ``[C, H, W]``; one ``[H, W, C]``), 21 classes."""
    root = tmp_path_factory.mktemp("data")
    for sub in ("images", "labels", "probs"):
        (root / sub).mkdir()
    sizes = [(24, 32), (24, 32), (24, 32), (32, 20)]
    for i, (H, W) in enumerate(sizes):
        rgb, labels = make_scene(H, W, seed=i)
        _save_png(root / "images" / f"im{i}.png", rgb)
        write_labels(root / "labels" / f"im{i}.png", labels)
        p = synthetic_unary(labels, 21, seed=i).astype(np.float32)
        np.save(root / "probs" / f"im{i}.npy", p.transpose(1, 2, 0) if i == 3 else p)
    _save_png(root / "images" / "extra.png", make_scene(16, 16)[0])  # extra images are ignored
    return root


def _direct(image_path: Path, unary: np.ndarray, **kw) -> np.ndarray:  # noqa: ANN003
    """The refined logits ``[C, H, W]`` computed without the CLI."""
    image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), np.float32).transpose(2, 0, 1))
    args = dict(filter_size=5, blur=2, num_iter=3, backend="torch")
    args.update(kw)
    crf = ConvCRF(unary.shape[0], **args)
    with torch.no_grad():
        return crf(torch.from_numpy(unary)[None].float(), image[None])[0].numpy()


# ---- demo -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_demo_without_arguments(storage, capsys, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "demo", "--backend", "torch", "--storage", storage)
    assert rc == 0, err
    fig = Image.open(tmp_path / "demo.png")
    assert fig.width > 4 * 320 and fig.height > 240
    lines = out.splitlines()
    before = next(line for line in lines if line.startswith("before"))
    after = next(line for line in lines if line.startswith("after"))
    miou = [float(line.split("mIoU")[1].split("%")[0]) for line in (before, after)]
    acc = [float(line.split("accuracy")[1].split("%")[0]) for line in (before, after)]
    assert miou[1] > miou[0] + 5 and acc[1] > acc[0] + 5, out
    assert " s)" in after  # the time


def test_demo_on_a_real_pair(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    rc, out, err = run(capsys, "demo", "--image", folder / "images" / "im0.png", "--labels", folder / "labels" /
                       "im0.png", "--out", tmp_path / "fig.png", *FAST)
    assert rc == 0, err
    assert "im0.png: 24×32" in out and "filter_size 5, blur 2, 3 iterations" in out
    assert Image.open(tmp_path / "fig.png").width > 4 * 32


# ---- eval -------------------------------------------------------------------------------------------------


def test_eval_json(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    rc, out, err = run(capsys, "eval", "--images", folder / "images", "--labels", folder / "labels",
                       "--json", tmp_path / "r.json", *FAST)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"n_images", "unary", "crf", "seconds"}
    assert result["n_images"] == 4
    for key in ("unary", "crf"):
        assert set(result[key]) == {"acc", "miou"}
        assert all(0 <= v <= 1 for v in result[key].values())
    assert json.loads((tmp_path / "r.json").read_text()) == result
    # The same numbers computed without the CLI.
    cm_u, cm_c = ConfusionMatrix(21), ConfusionMatrix(21)
    for i in range(4):
        labels = read_labels(folder / "labels" / f"im{i}.png")
        p = synthetic_unary(labels, 21, seed=0)
        cm_u.add(labels, p.argmax(0))
        cm_c.add(labels, _direct(folder / "images" / f"im{i}.png", p.astype(np.float32)).argmax(0))
    assert result["unary"] == {"acc": round(cm_u.accuracy(), 6), "miou": round(cm_u.miou(), 6)}
    assert result["crf"] == {"acc": round(cm_c.accuracy(), 6), "miou": round(cm_c.miou(), 6)}


def test_eval_reproduces_spec_figures_on_voc7(capsys, voc7) -> None:  # noqa: ANN001
    """SPEC §6: unary 73.9 / 88.3, original-compatible k=7 blur=4: 89.4 / 97.0 (within 0.2 points)."""
    rc, out, err = run(capsys, "eval", "--images", voc7 / "images", "--labels", voc7 / "labels", "--backend",
                       "torch", "--filter-size", "7", "--mode", "convcrf")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n_images"] == 7
    assert 100 * result["unary"]["miou"] == pytest.approx(73.9, abs=0.2)
    assert 100 * result["unary"]["acc"] == pytest.approx(88.3, abs=0.2)
    assert 100 * result["crf"]["miou"] == pytest.approx(89.4, abs=0.2)
    assert 100 * result["crf"]["acc"] == pytest.approx(97.0, abs=0.2)


# ---- refine -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3])  # [C, H, W] and [H, W, C] probabilities
def test_refine_one_image_probs(capsys, tmp_path, folder, index) -> None:  # noqa: ANN001
    image, probs = folder / "images" / f"im{index}.png", folder / "probs" / f"im{index}.npy"
    rc, out, err = run(capsys, "refine", "--image", image, "--probs", probs, "--out", tmp_path / "o.png",
                       "--probs-out", tmp_path / "q.npy", *FAST)
    assert rc == 0, err
    assert out.startswith("refined ")
    p = np.load(probs)
    chw = p if index != 3 else p.transpose(2, 0, 1)
    want = _direct(image, np.log(np.clip(chw, 1e-5, 1)))
    labels = read_labels(tmp_path / "o.png")
    assert Image.open(tmp_path / "o.png").mode == "P"
    assert np.array_equal(labels, want.argmax(0))
    q = np.load(tmp_path / "q.npy")
    assert q.dtype == np.float32 and q.shape == p.shape  # the input's layout
    q_chw = q if index != 3 else q.transpose(2, 0, 1)
    np.testing.assert_allclose(q_chw, torch.softmax(torch.from_numpy(want), 0).numpy(), atol=1e-5)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["o.png", "q.npy"]  # no temporary files left


def test_refine_logits_and_default_out(capsys, tmp_path, folder, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    logits = np.random.default_rng(0).normal(0, 3, (5, 24, 32)).astype(np.float32)
    np.save(tmp_path / "l.npy", logits)
    image = folder / "images" / "im1.png"
    rc, out, err = run(capsys, "refine", "--image", image, "--probs", tmp_path / "l.npy", "--logits", *FAST)
    assert rc == 0, err
    assert np.array_equal(read_labels(tmp_path / "im1_crf.png"), _direct(image, logits).argmax(0))


def test_refine_coarse_labels(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    image, labels_path = folder / "images" / "im2.png", folder / "labels" / "im2.png"
    coarse = read_labels(labels_path)
    coarse[::5] = 255  # unsure rows
    write_labels(tmp_path / "coarse.png", coarse)
    rc, _, err = run(capsys, "refine", "--image", image, "--labels", tmp_path / "coarse.png", "--gt-prob", "0.6",
                     "--out", tmp_path / "o.png", *FAST)
    assert rc == 0, err
    unary = np.full((21, *coarse.shape), np.log(0.4 / 20), np.float32)
    for c in np.unique(coarse[coarse != 255]):
        unary[c][coarse == c] = np.log(0.6)
    unary[:, coarse == 255] = 0
    assert np.array_equal(read_labels(tmp_path / "o.png"), _direct(image, unary).argmax(0))


def test_refine_folder_resumes(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    out, qdir = tmp_path / "out", tmp_path / "q"
    argv = ["refine", "--images", folder / "images", "--probs", folder / "probs", "--out", out, "--probs-out", qdir,
            "--batch-size", "2", *FAST]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "refined 4 images, skipped 0" in stdout and len(stdout.strip().splitlines()) == 1
    assert sorted(f.name for f in out.iterdir()) == [f"im{i}.png" for i in range(4)]
    assert sorted(f.name for f in qdir.iterdir()) == [f"im{i}.npy" for i in range(4)]
    p0 = np.load(folder / "probs" / "im0.npy")
    want = _direct(folder / "images" / "im0.png", np.log(np.clip(p0, 1e-5, 1))).argmax(0)
    assert np.array_equal(read_labels(out / "im0.png"), want)
    # A second run skips everything; a missing output (or probs output) is redone.
    (out / "im1.png").unlink()
    (qdir / "im2.npy").unlink()
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0 and "refined 2 images, skipped 2" in stdout, (stdout, err)
    rc, stdout, _ = run(capsys, *argv, "--overwrite")
    assert "refined 4 images, skipped 0" in stdout


def test_refine_folder_failure_keeps_finished_outputs_and_resumes(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    probs = tmp_path / "probs"
    probs.mkdir()
    for i in range(4):
        (probs / f"im{i}.npy").write_bytes((folder / "probs" / f"im{i}.npy").read_bytes())
    (probs / "im2.npy").write_bytes(b"not a numpy file")
    out = tmp_path / "out"
    argv = ["refine", "--images", folder / "images", "--probs", probs, "--out", out, *FAST]
    rc, stdout, err = run(capsys, *argv)
    assert_user_error(rc, stdout, err, "im2.npy", "not a readable .npy")
    assert sorted(f.name for f in out.iterdir()) == ["im0.png", "im1.png"]  # finished; nothing partial
    np.save(probs / "im2.npy", synthetic_unary(read_labels(folder / "labels" / "im2.png"), 21, 2).astype(np.float32))
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0 and "refined 2 images, skipped 2" in stdout, (stdout, err)


def test_refine_with_checkpoint(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    if not hasattr(ConvCRF, "load"):
        pytest.skip("ConvCRF.load is not available")
    crf = ConvCRF(21, filter_size=3, blur=1, num_iter=2, pos_compat=7.0, backend="torch")
    crf.save(tmp_path / "crf.pt")
    image, probs = folder / "images" / "im0.png", folder / "probs" / "im0.npy"
    rc, _, err = run(capsys, "refine", "--image", image, "--probs", probs, "--out", tmp_path / "o.png",
                     "--checkpoint", tmp_path / "crf.pt", "--backend", "torch")
    assert rc == 0, err
    want = _direct(image, np.log(np.clip(np.load(probs), 1e-5, 1)), filter_size=3, blur=1, num_iter=2,
                   pos_compat=7.0)
    assert np.array_equal(read_labels(tmp_path / "o.png"), want.argmax(0))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    rc, out, err = run(capsys, "refine", "--image", image, "--probs", probs, "--out", tmp_path / "o2.png",
                       "--checkpoint", tmp_path / "bad.pt")
    assert_user_error(rc, out, err, "--checkpoint", "bad.pt")
    assert not (tmp_path / "o2.png").exists()


# ---- bench, help ------------------------------------------------------------------------------------------


def test_bench_dispatches_to_benchmark_main(capsys, monkeypatch) -> None:  # noqa: ANN001
    seen = []
    fake = types.ModuleType("convcrf_triton.benchmark")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "convcrf_triton.benchmark", fake)
    monkeypatch.setattr(sys.modules["convcrf_triton"], "benchmark", fake, raising=False)
    assert cli.main(["bench", "--device", "cpu", "--filter-sizes", "3,5"]) == 0
    assert seen == [["--device", "cpu", "--filter-sizes", "3,5"]]
    monkeypatch.setitem(sys.modules, "convcrf_triton.benchmark", None)  # the module is missing
    monkeypatch.delattr(sys.modules["convcrf_triton"], "benchmark", raising=False)
    assert_user_error(*run(capsys, "bench"), "benchmark")


def test_help_and_version(capsys) -> None:  # noqa: ANN001
    for argv in (["--help"], ["refine", "--help"], ["eval", "--help"], ["demo", "--help"], ["--version"]):
        rc, out, _ = run(capsys, *argv)
        assert rc == 0 and out
    rc, out, _ = run(capsys, "eval", "--help")
    assert "--filter-size" in out and "--noise-seed" in out and "--json" in out


# ---- errors: one line, exit 2, no partial output -----------------------------------------------------------


def _error_cases(d: Path, t: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    img, probs, lab = d / "images" / "im0.png", d / "probs" / "im0.npy", d / "labels" / "im0.png"
    (t / "empty").mkdir()
    (t / "notimage.png").write_text("hello")
    np.save(t / "flat.npy", np.zeros((24, 32), np.float32))
    np.save(t / "wrongsize.npy", np.zeros((21, 20, 32), np.float32))
    np.save(t / "big.npy", np.full((21, 24, 32), 3.0, np.float32))
    nan = np.load(probs)
    nan[0, 0, 0] = np.nan
    np.save(t / "nan.npy", nan)
    write_labels(t / "class30.png", np.full((24, 32), 30))
    write_labels(t / "small.png", np.zeros((10, 10), np.int64))
    Image.new("RGB", (32, 24)).save(t / "rgb_labels.png")
    (t / "lbl").mkdir()
    write_labels(t / "lbl" / "im0.png", np.zeros((10, 10), np.int64))
    (t / "orphans").mkdir()
    np.save(t / "orphans" / "nobody.npy", np.zeros((21, 4, 4), np.float32))
    one = ["refine", "--image", img, "--probs", probs]
    return [
        (["refine", "--image", t / "missing.png", "--probs", probs], ("missing.png", "no such file")),
        (["refine", "--image", t / "notimage.png", "--probs", probs], ("notimage.png", "cannot read")),
        (["refine", "--image", img, "--probs", t / "missing.npy"], ("missing.npy", "no such file")),
        (["refine", "--image", img, "--probs", t / "notimage.png"], ("notimage.png", ".npy")),
        (["refine", "--image", img, "--probs", t / "flat.npy"], ("flat.npy", "3-D")),
        (["refine", "--image", img, "--probs", t / "wrongsize.npy"], ("wrongsize.npy", "24×32")),
        (["refine", "--image", img, "--probs", probs, "--layout", "hwc"], ("[H, W, C]",)),
        (["refine", "--image", img, "--probs", t / "big.npy"], ("big.npy", "--logits")),
        (["refine", "--image", img, "--probs", t / "nan.npy"], ("NaN",)),
        ([*one, "--num-classes", "5"], ("21 classes", "--num-classes is 5")),
        (["refine", "--image", img, "--labels", t / "class30.png"], ("class 30", "--num-classes")),
        (["refine", "--image", img, "--labels", t / "small.png"], ("10×10", "24×32")),
        (["refine", "--image", img, "--labels", t / "rgb_labels.png"], ("palette or grey",)),
        (["refine", "--image", img, "--labels", lab, "--logits"], ("--logits",)),
        ([*one, "--filter-size", "4"], ("--filter-size 4", "odd")),
        ([*one, "--filter-size", "33"], ("--filter-size 33",)),
        ([*one, "--filter-size", "abc"], ("--filter-size", "invalid int")),
        ([*one, "--blur", "3"], ("--blur 3",)),
        ([*one, "--iters", "0"], ("--iters 0",)),
        ([*one, "--pos-sdims", "-1"], ("--pos-sdims -1",)),
        ([*one, "--col-schan", "nan"], ("--col-schan nan",)),
        ([*one, "--backend", "cuda"], ("--backend", "invalid choice")),
        ([*one, "--storage", "fp8"], ("--storage", "invalid choice")),
        ([*one, "--precision", "tf32x3"], ("--precision", "invalid choice")),
        ([*one, "--device", "tpu"], ("--device tpu",)),
        ([*one, "--device", "cuda:7"], ("--device cuda:7",)),
        ([*one, "--gt-prob", "1.5"], ("--gt-prob",)),
        ([*one, "--batch-size", "0"], ("--batch-size 0",)),
        ([*one, "--checkpoint", t / "none.pt"], ("--checkpoint", "no such file")),
        ([*one, "--bogus"], ("unrecognized arguments: --bogus",)),
        (["refine", "--image", img], ("one of the arguments --probs --labels is required",)),
        (["refine", "--image", d / "images", "--probs", d / "probs"], ("is a folder",)),
        ([*one, "--out", t / "nodir" / "o.png"], ("does not exist",)),
        ([*one, "--out", t / "empty"], ("is a folder",)),
        (["refine", "--images", d / "images", "--probs", t / "empty", "--out", t / "o"], ("has no .npy files",)),
        (["refine", "--images", t / "empty", "--probs", d / "probs", "--out", t / "o"], ("has no",)),
        (["refine", "--images", t / "nodir", "--probs", d / "probs", "--out", t / "o"], ("no such folder",)),
        (["refine", "--images", d / "images", "--probs", t / "orphans", "--out", t / "o"], ("no image", "nobody")),
        (["refine", "--images", d / "images", "--probs", d / "probs"], ("needs --out",)),
        (["eval", "--images", d / "images"], ("required: --labels",)),
        (["eval", "--images", t / "empty", "--labels", d / "labels"], ("has no",)),
        (["eval", "--images", d / "images", "--labels", t / "empty"], ("has no .png files",)),
        (["eval", "--images", d / "images", "--labels", t / "lbl"], ("10×10",)),
        (["eval", "--images", d / "images", "--labels", d / "labels", "--num-classes", "1"], ("--num-classes 1",)),
        (["demo", "--image", img], ("--image and --labels",)),
        (["demo", "--filter-size", "2"], ("--filter-size 2",)),
        (["demo", "--out", t / "nodir" / "x.png"], ("does not exist",)),
        (["frobnicate"], ("invalid choice",)),
        ([], ("required",)),
    ]


def test_every_error_is_one_line_exit_2_and_leaves_no_output(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    """Missing/unreadable files, shape and class mismatches, bad flag values, empty folders (SPEC §5)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _error_cases(folder, inputs)
    work = tmp_path / "work"
    work.mkdir()
    for argv, needles in cases:
        outputs = ["--out", work / "o.png"] if argv[:1] == ["refine"] and "--out" not in argv and \
            "--images" not in argv else []
        outputs += ["--json", work / "r.json"] if argv[:1] == ["eval"] else []
        rc, out, err = run(capsys, *argv, *outputs)
        try:
            assert_user_error(rc, out, err, *needles)
        except AssertionError as e:
            raise AssertionError(f"{[str(a) for a in argv]}: {e}") from None
        assert list(work.iterdir()) == [], argv
        assert not (inputs / "o").exists() or not any((inputs / "o").iterdir()), argv


def test_train_reports_saves_and_the_checkpoint_refines(capsys, tmp_path, folder) -> None:  # noqa: ANN001
    out = tmp_path / "crf.pt"
    rc, stdout, err = run(capsys, "train", "--images", folder / "images", "--labels", folder / "labels",
                          "--epochs", "2", "--holdout", "1", "--lr", "0.01", "--out", out, "--quiet", *FAST)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("before: mIoU") and "1 held-out images" in lines[0]
    assert [ln.split()[:2] for ln in lines[1:3]] == [["epoch", "1"], ["epoch", "2"]]
    assert lines[3].startswith("after:  mIoU") and lines[4] == f"saved {out}"
    # The training scenes (all but the last by name) label a few of the 21 classes; the per-class weight will
    # learn to suppress the others: one line says so.
    shown = set().union(*(np.unique(read_labels(folder / "labels" / f"im{i}.png")).tolist() for i in range(3)))
    unseen = sorted(set(range(21)) - shown)
    assert err.splitlines() == [
        f"warning: {len(unseen)} of 21 classes ({', '.join(map(str, unseen[:12]))}, ...) appear in no training "
        "label: the learned weight will learn to suppress them wherever they occur; train on labels that show "
        "every class, or learn weight='scalar' without convcomp"]
    crf = ConvCRF.load(out)
    assert crf.config.trainable and crf.config.filter_size == 5 and crf.num_classes == 21
    assert [p.name for p in tmp_path.iterdir()] == ["crf.pt"]  # no temporary left behind
    rc, stdout, err = run(capsys, "eval", "--images", folder / "images", "--labels", folder / "labels",
                          "--checkpoint", out, "--quiet")
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1])["n_images"] == 4


@pytest.mark.parametrize("extra,needles", [
    (["--holdout", "4"], ("--holdout 4", "4 image pairs")),
    (["--epochs", "0"], ("--epochs 0",)),
    (["--lr", "0"], ("--lr 0",)),
    (["--schedule", "linear"], ("--schedule", "invalid choice")),
    (["--num-classes", "3"], ("beyond --num-classes 3",)),
    (["--filter-size", "4"], ("--filter-size 4",)),
])
def test_train_errors_are_one_line(capsys, tmp_path, folder, extra, needles) -> None:  # noqa: ANN001
    rc, out, err = run(capsys, "train", "--images", folder / "images", "--labels", folder / "labels",
                       "--out", tmp_path / "crf.pt", "--quiet", *FAST, *extra)
    assert_user_error(rc, out, err, *needles)
    assert list(tmp_path.iterdir()) == []
