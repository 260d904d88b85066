"""Where the time of one ConvCRF inference goes on the GPU: ``torch.profiler``'s CUDA time per kernel.

    python bench/kernel_profile.py --size 1024x2048 --blur 4 --filter-size 11 [--composed] [--rows 15]

The original-compatible configuration of the benchmark (``convcrf_triton.benchmark.conf_for``), its
synthetic inputs, 5 iterations; warmed up (compiled and autotuned) before the profiled calls. ``--composed``
runs the blurred iterations as PyTorch ops around the message pass instead of ``kernels.blur_step``. The
``_blur_step_kernel`` rows hold the set-up too (``blur_start``, or ``mean_field_start`` at blur 1, the same
kernel): T + 1 calls an inference at blur > 1, one at blur 1. First line: the kernels' time an inference against
the wall time of one, back to back and each waited for (the host's share: launch-bound where they differ).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from run_all import bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x2048", help="HxW")
    parser.add_argument("--blur", type=int, default=4)
    parser.add_argument("--filter-size", type=int, default=11)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--calls", type=int, default=5, help="profiled calls")
    parser.add_argument("--rows", type=int, default=15, help="kernels listed")
    parser.add_argument("--composed", action="store_true", help="blur > 1 without kernels.blur_step")
    args = parser.parse_args()
    bootstrap()
    from convcrf_triton.benchmark import conf_for, switched, synthetic_image, synthetic_unary
    from convcrf_triton.module import ConvCRF

    H, W = (int(v) for v in args.size.split("x"))
    unary = synthetic_unary(1, args.classes, H, W).cuda()
    image = synthetic_image(1, H, W).cuda()
    crf = ConvCRF.from_convcrf_conf(conf_for(args.filter_size, args.blur), num_classes=args.classes).cuda()
    mode = switched("blur_iteration", "BLUR_STEP", False) if args.composed else contextlib.nullcontext()
    with torch.no_grad(), mode:
        for _ in range(3):
            crf(unary, image)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                crf(unary, image)
            torch.cuda.synchronize()
        # Wall time an inference, back to back and each call waited for (every call already waits once, early:
        # the input check reads a sum back): against the kernels' sum, whether the GPU or the host sets the pace.
        walls = []
        for wait in (False, True):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                crf(unary, image)
                if wait:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3 / args.calls)
    label = "composed" if args.composed else "blur_step"
    print(f"== {H}x{W} C={args.classes} k={args.filter_size} blur={args.blur} ({label}), {args.calls} calls")
    events = prof.key_averages()
    kernels_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 / args.calls
    print(f"an inference: kernels {kernels_ms:.3f} ms, wall {walls[0]:.3f} ms back to back, {walls[1]:.3f} ms "
          "waited for")
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
