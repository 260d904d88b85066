"""Training's kernels timed: the message passes and the weight gradient of their backward.

    python bench/backward.py [--sizes 512x512,256x512] [--filter-sizes 3,7,11] [--classes 21] [--out F.csv]

Learning the kernel's parameters (``θ``, the compat weights) runs, per iteration, a message pass forward and,
backward, the same pass of the output gradient (``dL/dQ``) and the weight-gradient kernel (``dL/dfeatures``,
``dL/dcompats``: ``message_passing._weight_grad_kernel``). The pass is the two-pass one reading ``K``
(``kernels.learned_message_pass``, ``K`` built once per forward) unless ``prefer_fused`` picks the fused one
(``kernels.fused_message_pass``, the weights recomputed). Per size and filter size this times the two passes
and the weight gradient alone, on the same inputs (C classes, features ``(2, 3)``: one Gaussian over position
and colour, one over position), and prints the weight gradient against the fused pass: it does two
multiply-adds a class and tap where the pass does one, plus its Gaussians' gradients once a tap, so ~2-3 is
its par. With CUDA: ``triton.testing.do_bench`` medians (the autotuned passes). Without: the interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, wall-clock medians that only show the script runs.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from run_all import bootstrap

DIMS = (2, 3)


def median_us(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median time of ``fn`` in µs: ``do_bench`` on CUDA, ``reps`` wall-clock runs otherwise."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, return_mode="median") * 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x512,256x512", help="HxW grids, comma-separated")
    parser.add_argument("--filter-sizes", default="3,7,11")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--reps", type=int, default=3, help="runs per row without CUDA")
    parser.add_argument("--out", type=Path, default=Path("bench-results/backward.csv"))
    args = parser.parse_args()
    bootstrap()
    from convcrf_triton.kernels import message_passing

    from convcrf_triton import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        feats = torch.randn(1, sum(DIMS), h, w, device=device, generator=g)
        compats = torch.tensor([3.0, 1.0], device=device)
        Q = torch.softmax(torch.randn(1, args.classes, h, w, device=device, generator=g), 1)
        G = torch.randn(1, args.classes, h, w, device=device, generator=g)
        for k in (int(v) for v in args.filter_sizes.split(",")):
            with torch.no_grad():
                K = kernels.gaussian_weights(feats, DIMS, compats, k, False)
                two_pass = median_us(partial(kernels.message_pass, K, Q), device, args.reps)
                del K
                forward = median_us(partial(kernels.fused_message_pass, feats, DIMS, compats, Q, k, False),
                                    device, args.reps)
                grad = median_us(partial(message_passing._weight_grad, Q, G, feats, compats, DIMS, k, False),
                                 device, args.reps)
            rows.append({"device": name, "size": size, "filter_size": k, "classes": args.classes,
                         "two_pass_us": round(two_pass, 2), "fused_pass_us": round(forward, 2),
                         "weight_grad_us": round(grad, 2),
                         "ratio": round(grad / forward, 2)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"message passes and weight gradient, µs ({name}, torch {torch.__version__}); CSV: {args.out}")
    print("| size | k | C | two-pass | fused pass | weight gradient | ÷ fused |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['filter_size']} | {r['classes']} | {r['two_pass_us']} | {r['fused_pass_us']} "
              f"| {r['weight_grad_us']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
