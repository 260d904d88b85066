"""Host time per launch: what calling a launcher through its ``torch.library`` op costs over calling it directly.

    python bench/host_overhead.py [--calls 20000]

Small images are launch-bound: the GPU waits for the host between kernels, so every microsecond of Python and
dispatch per launch is a microsecond of the inference. ``kernels._launch.LibraryOp`` calls a launcher's plain
function where nothing needs the op (see there). Measured here, as wall time per call over ``--calls`` calls:

- ``dispatch``: a do-nothing op (it returns an empty tensor) called through ``torch.library`` against the same
  function called through ``LibraryOp``'s checks: the dispatcher's round trip alone. Runs anywhere.
- ``message_pass`` (with CUDA): ``kernels.message_pass`` on a 64×64 grid, C = 21, k = 7 (a few µs of GPU
  work, so the host's time is what is measured; synchronised once at the end), through the op and directly.
- ``inference``: one ``ConvCRF(21, backend="triton")`` call (5 iterations; its input check synchronises once a
  call) on a 64×64 image, as it is (with CUDA) and with every Triton launch stubbed: the difference is Triton's
  own launch path, the rest our Python and the PyTorch ops around the kernels. Without CUDA, stubbed only, on
  an 8×8 image (the launchers' interpreter branch; the PyTorch ops' arithmetic there is then small).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def triton_launches_stubbed() -> Iterator[None]:
    """Every ``kernel[grid](...)`` launch (jit, autotuned, interpreted: all reach ``KernelInterface.__getitem__``)
    returns at once, launching nothing."""
    from triton.runtime.jit import KernelInterface

    real = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        KernelInterface.__getitem__ = real


def inference_rows(calls: int) -> list[tuple[str, str, float]]:
    """Host time of one whole inference per (blur, k), as it is (CUDA) and with Triton's launches stubbed."""
    from convcrf_triton import ConvCRF

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 64 if device == "cuda" else 8
    if device == "cpu":
        torch.set_num_threads(1)  # an 8×8 op split over threads waits on their barrier, not on the host
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(1, 21, size, size, generator=g).to(device)
    image = (torch.rand(1, 3, size, size, generator=g) * 255).to(device)
    rows = []
    for blur, k in ((4, 3), (1, 7)):
        crf = ConvCRF(21, filter_size=k, blur=blur, num_iter=5, backend="triton").to(device)
        what = f"inference {size}x{size} blur {blur} k {k}"
        with torch.no_grad():
            if device == "cuda":
                rows.append((what, "as is", per_call_us(lambda crf=crf: crf(unary, image), calls)))
            with triton_launches_stubbed():
                rows.append((what, "Triton launches stubbed", per_call_us(lambda crf=crf: crf(unary, image), calls)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (before triton is imported) CPU tensors reach the launchers
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
    rows += inference_rows(max(args.calls // 100, 20))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(f"host time per call, µs (torch {torch.__version__}, {device})")
    print("| what | path | µs |\n|---|---|---|")
    for what, path, us in rows:
        print(f"| {what} | {path} | {us:.1f} |")


if __name__ == "__main__":
    main()
