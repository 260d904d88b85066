"""A training step of the whole model timed: inference, forward with gradient, backward.

    python bench/train_step.py [--size 375x500] [--blurs 1,4] [--filter-sizes 3,7,11] [--classes 21]
                               [--backend torch] [--threads 2] [--reps 5] [--plain] [--out F.csv]

``ConvCRF(C, filter_size=k, blur=b, num_iter=5, trainable=True, convcomp=True)`` on random logits and a random
image; the loss is ``logsumexp`` over the classes, summed. Per blur and filter size: the median of ``--reps``
inferences (``torch.no_grad``), forwards with gradient and backwards, interleaved, each after one untimed step.
With ``--plain`` the PyTorch path's two hot ops (the Gaussian weights, the message pass) are also differentiated
by autograd through their plain ops instead of their written-out backward (``reference.written_backward`` off),
in the same rounds. CUDA: wall-clock between synchronisations.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from run_all import bootstrap


def timed_ms(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Wall-clock milliseconds of ``fn()`` and its result, the device synchronised around it."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


def time_config(crf: torch.nn.Module, unary: torch.Tensor, image: torch.Tensor,
                ways: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, float]:
    """Median milliseconds of ``crf``'s inference and, for each way of differentiating, of its forward with
    gradient and its backward: one untimed round, then ``reps`` interleaved rounds."""
    times: dict[str, list[float]] = {}

    def record(key: str, ms: float, keep: bool) -> None:
        if keep:
            times.setdefault(key, []).append(ms)

    for round_ in range(reps + 1):
        with torch.no_grad():
            record("inference_ms", timed_ms(lambda: crf(unary, image), device)[0], round_ > 0)
        for way, context in ways.items():
            with context():
                crf.zero_grad()
                fwd, loss = timed_ms(lambda: crf(unary, image).logsumexp(1).sum(), device)
                bwd, _ = timed_ms(loss.backward, device)
            record(f"{way}_forward_ms", fwd, round_ > 0)
            record(f"{way}_backward_ms", bwd, round_ > 0)
    return {key: round(statistics.median(v), 1) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="375x500", help="HxW")
    parser.add_argument("--blurs", default="1,4")
    parser.add_argument("--filter-sizes", default="3,7,11")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help="also time autograd through the plain ops")
    parser.add_argument("--out", type=Path, default=Path("bench-results/train_step.csv"))
    args = parser.parse_args()
    bootstrap()
    from convcrf_triton import ConvCRF, reference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    H, W = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    unary = (torch.randn(1, args.classes, H, W, generator=g) * 2).to(device)
    image = (torch.rand(1, 3, H, W, generator=g) * 255).to(device)
    ways = {"written": nullcontext}
    if args.plain:
        ways["plain"] = lambda: mock.patch.object(reference, "written_backward", lambda *tensors: False)
    rows = []
    for blur in (int(v) for v in args.blurs.split(",")):
        for k in (int(v) for v in args.filter_sizes.split(",")):
            crf = ConvCRF(args.classes, filter_size=k, blur=blur, num_iter=5, trainable=True, convcomp=True,
                          backend=args.backend).to(device)
            times = time_config(crf, unary, image, ways, args.reps, device)
            row = {"device": name, "backend": args.backend, "size": args.size, "blur": blur, "filter_size": k,
                   "classes": args.classes}
            row.update(times)
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plain = " | backward, plain autograd" if args.plain else ""
    print(f"\ntraining step, ms, median of {args.reps} ({name}, backend {args.backend}, torch {torch.__version__}); "
          f"CSV: {args.out}")
    print(f"| blur | k | inference | forward | backward{plain} |\n|---|---|---|---|---|" + ("---|" if plain else ""))
    for r in rows:
        extra = f" | {r['plain_backward_ms']}" if args.plain else ""
        print(f"| {r['blur']} | {r['filter_size']} | {r['inference_ms']} | {r['written_forward_ms']} "
              f"| {r['written_backward_ms']}{extra} |")


if __name__ == "__main__":
    main()
