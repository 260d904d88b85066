"""Accuracy report in the form of the paper's Table 1 (SPEC §6): the synthetic noisy-unary benchmark on
``../shared/data/voc7`` for k = 3 … 13 at blur 4 and 1, textbook mean-field (``ConvCRF(...)``) and the
original-compatible mode (``ConvCRF.from_convcrf_conf``), plus pydensecrf (matched parameters) when it is
installed and this package's drop-in for it (``convcrf_triton.densecrf.DenseCRF2D``, the same calls). mIoU and
pixel accuracy over the whole set (one confusion matrix), and the time per image.

Protocol (SPEC §6, via ``convcrf_triton.data``): every image gets the synthetic unary of its label map
with a fresh ``default_rng(seed)`` (seed 0); the unary logits are the noisy probabilities themselves, as
in the original code; 5 iterations; CRF on the PyTorch path (``backend="torch"``) of this CPU. pydensecrf:
Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, with two unaries: ``-log p`` (the noisy
probabilities, as the original code's FullCRF) and ``-log softmax(p)`` (p as logits, as ConvCRF takes it);
the drop-in alike (its window from ``sxy``: filter size 31 at blur 8), on the PyTorch path.

    python bench/accuracy.py [--data ../shared/data/voc7 | --images DIR --labels DIR] [--out DIR]
                             [--filter-sizes 3,5,7,9,11,13] [--blurs 4,1] [--threads 1] [--quick]

Writes ``accuracy.csv``, ``accuracy.md`` and ``accuracy.png`` into ``--out`` (default
``bench/results/<cpu-slug>/``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "voc7"
COLUMNS = ["method", "mode", "k", "blur", "iters", "miou", "acc", "ms_per_image", "n_images", "device", "torch",
           "commit", "date"]
SERIES = [("textbook", 4), ("textbook", 1), ("convcrf", 4), ("convcrf", 1)]
LABELS = {"textbook": "ConvCRF textbook", "convcrf": "ConvCRF original-compatible"}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load_set(images: Path, labels: Path, num_classes: int, seed: int) -> list[tuple[str, Any, Any, Any]]:
    """``[(stem, image [1, 3, H, W], unary [1, C, H, W] float32, labels [H, W])]`` matched by file stem."""
    import numpy as np
    import torch

    from convcrf_triton.data import read_image, read_labels, synthetic_unary

    label_files = {p.stem: p for p in labels.iterdir() if p.suffix.lower() in (".png", ".bmp", ".tif", ".tiff")}
    out = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")):
        if path.stem not in label_files:
            continue
        lab = read_labels(label_files[path.stem])
        img = read_image(path)
        if img.shape[1:] != lab.shape:
            raise ValueError(f"{path.name}: image {img.shape[1:]} and labels {lab.shape} differ in size")
        unary = synthetic_unary(lab, num_classes, seed=seed)
        out.append((path.stem, torch.from_numpy(img)[None], torch.from_numpy(unary)[None].float(),
                    np.asarray(lab)))
    if not out:
        raise ValueError(f"no image/label pairs matched by file stem in {images} and {labels}")
    return out


def evaluate(data, predict) -> tuple[float, float, float]:
    """(mIoU, accuracy, mean seconds per image) of ``predict(image, unary) -> labels [H, W]``."""
    from convcrf_triton.data import ConfusionMatrix

    cm = ConfusionMatrix(data[0][2].shape[1])
    seconds = 0.0
    for _, image, unary, labels in data:
        t0 = time.perf_counter()
        pred = predict(image, unary)
        seconds += time.perf_counter() - t0
        cm.add(labels, pred)
    return cm.miou(), cm.accuracy(), seconds / len(data)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from convcrf_triton import ConvCRF
    from convcrf_triton import densecrf as dropin
    from convcrf_triton.baselines import densecrf_available, densecrf_infer
    from convcrf_triton.benchmark import device_description, git_commit

    data = load_set(args.images, args.labels, args.num_classes, args.seed)
    device, _ = device_description("cpu", torch.get_num_threads())
    common = {"iters": args.iters, "n_images": len(data), "device": device, "torch": torch.__version__,
              "commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    rows: list[dict[str, Any]] = []

    def add(method: str, mode: str, k: Any, blur: Any, result: tuple[float, float, float]) -> None:
        miou, acc, sec = result
        rows.append({"method": method, "mode": mode, "k": k, "blur": blur, "miou": round(100 * miou, 2),
                     "acc": round(100 * acc, 2), "ms_per_image": round(1e3 * sec, 1), **common})
        print(f"{method:30s} k={k!s:>2} blur={blur!s:>2}: mIoU {100 * miou:5.1f}  acc {100 * acc:5.1f}  "
              f"{1e3 * sec:8.1f} ms/image", flush=True)

    add("unary", "-", "-", "-", evaluate(data, lambda image, unary: unary[0].argmax(0).numpy()))
    warm_image, warm_unary = data[0][1][..., :64, :64], data[0][2][..., :64, :64]
    for mode, blur in SERIES:
        if blur not in args.blurs or mode not in args.modes:
            continue
        for k in args.filter_sizes:
            if mode == "convcrf":
                crf = ConvCRF.from_convcrf_conf({"filter_size": k, "blur": blur}, num_classes=args.num_classes,
                                                backend="torch")
            else:
                crf = ConvCRF(args.num_classes, filter_size=k, blur=blur, num_iter=args.iters, backend="torch")
            crf.config = dataclasses.replace(crf.config, num_iter=args.iters)  # the original conf has no T

            def predict(image, unary, crf=crf):
                with torch.inference_mode():
                    return crf(unary, image)[0].argmax(0).numpy()

            predict(warm_image, warm_unary)  # lazy initialisation off the clock
            add(LABELS[mode], mode, k, blur, evaluate(data, predict))
    # Two unary conventions: -log p (the synthetic probabilities themselves, as the original code's FullCRF
    # does) and -log softmax(p) (p taken as logits, as ConvCRF does; nearly flat, since p is in [0, 1]).
    conventions = (("U = -log p", True), ("U = -log softmax(p)", False))
    implementations = []
    if args.densecrf and densecrf_available():
        implementations.append(("pydensecrf", "densecrf", {}))
    elif args.densecrf:
        print("pydensecrf is not installed (pip install pydensecrf2): its rows are left out", flush=True)
    if args.densecrf:
        implementations.append(("DenseCRF2D (drop-in)", "dropin", {"module": dropin, "backend": "torch"}))
    for label, mode, options in implementations:
        for convention, probs in conventions:
            def dense(image, unary, probs=probs, options=options):
                return densecrf_infer(unary[0].numpy(), image[0].numpy(), num_iter=args.iters,
                                      probabilities=probs, **options).argmax(0)

            dense(warm_image, warm_unary)
            add(f"{label}, {convention}", mode, "-", "-", evaluate(data, dense))
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of ``accuracy.csv`` with numbers parsed (``k``/``blur`` stay ``'-'`` where not applicable)."""
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for c in ("k", "blur", "iters", "n_images"):
                row[c] = int(r[c]) if r[c].lstrip("-").isdigit() else r[c]
            for c in ("miou", "acc", "ms_per_image"):
                row[c] = float(r[c])
            rows.append(row)
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    r0 = rows[0]
    lines = [
        f"# Synthetic noisy-unary benchmark (SPEC §6), {r0['n_images']} images of `{args.images.parent.name}`",
        "",
        f"Paper's Table 1 protocol: seed {args.seed} per image, {args.iters} iterations, C = {args.num_classes}; "
        f"mIoU over the classes present, pixel accuracy; time per image on {r0['device']} (mean over the set, "
        f"PyTorch path for ConvCRF). torch {r0['torch']}, commit {r0['commit']}, {r0['date']}.",
        "",
        "| method | k | blur | mIoU [%] | accuracy [%] | time / image [ms] |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['k']} | {r['blur']} | {r['miou']:.1f} | {r['acc']:.1f} | "
              f"{'–' if r['method'] == 'unary' else format(r['ms_per_image'], '.1f')} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    crf_rows = [r for r in rows if r["mode"] in ("textbook", "convcrf")]
    ks = sorted({r["k"] for r in crf_rows})
    series = [(m, b) for m, b in SERIES if any(r["mode"] == m and r["blur"] == b for r in crf_rows)]
    colors = {("textbook", 4): "tab:blue", ("textbook", 1): "tab:cyan", ("convcrf", 4): "tab:red",
              ("convcrf", 1): "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(ks))
    refs = [r for r in rows if r["mode"] in ("-", "densecrf", "dropin")]
    for ax, col, title in zip(axes, ("miou", "acc", "ms_per_image"),
                              ("mIoU [%]", "pixel accuracy [%]", "time per image [ms]"), strict=True):
        for i, (mode, blur) in enumerate(series):
            by_k = {r["k"]: r[col] for r in crf_rows if r["mode"] == mode and r["blur"] == blur}
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [by_k.get(k, math.nan) for k in ks], width,
                   color=colors[(mode, blur)], label=f"{LABELS[mode]}, blur {blur}")
        styles = (("k", ":"), ("g", "--"), ("tab:olive", "-."), ("m", "--"), ("tab:purple", "-."))
        for r, (color, ls) in zip(refs, styles, strict=False):
            if col == "ms_per_image" and r["mode"] == "-":
                continue
            ax.axhline(r[col], color=color, ls=ls, lw=1.5, label=r["method"])
        ax.set_xticks(x)
        ax.set_xticklabels([f"k={k}" for k in ks])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        if col == "ms_per_image":
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        else:
            lo = min([r[col] for r in rows]) - 3
            ax.set_ylim(max(0, lo), 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle(f"SPEC §6 synthetic benchmark, {rows[0]['n_images']} images, {rows[0]['iters']} iterations "
                 f"({rows[0]['device']})", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and labels/ (voc7)")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: DATA/images)")
    p.add_argument("--labels", type=Path, default=None, help="label folder (default: DATA/labels)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/<cpu-slug>")
    p.add_argument("--filter-sizes", type=_ints, default=[3, 5, 7, 9, 11, 13])
    p.add_argument("--blurs", type=_ints, default=[4, 1])
    p.add_argument("--modes", default="textbook,convcrf", help="textbook and/or convcrf (original-compatible)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--no-densecrf", dest="densecrf", action="store_false", help="leave pydensecrf and the drop-in out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="k = 3, 5 at blur 4 only")
    p.add_argument("--plot-only", action="store_true", help="redraw accuracy.png and .md from --out/accuracy.csv")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import bootstrap

    bootstrap()
    import torch

    from convcrf_triton.benchmark import device_description

    args.images = args.images or args.data / "images"
    args.labels = args.labels or args.data / "labels"
    args.modes = [m for m in args.modes.split(",") if m]
    if args.quick:
        args.filter_sizes, args.blurs = [3, 5], [4]
    out = args.out or ROOT / "bench" / "results" / device_description("cpu", args.threads)[1]
    if args.plot_only:
        rows = read_csv(out / "accuracy.csv")
        write_markdown(rows, out / "accuracy.md", args)
        plot(rows, out / "accuracy.png")
        print(f"wrote {out / 'accuracy.md'}\nwrote {out / 'accuracy.png'}")
        return 0
    for folder in (args.images, args.labels):
        if not folder.is_dir():
            print(f"error: folder not found: {folder}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "accuracy.csv")
    write_markdown(rows, out / "accuracy.md", args)
    written = [out / "accuracy.csv", out / "accuracy.md"]
    if not args.no_plot:
        plot(rows, out / "accuracy.png")
        written.append(out / "accuracy.png")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
