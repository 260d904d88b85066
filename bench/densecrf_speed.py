"""Migrating from pydensecrf: the drop-in (``convcrf_triton.densecrf.DenseCRF2D``) against pydensecrf, the same calls.

    python bench/densecrf_speed.py [--device cpu|cuda] [--sizes 375x500,512x512,1024x2048] [--threads 1]
                                   [--repeat 5] [--backend auto] [--out DIR]

Each size runs pydensecrf's README snippet on a procedural scene (``convcrf_triton.scene``: shapes, texture,
noise) with a noisy unary of 21 labels: ``setUnaryEnergy(-log p)``, ``addPairwiseGaussian(sxy=3, compat=3)``,
``addPairwiseBilateral(sxy=80, srgb=13, rgbim, compat=10)``, ``inference(5)``, numpy in and out, timed as a
whole (the drop-in's window from ``sxy``: filter size 31 at blur 8, ``norm="sym"``). The drop-in runs on
``--device`` (on a GPU: its first call, which compiles and tunes the kernels, off the clock); pydensecrf on this
machine's CPU, one thread whatever the setting, when installed. Median and range of ``--repeat`` calls after one
warm-up, the label agreement of the two, and the speed-up; and the drop-in's ``inference(5)`` alone, called again
on one object built off the clock (numpy out included): the rest of the snippet's time is its set-up. Writes
``densecrf_speed.csv`` and ``.md`` into ``--out`` (default ``bench/results/<device-slug>/``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["implementation", "device", "H", "W", "labels", "iters", "median_ms", "min_ms", "max_ms", "agreement",
           "speedup", "torch", "commit", "date"]
LABELS = 21
ITERS = 5


def problem(H: int, W: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A procedural scene ``[H, W, 3]`` uint8 and its noisy unary ``[LABELS, H·W]`` float32 (``-log p``: the true
    label's probability raised where a coin of 0.7 says so, the rest Dirichlet noise)."""
    from convcrf_triton.densecrf import unary_from_softmax
    from convcrf_triton.scene import make_scene

    image, labels = make_scene(H, W, seed=seed)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(LABELS), H * W).T
    trusted = rng.random(H * W) < 0.7
    probs[labels.reshape(-1) % LABELS, np.arange(H * W)] += np.where(trusted, 1.0, 0.0)
    # (C-contiguous, as pydensecrf requires: its transpose, copied inside the timed calls, had cost both sides
    # 10-19 ms at 375×500 on this project's CPU)
    return image, np.ascontiguousarray(unary_from_softmax(probs / probs.sum(0)))


def prepared(module: Any, image: np.ndarray, U: np.ndarray, **options: Any) -> Any:
    """pydensecrf's README snippet with ``module`` (pydensecrf.densecrf or the drop-in) up to its inference."""
    H, W, _ = image.shape
    d = module.DenseCRF2D(W, H, LABELS, **options)
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    return d


def infer(module: Any, image: np.ndarray, U: np.ndarray, **options: Any) -> np.ndarray:
    """The whole snippet: ``Q [LABELS, H·W]``."""
    return np.asarray(prepared(module, image, U, **options).inference(ITERS))


def timed(fn: Callable[[], np.ndarray], repeat: int) -> tuple[list[float], np.ndarray]:
    """``repeat`` wall times (ms) after one warm-up call, and the last output."""
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t))
    return times, out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from convcrf_triton import densecrf as dropin
    from convcrf_triton.baselines import densecrf_available
    from convcrf_triton.benchmark import device_description, git_commit

    device, _ = device_description(args.device, torch.get_num_threads())
    common = {"labels": LABELS, "iters": ITERS, "torch": torch.__version__, "commit": git_commit(),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if not densecrf_available():
        print("pydensecrf is not installed (pip install pydensecrf2): only the drop-in is timed", flush=True)
    rows: list[dict[str, Any]] = []
    for H, W in args.sizes:
        image, U = problem(H, W)
        first = len(rows)  # (this size's rows, printed below)
        times, Q = timed(lambda image=image, U=U: infer(dropin, image, U, device=args.device,
                                                         backend=args.backend), args.repeat)
        ours = {"implementation": "DenseCRF2D (drop-in)", "device": device, "H": H, "W": W, **common,
                **summary(times)}
        rows.append(ours)
        # The same object's inference(5) alone (numpy out included): what the snippet's set-up costs on top.
        built = prepared(dropin, image, U, device=args.device, backend=args.backend)
        times, _ = timed(lambda built=built: np.asarray(built.inference(ITERS)), args.repeat)
        rows.append({"implementation": "DenseCRF2D inference()", "device": device, "H": H, "W": W, **common,
                     **summary(times)})
        if densecrf_available():
            import pydensecrf.densecrf as pydensecrf

            times, Q_ref = timed(lambda image=image, U=U: infer(pydensecrf, image, U), args.repeat)
            ref = {"implementation": "pydensecrf", "device": device_description("cpu", 1)[0], "H": H, "W": W,
                   **common, **summary(times)}
            ours["agreement"] = round(float((Q.argmax(0) == Q_ref.argmax(0)).mean()), 4)
            ours["speedup"] = round(ref["median_ms"] / ours["median_ms"], 2)
            rows.append(ref)
        for r in rows[first:]:
            print(f"{H}x{W} {r['implementation']:22s} {r['device']:40s} median {r['median_ms']:9.1f} ms "
                  f"[{r['min_ms']:.1f}-{r['max_ms']:.1f}]", flush=True)
    return rows


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "agreement": float("nan"), "speedup": float("nan")}


def write(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "densecrf_speed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    r0 = rows[0]
    lines = [f"# The pydensecrf drop-in against pydensecrf ({LABELS} labels, {ITERS} iterations)", "",
             f"`python bench/densecrf_speed.py`: pydensecrf's README snippet on a procedural scene, numpy in and out; "
             f"torch {r0['torch']}, commit {r0['commit']}, {r0['date']}. Median [min-max] ms; label agreement "
             "with pydensecrf; speed-up over it.", "",
             "| H×W | implementation | device | time [ms] | agreement | × pydensecrf |", "|---|---|---|---|---|---|"]
    for r in rows:
        agree = "–" if r["agreement"] != r["agreement"] else f"{100 * r['agreement']:.1f}%"
        speed = "–" if r["speedup"] != r["speedup"] else f"{r['speedup']:.2f}×"
        lines.append(f"| {r['H']}×{r['W']} | {r['implementation']} | {r['device']} | {r['median_ms']:.1f} "
                     f"[{r['min_ms']:.1f}–{r['max_ms']:.1f}] | {agree} | {speed} |")
    (out / "densecrf_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'densecrf_speed.csv'}\nwrote {out / 'densecrf_speed.md'}", flush=True)


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]  # type: ignore[misc]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=_sizes, default=_sizes("375x500,512x512,1024x2048"))
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="the drop-in's")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pydensecrf runs on one)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/<device-slug>")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from convcrf_triton.benchmark import device_description

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    rows = run(args)
    write(rows, args.out or ROOT / "bench" / "results" / device_description(args.device, args.threads)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
