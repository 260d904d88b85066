"""Host time per launch: triton's launch path against ``DirectLaunch``, and a ``torch.library`` op's round trip.

    python bench/host_overhead.py [--calls 20000] [--profile N]

Small images are launch-bound: the GPU waits for the host between kernels, so every microsecond of Python and
dispatch per launch is a microsecond of the inference. Measured here, as wall time per call over ``--calls``
calls (median of 5 rounds):

- ``dispatch``: a do-nothing op (it returns an empty tensor) called through ``torch.library`` against the same
  function called through ``LibraryOp``'s checks: the dispatcher's round trip alone.
- ``message_pass``: ``kernels.message_pass`` on a 64×64 grid, C = 21, k = 7, through the op and directly, each
  with the compiled kernel launched by ``DirectLaunch`` (the default), through triton's own launch path
  (``CONVCRF_DIRECT_LAUNCH=0``'s), and with the launch stubbed (our Python alone).
- ``inference``: one ``ConvCRF(21, backend="triton")`` call (5 iterations; its input check synchronises once a
  call), on the same three paths and on ``DirectLaunch`` without ``kernels.Repeat`` (every iteration's launches
  through the launchers, as the first's).

With CUDA the kernels run (a few µs of GPU work each, so the host's time is what is measured). Without, the
launchers' GPU branch runs on CPU tensors through ``tests/stub_driver.py``: kernels compile for sm_90 (the first
call of each: seconds), and the launch itself is a stub that records its arguments; the inference then runs
on an 8×8 image on one thread (its PyTorch ops compute on the CPU, so small).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from run_all import ROOT, bootstrap


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
def launch_path(path: str) -> Iterator[None]:
    """``path``: "direct" (``DirectLaunch``, and the loops' ``Repeat``: the default), "no repeat" (``DirectLaunch``
    at every launch), "triton" (its own launch path at every call) or "stubbed" (every ``kernel[grid](...)``
    returns at once, launching nothing: our Python alone)."""
    from convcrf_triton.kernels import _launch
    from triton.runtime.jit import KernelInterface

    real, direct, repeat = KernelInterface.__getitem__, _launch.DIRECT_LAUNCH, _launch.REPEAT
    _launch.DIRECT_LAUNCH = path in ("direct", "no repeat")
    _launch.REPEAT = path == "direct"
    if path == "stubbed":
        KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        KernelInterface.__getitem__ = real
        _launch.DIRECT_LAUNCH, _launch.REPEAT = direct, repeat


PATHS = {"direct": "DirectLaunch", "no repeat": "DirectLaunch, no Repeat", "triton": "triton's launch path",
         "stubbed": "launch stubbed"}


def launch_rows(what: str, fn: Callable[[], object], calls: int, paths: tuple[str, ...] = tuple(PATHS)
                ) -> list[tuple[str, str, float]]:
    rows = []
    for path in paths:
        label = PATHS[path]
        with launch_path(path):
            rows.append((what, label, per_call_us(fn, calls)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then cProfile N inferences of each kind on the default path: the top functions")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.pop("TRITON_INTERPRET", None)  # (before triton is imported) the GPU branch, on the stub driver
        os.environ.setdefault("CONVCRF_AUTOTUNE", "0")  # (the stub's timings are all equal: no tuning)
        torch.set_num_threads(1)  # an 8×8 op split over threads waits on their barrier, not on the host
    bootstrap()
    import triton

    if not cuda:
        sys.path.insert(0, str(ROOT / "tests"))
        import stub_driver

        stub = stub_driver.install()
    from convcrf_triton.kernels import message_passing
    from convcrf_triton.kernels._launch import LibraryOp

    from convcrf_triton import ConvCRF, kernels

    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)

    op = LibraryOp("convcrf_bench::noop", noop)
    x = torch.zeros(4)
    rows = [("dispatch", "through the op", per_call_us(lambda: op.op(x), args.calls)),
            ("dispatch", "LibraryOp (direct)", per_call_us(lambda: op(x), args.calls))]
    device = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    K = torch.rand(1, 49, 64, 64, generator=g).to(device)
    Q = torch.rand(1, 21, 64, 64, generator=g).to(device)
    launch = message_passing._message_pass_op
    with torch.no_grad():
        single = ("direct", "triton", "stubbed")  # (one launch: nothing to repeat)
        rows += launch_rows("message_pass through the op", lambda: launch.op(Q, K), args.calls // 10, single)
        rows += launch_rows("kernels.message_pass", lambda: kernels.message_pass(K, Q), args.calls // 10, single)
        size = 64 if cuda else 8
        unary = torch.randn(1, 21, size, size, generator=g).to(device)
        image = (torch.rand(1, 3, size, size, generator=g) * 255).to(device)
        inferences = {}
        for blur, k in ((4, 3), (1, 7)):
            crf = ConvCRF(21, filter_size=k, blur=blur, num_iter=5, backend="triton").to(device)
            what = f"inference {size}x{size} blur {blur} k {k}"
            inferences[what] = lambda crf=crf: crf(unary, image)
            rows += launch_rows(what, inferences[what], max(args.calls // 100, 20))
            if not cuda:
                stub.launches.clear()
    where = torch.cuda.get_device_name() if cuda else "no CUDA: stub driver, kernels compiled for sm_90"
    print(f"host time per call, µs (torch {torch.__version__}, triton {triton.__version__}, {where})")
    print("| what | path | µs |\n|---|---|---|")
    for what, path, us in rows:
        print(f"| {what} | {path} | {us:.1f} |")
    if args.profile:
        with torch.no_grad():
            for what, fn in inferences.items():
                print_profile(what, fn, args.profile)


def print_profile(what: str, fn: Callable[[], object], calls: int, top: int = 15) -> None:
    """The ``top`` functions by own time over ``calls`` calls of ``fn`` (cProfile: its overhead inflates them all),
    in µs a call: where an inference's host time goes."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, ...)}
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    print(f"\nprofile of {what}, {calls} calls (µs a call: own, cumulative; calls a call)")
    print("| function | own µs | cumulative µs | calls |\n|---|---|---|---|")
    for (file, line, name), (n, _, own, cumulative, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"| {where} | {1e6 * own / calls:.1f} | {1e6 * cumulative / calls:.1f} | {n / calls:g} |")


if __name__ == "__main__":
    main()
