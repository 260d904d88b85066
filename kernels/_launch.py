"""What every launcher needs: interpreter detection, block sizes, index width, input checks."""

from __future__ import annotations

import os

import torch
import triton

MAX_INT32 = 2**31 - 1
# What every launch compiles with (the interpreter ignores it): multiply-adds fused into FFMA, named because
# triton 3.9 warns that its default turns to unfused in 3.10, which would split every one of the kernels'
# multiply-adds in two (and round twice).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset of these tensors overflows int32 (then kernels index in int64)."""
    return any(t.numel() > MAX_INT32 for t in tensors)


def interpreter_blocks(C: int, hw: int) -> tuple[int, int]:
    """One large ``(BLOCK_C, BLOCK_P)`` tile per small image: the interpreter's cost grows with the
    number of programs, not with the block size."""
    return min(triton.next_power_of_2(C), 256), min(triton.next_power_of_2(hw), 4096)


def tuning_off(configs: list) -> list:
    """``CONVCRF_AUTOTUNE=0``: the first surviving autotune config, no benchmarking (quick GPU test runs)."""
    return configs[:1] if os.environ.get("CONVCRF_AUTOTUNE", "1") == "0" else configs


def check_on_device(**tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for name, t in tensors.items():
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"{name} is on {t.device}: the Triton backend needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for CPU tensors); use backend='torch' on the CPU"
            )
