"""``convcrf-triton refine``: one image or whole folders, resumable, sharded over ``torchrun`` ranks.

Also the command line's shared plumbing: :class:`CLIError` (a one-line user error, exit code 2), input
readers that turn every bad file into such an error, and atomic writers (a temporary name in the target
folder, then ``os.replace``), so an interrupted or failed run never leaves a partial output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import IGNORE, read_image, read_labels, write_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
PROB_CLIP = 1e-5  # probabilities are clipped here before the log (as pydensecrf's unary_from_softmax)


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# ---- atomic outputs ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (same suffix, hidden name); renamed to ``path`` on success,
    removed on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_labels(path: Path, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        write_labels(tmp, labels)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_image(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def check_output_path(path: Path, what: str) -> None:
    """Fail early (before any work) when ``path`` cannot be written: a folder, or a missing parent."""
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise CLIError(f"{what} {path}: folder {path.parent} does not exist")


# ---- inputs -----------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """``[3, H, W]`` float32 RGB in [0, 255], or a :class:`CLIError`."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"image {path}: no such file")
    try:
        return read_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CLIError(f"image {path}: cannot read it as an image ({e.__class__.__name__})") from None


def load_labels(path: str | Path, num_classes: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A label map ``[H, W]`` int64 (palette or grey PNG, 255 = ignore) with classes ``< num_classes``."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"labels {path}: no such file")
    try:
        labels = read_labels(path)
    except ValueError as e:
        raise CLIError(f"labels {path}: {str(e).removeprefix(f'{path}: ')}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"labels {path}: cannot read it as an image ({e.__class__.__name__})") from None
    if shape is not None and labels.shape != shape:
        raise CLIError(f"labels {path} are {labels.shape[0]}×{labels.shape[1]} but the image is {shape[0]}×{shape[1]}")
    valid = labels[labels != IGNORE]
    if valid.size and (valid.min() < 0 or valid.max() >= num_classes):
        bad = int(valid.max() if valid.max() >= num_classes else valid.min())
        raise CLIError(f"labels {path} contain class {bad}, but --num-classes is {num_classes} "
                       f"(classes 0..{num_classes - 1}, 255 = ignore)")
    return labels


def load_probs(path: str | Path, shape: tuple[int, int], layout: str, logits: bool,
               num_classes: int | None) -> tuple[np.ndarray, str]:
    """A ``.npy`` of probabilities (or ``logits``) in ``[C, H, W]`` or ``[H, W, C]`` → ``(unary logits
    [C, H, W] float32, the layout found)``. Probabilities become ``log(max(p, 1e-5))``."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"probs {path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise CLIError(f"probs {path}: not a readable .npy array (numpy.save of a numeric array)") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise CLIError(f"probs {path}: expected a 3-D array [C, H, W] or [H, W, C], got shape {np.shape(arr)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CLIError(f"probs {path}: expected a numeric array, got dtype {arr.dtype}")
    H, W = shape
    chw, hwc = arr.shape[1:] == (H, W), arr.shape[:2] == (H, W)
    if layout == "chw" and not chw or layout == "hwc" and not hwc or layout == "auto" and not (chw or hwc):
        want = {"chw": "[C, H, W]", "hwc": "[H, W, C]"}.get(layout, "[C, H, W] or [H, W, C]")
        raise CLIError(f"probs {path} have shape {arr.shape} but the image is {H}×{W} (expected {want})")
    if layout == "auto":
        layout = "chw" if chw else "hwc"  # both only when C == H == W: [C, H, W] wins (say --layout)
    arr = np.asarray(arr if layout == "chw" else arr.transpose(2, 0, 1), dtype=np.float64)
    C = arr.shape[0]
    if num_classes is not None and C != num_classes:
        raise CLIError(f"probs {path} have {C} classes but --num-classes is {num_classes}")
    if not np.all(np.isfinite(arr)):
        raise CLIError(f"probs {path} contain NaN or Inf")
    if not logits:
        if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise CLIError(f"probs {path} hold values in [{arr.min():.3g}, {arr.max():.3g}], not probabilities "
                           "in [0, 1]: pass --logits if they are logits")
        arr = np.log(np.clip(arr, PROB_CLIP, 1.0))
    return np.ascontiguousarray(arr, dtype=np.float32), layout


def labels_to_logits(labels: np.ndarray, num_classes: int, gt_prob: float) -> np.ndarray:
    """A coarse label map → unary logits ``[C, H, W]`` float32, as pydensecrf's ``unary_from_labels``: each
    label is trusted with probability ``gt_prob``, the rest spread evenly; 255 (unsure) is uniform."""
    C = num_classes
    logits = np.full((C, *labels.shape), np.log((1 - gt_prob) / (C - 1)), dtype=np.float32)
    known = labels != IGNORE
    ys, xs = np.nonzero(known)
    logits[labels[known], ys, xs] = np.log(gt_prob)
    logits[:, ~known] = 0.0
    return logits


def index_folder(folder: str | Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` with one of ``suffixes`` (case-insensitive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CLIError(f"{what} folder {folder}: no such folder" if not folder.exists()
                       else f"{what} {folder} is a file, but this mode takes a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and path.is_file() and not path.name.startswith("."):
            if path.stem in found:
                raise CLIError(f"{what} folder {folder}: two files for {path.stem!r} ({found[path.stem].name}, "
                               f"{path.name})")
            found[path.stem] = path
    if not found:
        raise CLIError(f"{what} folder {folder} has no {'/'.join(suffixes)} files")
    return found


def match_pairs(images_dir: str | Path, inputs_dir: str | Path, suffixes: tuple[str, ...], what: str
                ) -> list[tuple[str, Path, Path]]:
    """``(stem, image, input)`` for every input file, matched to an image by stem (extra images are fine)."""
    inputs = index_folder(inputs_dir, suffixes, what)
    images = index_folder(images_dir, IMAGE_SUFFIXES, "images")
    missing = [stem for stem in inputs if stem not in images]
    if missing:
        raise CLIError(f"no image in {images_dir} for {len(missing)} of the {len(inputs)} {what} files "
                       f"(e.g. {inputs[missing[0]].name}); images are matched by file name stem")
    return [(stem, images[stem], path) for stem, path in inputs.items()]


# ---- refinement -------------------------------------------------------------------------------------------


@dataclass
class Item:
    stem: str
    image: np.ndarray  # [3, H, W]
    unary: np.ndarray  # [C, H, W]
    layout: str  # of --probs-out
    out: Path
    probs_out: Path | None


def _load_item(args: argparse.Namespace, stem: str, image_path: Path, input_path: Path, out: Path,
               probs_out: Path | None) -> Item:
    image = load_image(image_path)
    shape = image.shape[1:]
    if args.probs is not None:
        unary, layout = load_probs(input_path, shape, args.layout, args.logits, args.num_classes)
    else:
        C = args.num_classes or 21
        unary, layout = labels_to_logits(load_labels(input_path, C, shape), C, args.gt_prob), "chw"
    return Item(stem, image, unary, layout, out, probs_out)


CrfFactory = Callable[[int, torch.device], torch.nn.Module]


def _refine_batch(items: list[Item], crf: torch.nn.Module, device: torch.device) -> None:
    """Run the CRF on items of one size and write their outputs (each one atomically)."""
    unary = torch.from_numpy(np.stack([it.unary for it in items])).to(device)
    image = torch.from_numpy(np.stack([it.image for it in items])).to(device)
    with torch.no_grad():
        logits = crf(unary, image)
    labels = logits.argmax(1).to(torch.uint8).cpu().numpy()
    probs = torch.softmax(logits.float(), 1).cpu().numpy() if any(it.probs_out for it in items) else None
    for i, it in enumerate(items):
        if it.probs_out is not None:
            q = probs[i] if it.layout == "chw" else probs[i].transpose(1, 2, 0)
            save_npy(it.probs_out, np.ascontiguousarray(q, dtype=np.float32))
        save_labels(it.out, labels[i])  # last: its presence marks the item as done


def _check_classes(crf_classes: int | None, item: Item, path: Path) -> None:
    if crf_classes is not None and item.unary.shape[0] != crf_classes:
        raise CLIError(f"{path} has {item.unary.shape[0]} classes, but earlier inputs have {crf_classes}")
    if item.unary.shape[0] > 256:
        raise CLIError(f"{path} has {item.unary.shape[0]} classes; PNG label maps hold at most 256")


def refine_one(args: argparse.Namespace, make_crf: CrfFactory, device: torch.device) -> int:
    """``refine --image IMG --probs P.npy|--labels L.png [--out OUT.png] [--probs-out Q.npy]``."""
    source = Path(args.probs if args.probs is not None else args.labels)
    for flag, path in (("--image", Path(args.image)), ("--probs" if args.probs else "--labels", source)):
        if path.is_dir():
            raise CLIError(f"{flag} {path} is a folder: use --images DIR with --probs/--labels DIR for folders")
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_crf.png")
    probs_out = Path(args.probs_out) if args.probs_out else None
    check_output_path(out, "--out")
    if probs_out is not None:
        check_output_path(probs_out, "--probs-out")
    item = _load_item(args, Path(args.image).stem, Path(args.image), source, out, probs_out)
    _check_classes(None, item, source)
    t0 = time.perf_counter()
    _refine_batch([item], make_crf(item.unary.shape[0], device), device)
    written = f"{out}" + (f" and {probs_out}" if probs_out else "")
    print(f"refined {args.image} ({item.unary.shape[0]} classes) in {time.perf_counter() - t0:.2f} s → {written}")
    return 0


def _distributed() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def refine_folder(args: argparse.Namespace, make_crf: CrfFactory, device: torch.device, progress: bool) -> int:
    """``refine --images DIR --probs DIR|--labels DIR --out DIR [--probs-out DIR]``: outputs ``<stem>.png``
    (and ``<stem>.npy``); finished outputs are skipped, so an interrupted run resumes. Under ``torchrun``
    every rank takes every ``WORLD_SIZE``-th input and rank 0 prints the one summary line."""
    rank, world, _ = _distributed()
    using_probs = args.probs is not None
    source = args.probs if using_probs else args.labels
    if not args.out:
        raise CLIError("folder mode (--images DIR) needs --out DIR")
    out_dir = Path(args.out)
    probs_dir = Path(args.probs_out) if args.probs_out else None
    for flag, d in (("--out", out_dir), ("--probs-out", probs_dir)):
        if d is not None and d.exists() and not d.is_dir():
            raise CLIError(f"{flag} {d} is a file; folder mode writes into a folder")
    pairs = match_pairs(args.images, source, (".npy",) if using_probs else (".png",),
                        "probs" if using_probs else "labels")

    dist = None
    if world > 1:  # after validation: a bad command fails the same way on every rank, without a hang
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
        dist.barrier()
    t0 = time.perf_counter()
    done = skipped = 0
    error: BaseException | None = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if probs_dir is not None:
            probs_dir.mkdir(parents=True, exist_ok=True)
        todo = []
        for stem, image_path, input_path in pairs[rank::world]:
            out = out_dir / f"{stem}.png"
            probs_out = probs_dir / f"{stem}.npy" if probs_dir is not None else None
            if not args.overwrite and out.exists() and (probs_out is None or probs_out.exists()):
                skipped += 1
            else:
                todo.append((stem, image_path, input_path, out, probs_out))
        done = _refine_items(args, todo, make_crf, device, progress and rank == 0)
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as e:
        error = e
    if dist is not None:
        counts = torch.tensor([done, skipped, int(error is not None)], dtype=torch.float64)
        dist.all_reduce(counts)
        done, skipped, failed = (int(v) for v in counts.tolist())
        dist.destroy_process_group()
    else:
        failed = int(error is not None)
    if error is not None:
        if world > 1 and isinstance(error, CLIError):
            raise CLIError(f"[rank {rank}] {error}") from None
        raise error
    if failed:
        return 2  # another rank failed and said why
    if rank == 0:
        seconds = time.perf_counter() - t0
        procs = f" on {world} processes" if world > 1 else ""
        print(f"refined {done} images, skipped {skipped} already done, in {seconds:.2f} s "
              f"({done / max(seconds, 1e-9):.2f} images/s){procs} → {out_dir}")
    return 0


def _refine_items(args: argparse.Namespace, todo: list[tuple[str, Path, Path, Path, Path | None]],
                  make_crf: CrfFactory, device: torch.device, progress: bool) -> int:
    """Refine ``todo`` in batches of equal-size images (up to ``--batch-size``); returns the count done."""
    from tqdm import tqdm

    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    crf, classes, batch, done = None, None, [], 0
    # disable=None: a bar on terminals only
    with tqdm(total=len(todo), unit="img", disable=None if progress else True, dynamic_ncols=True, leave=False) as bar:
        def flush() -> None:
            nonlocal done
            if batch:
                _refine_batch(batch, crf, device)
                done += len(batch)
                bar.update(len(batch))
                batch.clear()

        for stem, image_path, input_path, out, probs_out in todo:
            try:
                item = _load_item(args, stem, image_path, input_path, out, probs_out)
                _check_classes(classes, item, input_path)
            except BaseException:
                flush()  # the inputs read so far are fine: finish them, so a restart skips them
                raise
            if crf is None:
                classes = item.unary.shape[0]
                crf = make_crf(classes, device)
            if batch and batch[0].image.shape != item.image.shape:
                flush()
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
    return done
