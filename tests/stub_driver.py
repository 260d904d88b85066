"""A stub CUDA driver for triton: kernels compile for a real target (sm_90) and every launch is recorded, not run.

With it the launchers' GPU branch runs on a CPU, without a GPU: triton's whole launch path (the autotuner, the
binder, the compile cache) up to the launcher, which receives the arguments a GPU launch would. Used by
``tests/test_direct_launch.py`` (in a child process, as triton must not be interpreting) and
``bench/host_overhead.py`` (host time of triton's path and of ``DirectLaunch``). Install it before the first
launch, with ``TRITON_INTERPRET`` unset when triton is imported; the launchers' device checks must be bypassed
(:func:`install` does it), as the tensors are CPU tensors. Their outputs are left as allocated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

ARCH = 90
MAX_LAUNCHES = 4096


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads): the function's handle the hash of its cubin."""
        return 0, hash(kernel), 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class StubDriver:
    """Triton's driver interface as far as compiling, tuning and launching use it; ``launches`` holds each
    launch's arguments: ``(grid_x, grid_y, grid_z, stream, function, packed metadata, launch metadata,
    enter hook, exit hook, *kernel arguments)``, the last ``MAX_LAUNCHES``, and ``devices`` the current device
    (``set_current_device``'s) at each. The tuner's timings are all equal
    (it keeps the first config) unless ``timings`` yields them; ``benchmarks`` counts them. With
    ``launch_when_timing`` a timing launches its config once, as a real one does (compiling it if it was not)."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launches: deque[tuple] = deque(maxlen=MAX_LAUNCHES)
        self.devices: deque[int] = deque(maxlen=MAX_LAUNCHES)  # the current device at each launch
        self.benchmarks = 0  # the tuner's timings taken
        self.timings: Iterator[float] | None = None
        self.launch_when_timing = False
        self.device = 0

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device: int) -> None:
        self.device = device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            self.benchmarks += 1
            if self.launch_when_timing:
                fn()
            t = 1.0 if self.timings is None else next(self.timings)
            return [t] * len(quantiles) if quantiles else t
        return bench

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(1)

    def clear_cache(self, cache: torch.Tensor) -> None:
        pass

    def launcher_cls(self, src, metadata):
        def launch(*args):
            self.launches.append(args)
            self.devices.append(self.device)
        return launch


def install() -> StubDriver:
    """Make a :class:`StubDriver` triton's active driver and let the launchers take CPU tensors."""
    from convcrf_triton.kernels import _launch, band_product, blur_iteration, features, merged_kernel, message_passing

    from convcrf_triton import functional

    stub = StubDriver()
    driver.set_active(stub)
    for module in (_launch, band_product, blur_iteration, features, merged_kernel, message_passing):
        module.check_on_device = lambda **tensors: None
    functional._interpreting = lambda: True  # (backend="triton" on CPU tensors)
    return stub
