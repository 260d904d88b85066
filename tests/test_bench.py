"""The benchmark suite (issue 5): ``convcrf-triton bench --quick`` and ``bench/accuracy.py --quick`` write
well-formed CSVs, PNGs and markdown; the fused/two-pass forcing used for the GPU rows works. No timing
assertions: the numbers themselves are measured by ``bench/``, never by tests (SPEC §7)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convcrf_triton import ConvCRF, benchmark
from convcrf_triton.baselines import densecrf_available
from convcrf_triton.data import write_labels

ROOT = Path(__file__).resolve().parents[1]


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200, (path, im.size)
        assert np.asarray(im.convert("L")).std() > 1  # not a blank canvas


def _floats(row: dict[str, str], *cols: str) -> list[float]:
    return [float(row[c]) for c in cols]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert benchmark.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_quick_csv_columns_and_rows(quick_run: Path) -> None:
    with (quick_run / "bench.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == benchmark.COLUMNS
    impls = {r["implementation"] for r in rows}
    assert {"reference", "unfold", "device"} <= impls
    assert not impls & set(benchmark.TRITON_IMPLS)  # CPU: the Triton path is only the interpreter
    assert ("pydensecrf" in impls) == densecrf_available()
    sweep = benchmark.quick_sweep()
    for impl in ("reference", "unfold"):
        got = {(int(r["k"]), int(r["blur"])) for r in rows if r["implementation"] == impl and r["mode"] == "convcrf"
               and (int(r["H"]), int(r["W"]), r["C"], r["B"]) == (*sweep.k_resolutions[0], "21", "1")}
        assert got == {(k, b) for k in sweep.filter_sizes for b in sweep.blurs}, impl
    for r in rows:
        assert r["dtype"] == "float32" and r["torch"] == torch.__version__ and r["date"] and r["commit"]
        median, p20, p80 = _floats(r, "median_ms", "p20_ms", "p80_ms")
        assert 0 < p20 <= median <= p80 < math.inf, r
        if r["mode"] in ("convcrf", "densecrf") and r["peak_mem_mb"] != "":
            assert float(r["peak_mem_mb"]) > -1.0, r  # a resident-set delta: may be ~0, never really negative
        if r["mode"] == "message_pass":
            assert all(v > 0 for v in _floats(r, "gflops", "gbs", "roofline_frac")), r
    modes = {r["mode"] for r in rows if r["implementation"] == "device"}
    assert modes == {"copy", "matmul"}
    # Resolution sweep and the C / B variants are there too.
    sizes = {(int(r["H"]), int(r["W"])) for r in rows if r["implementation"] == "reference"}
    assert sizes >= set(sweep.res_resolutions)
    assert {(r["C"], r["B"]) for r in rows if r["implementation"] == "reference"} >= {("19", "1"), ("21", "2")}


def test_quick_meta_plots_and_summary(quick_run: Path) -> None:
    meta = json.loads((quick_run / "meta.json").read_text())
    assert meta["device_type"] == "cpu" and meta["loadavg"] and not meta["errors"]
    assert any("Triton rows" in n for n in meta["notes"])
    assert meta["checks"] and max(c["max_rel_diff"] for c in meta["checks"]) < 1e-4  # reference == unfold
    for name in benchmark.PLOT_FILES:
        _assert_png(quick_run / name)
    summary = (quick_run / "summary.md").read_text()
    assert "| reference |" in summary and "× unfold" in summary
    # The plots can be redrawn from the CSV alone.
    (quick_run / "time_vs_filter_size.png").unlink()
    assert benchmark.main(["--plot-only", "--out", str(quick_run)]) == 0
    _assert_png(quick_run / "time_vs_filter_size.png")


def test_bench_cli_errors(tmp_path: Path, capsys) -> None:
    assert benchmark.main(["--device", "cpu", "--filter-sizes", "4", "--out", str(tmp_path)]) == 2
    assert "filter size 4" in capsys.readouterr().err
    assert benchmark.main(["--device", "cpu", "--implementations", "nope", "--out", str(tmp_path)]) == 2
    assert benchmark.main(["--plot-only", "--out", str(tmp_path / "missing")]) == 2
    if not torch.cuda.is_available():
        assert benchmark.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("fused", [True, False])
def test_forced_variant_reaches_the_kernels(fused: bool) -> None:
    """The GPU rows force fused / two-pass through ``prefer_fused``; check it against the real dispatch
    (conftest sets TRITON_INTERPRET=1, so the Triton backend runs on CPU tensors)."""
    from convcrf_triton.kernels import message_passing

    from convcrf_triton import kernels

    g = torch.Generator().manual_seed(0)
    unary, image = torch.randn(1, 3, 9, 11, generator=g), torch.rand(1, 3, 9, 11, generator=g) * 255

    def state():
        return (message_passing.prefer_fused, *(getattr(kernels, n, None) for n in ("prefer_fused",
                                                                                    *benchmark.COUNTED_OPS)))

    before = state()
    for blur in (1, 2):  # blur 1 may take the one-launch mean-field step, blur 2 the message-pass ops
        crf = ConvCRF(3, filter_size=5, blur=blur, num_iter=2, backend="triton")
        with benchmark.forced_variant(fused) as counts:
            out = crf(unary, image)
        assert benchmark.variant_ran(counts) == ("fused" if fused else "two-pass"), counts
        assert state() == before  # restored
        want = ConvCRF(3, filter_size=5, blur=blur, num_iter=2, backend="torch")(unary, image)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_band_ab_script_under_the_interpreter(tmp_path: Path) -> None:
    """``bench/band_ab.py`` (a GPU A/B, op by op) runs end to end: every variant, outputs that agree with the
    direct kernel (tf32 within its ~1e-3 on probabilities)."""
    spec = importlib.util.spec_from_file_location("bench_band_ab", ROOT / "bench" / "band_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ab.csv"
    assert module.main(["--device", "cpu", "--sizes", "9x12", "--filter-sizes", "7", "--classes", "3",
                        "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["variant"]) for r in rows] == [
        ("message_pass", "direct"), ("message_pass", "band-tf32x3"), ("message_pass", "band-tf32"),
        ("step", "direct-planar"), ("step", "direct-channels-last"), *[
            ("step", f"band-{p}-{w}w") for p in ("tf32x3", "tf32") for w in (4, 8)]]
    for r in rows:
        rounded_tf32 = r["variant"].startswith("band-tf32") and not r["variant"].startswith("band-tf32x3")
        assert float(r["rel_err"]) < (3e-3 if rounded_tf32 else 1e-5), r


def test_host_overhead_script_runs() -> None:
    """``bench/host_overhead.py`` prints the dispatch rows, and the message pass's and inference's on each launch
    path (here through the stub driver, the kernels compiled for sm_90)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(ROOT / ".aot_cache" / "triton")}  # (test_direct_launch's too)
    script = str(ROOT / "bench" / "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "--calls", "300", "--profile", "3"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("\nprofile of")[0]
    rows = [[c.strip() for c in line.split("|")[1:4]] for line in table.splitlines()
            if line.startswith(("| dispatch", "| message_pass", "| kernels", "| inference"))]
    paths = ["DirectLaunch", "triton's launch path", "launch stubbed"]
    loop_paths = ["DirectLaunch", "DirectLaunch, no Repeat", "triton's launch path", "launch stubbed"]
    assert [r[:2] for r in rows] == [["dispatch", "through the op"], ["dispatch", "LibraryOp (direct)"],
                                     *[[what, p] for what in ("message_pass through the op", "kernels.message_pass")
                                       for p in paths],
                                     *[[what, p] for what in ("inference 8x8 blur 4 k 3", "inference 8x8 blur 1 k 7")
                                       for p in loop_paths]], proc.stdout
    assert all(float(r[2]) > 0 for r in rows), proc.stdout
    # --profile: each inference's top functions by own time, ConvCRF's forward among their callers
    assert proc.stdout.count("\nprofile of inference 8x8") == 2, proc.stdout
    assert proc.stdout.count("| function | own µs | cumulative µs | calls |") == 2, proc.stdout


def test_first_call_script_times_an_empty_and_a_full_cache() -> None:
    """``bench/first_call.py`` times a process's first inference from an empty Triton cache, then from the cache
    that process filled, without and with its kept picks, then untuned from an empty cache (here through the stub
    driver, compiling for sm_90: the full cache's are faster)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "first_call.py"), "--filter-size", "3", "--blur", "1",
                           "--size", "8x8", "--classes", "2", "--threads", "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:6]] for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert [r[:3] for r in rows] == [["2", "empty", "none"], ["2", "full", "none"], ["2", "full", "kept"],
                                     ["2", "empty", "no tuning (CONVCRF_AUTOTUNE=0)"]], proc.stdout
    first = [float(r[3]) for r in rows]
    # an empty cache compiles (tuned: every config; untuned: one a kernel), a full one nothing
    assert min(first[0], first[3]) > max(first[1], first[2]) > 0, proc.stdout


def test_backward_script_times_both_kernels(tmp_path: Path) -> None:
    """``bench/backward.py`` (under the interpreter here) writes a row per size and filter size with its times."""
    out = tmp_path / "backward.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backward.py"), "--sizes", "6x9", "--filter-sizes",
                           "3,5", "--classes", "3", "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["size"], r["filter_size"]) for r in rows] == [("6x9", "3"), ("6x9", "5")]
    assert all(float(r[t]) > 0 for r in rows for t in ("two_pass_us", "fused_pass_us", "weight_grad_us"))


def test_train_step_script_times_both_backwards(tmp_path: Path) -> None:
    """``bench/train_step.py`` writes a row per blur and filter size: inference, forward and backward, the
    written-out backward's and (``--plain``) autograd's through the plain ops."""
    out = tmp_path / "train_step.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--size", "9x13", "--blurs", "1,2",
                           "--filter-sizes", "3", "--classes", "3", "--reps", "1", "--plain", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["blur"], r["filter_size"]) for r in rows] == [("1", "3"), ("2", "3")]
    times = ("inference_ms", "written_forward_ms", "written_backward_ms", "plain_forward_ms", "plain_backward_ms")
    assert all(float(r[t]) > 0 for r in rows for t in times)


def _load_accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_quick_on_a_tiny_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(2):
        labels = np.zeros((40, 56), dtype=np.int64)
        labels[10:30, 15:45] = 1 + i
        labels[:2] = 255
        image = (np.stack([labels * 60, 200 - labels * 50, np.full_like(labels, 90)], -1) % 256).astype(np.uint8)
        image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"im{i}.png")
        write_labels(tmp_path / "labels" / f"im{i}.png", labels)
    out = tmp_path / "out"
    accuracy = _load_accuracy()
    assert accuracy.main(["--data", str(tmp_path), "--out", str(out), "--quick"]) == 0
    with (out / "accuracy.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == accuracy.COLUMNS
    methods = [r["method"] for r in rows]
    assert methods[0] == "unary"
    crf = [(r["mode"], r["k"], r["blur"]) for r in rows if r["mode"] in ("textbook", "convcrf")]
    assert crf == [(m, k, "4") for m in ("textbook", "convcrf") for k in ("3", "5")]
    assert sum(m.startswith("pydensecrf") for m in methods) == (2 if densecrf_available() else 0)
    assert [m for m in methods if m.startswith("DenseCRF2D")] == ["DenseCRF2D (drop-in), U = -log p",
                                                                   "DenseCRF2D (drop-in), U = -log softmax(p)"]
    for r in rows:
        assert 0 <= float(r["miou"]) <= 100 and 0 <= float(r["acc"]) <= 100 and r["n_images"] == "2"
    assert "| method | k | blur | mIoU [%] | accuracy [%] | time / image [ms] |" in (out / "accuracy.md").read_text()
    _assert_png(out / "accuracy.png")
    assert accuracy.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_densecrf_speed_script(tmp_path: Path) -> None:
    """``bench/densecrf_speed.py``: the drop-in's row, its inference alone (and pydensecrf's, with the labels'
    agreement and the speed-up, where it is installed) per size, in CSV and markdown."""
    spec = importlib.util.spec_from_file_location("bench_densecrf_speed", ROOT / "bench" / "densecrf_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    image, U = script.problem(17, 20)
    # pydensecrf's layout, made once: a transposed copy inside the timed calls had been 10-19 ms of each at 375×500
    assert U.dtype == np.float32 and U.flags.c_contiguous and U.shape == (21, 17 * 20) and image.shape == (17, 20, 3)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--sizes", "24x32,17x20", "--repeat", "1", "--backend", "torch",
                            "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    with (tmp_path / "densecrf_speed.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == script.COLUMNS
    names = ["DenseCRF2D (drop-in)", "DenseCRF2D inference()", *(["pydensecrf"] if densecrf_available() else [])]
    assert [(r["H"], r["W"], r["implementation"]) for r in rows] == [(H, W, n) for H, W in (("24", "32"), ("17", "20"))
                                                                   for n in names]
    for r in rows:
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        if r["implementation"] == "DenseCRF2D (drop-in)" and densecrf_available():
            assert 0.5 < float(r["agreement"]) <= 1 and float(r["speedup"]) > 0
    assert "| H×W | implementation | device |" in (tmp_path / "densecrf_speed.md").read_text()
    on_gpu = ["--device", "cuda", "--sizes", "24x32", "--repeat", "1", "--backend", "torch", "--out", str(tmp_path)]
    assert script.main(on_gpu) == (0 if torch.cuda.is_available() else 2)


@pytest.mark.filterwarnings("ignore:.*appear in no training label")
def test_decoupled_training_script_on_a_tiny_set(tmp_path: Path) -> None:
    """``bench/decoupled_training.py --quick``: per held-out set, the hand-set rows then one trained row per
    recipe, with IoUs of the held-out classes and the held-out classes no training label shows (class 3 is
    only in the held-out image)."""
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for i, classes in enumerate([(1, 2), (2, 1), (1, 3)]):
        labels = np.zeros((24, 28), dtype=np.int64)
        labels[4:14, 3:13], labels[12:22, 15:26] = classes
        image = np.stack([labels * 70, 220 - labels * 60, np.full_like(labels, 90)], -1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"im{i}.png")
        write_labels(tmp_path / "labels" / f"im{i}.png", labels)
    spec = importlib.util.spec_from_file_location("bench_decoupled", ROOT / "bench" / "decoupled_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path), "--holdout", "im2", "--num-classes", "4", "--jobs", "1", "--quick"]
    assert module.main([*argv, "--out", str(out)]) == 0
    with (out / "decoupled_training.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["hand-set textbook", "hand-set original-compatible"] + [
        f"trained {module.LABELS[mode]}" for mode, *_ in module.RECIPES]
    assert [(r["weight"], r["convcomp"], r["schedule"], r["loss"]) for r in rows[2:]] == [
        (w, str(c), s, loss) for _, w, c, _, s, loss in module.RECIPES]
    for r in rows:
        iou = dict(item.split(":") for item in r["class_iou"].split())
        assert sorted(iou) == ["0", "1", "3"] and r["unseen"] == "3" and r["holdout"] == "im2"
        assert all(0 <= float(v) <= 100 for v in iou.values()) and 0 <= float(r["miou"]) <= 100
    assert all(float(r["last10_min"]) <= float(r["miou"]) <= float(r["last10_max"]) for r in rows[2:])
    assert "| held out | method |" in (out / "decoupled_training.md").read_text()
    assert module.main([*argv, "--holdout", "im9", "--out", str(out)]) == 2  # not a stem of the set


def test_every_row_can_be_asked_for_by_name() -> None:
    """Each row the sweep knows how to time is one ``--implementations`` accepts (a row left out of
    ``TRITON_IMPLS`` was refused on a lent GPU)."""
    rows = {benchmark.BAND_IMPL, benchmark.TF32_IMPL, *benchmark.MODEL_ONLY_IMPLS, *benchmark.ROW_SWITCHES}
    assert rows <= set(benchmark.TRITON_IMPLS) <= set(benchmark.MODEL_IMPLS)


def test_gpu_rows_compute_the_same_as_the_reference_under_the_interpreter() -> None:
    """Each GPU row's callable, run by the interpreter on CPU tensors: a row that would fail or compute
    something else must not wait for a lent GPU to show it."""
    bench = object.__new__(benchmark.Bench)
    bench.dev = torch.device("cpu")
    image = benchmark.synthetic_image(1, 10, 12)
    case = benchmark.Case("message_pass", 5, 10, 12, 3, 1, 1)
    want = bench.mp_fn("reference", case, image)()
    for impl in ("triton-two-pass", "triton-fused", benchmark.BAND_IMPL, benchmark.TF32_IMPL):
        got = bench.mp_fn(impl, case, image)()
        if impl == benchmark.TF32_IMPL:  # tf32 products: judged relative to the largest message
            assert (got - want).abs().max() < 3e-4 * want.abs().max(), impl
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=impl)
    image, unary = benchmark.synthetic_image(1, 7, 9), benchmark.synthetic_unary(1, 3, 7, 9)
    for blur in (1, 2):
        case = benchmark.Case("convcrf", 3, 7, 9, 3, 1, blur)
        want = bench.model_fn("reference", case, unary, image)()
        for impl in (benchmark.CL_IMPL, benchmark.COMPOSED_IMPL, benchmark.GRAPH_IMPL, benchmark.BAND_IMPL,
                     "triton-two-pass"):
            got = bench.model_fn(impl, case, unary, image)()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{impl} blur={blur}")
    case = benchmark.Case("convcrf", 7, 7, 9, 3, 1, 2)  # triton-tf32 takes the band kernel from k = 7, blur > 1
    want = bench.model_fn("reference", case, unary, image)()
    got = bench.model_fn(benchmark.TF32_IMPL, case, unary, image)()
    assert (got - want).abs().max() < 3e-4 * want.abs().max()
