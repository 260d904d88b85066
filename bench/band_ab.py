"""The band kernel against the direct kernel, op by op, in one process (CSV): per grid, filter size and class
count, one message pass (direct two-pass; band in tf32x3 and rounded tf32) and one blur-1 mean-field step
(direct planar and channels-last; band in tf32x3 and tf32 on 4 and 8 warps).

    python bench/band_ab.py [--sizes 1024x2048,256x512] [--filter-sizes 7,11,15] [--classes 21] [--out CSV]

The questions it answers (bench/NOTES.md, "Next"): what the operand rounding of tf32 costs, and why the band
step is slower than the direct one. ``rel_err`` is each output's largest difference from the direct kernel's,
relative to the direct output's largest value. ``--device cpu`` runs the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``; wall-clock times, meaningless as speed): a check that the script works.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import bootstrap  # noqa: E402

COLUMNS = ["H", "W", "k", "C", "op", "variant", "ms", "rel_err"]
DIMS = (2, 3)  # smoothness and appearance features, merged


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def wall(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return wall


def variants(kernels: object, K: torch.Tensor, Q: torch.Tensor, A: torch.Tensor, k: int
             ) -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
    """``(op, variant, fn)``: the direct kernel's first for each op (the reference of ``rel_err``); every
    ``fn`` returns planar ``[B, C, h, w]``."""
    from convcrf_triton.benchmark import switched

    C = Q.shape[1]
    weight = torch.tensor(0.3, device=Q.device)
    yield "message_pass", "direct", lambda: kernels.message_pass(K, Q)
    for precision in ("tf32x3", "tf32"):
        yield "message_pass", f"band-{precision}", lambda p=precision: kernels.band_message_pass(K, Q, p)

    def direct_step(channels_last: bool) -> Callable[[], torch.Tensor]:
        q, a = (kernels.to_channels_last(Q), kernels.to_channels_last(A)) if channels_last else (Q, A)
        cs = C if channels_last else None
        out = (lambda z: kernels.from_channels_last(z, C)) if channels_last else (lambda z: z)
        return lambda: out(kernels.mean_field_step(q, a, weight, None, K, None, None, DIMS, k, False, True,
                                                   channels_last=cs))

    yield "step", "direct-planar", direct_step(False)
    yield "step", "direct-channels-last", direct_step(True)
    for precision in ("tf32x3", "tf32"):
        for warps in (4, 8):
            def run(p: str = precision, nw: int = warps) -> torch.Tensor:
                with switched("band_product", "STEP_NUM_WARPS", nw):
                    return kernels.band_mean_field_step(Q, A, weight, None, K, True, None, p)

            yield "step", f"band-{precision}-{warps}w", run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024x2048,256x512", help="grids HxW, comma-separated")
    parser.add_argument("--filter-sizes", default="7,11,15")
    parser.add_argument("--classes", default="21")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("band_ab.csv"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu under TRITON_INTERPRET=1 to check the script)",
              file=sys.stderr)
        return 2
    bootstrap()
    from convcrf_triton import kernels

    time_ms = timer(args.device)
    g = torch.Generator().manual_seed(0)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            feats = (torch.randn(1, sum(DIMS), h, w, generator=g) * 0.7).to(args.device)
            for k in (int(v) for v in args.filter_sizes.split(",")):
                K = kernels.gaussian_weights(feats, DIMS, torch.tensor([3.0, 10.0], device=args.device), k, False)
                for C in (int(v) for v in args.classes.split(",")):
                    Q = torch.softmax(torch.randn(1, C, h, w, generator=g), 1).to(args.device)
                    A = (torch.randn(1, C, h, w, generator=g) * 2).to(args.device)
                    want: dict[str, torch.Tensor] = {}
                    for op, variant, fn in variants(kernels, K, Q, A, k):
                        out = fn()
                        ref = want.setdefault(op, out)
                        err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                        row = {"H": h, "W": w, "k": k, "C": C, "op": op, "variant": variant,
                               "ms": f"{time_ms(fn):.4f}", "rel_err": f"{err:.2e}"}
                        writer.writerow(row)
                        f.flush()
                        print(",".join(str(row[c]) for c in COLUMNS), flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
