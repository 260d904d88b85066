"""The ``convcrf-triton`` command line (SPEC §5); also ``python -m convcrf_triton``.

Subcommands: ``demo`` (no arguments needed: a procedural scene with its exact truth), ``refine`` (one image
or folders; resumable; sharded under ``torchrun``), ``eval`` (the synthetic benchmark of SPEC §6 over a
folder; one JSON line), ``train`` (decoupled training, :mod:`convcrf_triton.train`),
``bench`` (speed measurements, :mod:`convcrf_triton.benchmark`).

Every user error (missing or unreadable file, shape or class mismatch, bad flag value, empty folder) is
one line on stderr and exit code 2, with no traceback and no partial output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import LOSSES, SCHEDULES, CRFConfig
from .refine import (
    CLIError,
    check_output_path,
    load_image,
    load_labels,
    match_pairs,
    refine_folder,
    refine_one,
    save_image,
    save_text,
)

PROG = "convcrf-triton"

# CRF flag → ConvCRF argument (SPEC §5 "CRF flags"), in help order.
CRF_FLAGS = {
    "--filter-size": "filter_size", "--blur": "blur", "--iters": "num_iter", "--pos-sdims": "pos_sdims",
    "--pos-compat": "pos_compat", "--col-sdims": "col_sdims", "--col-schan": "col_schan",
    "--col-compat": "col_compat", "--col-use-pos": "col_use_pos", "--mode": "mode", "--backend": "backend",
    "--storage": "storage", "--precision": "precision",
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")


def _defaults() -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(CRFConfig) if f.default is not dataclasses.MISSING}


def _add_crf_flags(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    g = p.add_argument_group("CRF (SPEC §1; defaults are the SPEC's)")
    g.add_argument("--filter-size", type=int, default=d["filter_size"], metavar="K",
                   help="window k×k on the blurred grid, odd, 3..31 (default %(default)s)")
    g.add_argument("--blur", type=int, default=d["blur"], metavar="S",
                   help="pool features and Q by S, 1 or even (default %(default)s)")
    g.add_argument("--iters", type=int, default=d["num_iter"], metavar="T",
                   help="mean-field iterations (default %(default)s)")
    for flag, name, what in (("--pos-sdims", "pos_sdims", "smoothness kernel bandwidth θγ, pixels"),
                             ("--pos-compat", "pos_compat", "smoothness kernel weight"),
                             ("--col-sdims", "col_sdims", "appearance kernel position bandwidth θα, pixels "
                                                          "(with --col-use-pos)"),
                             ("--col-schan", "col_schan", "appearance kernel colour bandwidth θβ, 0..255 units"),
                             ("--col-compat", "col_compat", "appearance kernel weight")):
        g.add_argument(flag, type=float, default=d[name], metavar="X", help=f"{what} (default %(default)s)")
    g.add_argument("--col-use-pos", action="store_true", help="add position to the appearance kernel "
                   "(the dense-CRF bilateral kernel)")
    g.add_argument("--mode", choices=("textbook", "convcrf"), default=d["mode"],
                   help="textbook mean-field, or the original ConvCRF code's inference (default %(default)s)")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=d["backend"],
                   help="auto: Triton kernels on CUDA, PyTorch on the CPU (default %(default)s)")
    g.add_argument("--storage", choices=("float32", "bfloat16", "float16"), default=d["storage"],
                   help="dtype of the Gaussian weights and message-pass inputs between kernels; arithmetic "
                        "stays float32 (default %(default)s)")
    g.add_argument("--precision", choices=("float32", "tf32"), default=d["precision"],
                   help="tf32: inference message passes on the pooled grid (blur > 1, k 7..21, Triton on CUDA) as "
                        "TF32 tensor-core products, messages within ~2e-4 relative (default %(default)s)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N "
                   "(default %(default)s)")
    g.add_argument("--checkpoint", metavar="PATH", help="load a trained ConvCRF (ConvCRF.load) instead of "
                   "building one from the flags above")


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    """The image/label folders (matched by file stem) and the class count of ``eval`` and ``train``."""
    p.add_argument("--images", required=True, metavar="DIR", help="images, matched to labels by file stem")
    p.add_argument("--labels", required=True, metavar="DIR", help="label PNGs (palette or grey, 255 = ignore)")
    p.add_argument("--num-classes", type=int, default=21, help="default %(default)s")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Convolutional CRFs for semantic segmentation (Triton kernels).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,refine,eval,train,bench}", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="refine a noisy segmentation of a built-in scene (or --image/--labels) "
                          "and save a figure", description="Refine a noisy unary (SPEC §6) of a procedurally "
                          "generated scene, or of --image with --labels, print accuracy and mIoU before and "
                          "after, and save a figure (image | noisy unary | CRF | truth).")
    demo.add_argument("--out", default="demo.png", help="figure path (default %(default)s)")
    demo.add_argument("--image", help="a real image instead of the built-in scene (needs --labels)")
    demo.add_argument("--labels", help="its label map (palette or grey PNG, 255 = ignore)")
    demo.add_argument("--num-classes", type=int, default=21, help="default %(default)s (PASCAL VOC)")
    demo.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy unary (default %(default)s)")
    _add_crf_flags(demo)

    refine = sub.add_parser("refine", help="refine segmentations: one image, or folders (resumable, torchrun)",
                            description="Refine network outputs with the image. One image: --image IMG "
                            "--probs P.npy|--labels L.png [--out OUT.png] [--probs-out Q.npy]. Folders: "
                            "--images DIR --probs DIR|--labels DIR --out DIR [--probs-out DIR], matched by "
                            "file stem; finished outputs are skipped (restartable); under torchrun "
                            "--nproc-per-node N the folder is sharded over the ranks.")
    src = refine.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one RGB image")
    src.add_argument("--images", metavar="DIR", help="a folder of images (folder mode)")
    inp = refine.add_mutually_exclusive_group(required=True)
    inp.add_argument("--probs", metavar="P.npy|DIR", help=".npy [C,H,W] or [H,W,C] probabilities (or logits "
                     "with --logits)")
    inp.add_argument("--labels", metavar="L.png|DIR", help="coarse label PNG(s), turned into unaries like "
                     "pydensecrf's unary_from_labels (255 = unsure)")
    refine.add_argument("--logits", action="store_true", help="--probs hold logits, not probabilities")
    refine.add_argument("--layout", choices=("auto", "chw", "hwc"), default="auto",
                        help="layout of --probs (default %(default)s: from the image size)")
    refine.add_argument("--gt-prob", type=float, default=0.7, help="with --labels: confidence in each label "
                        "(default %(default)s)")
    refine.add_argument("--num-classes", type=int, help="classes (default: from --probs; 21 with --labels)")
    refine.add_argument("--out", help="label PNG (default <image>_crf.png), or the output folder")
    refine.add_argument("--probs-out", help="also save refined probabilities (.npy, the layout of --probs)")
    refine.add_argument("--batch-size", type=int, help="images per CRF call in folder mode (default 8 on "
                        "CUDA, 1 on the CPU)")
    refine.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    refine.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_crf_flags(refine)

    ev = sub.add_parser("eval", help="the synthetic benchmark (SPEC §6) over a folder; prints one JSON line",
                        description="Noisy unaries (SPEC §6) from each label map, refined with its image; "
                        "prints {n_images, unary: {acc, miou}, crf: {acc, miou}, seconds} as the last line "
                        "(fractions in [0, 1]; seconds: time spent in CRF inference).")
    _add_dataset_flags(ev)
    ev.add_argument("--noise-seed", type=int, default=0, help="every image gets default_rng(seed) "
                    "(default %(default)s)")
    ev.add_argument("--json", metavar="OUT.json", help="also write the JSON object here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_crf_flags(ev)

    tr = sub.add_parser("train", help="decoupled training of the CRF's parameters on noisy unaries (SPEC §6)",
                        description="Learn w, the compat weights, the bandwidths (and with --convcomp a 1×1 "
                        "compatibility) on synthetic noisy unaries drawn fresh each epoch; the Lovász-softmax (a "
                        "surrogate of 1 - IoU) or the cross-entropy of the CRF output. Reports SPEC §6 "
                        "mIoU/accuracy on noise it never trains on (--noise-seed) "
                        "before and after, and saves a checkpoint for --checkpoint / ConvCRF.load.")
    _add_dataset_flags(tr)
    tr.add_argument("--epochs", type=int, default=10, help="default %(default)s")
    tr.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default %(default)s)")
    tr.add_argument("--loss", choices=LOSSES, default="lovasz", help="lovasz: the Lovász-softmax, a surrogate "
                    "of 1 - IoU; cross_entropy (default %(default)s)")
    tr.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="cosine: the learning rate decays "
                    "to 0 over the run; constant: it stays (default %(default)s)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the training noise and order (default %(default)s)")
    tr.add_argument("--holdout", type=int, default=0, metavar="N", help="keep the last N images (by name) out "
                    "of training and report on them (default %(default)s: report on the training images, "
                    "with held-out noise)")
    tr.add_argument("--noise-seed", type=int, default=0, help="evaluation noise, default_rng(seed) per image "
                    "(default %(default)s)")
    tr.add_argument("--weight", choices=("vector", "scalar"), default="vector", help="per-class or one w "
                    "(default %(default)s)")
    tr.add_argument("--convcomp", action="store_true", help="also learn a 1×1 label compatibility [C, C]")
    tr.add_argument("--out", default="crf.pt", help="checkpoint path (default %(default)s)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_crf_flags(tr)

    sub.add_parser("bench", add_help=False, help="speed vs filter size and resolution (CSV + PNG); "
                   "see convcrf-triton bench --help")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# ---- CRF and device from the flags ------------------------------------------------------------------------

_MESSAGE = re.compile(r"^(\w+)=(.*?) is not allowed: (.*)$")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else e.__class__.__name__


def _flag_error(e: Exception) -> CLIError:
    """``ValueError("filter_size=4 is not allowed: expected …")`` → ``--filter-size 4: expected …``."""
    msg = _first_line(e)
    m = _MESSAGE.match(msg)
    flags = {v: k for k, v in CRF_FLAGS.items()}
    if m and m.group(1) in flags:
        return CLIError(f"{flags[m.group(1)]} {m.group(2)}: {m.group(3)}")
    if m and m.group(1) == "num_classes":
        return CLIError(f"--num-classes {m.group(2)}: {m.group(3)}")
    return CLIError(msg)


def resolve_device(name: str):  # noqa: ANN201 (torch.device; torch is imported lazily)
    import torch

    _, world, local_rank = _dist_env()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise CLIError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


def _dist_env() -> tuple[int, int, int]:
    from .refine import _distributed

    return _distributed()


def make_crf_factory(args: argparse.Namespace):  # noqa: ANN201
    """Validates the CRF flags now (a bad value fails before any work) and returns ``(C, device) → ConvCRF``."""
    from .module import ConvCRF

    kwargs = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in CRF_FLAGS.items()}
    mode = kwargs.pop("mode")
    if args.checkpoint:
        load = getattr(ConvCRF, "load", None)
        if load is None:
            raise CLIError("--checkpoint needs ConvCRF.load, which this version of convcrf_triton lacks")
        if not Path(args.checkpoint).is_file():
            raise CLIError(f"--checkpoint {args.checkpoint}: no such file")
        try:
            loaded = load(args.checkpoint, backend=args.backend)
        except Exception as e:  # a corrupt or foreign file: any error is the file's fault
            why = _first_line(e) if isinstance(e, ValueError) else e.__class__.__name__
            raise CLIError(f"--checkpoint {args.checkpoint}: cannot load it as a ConvCRF checkpoint ({why})") from None

        def from_checkpoint(num_classes: int, device):  # noqa: ANN001, ANN202
            if loaded.num_classes != num_classes:
                raise CLIError(f"--checkpoint {args.checkpoint} is for {loaded.num_classes} classes, the inputs "
                               f"have {num_classes}")
            return loaded.to(device).eval()

        return from_checkpoint
    try:
        ConvCRF(2, mode=mode, **kwargs)
    except (ValueError, TypeError) as e:
        raise _flag_error(e) from None

    def factory(num_classes: int, device):  # noqa: ANN001, ANN202
        try:
            return ConvCRF(num_classes, mode=mode, **kwargs).to(device).eval()
        except (ValueError, TypeError) as e:
            raise _flag_error(e) from None

    return factory


def _backend_name(backend: str, device) -> str:  # noqa: ANN001
    try:
        from . import functional, reference

        return "PyTorch" if functional.resolve_backend(backend, device) is reference else "Triton"
    except (ValueError, AttributeError, ImportError) as e:
        raise _flag_error(e) from None


def _run_crf(crf, unary: np.ndarray, image: np.ndarray, device, warmup: bool = False):  # noqa: ANN001, ANN202
    """``unary [C, H, W]``, ``image [3, H, W]`` → ``(refined logits [C, H, W] numpy, seconds)``."""
    import torch

    u = torch.from_numpy(np.ascontiguousarray(unary, dtype=np.float32))[None].to(device)
    im = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    with torch.no_grad():
        if warmup and device.type == "cuda":  # compile and autotune the kernels outside the timing
            crf(u, im)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = crf(u, im)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return out[0].float().cpu().numpy(), seconds


def _synthetic(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    from .data import synthetic_unary

    return synthetic_unary(labels, num_classes, seed=seed)


def _check_int(value: int, flag: str, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in {low}..{high}"
        raise CLIError(f"{flag} {value}: expected an integer {rng}")


# ---- demo ---------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import ConfusionMatrix
    from .scene import make_scene

    _check_int(args.num_classes, "--num-classes", 2, 256)
    if (args.image is None) != (args.labels is None):
        raise CLIError("--image and --labels go together (or give neither for the built-in scene)")
    out = Path(args.out)
    check_output_path(out, "--out")
    make_crf = make_crf_factory(args)
    device = resolve_device(args.device)
    if args.image is not None:
        image = load_image(args.image)
        labels = load_labels(args.labels, args.num_classes, image.shape[1:])
        name = Path(args.image).name
    else:
        rgb, labels = make_scene()
        image = rgb.transpose(2, 0, 1).astype(np.float32)
        name = "the built-in procedural scene"
    H, W = labels.shape
    C = args.num_classes
    unary = _synthetic(labels, C, args.noise_seed)
    crf = make_crf(C, device)
    backend = _backend_name(args.backend, device)
    refined, seconds = _run_crf(crf, unary, image, device, warmup=True)
    before, after = ConfusionMatrix(C), ConfusionMatrix(C)
    noisy, crf_labels = unary.argmax(0), refined.argmax(0)
    before.add(labels, noisy)
    after.add(labels, crf_labels)
    cfg = crf.config
    print(f"{name}: {H}×{W}, {C} classes; noisy unary: SPEC §6 synthetic protocol, seed {args.noise_seed}")
    print(f"CRF: {cfg.mode} mean-field, filter_size {cfg.filter_size}, blur {cfg.blur}, {cfg.num_iter} iterations, "
          f"{backend} on {device}")
    print(f"before (noisy unary): accuracy {100 * before.accuracy():5.1f}%   mIoU {100 * before.miou():5.1f}%")
    print(f"after  (ConvCRF):     accuracy {100 * after.accuracy():5.1f}%   mIoU {100 * after.miou():5.1f}%   "
          f"({seconds:.2f} s)")
    fig = make_figure(image, [noisy, crf_labels, labels], [
        "image", f"noisy unary: mIoU {100 * before.miou():.1f}%, acc {100 * before.accuracy():.1f}%",
        f"ConvCRF: mIoU {100 * after.miou():.1f}%, acc {100 * after.accuracy():.1f}%", "ground truth"],
        legend_maps=[labels, crf_labels], note="of the truth and the CRF output; the noisy unary's speckles are "
        "random classes")
    save_image(out, fig)
    print(f"figure: {out}")
    return 0


def _font(size: int):  # noqa: ANN202
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def make_figure(image: np.ndarray, label_maps: Sequence[np.ndarray], titles: Sequence[str],
                legend_maps: Sequence[np.ndarray] | None = None, note: str = ""):  # noqa: ANN201
    """One row of panels (the image, then label maps in the PASCAL palette) with titles, and a legend of
    the classes present in ``legend_maps`` (default: all label maps) followed by ``note``.
    ``image [3, H, W]`` in [0, 255]; returns a PIL image."""
    from PIL import Image, ImageDraw

    from .data import pascal_palette
    from .scene import class_name

    palette = pascal_palette()
    H, W = image.shape[1:]
    panels = [np.clip(image.transpose(1, 2, 0), 0, 255).astype(np.uint8)]
    panels += [palette[np.asarray(m, dtype=np.int64) % 256] for m in label_maps]
    gap, pad, title_h = 8, 10, 24
    font, small = _font(15), _font(13)
    classes = sorted(set().union(*(np.unique(m).tolist() for m in (legend_maps or label_maps))))
    swatch, col_w = 14, 150
    cols = max(1, (len(panels) * (W + gap) - gap) // col_w)
    rows = -(-len(classes) // cols)
    width = 2 * pad + len(panels) * (W + gap) - gap
    height = pad + title_h + H + pad + 20 + rows * 20 + pad
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = pad + i * (W + gap)
        fig.paste(Image.fromarray(panel), (x, pad + title_h))
        draw.text((x + W / 2, pad + title_h / 2), title, fill="black", font=font, anchor="mm")
    y0 = pad + title_h + H + pad
    draw.text((pad, y0), "classes" + (f" ({note})" if note else "") + ":", fill="black", font=small)
    for j, c in enumerate(classes):
        x, y = pad + (j % cols) * col_w, y0 + 20 + (j // cols) * 20
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(v) for v in palette[c % 256]),
                       outline="black")
        label = class_name(c) + (" (ignored)" if c == 255 else "")
        draw.text((x + swatch + 6, y + 1), label, fill="black", font=small)
    return fig


# ---- eval -------------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import ConfusionMatrix

    _check_int(args.num_classes, "--num-classes", 2)
    if args.json:
        check_output_path(Path(args.json), "--json")
    make_crf = make_crf_factory(args)
    device = resolve_device(args.device)
    pairs = match_pairs(args.images, args.labels, (".png",), "labels")
    C = args.num_classes
    crf = make_crf(C, device)
    cm_unary, cm_crf = ConfusionMatrix(C), ConfusionMatrix(C)
    seconds = 0.0
    for i, (_, image_path, label_path) in enumerate(tqdm(pairs, unit="img", leave=False, dynamic_ncols=True,
                                                         disable=True if args.quiet else None)):
        image = load_image(image_path)
        labels = load_labels(label_path, C, image.shape[1:])
        unary = _synthetic(labels, C, args.noise_seed)
        refined, dt = _run_crf(crf, unary, image, device, warmup=i == 0)
        seconds += dt
        cm_unary.add(labels, unary.argmax(0))
        cm_crf.add(labels, refined.argmax(0))
    result = {
        "n_images": len(pairs),
        "unary": {"acc": round(cm_unary.accuracy(), 6), "miou": round(cm_unary.miou(), 6)},
        "crf": {"acc": round(cm_crf.accuracy(), 6), "miou": round(cm_crf.miou(), 6)},
        "seconds": round(seconds, 4),
    }
    line = json.dumps(result)
    if args.json:
        save_text(Path(args.json), line + "\n")
    print(line)
    return 0


# ---- train ------------------------------------------------------------------------------------------------


def _print_warning(message: Warning | str, *_: object) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .module import ConvCRF
    from .train import evaluate, load_samples, train

    _check_int(args.num_classes, "--num-classes", 2, 256)
    _check_int(args.epochs, "--epochs", 1)
    _check_int(args.holdout, "--holdout", 0)
    if not args.lr > 0:
        raise CLIError(f"--lr {args.lr}: expected a number > 0")
    out = Path(args.out)
    check_output_path(out, "--out")
    make_crf_factory(args)  # validates the CRF flags (and --checkpoint) before any work
    device = resolve_device(args.device)
    try:
        samples = load_samples(args.images, args.labels)
    except ValueError as e:
        raise CLIError(_first_line(e)) from None
    C = args.num_classes
    for sample in samples:
        if int(sample.labels[sample.labels != 255].max(initial=0)) >= C:
            raise CLIError(f"{sample.name}: labels go beyond --num-classes {C}")
        if sample.image.shape[1:] != sample.labels.shape:
            raise CLIError(f"{sample.name}: image {sample.image.shape[1:]} and labels {sample.labels.shape} differ")
    if args.holdout >= len(samples):
        raise CLIError(f"--holdout {args.holdout}: needs fewer than the {len(samples)} image pairs found")
    fit = samples[: len(samples) - args.holdout]
    report = samples[len(samples) - args.holdout:] or fit
    if args.checkpoint:
        init = ConvCRF.load(args.checkpoint)
        crf = ConvCRF(**{**init.config.to_dict(), "trainable": True, "backend": args.backend})
        crf.load_state_dict(init.state_dict())
    else:
        kwargs = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in CRF_FLAGS.items()}
        crf = ConvCRF(C, weight=args.weight, convcomp=args.convcomp, trainable=True, **kwargs)
    crf = crf.to(device)
    which = f"{len(report)} held-out images" if args.holdout else "the training images"
    before = evaluate(crf, report, args.noise_seed)
    print(f"before: mIoU {100 * before['miou']:.2f}  acc {100 * before['acc']:.2f}  ({which}, noise seed "
          f"{args.noise_seed}, never trained on)")
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.showwarning = _print_warning
        train(crf, fit, epochs=args.epochs, lr=args.lr, seed=args.seed, schedule=args.schedule, loss=args.loss,
              progress=not args.quiet)
    after = evaluate(crf, report, args.noise_seed)
    print(f"after:  mIoU {100 * after['miou']:.2f}  acc {100 * after['acc']:.2f}")
    tmp = out.with_name(f".{out.name}.tmp")
    crf.save(tmp)
    tmp.replace(out)
    print(f"saved {out}")
    return 0


# ---- refine, bench ----------------------------------------------------------------------------------------


def cmd_refine(args: argparse.Namespace) -> int:
    if args.num_classes is not None:
        _check_int(args.num_classes, "--num-classes", 2, 256)
    if args.batch_size is not None:
        _check_int(args.batch_size, "--batch-size", 1)
    if not 0 < args.gt_prob < 1:
        raise CLIError(f"--gt-prob {args.gt_prob}: expected a probability in (0, 1)")
    if args.labels is not None and (args.logits or args.layout != "auto"):
        raise CLIError("--logits and --layout describe --probs; they do not apply to --labels")
    make_crf = make_crf_factory(args)
    if args.images is not None:
        return refine_folder(args, make_crf, resolve_device(args.device), progress=not args.quiet)
    rank, world, _ = _dist_env()
    if world > 1 and rank > 0:  # one image: rank 0 does it
        return 0
    return refine_one(args, make_crf, resolve_device(args.device))


def cmd_bench(argv: list[str]) -> int:
    try:
        from . import benchmark
    except ModuleNotFoundError as e:
        if e.name in ("convcrf_triton.benchmark", f"{__package__}.benchmark"):
            raise CLIError("bench: this installation has no convcrf_triton.benchmark module") from None
        raise CLIError(f"bench needs the package {e.name!r}: pip install 'convcrf-triton[bench]'") from None
    try:
        return int(benchmark.main(argv) or 0)
    except SystemExit as e:  # its argparse: --help, or a usage error it has already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


# ---- entry point ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 1 internal error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "bench":
            return cmd_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return int(e.code or 0)
        handler = {"demo": cmd_demo, "refine": cmd_refine, "eval": cmd_eval, "train": cmd_train}[args.command]
        return handler(args)
    except CLIError as e:
        where = f"{PROG} {command}" if command in ("demo", "refine", "eval", "train", "bench") else PROG
        print(f"{where}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("CONVCRF_TRITON_DEBUG"):
            raise
        msg = _first_line(e)
        if isinstance(e, RuntimeError) and "out of memory" in msg:
            msg += " (try a smaller --batch-size or --filter-size, or a larger --blur)"
        print(f"{PROG} {command}: error: {e.__class__.__name__}: {msg}", file=sys.stderr)
        return 2
