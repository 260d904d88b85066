"""CPU path (the reference backend) against the original ConvCRF unfold formulation, side by side.

SPEC §7: at k=11, 500×375, C=21, 5 iterations, 2 threads, the reference path must be ≥ 10× faster than
the unfold formulation at blur 1 and ≥ 5× at blur 4. Both run in this process on the same inputs
(original-compatible mode, whose outputs must agree); median and p20/p80 of ``--repeat`` warm runs.
The full sweep (all sizes, memory, plots) is ``bench/run_all.py``; this is the quick side-by-side check.

    python bench/cpu_vs_unfold.py [--filter-sizes 7,11] [--blurs 1,4] [--repeat 5] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import bootstrap  # noqa: E402

bootstrap()
from convcrf_triton import ConvCRF  # noqa: E402
from convcrf_triton.baselines import DEFAULT_CONF, unfold_crf  # noqa: E402  (the independent unfold formulation)


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter-sizes", default="11")
    p.add_argument("--blurs", default="1,4")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", type=Path, help="a real RGB image (e.g. voc7) instead of uniform noise; needs --labels")
    p.add_argument("--labels", type=Path, help="its label map: the unary is SPEC §6's noisy unary of it (seed 0)")
    p.add_argument("--csv", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    C, H, W = args.classes, args.height, args.width
    unary = torch.randn(1, C, H, W, generator=g)
    image = torch.rand(1, 3, H, W, generator=g) * 255
    if args.image is not None:  # natural images drive softmax outputs into float32 denormals
        from convcrf_triton.data import read_image, read_labels, synthetic_unary

        image = torch.from_numpy(read_image(args.image))[None]
        unary = torch.from_numpy(synthetic_unary(read_labels(args.labels), C, seed=0)).float()[None]
        H, W = image.shape[-2:]
    rows = []
    for k in map(int, args.filter_sizes.split(",")):
        for blur in map(int, args.blurs.split(",")):
            conf = {**DEFAULT_CONF, "filter_size": k, "blur": blur}
            crf = ConvCRF.from_convcrf_conf(conf, C, backend="torch")
            with torch.no_grad():
                ours = crf(unary, image)
                theirs = unfold_crf(unary, image, conf, C, num_iter=5)
                err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
                t_ours = timed(lambda crf=crf: crf(unary, image), args.repeat)
                t_unfold = timed(lambda conf=conf: unfold_crf(unary, image, conf, C, num_iter=5), args.repeat)
            for name, ts in (("reference", t_ours), ("unfold", t_unfold)):
                q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
                rows.append(dict(implementation=name, k=k, blur=blur, H=H, W=W, C=C, threads=args.threads,
                                 median_ms=1e3 * statistics.median(ts), p20_ms=1e3 * q[0], p80_ms=1e3 * q[3]))
            speedup = statistics.median(t_unfold) / statistics.median(t_ours)
            print(f"k={k:2d} blur={blur}: reference {1e3 * statistics.median(t_ours):8.1f} ms   "
                  f"unfold {1e3 * statistics.median(t_unfold):8.1f} ms   speed-up {speedup:5.1f}x   "
                  f"max rel diff {err:.1e}", flush=True)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
