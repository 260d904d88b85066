"""Time to a process's first inference: compiling and tuning from an empty Triton cache, then from a full one.

    python bench/first_call.py [--filter-size 11] [--blur 4] [--size 96x128] [--threads 1,2]

The first inference on a machine compiles every config the autotuner times (and a tuning times every config of each
tuned kernel); Triton keeps the compiled kernels in its cache directory and this package keeps the tuner's picks
(``kernels/_tuning_cache.py``). Each row is a fresh process with ``CONVCRF_COMPILE_THREADS`` threads compiling a
tuning's configs (``kernels._launch.compile_configs``): with an empty Triton cache of its own (it keeps its picks),
then with that cache full and no picks (``CONVCRF_TUNE_CACHE=0``: it tunes again), then with the cache and the
picks; last, from an empty cache without tuning (``CONVCRF_AUTOTUNE=0``: the first config of each kernel, the
quick start). With CUDA the kernels run and are timed by the tuner; without, the launchers' GPU branch runs through
``tests/stub_driver.py``: every kernel compiles for sm_90 and the tuner's timing of a config is one stubbed launch
of it (which compiles it: the last two rows then cost the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from run_all import ROOT, bootstrap


def first_inference(filter_size: int, blur: int, height: int, width: int, classes: int) -> dict:
    """One process's first and second inference, in seconds (the child's side)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        sys.path.insert(0, str(ROOT / "tests"))
        import stub_driver

        stub_driver.install().launch_when_timing = True
    from convcrf_triton import ConvCRF

    device = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(1, classes, height, width, generator=g).to(device)
    image = (torch.rand(1, 3, height, width, generator=g) * 255).to(device)
    crf = ConvCRF(classes, filter_size=filter_size, blur=blur, backend="triton").to(device)
    times = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            crf(unary, image)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"first": times[0], "second": times[1]}


def run_child(args: argparse.Namespace, threads: int, cache: str, picks: str, tune: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache, CONVCRF_TUNE_CACHE=picks, CONVCRF_COMPILE_THREADS=str(threads),
               CONVCRF_AUTOTUNE="1" if tune else "0")
    command = [sys.executable, __file__, "--child", "--filter-size", str(args.filter_size), "--blur", str(args.blur),
               "--size", args.size, "--classes", str(args.classes)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter-size", type=int, default=11)
    parser.add_argument("--blur", type=int, default=4)
    parser.add_argument("--size", default="96x128", help="HxW")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--threads", default="1,2", help="compile threads, one row each")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    height, width = (int(n) for n in args.size.split("x"))
    if args.child:
        bootstrap()
        print(json.dumps(first_inference(args.filter_size, args.blur, height, width, args.classes)))
        return
    bootstrap()
    import torch
    import triton

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA: stub driver, sm_90"
    print(f"first inference, s: ConvCRF({args.classes}, filter_size={args.filter_size}, blur={args.blur}) on "
          f"{height}x{width} (torch {torch.__version__}, triton {triton.__version__}, {where}, {os.cpu_count()} cores)")
    print("| compile threads | Triton cache | tuner's picks | first inference | second inference |")
    print("|---|---|---|---|---|")
    for threads in (int(n) for n in args.threads.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            picks = os.path.join(cache, "picks")
            for state, kept in (("empty", "none"), ("full", "none"), ("full", "kept")):
                row = run_child(args, threads, cache, picks if state == "empty" or kept == "kept" else "0")
                print(f"| {threads} | {state} | {kept} | {row['first']:.2f} | {row['second']:.3f} |", flush=True)
        with tempfile.TemporaryDirectory() as cache:  # (the first config of each kernel: one compile a kernel)
            row = run_child(args, threads, cache, "0", tune=False)
            print(f"| {threads} | empty | no tuning (CONVCRF_AUTOTUNE=0) | {row['first']:.2f} | {row['second']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
