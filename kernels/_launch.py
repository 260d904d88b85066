"""What every launcher needs: interpreter detection, block sizes, index width, input checks."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.overrides import has_torch_function
from torch.utils._python_dispatch import _get_current_dispatch_mode

MAX_INT32 = 2**31 - 1
# What every launch compiles with (the interpreter ignores it): multiply-adds fused into FFMA, named because
# triton 3.9 warns that its default turns to unfused in 3.10, which would split every one of the kernels'
# multiply-adds in two (and round twice).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` is a constexpr function: ~3 µs a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (>= 1), on the host (``triton.next_power_of_2``: ~4 µs a call)."""
    return 1 << max(n - 1, 0).bit_length()


# Whether ``@triton.jit`` made this package's kernels interpreter objects: triton decides when the decorator runs, at
# import, from TRITON_INTERPRET (and so do we, once: the launchers ask at every launch, and an environment lookup
# is ~1 µs of host time).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were imported)."""
    return INTERPRETING


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset of these tensors overflows int32 (then kernels index in int64)."""
    return any(t.numel() > MAX_INT32 for t in tensors)


def interpreter_blocks(C: int, hw: int) -> tuple[int, int]:
    """One large ``(BLOCK_C, BLOCK_P)`` tile per small image: the interpreter's cost grows with the
    number of programs, not with the block size."""
    return min(next_power_of_2(C), 256), min(next_power_of_2(hw), 4096)


def tuning_off(configs: list) -> list:
    """``CONVCRF_AUTOTUNE=0``: the first surviving autotune config, no benchmarking (quick GPU test runs)."""
    return configs[:1] if os.environ.get("CONVCRF_AUTOTUNE", "1") == "0" else configs


def check_on_device(**tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if interpreting():
        return
    for name, t in tensors.items():
        if not t.is_cuda:  # (an attribute: t.device builds a device object, ~0.5 µs a tensor)
            raise ValueError(
                f"{name} is on {t.device}: the Triton backend needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for CPU tensors); use backend='torch' on the CPU"
            )


# The tensor types a launcher takes without the dispatcher (not fake, no subclass's __torch_dispatch__); a
# module's parameters are passed as they are.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class LibraryOp:
    """A launcher registered as the ``torch.library`` custom op ``name`` (``op``: what ``torch.compile`` captures
    as one node and autograd differentiates; ``op.register_fake`` and ``op.register_autograd`` as usual), called
    as its plain Python function ``fn`` where nothing needs the op: not compiling or tracing (``torch.jit``,
    ``torch.fx``), no dispatch mode, plain tensors or parameters, none of which requires grad with grad enabled.
    The dispatcher's round trip costs ~8 µs of host time a call on this project's CPU (a do-nothing op: 9.9 µs
    through it, 1.7 direct; ``bench/host_overhead.py``), against 12-23 µs of our launchers' own Python: small
    images, launch-bound, pay it at every launch."""

    def __init__(self, name: str, fn: Callable[..., object]) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=())

    def __call__(self, *args: object) -> object:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
                or has_torch_function(args)):  # also fx proxies and __torch_function__ subclasses
            return self.op(*args)
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor) and (type(a) not in PLAIN_TENSORS or (grad and a.requires_grad)):
                return self.op(*args)
        return self.fn(*args)


def library_op(name: str) -> Callable[[Callable[..., object]], LibraryOp]:
    """Decorator: ``fn`` as a :class:`LibraryOp` named ``name``."""
    return lambda fn: LibraryOp(name, fn)
