"""``convcrf-triton bench``: speed, memory and roofline measurements, written as CSV + PNG (SPEC §5, §7).

One run times, on one device, every implementation of the same CRF on the same inputs:

- ``triton-graph``: ``ConvCRF(backend="triton").use_cuda_graphs()``, the default dispatch replayed from a
  CUDA graph recorded per shape (whole-model rows, CUDA only);
- ``triton-cl``: the default dispatch with the one-launch step forced onto channels-last tensors (slower than
  the planar default wherever timed: :func:`convcrf_triton.kernels.step_channels_last`; only at blur 1;
  whole-model rows, CUDA only);
- ``triton-composed``: the default dispatch with the blurred iterations composed from PyTorch ops around the
  message pass (upsample, add, softmax, pool) instead of one :func:`convcrf_triton.kernels.blur_step` launch
  (differs only at blur > 1; whole-model rows, CUDA only);
- ``triton-band``: message-pass rows, :func:`convcrf_triton.kernels.band_message_pass` (the window sum as
  banded tensor-core products, tf32x3); whole-model rows: the default dispatch with every inference pass on it
  (``kernels.band_product.BAND``; CUDA only);
- ``triton-tf32``: the default dispatch with ``precision="tf32"`` (blur > 1, k = 7..21: the pooled-grid passes
  on the band kernel, one tf32 product per product); message-pass rows: ``band_message_pass`` in tf32 at every
  k (CUDA only; its output is judged by label agreement);
- ``triton-bf16``: the default dispatch with ``storage="bfloat16"`` (message-pass rows: two-pass with ``K``
  and ``Q`` in bfloat16; CUDA only; its output is judged by label agreement);
- ``triton-fused`` / ``triton-two-pass``: ``ConvCRF(backend="triton")`` with the choice of
  :func:`convcrf_triton.kernels.prefer_fused` forced one way or the other, and the blur-1 step in the
  planar layout (CUDA only; on the CPU the
  Triton path is only the interpreter, so these rows are skipped there);
- ``reference``: ``ConvCRF(backend="torch")``, the pure-PyTorch path;
- ``unfold``: :func:`convcrf_triton.baselines.unfold_crf`, the original ConvCRF formulation;
- ``pydensecrf``: the permutohedral fully connected CRF with matched parameters (CPU; when installed).

Every whole-model row (``mode="convcrf"``) is a full 5-iteration inference of the original-compatible
configuration (``ConvCRF.from_convcrf_conf``; the original defaults but ``filter_size`` and ``blur``),
so all implementations compute the same output, which is checked. ``mode="message_pass"`` rows time one
message pass ``(K or features, Q) -> M`` on the pooled grid and report its nominal FLOP/s (``2·B·C·k²·h·w``)
and ideal bytes/s (weights or features, Q and M each moved once) against the device's measured
ceilings (``implementation="device"``, ``mode="copy"``/``"matmul"`` rows: a large copy and a large fp32
matmul, measured in the same run). ``roofline_frac = max(FLOPs / peak FLOP/s, bytes / peak B/s) / time``.

Times: CUDA, ``triton.testing.do_bench`` quantiles (CUDA events over a ~60 ms window, L2 flushed);
CPU, a warm, repeated wall clock. ``median_ms`` / ``p20_ms`` / ``p80_ms`` per full call.
Peak extra memory: CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
CPU, the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
resident set before the call (after ``malloc_trim``) - tracemalloc does not see torch's allocations.
The output tensor is included, the inputs are not.

    convcrf-triton bench [--device cuda|cpu] [--filter-sizes 3,5,...] [--out DIR] [--quick] ...
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime as _dt
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

COLUMNS = [
    "implementation", "mode", "k", "H", "W", "C", "B", "blur", "dtype", "median_ms", "p20_ms", "p80_ms",
    "peak_mem_mb", "gflops", "gbs", "roofline_frac", "device", "torch", "triton", "commit", "date",
]
BAND_IMPL = "triton-band"  # kernels.band_message_pass (tf32x3 tensor-core products); whole model: kernels' BAND on
TF32_IMPL = "triton-tf32"  # precision="tf32"; message pass: band_message_pass with one tf32 product per product
TRITON_IMPLS = ("triton-fused", "triton-two-pass", "triton-graph", "triton-bf16", "triton-cl", "triton-composed",
                BAND_IMPL, TF32_IMPL)
MODEL_IMPLS = ("unfold", "reference", *TRITON_IMPLS)  # every implementation
GRAPH_IMPL = "triton-graph"  # whole-model rows only: the default dispatch, replayed from a CUDA graph
BF16_IMPL = "triton-bf16"  # the default dispatch with storage="bfloat16"; message pass: two-pass, K and Q bf16
# What a whole-model row changes in the default configuration; their outputs are judged by label agreement.
ROW_CONFIGS = {BF16_IMPL: {"storage": "bfloat16"}, TF32_IMPL: {"precision": "tf32"}}
LOW_PRECISION_IMPLS = tuple(ROW_CONFIGS)
CL_IMPL = "triton-cl"  # whole-model rows only: the default dispatch with the channels-last one-launch step
COMPOSED_IMPL = "triton-composed"  # whole-model rows only: the default dispatch without blur_step
MODEL_ONLY_IMPLS = (GRAPH_IMPL, CL_IMPL, COMPOSED_IMPL)
PLOT_FILES = ("time_vs_filter_size.png", "time_vs_resolution.png", "memory_vs_filter_size.png",
              "speedup_vs_unfold.png", "message_pass_roofline.png")
NUM_ITER = 5
SECTIONS = ("filter_size", "message_pass", "resolution", "classes_batch", "densecrf")
FEATURE_DIMS = (2, 3)  # smoothness (y, x) and appearance (r, g, b): the original defaults, merged


# ---------------------------------------------------------------------------------------------------------
# what to measure
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input configuration. ``k = 0`` for pydensecrf (a full CRF, no window)."""

    mode: str  # "convcrf" | "message_pass" | "densecrf"
    k: int
    H: int
    W: int
    C: int
    B: int
    blur: int

    def label(self) -> str:
        return f"{self.mode} k={self.k} {self.H}x{self.W} C={self.C} B={self.B} blur={self.blur}"


@dataclass
class Sweep:
    """The measurement plan. Caps: ``unfold_cap_elems`` bounds the unfold tensor ``B·C·k²·h·w``
    (memory); ``work_cap`` bounds the taps·classes·pixels of one call of our CPU paths (time)."""

    filter_sizes: list[int]
    baseline_max_k: int
    k_resolutions: list[tuple[int, int]]
    blurs: list[int]
    res_resolutions: list[tuple[int, int]]
    res_filter_size: int
    classes: int
    extra: list[Case]
    mp_resolutions: list[tuple[int, int]]
    densecrf_resolutions: list[tuple[int, int]]
    repeat: int
    copy_mb: int
    matmul_n: int
    unfold_cap_elems: float
    work_cap: float
    time_budget_s: float | None

    def sections(self, impls: Sequence[str], mp_impls: Sequence[str], densecrf: bool
                 ) -> list[tuple[str, list[tuple[Case, list[str]]]]]:
        """``[(section, [(case, implementations)])]`` in priority order (the time budget cuts the tail)."""
        C = self.classes

        def model_impls(k: int) -> list[str]:
            return [i for i in impls if i != "unfold" or k <= self.baseline_max_k]

        k_sweep = [(Case("convcrf", k, H, W, C, 1, blur), model_impls(k))
                   for (H, W) in self.k_resolutions for blur in self.blurs for k in self.filter_sizes]
        mp = [(Case("message_pass", k, H, W, C, 1, blur),
               [i for i in mp_impls if i != "unfold" or k <= self.baseline_max_k])
              for (H, W) in self.mp_resolutions for blur in self.blurs for k in self.filter_sizes]
        res = [(Case("convcrf", self.res_filter_size, H, W, C, 1, blur), model_impls(self.res_filter_size))
               for blur in self.blurs for (H, W) in self.res_resolutions]
        extra = [(c, model_impls(c.k)) for c in self.extra]
        dense = [(Case("densecrf", 0, H, W, C, 1, 1), ["pydensecrf"]) for (H, W) in self.densecrf_resolutions]
        out = [("filter_size", k_sweep), ("message_pass", mp), ("resolution", res), ("classes_batch", extra)]
        if densecrf:
            out.append(("densecrf", dense))
        return out


def quick_sweep() -> Sweep:
    """CI-sized: tiny images, three filter sizes; seconds on a CPU."""
    return Sweep(
        filter_sizes=[3, 5, 7], baseline_max_k=7, k_resolutions=[(48, 64)], blurs=[1, 4],
        res_resolutions=[(32, 48), (48, 64), (64, 96)], res_filter_size=5, classes=21,
        extra=[Case("convcrf", 5, 48, 64, 19, 1, 4), Case("convcrf", 5, 48, 64, 21, 2, 1)],
        mp_resolutions=[(48, 64)], densecrf_resolutions=[(48, 64), (64, 96)], repeat=3, copy_mb=16,
        matmul_n=256, unfold_cap_elems=5e8, work_cap=5e9, time_budget_s=None,
    )


def cpu_sweep() -> Sweep:
    """This machine's CPU, sized to ~10-15 minutes on 2 shared cores (the caps are documented in
    bench/README.md): the filter-size sweep at VOC size (375×500), blur 1 and 4; the resolution sweep at
    k=11; the unfold tensor capped at 5e8 elements (2 GB: k ≤ 11 at 375×500, blur 1), our path at
    5e9 tap·class·pixel products per inference (k ≤ 15 at 375×500, blur 1)."""
    return Sweep(
        filter_sizes=[3, 5, 7, 9, 11, 13, 15, 21, 31], baseline_max_k=15, k_resolutions=[(375, 500)],
        blurs=[1, 4], res_resolutions=[(256, 256), (375, 500), (512, 512), (1024, 2048)], res_filter_size=11,
        classes=21,
        extra=[Case("convcrf", 11, 1024, 2048, 19, 1, 4), Case("convcrf", 11, 375, 500, 21, 8, 4)],
        mp_resolutions=[(375, 500)], densecrf_resolutions=[(256, 256), (375, 500), (512, 512), (1024, 2048)],
        repeat=5, copy_mb=256, matmul_n=2048, unfold_cap_elems=5e8, work_cap=5e9, time_budget_s=None,
    )


def cuda_sweep() -> Sweep:
    """The full GPU grid of issue 5, cut at the time budget (450 s by default; on an H200, 200 s covered the
    filter-size sweep and half of the message-pass sweep, autotuning included)."""
    return Sweep(
        filter_sizes=[3, 5, 7, 9, 11, 13, 15, 21, 31], baseline_max_k=15,
        k_resolutions=[(512, 512), (1024, 2048)], blurs=[1, 4],
        res_resolutions=[(256, 256), (375, 500), (512, 512), (1024, 2048)], res_filter_size=11, classes=21,
        extra=[Case("convcrf", 11, 1024, 2048, 19, 1, 1), Case("convcrf", 11, 1024, 2048, 19, 1, 4),
               Case("convcrf", 11, 512, 512, 21, 8, 1), Case("convcrf", 11, 512, 512, 21, 8, 4),
               Case("convcrf", 11, 375, 500, 21, 8, 4), Case("convcrf", 7, 375, 500, 19, 1, 1)],
        mp_resolutions=[(512, 512), (1024, 2048)], densecrf_resolutions=[(375, 500), (512, 512), (1024, 2048)],
        repeat=5, copy_mb=1024, matmul_n=8192, unfold_cap_elems=0.0, work_cap=math.inf, time_budget_s=450.0,
    )


def pooled(n: int, blur: int) -> int:
    return -(-n // blur)


def unfold_elems(c: Case) -> float:
    return float(c.B * c.C * c.k * c.k * pooled(c.H, c.blur) * pooled(c.W, c.blur))


# ---------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_description(device: str, threads: int) -> tuple[str, str]:
    """(human-readable device, results-folder slug)."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return name, slugify(name)
    name = cpu_name()
    return f"{name} ({threads} thread{'s' if threads != 1 else ''})", f"cpu-{slugify(name)}-{threads}t"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "convcrf_triton", "kernels"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------
# memory and timing
# ---------------------------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def cpu_call_with_peak(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(output, seconds, peak extra resident MB)`` of one call; the MB are NaN where not measurable."""
    gc.collect()
    _malloc_trim()
    rss0 = _status_kb("VmRSS")
    ok = rss0 is not None and _reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    hwm = _status_kb("VmHWM") if ok else None
    mem = (hwm - rss0) / 1024.0 if ok and hwm is not None else math.nan
    return out, dt, mem


def quantiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    ms = 1e3 * np.asarray(samples_s, dtype=np.float64)
    return float(np.median(ms)), float(np.percentile(ms, 20)), float(np.percentile(ms, 80))


@dataclass
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    samples: int
    output: Any = None


class Timer:
    """Warm, repeated timing of a zero-argument callable on one device, with its peak extra memory."""

    def __init__(self, device: str, repeat: int, slow_s: float = 2.0, row_budget_s: float = 20.0,
                 fast_budget_s: float = 1.0) -> None:
        self.device, self.repeat, self.slow_s, self.row_budget_s = device, repeat, slow_s, row_budget_s
        self.fast_budget_s = fast_budget_s

    def __call__(self, fn: Callable[[], Any], keep_output: bool = False) -> Measurement:
        return self._cuda(fn, keep_output) if self.device == "cuda" else self._cpu(fn, keep_output)

    def _cpu(self, fn: Callable[[], Any], keep_output: bool) -> Measurement:
        # The first call is the warm-up and the memory measurement; a slow one (no JIT on this path: the
        # first call costs what the others do) also counts as a sample, to keep long rows affordable.
        out, first, mem = cpu_call_with_peak(fn)
        out = out if keep_output else None
        samples: list[float] = []
        if first > self.slow_s:
            samples.append(first)
            n = max(3, min(self.repeat, int(self.row_budget_s / first))) - 1
        else:
            n = max(self.repeat, min(30, int(self.fast_budget_s / max(first, 1e-6))))
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return Measurement(*quantiles_ms(samples), mem, len(samples), out)

    def _cuda(self, fn: Callable[[], Any], keep_output: bool) -> Measurement:
        from triton.testing import do_bench

        fn()  # warm-up: compilation and autotuning
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        out = out if keep_output else None
        if first > 0.25:  # slow (the unfold baseline on big inputs): a few CUDA-event-timed calls
            samples = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            return Measurement(*quantiles_ms(samples), mem, len(samples), out)
        med, p20, p80 = do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
        return Measurement(float(med), float(p20), float(p80), mem, -1, out)


# ---------------------------------------------------------------------------------------------------------
# inputs and implementations
# ---------------------------------------------------------------------------------------------------------


def synthetic_image(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A natural-looking RGB image ``[B, 3, H, W]`` in [0, 255]: smooth gradients, flat regions, mild noise.

    (Uniform-noise images make almost every colour weight underflow, which times a denormal path that
    real images never take.)
    """
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(B, 3, max(H // 32, 2), max(W // 32, 2), generator=g) * 255
    blocks = torch.rand(B, 3, max(H // 64, 1), max(W // 64, 1), generator=g) * 255
    img = 0.5 * F.interpolate(smooth, size=(H, W), mode="bilinear", align_corners=False)
    img = img + 0.5 * F.interpolate(blocks, size=(H, W), mode="nearest")
    return (img + 4 * torch.randn(B, 3, H, W, generator=g)).clamp(0, 255)


def synthetic_unary(B: int, C: int, H: int, W: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(B, C, H, W, generator=g)


def conf_for(k: int, blur: int) -> dict[str, Any]:
    from .baselines import DEFAULT_CONF

    return {**DEFAULT_CONF, "filter_size": k, "blur": blur}


COUNTED_OPS = ("gaussian_weights", "message_pass", "fused_message_pass", "mean_field_step")


@contextlib.contextmanager
def switched(module_name: str, flag: str, value: Any) -> Iterator[None]:
    """Set the dispatch switch ``convcrf_triton.kernels.<module_name>.<flag>`` for the duration
    (``message_passing.STEP_CHANNELS_LAST``, ``blur_iteration.BLUR_STEP``)."""
    module = importlib.import_module(f"{__package__}.kernels.{module_name}")
    saved = getattr(module, flag)
    setattr(module, flag, value)
    try:
        yield
    finally:
        setattr(module, flag, saved)


# What a whole-model row switches on top of the default dispatch.
ROW_SWITCHES = {CL_IMPL: ("message_passing", "STEP_CHANNELS_LAST", True),
                COMPOSED_IMPL: ("blur_iteration", "BLUR_STEP", False),
                BAND_IMPL: ("band_product", "BAND", True),
                "triton-fused": ("message_passing", "STEP_CHANNELS_LAST", False),
                "triton-two-pass": ("message_passing", "STEP_CHANNELS_LAST", False)}


@contextlib.contextmanager
def forced_variant(fused: bool) -> Iterator[dict[str, int]]:
    """Force the fused / two-pass choice of the Triton backend, and count which ops actually ran.

    Replaces ``prefer_fused`` in ``convcrf_triton.kernels`` and ``convcrf_triton.kernels.message_passing``
    (whatever signature the rule has) and wraps the package's ops with call counters (``mean_field_step``,
    the one-launch iteration, is counted as ``mean_field_step_fused`` or ``mean_field_step_two_pass`` by
    whether it got the features or ``K``); everything is restored on exit. See :func:`variant_ran`.
    """
    from . import kernels
    from .kernels import message_passing

    counts = dict.fromkeys(["gaussian_weights", "message_pass", "fused_message_pass", "mean_field_step_fused",
                            "mean_field_step_two_pass"], 0)
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        if hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    def counting(name: str, op: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(op).parameters)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = name
            if name == "mean_field_step":
                bound = dict(zip(params, args, strict=False)) | kwargs
                key = "mean_field_step_two_pass" if bound.get("K") is not None else "mean_field_step_fused"
            counts[key] += 1
            return op(*args, **kwargs)

        return wrapper

    for mod in (kernels, message_passing):
        patch(mod, "prefer_fused", lambda *a, **kw: fused)
    for name in COUNTED_OPS:
        if hasattr(kernels, name):
            patch(kernels, name, counting(name, getattr(kernels, name)))
    try:
        yield counts
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def variant_ran(counts: dict[str, int]) -> str | None:
    """``"fused"`` / ``"two-pass"`` when the counted calls are all of one variant, else None."""
    fused = counts["fused_message_pass"] + counts["mean_field_step_fused"]
    two = counts["message_pass"] + counts["mean_field_step_two_pass"]
    if fused and not two and not counts["gaussian_weights"]:
        return "fused"
    if two and not fused and counts["gaussian_weights"]:
        return "two-pass"
    return None


class Bench:
    """Runs a :class:`Sweep` on one device and appends rows to a CSV as it goes."""

    def __init__(self, args: argparse.Namespace, sweep: Sweep, out: Path) -> None:
        self.args, self.sweep, self.out = args, sweep, out
        self.device = args.device
        self.dev = torch.device(args.device)
        self.timer = Timer(args.device, sweep.repeat, fast_budget_s=0.0 if args.quick else 1.0)
        self.threads = torch.get_num_threads()
        self.device_name, self.slug = device_description(args.device, self.threads)
        self.common = {"dtype": "float32", "device": self.device_name, "torch": torch.__version__,
                       "triton": triton_version(), "commit": git_commit(),
                       "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.rows: list[dict[str, Any]] = []
        self.ceiling = {"flops": math.nan, "bytes": math.nan}
        self.meta: dict[str, Any] = {
            "device": self.device_name, "device_type": self.device, "threads": self.threads,
            "cpu": cpu_name(), "python": platform.python_version(), "quick": bool(args.quick),
            "num_iter": NUM_ITER, "flush_denormal": bool(args.flush_denormal), "loadavg": [], "skipped": [],
            "errors": [], "checks": [], "notes": [],
            "memory_method": ("torch.cuda.max_memory_allocated() minus memory_allocated() before the call"
                              if self.device == "cuda" else
                              "VmHWM (reset via /proc/self/clear_refs) minus VmRSS before the call, after "
                              "gc.collect() and malloc_trim(0); measured on the first (warm-up) call"),
            "timing_method": ("triton.testing.do_bench(warmup=10, rep=60) quantiles 0.5/0.2/0.8; calls over "
                              "0.25 s: 3 CUDA-event-timed calls" if self.device == "cuda" else
                              "time.perf_counter around warm calls; >= repeat samples (more for fast calls, "
                              "up to 30); calls over 2 s count the first call and take max(3, 20 s / t) samples"),
            "sweep": {k: (v if not isinstance(v, list) or not v or not isinstance(v[0], Case)
                          else [c.label() for c in v]) for k, v in sweep.__dict__.items()},
        }
        self.t_start = time.perf_counter()
        self.csv_path = out / "bench.csv"
        self._csv_file = self.csv_path.open("w", newline="")
        self._writer = csv.DictWriter(self._csv_file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._csv_file.flush()

    # -- bookkeeping ----------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t_start:7.1f}s] {msg}", flush=True)

    def add_row(self, impl: str, case: Case, m: Measurement | None = None, **extra: Any) -> dict[str, Any]:
        row = {"implementation": impl, "mode": case.mode, "k": case.k, "H": case.H, "W": case.W, "C": case.C,
               "B": case.B, "blur": case.blur, **self.common}
        if m is not None:
            row.update(median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, peak_mem_mb=m.peak_mem_mb)
        row.update(extra)
        clean = {c: _fmt(row.get(c, "")) for c in COLUMNS}
        self._writer.writerow(clean)
        self._csv_file.flush()
        self.rows.append(clean)
        return clean

    def skip(self, impl: str, case: Case, why: str) -> None:
        self.meta["skipped"].append({"implementation": impl, "case": case.label(), "why": why})

    def error(self, impl: str, case: Case, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.meta["errors"].append({"implementation": impl, "case": case.label(), "error": msg})
        self.log(f"  ERROR {impl} {case.label()}: {msg}")

    def over_budget(self) -> bool:
        budget = self.sweep.time_budget_s
        return budget is not None and time.perf_counter() - self.t_start > budget

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # -- caps -------------------------------------------------------------------------------------------

    def unfold_cap(self) -> float:
        if self.sweep.unfold_cap_elems > 0:
            return self.sweep.unfold_cap_elems
        if self.device == "cuda":  # x_col and the product (2 × 4 bytes per element), 25% headroom
            return 0.8 * torch.cuda.get_device_properties(0).total_memory / (2 * 4 * 1.25)
        return math.inf

    def cap_reason(self, impl: str, case: Case) -> str | None:
        if impl == "unfold" and case.mode != "densecrf" and unfold_elems(case) > self.unfold_cap():
            return (f"unfold tensor B·C·k²·h·w = {unfold_elems(case):.2e} elements > cap {self.unfold_cap():.2e} "
                    f"({unfold_elems(case) * 4 / 2**30:.1f} GiB each for x_col and the product)")
        if self.device == "cpu" and impl == "reference":
            work = unfold_elems(case) * (NUM_ITER if case.mode == "convcrf" else 1)
            if work > self.sweep.work_cap:
                return f"work {work:.2e} tap·class·pixel products > CPU cap {self.sweep.work_cap:.2e}"
        return None

    # -- the measurements -------------------------------------------------------------------------------

    def ceilings(self) -> None:
        """A large copy (GB/s, bytes read + written) and a large fp32 matmul (GFLOP/s)."""
        n = self.sweep.matmul_n
        for case, measure in ((Case("copy", 0, self.sweep.copy_mb, 1, 1, 1, 1), self._copy_ceiling),
                              (Case("matmul", 0, n, n, 1, 1, 1), self._matmul_ceiling)):
            try:
                measure(case)
            except Exception as exc:  # noqa: BLE001 - record and carry on
                self.error("device", case, exc)
            self.free()
        self.meta["ceilings"] = {"copy_gbs": self.ceiling["bytes"] / 1e9, "matmul_gflops": self.ceiling["flops"] / 1e9,
                                 "copy_mib": self.sweep.copy_mb, "matmul_n": n}

    def _copy_ceiling(self, case: Case) -> None:
        numel = self.sweep.copy_mb * 2**20 // 4
        src = torch.rand(numel, device=self.dev)
        dst = torch.empty_like(src)
        m = self.timer(lambda: dst.copy_(src))
        gbs = 2 * numel * 4 / (m.median_ms * 1e-3) / 1e9
        self.ceiling["bytes"] = gbs * 1e9
        self.add_row("device", case, m, gbs=gbs)
        self.log(f"ceiling: copy {self.sweep.copy_mb} MiB: {gbs:.1f} GB/s")

    def _matmul_ceiling(self, case: Case) -> None:
        n = case.H
        a = torch.rand(n, n, device=self.dev)
        b = torch.rand(n, n, device=self.dev)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 FMA ceiling, not TF32
        try:
            m = self.timer(lambda: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        gflops = 2 * n**3 / (m.median_ms * 1e-3) / 1e9
        self.ceiling["flops"] = gflops * 1e9
        self.add_row("device", case, m, gflops=gflops)
        self.log(f"ceiling: fp32 matmul {n}^3: {gflops:.1f} GFLOP/s")

    def model_fn(self, impl: str, case: Case, unary: torch.Tensor, image: torch.Tensor) -> Callable[[], Any]:
        from .baselines import unfold_crf
        from .module import ConvCRF

        conf = conf_for(case.k, case.blur)
        if impl == "unfold":
            return lambda: unfold_crf(unary, image, conf, case.C, num_iter=NUM_ITER)
        backend = "torch" if impl == "reference" else "triton"
        crf = ConvCRF.from_convcrf_conf(conf, num_classes=case.C, backend=backend).to(self.dev)
        if impl in ROW_CONFIGS:  # storage and precision live in the config alone: no parameter changes
            crf.config = replace(crf.config, **ROW_CONFIGS[impl])
        if impl in ("reference", *ROW_CONFIGS):
            return lambda: crf(unary, image)
        if impl in (CL_IMPL, COMPOSED_IMPL, BAND_IMPL):
            def run_switched() -> torch.Tensor:
                with switched(*ROW_SWITCHES[impl]):
                    return crf(unary, image)

            run_switched()  # compile and autotune
            return run_switched
        if impl == GRAPH_IMPL:
            crf.use_cuda_graphs()
            crf(unary, image)  # record
            return lambda: crf(unary, image)
        fused = impl == "triton-fused"

        def run() -> torch.Tensor:
            with forced_variant(fused), switched(*ROW_SWITCHES[impl]):
                return crf(unary, image)

        with forced_variant(fused) as counts, switched(*ROW_SWITCHES[impl]):  # check the forcing, compile, tune
            crf(unary, image)
        if variant_ran(counts) != ("fused" if fused else "two-pass"):
            raise RuntimeError(f"could not force {impl}: kernel calls {counts}; the dispatch in functional.py "
                               "no longer goes through kernels.prefer_fused")
        return run

    def mp_fn(self, impl: str, case: Case, image: torch.Tensor) -> Callable[[], Any]:
        from . import baselines, functional, reference

        pos, col = functional.features(image, case.blur, 3.0, 80.0, 13.0, False)
        feats = torch.cat([pos, col], 1).contiguous()
        compats = torch.tensor([3.0, 10.0], device=self.dev)
        B, _, h, w = feats.shape
        g = torch.Generator().manual_seed(2)
        Q = torch.softmax(torch.randn(B, case.C, h, w, generator=g), 1).to(self.dev)
        k = case.k
        if impl == "triton-fused":
            from . import kernels

            return lambda: kernels.fused_message_pass(feats, FEATURE_DIMS, compats, Q, k, True)
        if impl in (BAND_IMPL, TF32_IMPL):
            from . import kernels

            K = kernels.gaussian_weights(feats, FEATURE_DIMS, compats, k, True)
            precision = "tf32" if impl == TF32_IMPL else "tf32x3"
            return lambda: kernels.band_message_pass(K, Q, precision)
        if impl in ("triton-two-pass", BF16_IMPL):
            from . import kernels

            dtype = torch.bfloat16 if impl == BF16_IMPL else torch.float32
            K = kernels.gaussian_weights(feats, FEATURE_DIMS, compats, k, True, out_dtype=dtype)
            Qs = Q.to(dtype)
            return lambda: kernels.message_pass(K, Qs)
        K = reference.gaussian_weights(feats, FEATURE_DIMS, compats, k, True)
        if impl == "reference":
            return lambda: reference.message_pass(K, Q)
        gaussian = K.view(B, k, k, h, w)
        return lambda: baselines._unfold_compute(Q, gaussian, 1, (0, 0))

    def mp_roofline(self, impl: str, case: Case, m: Measurement) -> dict[str, float]:
        B, C, k = case.B, case.C, case.k
        hw = pooled(case.H, case.blur) * pooled(case.W, case.blur)
        flops = 2.0 * B * C * k * k * hw
        weights = B * sum(FEATURE_DIMS) * hw if impl == "triton-fused" else B * k * k * hw
        # K (or the features) and Q in the storage dtype, the message M in float32 (kernels._launch.message_dtype)
        nbytes = (2.0 if impl == BF16_IMPL else 4.0) * (weights + B * C * hw) + 4.0 * B * C * hw
        t = m.median_ms * 1e-3
        ideal = max(flops / self.ceiling["flops"], nbytes / self.ceiling["bytes"])
        return {"gflops": flops / t / 1e9, "gbs": nbytes / t / 1e9, "roofline_frac": ideal / t}

    def run_case(self, case: Case, impls: list[str]) -> None:
        todo = []
        for impl in impls:
            why = self.cap_reason(impl, case)
            if why:
                self.skip(impl, case, why)
            else:
                todo.append(impl)
        if not todo:
            return
        self.log(case.label())
        image = synthetic_image(case.B, case.H, case.W).to(self.dev)
        unary = synthetic_unary(case.B, case.C, case.H, case.W).to(self.dev)
        first: tuple[str, torch.Tensor] | None = None
        for impl in todo:
            if self.over_budget():
                self.skip(impl, case, "time budget spent")
                continue
            try:
                with torch.inference_mode():
                    if case.mode == "densecrf":
                        m = self._densecrf(unary, image)
                        extra: dict[str, float] = {}
                    elif case.mode == "message_pass":
                        m = self.timer(self.mp_fn(impl, case, image))
                        extra = self.mp_roofline(impl, case, m)
                    else:
                        m = self.timer(self.model_fn(impl, case, unary, image), keep_output=True)
                        extra = {}
                        first = self._check(impl, case, m.output, first)
                        m.output = None
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the sweep
                if self.device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                    self.skip(impl, case, "CUDA out of memory")
                self.error(impl, case, exc)
                self.free()
                continue
            self.add_row(impl, case, m, **extra)
            info = " ".join(f"{k}={v:.3g}" for k, v in extra.items())
            self.log(f"  {impl:16s} {m.median_ms:10.2f} ms [{m.p20_ms:.2f}, {m.p80_ms:.2f}]  "
                     f"peak {m.peak_mem_mb:9.1f} MB  {info}")
            self.free()
        del image, unary, first
        self.free()

    def _densecrf(self, unary: torch.Tensor, image: torch.Tensor) -> Measurement:
        from .baselines import densecrf_inputs, densecrf_run

        # (pydensecrf's arrays made off the clock, as ConvCRF's rows take their inputs ready: the unary's float64
        # log-softmax in numpy alone took seconds at 1024×2048)
        u, im = unary.float().cpu().numpy(), image.float().cpu().numpy()
        inputs = [densecrf_inputs(u[b], im[b]) for b in range(u.shape[0])]
        cpu_timer = self.timer if self.device == "cpu" else Timer("cpu", self.sweep.repeat)
        return cpu_timer(lambda: [densecrf_run(energy, rgb, NUM_ITER) for energy, rgb in inputs])

    def _check(self, impl: str, case: Case, out: torch.Tensor, first: tuple[str, torch.Tensor] | None
               ) -> tuple[str, torch.Tensor] | None:
        """All implementations compute the same thing: record the max relative difference to the first.

        bfloat16 storage rounds ``K`` and ``Q`` to 8 bits of mantissa (tf32 products: 10), and mean-field
        inference amplifies that at pixels whose two best classes nearly tie (the strong synthetic weights give
        logits of ~100): their largest difference says little, so they are judged by the share of pixels whose
        label agrees."""
        if first is None:
            return impl, out
        ref_impl, ref = first
        diff = float((out.float() - ref.float()).abs().max() / max(1.0, float(ref.abs().max())))
        check = {"case": case.label(), "implementation": impl, "against": ref_impl, "max_rel_diff": diff}
        if impl in LOW_PRECISION_IMPLS:
            check["label_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
            if check["label_agreement"] < 0.99:
                self.log(f"  WARNING {impl} labels agree with {ref_impl} on {check['label_agreement']:.2%} of pixels")
        elif not diff < 1e-3:
            self.log(f"  WARNING {impl} differs from {ref_impl} by {diff:.2e} (relative)")
        self.meta["checks"].append(check)
        return first

    def run(self, impls: Sequence[str], mp_impls: Sequence[str], densecrf: bool,
            sections: Sequence[str] | None = None) -> None:
        self.meta["loadavg"].append({"when": "start", "load": loadavg()})
        try:
            self.ceilings()
            for name, cases in self.sweep.sections(impls, mp_impls, densecrf):
                if sections is not None and name not in sections:
                    continue
                self.meta["loadavg"].append({"when": f"section {name}", "load": loadavg()})
                self.log(f"== {name} (load average {loadavg()})")
                for case, case_impls in cases:  # a configuration shared by two sections is measured once
                    seen = {(r["implementation"], r["mode"], r["k"], r["H"], r["W"], r["C"], r["B"], r["blur"])
                            for r in self.rows}
                    key = (case.mode, case.k, case.H, case.W, case.C, case.B, case.blur)
                    self.run_case(case, [i for i in case_impls if (i, *key) not in seen])
        except KeyboardInterrupt:  # SIGINT, or SIGTERM (see main): keep what was measured
            self.meta["interrupted"] = True
            self.meta["notes"].append(f"interrupted after {time.perf_counter() - self.t_start:.0f} s: the rows "
                                      "measured so far are kept, the rest of the sweep is missing")
            self.log("interrupted: writing what was measured")
        self.meta["loadavg"].append({"when": "end", "load": loadavg()})
        self.meta["seconds"] = round(time.perf_counter() - self.t_start, 1)
        self._csv_file.close()
        if self.device == "cuda":
            write_autotune(self.out / "autotune.csv")
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str) + "\n")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_autotune(path: Path) -> int:
    """The config the Triton autotuner picked per key (KSIZE, FUSED, C, h, w, dtypes), for every
    autotuned kernel of ``convcrf_triton.kernels``."""
    from . import kernels  # noqa: F401 - imports the kernel modules

    rows = []
    for mod_name, mod in sorted(sys.modules.items()):
        if not mod_name.startswith("convcrf_triton.kernels") or mod is None:
            continue
        for attr, obj in sorted(vars(mod).items()):
            cache = getattr(obj, "cache", None)
            if not isinstance(cache, dict) or not hasattr(obj, "configs") or not hasattr(obj, "keys"):
                continue
            for key, cfg in cache.items():
                row = {"kernel": f"{mod_name}.{attr}", "key": "|".join(map(str, key)),
                       "num_warps": getattr(cfg, "num_warps", ""), "num_stages": getattr(cfg, "num_stages", "")}
                row.update({name: key[i] for i, name in enumerate(obj.keys) if i < len(key)})
                row.update(getattr(cfg, "kwargs", {}))
                rows.append(row)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)


# ---------------------------------------------------------------------------------------------------------
# plots and the summary
# ---------------------------------------------------------------------------------------------------------

STYLE = {
    "triton-fused": ("tab:red", "o"), "triton-two-pass": ("tab:orange", "s"),
    GRAPH_IMPL: ("tab:purple", "D"), BF16_IMPL: ("tab:brown", "v"), CL_IMPL: ("tab:olive", "P"),
    COMPOSED_IMPL: ("tab:cyan", "X"), BAND_IMPL: ("tab:pink", "*"), TF32_IMPL: ("tab:pink", "p"),
    "reference": ("tab:blue", "^"),
    "unfold": ("tab:gray", "x"), "pydensecrf": ("tab:green", "D"),
}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The CSV with numbers parsed (empty cells become NaN)."""
    out = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for c in ("k", "H", "W", "C", "B", "blur"):
                row[c] = int(r[c])
            for c in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "gflops", "gbs", "roofline_frac"):
                row[c] = float(r[c]) if r[c] not in ("", None) else math.nan
            out.append(row)
    return out


def _model(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["mode"] == "convcrf" and not math.isnan(r["median_ms"])]


def k_panels(rows: list[dict[str, Any]], mode: str = "convcrf") -> list[tuple[int, int, int]]:
    """(H, W, blur) with at least three filter sizes measured (C and B the most common)."""
    sel = [r for r in rows if r["mode"] == mode]
    if not sel:
        return []
    C, B = _common(sel, "C"), _common(sel, "B")
    ks: dict[tuple[int, int, int], set[int]] = {}
    for r in sel:
        if r["C"] == C and r["B"] == B:
            ks.setdefault((r["H"], r["W"], r["blur"]), set()).add(r["k"])
    return sorted((p for p, s in ks.items() if len(s) >= 3), key=lambda p: (p[0] * p[1], p[2]))


def _common(rows: list[dict[str, Any]], col: str) -> int:
    values = [r[col] for r in rows]
    return max(set(values), key=values.count)


def _axes(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.3 * nrows), squeeze=False)
    fig.suptitle(title, fontsize=11)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _finish(plt, fig, path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def minor(v: float, _: Any) -> str:  # label the 2× and 5× ticks of each decade
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    for ax in fig.axes:
        if ax.get_yscale() == "log":  # plain numbers (12, 0.5, 3000) rather than 1.2×10^1
            lo, hi = ax.get_ylim()
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            span = hi / max(lo, 1e-30)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if span < 10 else
                                         FuncFormatter(minor) if span < 300 else NullFormatter())
        if ax.get_xlabel() == "filter size k":
            ks = sorted({int(x) for line in ax.get_lines() if line.get_marker() not in (None, "None", "")
                         for x in line.get_xdata() if float(x).is_integer()})
            if ks:
                ax.set_xticks(ks)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(rows, impl, **match) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["implementation"] == impl and all(r[k] == v for k, v in match.items())),
                  key=lambda r: r["k"])


def _impls(rows) -> list[str]:
    present = {r["implementation"] for r in rows}
    return [i for i in STYLE if i in present]


def _decorate(ax, xlabel: str, ylabel: str, title: str, log_y: bool = False) -> None:  # noqa: ANN001
    """Labels, title, grid and legend of one panel (log y-axis for times, speed-ups and ratios)."""
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _dense(rows, H: int, W: int, C: int, B: int) -> list[dict[str, Any]]:
    """The measured pydensecrf rows of one image size (drawn as a reference line on the k panels)."""
    return [r for r in rows if r["mode"] == "densecrf" and not math.isnan(r["median_ms"])
            and (r["H"], r["W"], r["C"], r["B"]) == (H, W, C, B)]


def plot_time_vs_k(rows, path: Path, device: str) -> bool:
    model = _model(rows)
    panels = k_panels(model)
    if not panels:
        return False
    C, B = _common(model, "C"), _common(model, "B")
    plt, fig, axes = _axes(len(panels), f"Full inference ({NUM_ITER} iterations), C={C}, B={B} - {device}")
    for ax, (H, W, blur) in zip(axes, panels, strict=True):
        for impl in _impls(model):
            s = _series(model, impl, H=H, W=W, blur=blur, C=C, B=B)
            if s:
                color, marker = STYLE[impl]
                ks = [r["k"] for r in s]
                med = np.array([r["median_ms"] for r in s])
                err = [med - [r["p20_ms"] for r in s], np.array([r["p80_ms"] for r in s]) - med]
                ax.errorbar(ks, med, yerr=np.clip(err, 0, None), color=color, marker=marker, label=impl, capsize=2)
        for r in _dense(rows, H, W, C, B):
            ax.axhline(r["median_ms"], color=STYLE["pydensecrf"][0], ls="--", label="pydensecrf (full CRF)")
        _decorate(ax, "filter size k", "time per inference [ms]", f"H×W = {H}×{W}, blur {blur}", log_y=True)
    _finish(plt, fig, path)
    return True


def plot_time_vs_resolution(rows, path: Path, device: str) -> bool:
    model = _model(rows)
    if not model:
        return False
    C, B = _common(model, "C"), _common(model, "B")
    sel = [r for r in model if r["C"] == C and r["B"] == B]
    res_by_k: dict[int, set[tuple[int, int]]] = {}
    for r in sel:
        res_by_k.setdefault(r["k"], set()).add((r["H"], r["W"]))
    k = max(res_by_k, key=lambda kk: (len(res_by_k[kk]), kk))
    if len(res_by_k[k]) < 2:
        return False
    blurs = sorted({r["blur"] for r in sel if r["k"] == k})
    plt, fig, axes = _axes(len(blurs), f"Full inference vs resolution, k={k}, C={C}, B={B} - {device}")
    dense = sorted((r for r in rows if r["mode"] == "densecrf" and r["C"] == C and r["B"] == B
                    and not math.isnan(r["median_ms"])), key=lambda r: r["H"] * r["W"])
    for ax, blur in zip(axes, blurs, strict=True):
        for impl in _impls(sel):
            s = sorted((r for r in sel if r["implementation"] == impl and r["k"] == k and r["blur"] == blur),
                       key=lambda r: r["H"] * r["W"])
            if s:
                color, marker = STYLE[impl]
                ax.plot([r["H"] * r["W"] / 1e6 for r in s], [r["median_ms"] for r in s], color=color,
                        marker=marker, label=impl)
        if dense:
            ax.plot([r["H"] * r["W"] / 1e6 for r in dense], [r["median_ms"] for r in dense], ls="--",
                    color=STYLE["pydensecrf"][0], marker=STYLE["pydensecrf"][1], label="pydensecrf (full CRF)")
        ticks = sorted({(r["H"], r["W"]) for r in sel if r["k"] == k and r["blur"] == blur})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([h * w / 1e6 for h, w in ticks])
        ax.set_xticklabels([f"{h}×{w}" for h, w in ticks], rotation=30, fontsize=8)
        ax.minorticks_off()
        _decorate(ax, "resolution H×W", "time per inference [ms]", f"blur {blur}")
    _finish(plt, fig, path)
    return True


def plot_memory_vs_k(rows, path: Path, device: str) -> bool:
    model = [r for r in _model(rows) if not math.isnan(r["peak_mem_mb"])]
    panels = k_panels(model)
    if not panels:
        return False
    C, B = _common(model, "C"), _common(model, "B")
    plt, fig, axes = _axes(len(panels), f"Peak extra memory per inference, C={C}, B={B} - {device}")
    for ax, (H, W, blur) in zip(axes, panels, strict=True):
        for impl in _impls(model):
            s = _series(model, impl, H=H, W=W, blur=blur, C=C, B=B)
            if s:
                color, marker = STYLE[impl]
                ax.plot([r["k"] for r in s], [max(r["peak_mem_mb"], 0.01) for r in s], color=color, marker=marker,
                        label=impl)
        unary_mb = B * C * H * W * 4 / 2**20
        ax.axhline(unary_mb, color="k", ls=":", lw=1, label=f"unary size ({unary_mb:.3g} MB)")
        ax.axhline(4 * unary_mb, color="k", ls="--", lw=1, label="4× unary (SPEC §7 target)")
        _decorate(ax, "filter size k", "peak extra memory [MB]", f"H×W = {H}×{W}, blur {blur}", log_y=True)
    _finish(plt, fig, path)
    return True


def plot_speedup(rows, path: Path, device: str, device_type: str) -> bool:
    model = _model(rows)
    panels = [p for p in k_panels(model) if any(r["implementation"] == "unfold" and (r["H"], r["W"], r["blur"]) == p
                                                 for r in model)]
    if not panels:
        return False
    C, B = _common(model, "C"), _common(model, "B")
    plt, fig, axes = _axes(len(panels), f"Speed-up over the unfold baseline (same device, same run) - {device}")
    for ax, (H, W, blur) in zip(axes, panels, strict=True):
        base = {r["k"]: r["median_ms"] for r in _series(model, "unfold", H=H, W=W, blur=blur, C=C, B=B)}
        for impl in _impls(model):
            if impl == "unfold":
                continue
            s = [r for r in _series(model, impl, H=H, W=W, blur=blur, C=C, B=B) if r["k"] in base]
            if s:
                color, marker = STYLE[impl]
                ax.plot([r["k"] for r in s], [base[r["k"]] / r["median_ms"] for r in s], color=color, marker=marker,
                        label=impl)
        for r in _dense(rows, H, W, C, B):
            ks = sorted(base)
            ax.plot(ks, [base[k] / r["median_ms"] for k in ks], color=STYLE["pydensecrf"][0], ls="--",
                    marker=STYLE["pydensecrf"][1], label="pydensecrf (full CRF)")
        target = (20.0, "20× (SPEC §7, GPU)") if device_type == "cuda" else \
            ((10.0, "10× (SPEC §7, CPU, k=11)") if blur == 1 else (5.0, "5× (SPEC §7, CPU, k=11)"))
        ax.axhline(target[0], color="k", ls="--", lw=1, label=target[1])
        ax.axhline(1.0, color="k", lw=0.8)
        _decorate(ax, "filter size k", "unfold time / time", f"H×W = {H}×{W}, blur {blur}", log_y=True)
    _finish(plt, fig, path)
    return True


def plot_roofline(rows, path: Path, device: str) -> bool:
    mp = [r for r in rows if r["mode"] == "message_pass" and not math.isnan(r["roofline_frac"])]
    panels = k_panels(mp, "message_pass")
    if not panels:
        return False
    plt, fig, axes = _axes(len(panels), f"Message-passing kernel: fraction of its roofline - {device}")
    C, B = _common(mp, "C"), _common(mp, "B")
    for ax, (H, W, blur) in zip(axes, panels, strict=True):
        for impl in _impls(mp):
            s = _series(mp, impl, H=H, W=W, blur=blur, C=C, B=B)
            if s:
                color, marker = STYLE[impl]
                ax.plot([r["k"] for r in s], [r["roofline_frac"] for r in s], color=color, marker=marker,
                        label=impl)
        ax.axhline(0.5, color="k", ls="--", lw=1, label="50% (SPEC §7 target)")
        title = f"grid {pooled(H, blur)}×{pooled(W, blur)} (H×W = {H}×{W}, blur {blur}), C={C}"
        _decorate(ax, "filter size k", "roofline time / measured time", title, log_y=True)
    _finish(plt, fig, path)
    return True


def make_plots(out: Path, device_type: str | None = None) -> list[Path]:
    rows = read_rows(out / "bench.csv")
    meta = _read_meta(out)
    device = meta.get("device", rows[0]["device"] if rows else "?")
    device_type = device_type or meta.get("device_type", "cpu")
    made = []
    for name, ok in (
        ("time_vs_filter_size.png", lambda p: plot_time_vs_k(rows, p, device)),
        ("time_vs_resolution.png", lambda p: plot_time_vs_resolution(rows, p, device)),
        ("memory_vs_filter_size.png", lambda p: plot_memory_vs_k(rows, p, device)),
        ("speedup_vs_unfold.png", lambda p: plot_speedup(rows, p, device, device_type)),
        ("message_pass_roofline.png", lambda p: plot_roofline(rows, p, device)),
    ):
        if ok(out / name):
            made.append(out / name)
    return made


def _read_meta(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _ms(r: dict[str, Any]) -> str:
    return f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}–{r['p80_ms']:.4g}]"


def write_summary(out: Path) -> Path:
    """``summary.md``: the headline tables of a results folder (pasted into bench/README.md)."""
    rows = read_rows(out / "bench.csv")
    meta = _read_meta(out)
    model = _model(rows)
    lines = [f"# Benchmark results: {meta.get('device', '?')}", ""]
    c0 = rows[0] if rows else {}
    lines += [f"torch {c0.get('torch', '?')}, triton {c0.get('triton', '?') or '-'}, commit {c0.get('commit', '?')}, "
              f"{c0.get('date', '?')}; torch threads: {meta.get('threads', '?')}; flush denormals: "
              f"{'yes' if meta.get('flush_denormal') else 'no'}; {meta.get('seconds', '?')} s in all.",
              "Load average (1/5/15 min) during the run: "
              + "; ".join(f"{e['when']}: {'/'.join(map(str, e['load']))}" for e in meta.get("loadavg", [])) + ".",
              f"Timing: {meta.get('timing_method', '?')}. Memory: {meta.get('memory_method', '?')}.", ""]
    ceil = meta.get("ceilings", {})
    if ceil:
        lines += [f"Measured ceilings: copy {ceil.get('copy_gbs', math.nan):.1f} GB/s (read + write), "
                  f"fp32 matmul {ceil.get('matmul_gflops', math.nan):.1f} GFLOP/s.", ""]
    dense = {(r["H"], r["W"], r["C"], r["B"]): r for r in rows if r["mode"] == "densecrf"
             and not math.isnan(r["median_ms"])}
    impls = [i for i in _impls(model) if i != "pydensecrf"]
    # headline: k = 7 and 11 at every (H, W, blur) that has them
    panels = k_panels(model)
    C, B = (_common(model, "C"), _common(model, "B")) if model else (0, 0)
    heads = sorted({(r["H"], r["W"], r["blur"]) for r in model if r["k"] in (7, 11) and (r["C"], r["B"]) == (C, B)},
                   key=lambda p: (p[0] * p[1], p[2]))
    if heads:
        lines += [f"## Full inference ({NUM_ITER} iterations), C={C}, B={B}: ms median [p20–p80], peak extra MB, "
                  "speed-up over unfold", "",
                  "| H×W | blur | k | implementation | time [ms] | peak MB | × unfold |",
                  "|---|---|---|---|---|---|---|"]
        for H, W, blur in heads:
            for k in (7, 11):
                base = next((r for r in _series(model, "unfold", H=H, W=W, blur=blur, C=C, B=B) if r["k"] == k),
                            None)
                for impl in impls:
                    r = next((r for r in _series(model, impl, H=H, W=W, blur=blur, C=C, B=B) if r["k"] == k), None)
                    if r is None:
                        continue
                    sp = f"{base['median_ms'] / r['median_ms']:.1f}×" if base else "–"
                    lines.append(f"| {H}×{W} | {blur} | {k} | {impl} | {_ms(r)} | {r['peak_mem_mb']:.4g} | {sp} |")
                d = dense.get((H, W, C, B))
                if d and base:
                    sp = f"{base['median_ms'] / d['median_ms']:.2f}×" if base else "–"
                    lines.append(f"| {H}×{W} | – | – | pydensecrf (full CRF) | {_ms(d)} | {d['peak_mem_mb']:.4g} "
                                 f"| {sp} |")
        lines.append("")
    if panels:
        for H, W, blur in panels:
            ks = sorted({r["k"] for r in model if (r["H"], r["W"], r["blur"], r["C"], r["B"]) == (H, W, blur, C, B)})
            lines += [f"### Time vs filter size, {H}×{W}, blur {blur} (median ms)", "",
                      "| implementation | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for impl in impls:
                by_k = {r["k"]: r for r in _series(model, impl, H=H, W=W, blur=blur, C=C, B=B)}
                lines.append(f"| {impl} | " + " | ".join(f"{by_k[k]['median_ms']:.4g}" if k in by_k else "–"
                                                        for k in ks) + " |")
            lines.append("")
    other = [r for r in model if not any((r["H"], r["W"], r["blur"]) == p for p in [*panels, *heads])
             or r["C"] != C or r["B"] != B]
    if other:
        lines += ["## Other resolutions, classes and batch sizes (median ms [p20–p80], peak MB)", "",
                  "| H×W | C | B | blur | k | implementation | time [ms] | peak MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(other, key=lambda r: (r["H"] * r["W"], r["C"], r["B"], r["blur"], r["k"],
                                               impls.index(r["implementation"]))):
            lines.append(f"| {r['H']}×{r['W']} | {r['C']} | {r['B']} | {r['blur']} | {r['k']} | {r['implementation']} "
                         f"| {_ms(r)} | {r['peak_mem_mb']:.4g} |")
        lines.append("")
    if dense:
        lines += ["## pydensecrf (full CRF, matched parameters, 5 iterations)", "",
                  "| H×W | C | B | time [ms] | peak MB |", "|---|---|---|---|---|"]
        for (H, W, C, B), r in sorted(dense.items(), key=lambda kv: kv[0][0] * kv[0][1]):
            lines.append(f"| {H}×{W} | {C} | {B} | {_ms(r)} | {r['peak_mem_mb']:.4g} |")
        lines.append("")
    mp = [r for r in rows if r["mode"] == "message_pass" and not math.isnan(r["median_ms"])]
    if mp:
        lines += ["## Message passing alone (one pass on the pooled grid): achieved vs roofline", "",
                  "| H×W | blur | k | implementation | time [ms] | GFLOP/s | GB/s | roofline fraction |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(mp, key=lambda r: (r["H"] * r["W"], r["blur"], r["k"], r["implementation"])):
            lines.append(f"| {r['H']}×{r['W']} | {r['blur']} | {r['k']} | {r['implementation']} | {_ms(r)} "
                         f"| {r['gflops']:.4g} | {r['gbs']:.4g} | {r['roofline_frac']:.3g} |")
        lines.append("")
        fused = {(r["H"], r["W"], r["blur"], r["k"]): r["median_ms"] for r in mp
                 if r["implementation"] == "triton-fused"}
        two = {(r["H"], r["W"], r["blur"], r["k"]): r["median_ms"] for r in mp
               if r["implementation"] == "triton-two-pass"}
        both = sorted(set(fused) & set(two))
        if both:
            lines += ["Fused vs two-pass message pass (which is faster; the two-pass time excludes building K):", "",
                      "| H×W | blur | k | faster | fused / two-pass |", "|---|---|---|---|---|"]
            for key in both:
                lines.append(f"| {key[0]}×{key[1]} | {key[2]} | {key[3]} | "
                             f"{'fused' if fused[key] < two[key] else 'two-pass'} | {fused[key] / two[key]:.2f} |")
            lines.append("")
    checks = meta.get("checks", [])
    if checks:
        worst = max((c for c in checks if c["implementation"] not in LOW_PRECISION_IMPLS),
                    key=lambda c: c["max_rel_diff"], default=checks[0])
        lines += [f"Outputs agree: {len(checks)} comparisons of whole-model outputs between implementations, the "
                  f"largest relative difference {worst['max_rel_diff']:.1e} ({worst['implementation']} vs "
                  f"{worst['against']}, {worst['case']}).", ""]
        for impl, what in ((BF16_IMPL, "bfloat16 storage"), (TF32_IMPL, "tf32 products")):
            agreement = [c["label_agreement"] for c in checks if c["implementation"] == impl]
            if agreement:
                lines += [f"{what}: labels agree with the float32 output on {min(agreement):.2%} to "
                          f"{max(agreement):.2%} of pixels ({len(agreement)} cases).", ""]
    skipped = meta.get("skipped", [])
    if skipped:
        lines += [f"Skipped ({len(skipped)}):", ""]
        lines += [f"- {s['implementation']} {s['case']}: {s['why']}" for s in skipped]
        lines.append("")
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}")
    errors = meta.get("errors", [])
    if errors:
        lines += ["", f"Errors ({len(errors)}):", ""] + [f"- {e['implementation']} {e['case']}: {e['error']}"
                                                        for e in errors]
    path = out / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", item)
        if not m:
            raise argparse.ArgumentTypeError(f"expected sizes as HxW[,HxW...], got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convcrf-triton bench",
        description="Speed vs filter size and resolution, peak memory and roofline of every ConvCRF "
                    "implementation on one device; CSV + PNG plots + summary.md.",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu (Triton rows need CUDA)")
    p.add_argument("--filter-sizes", type=_ints, default=None, help="filter sizes of the k sweep, e.g. 3,5,7")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench-results/<device-slug>)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny images, k=3,5,7 (seconds)")
    p.add_argument("--blurs", type=_ints, default=None, help="blur factors (default 1,4)")
    p.add_argument("--k-resolutions", type=_sizes, default=None, help="HxW list of the filter-size sweep")
    p.add_argument("--resolutions", type=_sizes, default=None, help="HxW list of the resolution sweep")
    p.add_argument("--res-filter-size", type=int, default=None, help="k of the resolution sweep (default 11)")
    p.add_argument("--classes", type=int, default=None, help="C (default 21)")
    p.add_argument("--baseline-max-k", type=int, default=None, help="largest k for the unfold baseline (15)")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats per row on the CPU (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; rows after it are skipped and listed (default: 450 on CUDA, none on CPU)")
    p.add_argument("--implementations", default=None,
                   help="comma-separated subset of " + ",".join([*MODEL_IMPLS, "pydensecrf"]))
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of filter_size,message_pass,resolution,classes_batch,densecrf")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) for the run (CPU: avoids the slow x86 denormal path)")
    p.add_argument("--no-plots", action="store_true", help="CSV and summary only")
    p.add_argument("--plot-only", action="store_true", help="redraw plots and summary.md from --out/bench.csv")
    return p


def _sweep_from_args(args: argparse.Namespace) -> Sweep:
    sweep = quick_sweep() if args.quick else (cuda_sweep() if args.device == "cuda" else cpu_sweep())
    if args.quick and args.device == "cuda":
        sweep.time_budget_s = None
    for name, attr in (("filter_sizes", "filter_sizes"), ("blurs", "blurs"), ("k_resolutions", "k_resolutions"),
                       ("resolutions", "res_resolutions"), ("res_filter_size", "res_filter_size"),
                       ("classes", "classes"), ("baseline_max_k", "baseline_max_k"), ("repeat", "repeat")):
        value = getattr(args, name)
        if value is not None:
            setattr(sweep, attr, value)
    if args.k_resolutions is not None:
        sweep.mp_resolutions = list(args.k_resolutions)
    if args.time_budget is not None:
        sweep.time_budget_s = args.time_budget if args.time_budget > 0 else None
    for k in [*sweep.filter_sizes, sweep.res_filter_size]:
        if k % 2 == 0 or not 3 <= k <= 31:
            raise ValueError(f"filter size {k} is not allowed: expected odd values in 3..31")
    for b in sweep.blurs:
        if not (b == 1 or (b >= 2 and b % 2 == 0)):
            raise ValueError(f"blur {b} is not allowed: expected 1 or an even integer")
    return sweep


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``convcrf-triton bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    if args.threads is None and args.quick and args.device == "cpu":
        args.threads = 1  # CI-sized: one thread is steady on a shared machine
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    try:
        # The sweep tunes in its own process (autotune.csv: the picks it timed), not from picks an earlier run kept.
        with mock.patch.dict(os.environ, CONVCRF_TUNE_CACHE="0"):
            return _main(args)
    finally:
        torch.set_num_threads(threads)
        if args.flush_denormal:
            torch.set_flush_denormal(False)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _main(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        out = Path("bench-results") / device_description(args.device, torch.get_num_threads())[1]
    if args.plot_only:
        if not (out / "bench.csv").is_file():
            print(f"error: --plot-only needs {out / 'bench.csv'}", file=sys.stderr)
            return 2
        for path in [*make_plots(out), write_summary(out)]:
            print(f"wrote {path}")
        return 0
    try:
        sweep = _sweep_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .baselines import densecrf_available

    wanted = set(args.implementations.split(",")) if args.implementations else None
    known = {*MODEL_IMPLS, "pydensecrf"}
    if wanted is not None and not wanted <= known:
        print(f"error: unknown implementations {sorted(wanted - known)}; known: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    impls = [i for i in MODEL_IMPLS if (wanted is None or i in wanted)]
    sections = args.sections.split(",") if args.sections else None
    if sections is not None and not set(sections) <= set(SECTIONS):
        print(f"error: unknown sections {sorted(set(sections) - set(SECTIONS))}; known: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    notes = []
    if args.device == "cpu" and any(i in TRITON_IMPLS for i in impls):
        impls = [i for i in impls if i not in TRITON_IMPLS]
        notes.append("Triton rows (triton-fused, triton-two-pass) are skipped on the CPU: there the Triton path is "
                     "only the interpreter, whose timings say nothing about the kernels.")
    mp_impls = [i for i in impls if (i != "unfold" or args.device == "cuda") and i not in MODEL_ONLY_IMPLS]
    densecrf = (wanted is None or "pydensecrf" in wanted) and densecrf_available()
    if not densecrf and (wanted is None or "pydensecrf" in wanted):
        notes.append("pydensecrf rows are skipped: `import pydensecrf.densecrf` failed "
                     "(pip install pydensecrf2, the `compare` extra).")
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(ValueError):  # not the main thread: no handler, SIGTERM ends the run as usual
        signal.signal(signal.SIGTERM, _raise_interrupt)
    bench = Bench(args, sweep, out)
    bench.meta["notes"] += notes
    for n in notes:
        bench.log(n)
    bench.log(f"device {bench.device_name}; results in {out}")
    bench.run(impls, mp_impls, densecrf, sections)
    written = [bench.csv_path, out / "meta.json"]
    if not args.no_plots:
        try:
            written += make_plots(out, args.device)
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib, the `bench` extra)", file=sys.stderr)
    written.append(write_summary(out))
    for path in written:
        print(f"wrote {path}")
    if bench.meta["errors"]:
        print(f"{len(bench.meta['errors'])} rows failed (see {out / 'meta.json'})", file=sys.stderr)
    return 1 if bench.meta.get("interrupted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
