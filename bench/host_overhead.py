"""Host time per launch: what calling a launcher through its ``torch.library`` op costs over calling it directly.

    python bench/host_overhead.py [--calls 20000]

Small images are launch-bound: the GPU waits for the host between kernels, so every microsecond of Python and
dispatch per launch is a microsecond of the inference. ``kernels._launch.LibraryOp`` calls a launcher's plain
function where nothing needs the op (see there). Measured here, as wall time per call over ``--calls`` calls:

- ``dispatch``: a do-nothing op (it returns an empty tensor) called through ``torch.library`` against the same
  function called through ``LibraryOp``'s checks: the dispatcher's round trip alone. Runs anywhere.
- ``message_pass`` (with CUDA): ``kernels.message_pass`` on a 64×64 grid, C = 21, k = 7 (a few µs of GPU
  work, so the host's time is what is measured; synchronised once at the end), through the op and directly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from run_all import bootstrap


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median over 5 rounds of the wall time per call, in µs (CUDA synchronised at the end of each round)."""
    for _ in range(min(calls, 200)):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    bootstrap()
    from convcrf_triton.kernels import message_passing
    from convcrf_triton.kernels._launch import LibraryOp

    from convcrf_triton import kernels

    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)

    op = LibraryOp("convcrf_bench::noop", noop)
    x = torch.zeros(4)
    rows = [("dispatch", "through the op", per_call_us(lambda: op.op(x), args.calls)),
            ("dispatch", "LibraryOp (direct)", per_call_us(lambda: op(x), args.calls))]
    if torch.cuda.is_available():
        g = torch.Generator(device="cuda").manual_seed(0)
        K = torch.rand(1, 49, 64, 64, device="cuda", generator=g)
        Q = torch.rand(1, 21, 64, 64, device="cuda", generator=g)
        launch = message_passing._message_pass_op
        with torch.no_grad():
            rows += [("message_pass", "through the op", per_call_us(lambda: launch.op(Q, K), args.calls // 10)),
                     ("message_pass", "kernels.message_pass", per_call_us(lambda: kernels.message_pass(K, Q),
                                                                           args.calls // 10))]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(f"host time per call, µs (torch {torch.__version__}, {device})")
    print("| what | path | µs |\n|---|---|---|")
    for what, path, us in rows:
        print(f"| {what} | {path} | {us:.1f} |")


if __name__ == "__main__":
    main()
