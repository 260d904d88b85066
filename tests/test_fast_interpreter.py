"""The interpreter's patching skipped for helper calls (tests/fast_interpreter.py): same results, one patch a
launch, triton.language restored after it."""

import os

import fast_interpreter
import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="interpreter only")


@triton.jit
def _scaled(x, s):
    return x * s + tl.program_id(0)


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, N: tl.constexpr, CALLS: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros((N,), tl.float32)
    for i in tl.static_range(CALLS):
        acc += _scaled(x, i + 1.0)
    tl.store(out_ptr + offs, acc)


def test_helper_calls_skip_the_patch_and_compute_the_same():
    assert fast_interpreter.install()
    x = torch.randn(3 * 8)
    out = torch.empty_like(x)
    before = dict(fast_interpreter._calls)
    _helpers_kernel[(3,)](x, out, N=8, CALLS=5)
    want = x.view(3, 8) * 15 + 5 * torch.arange(3.0)[:, None]
    torch.testing.assert_close(out.view(3, 8), want)
    patched, skipped = (fast_interpreter._calls[key] - before[key] for key in ("patched", "skipped"))
    # The launch's own patch and each program's 5 helpers and tl.zeros (a helper of triton.language.standard,
    # which sees only triton.language.core: patched at its first call in a process, and left so by triton).
    assert patched + skipped == 1 + 3 * 6
    assert patched <= 2
    assert tl.core.is_builtin(tl.program_id)  # the launch's patch undone


@triton.jit
def _downcast_kernel(x_ptr, out_ptr, rtz_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty))
    tl.store(rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))


def test_bfloat16_stores_round_to_nearest_even_as_on_the_gpu():
    """float32 → bfloat16 rounds to nearest even (ties, carries into the exponent, subnormals, Inf, NaN): torch's
    conversion, and the GPU's ``cvt.rn.bf16.f32``; an explicit ``rtz`` still truncates; float16 is unchanged."""
    assert fast_interpreter.install()
    g = torch.Generator().manual_seed(7)
    ties = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2 - 2.0**-9, 3.0e38, 1e-40, -2.0**-130])
    x = torch.cat([torch.randn(52, generator=g) * 10.0 ** torch.randint(-30, 30, (52,), generator=g),
                   ties, torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])]).float()
    out, rtz = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.bfloat16)
    _downcast_kernel[(1,)](x, out, rtz, N=x.numel())
    want = x.to(torch.bfloat16)
    assert bool((out.view(torch.int16)[:-3] == want.view(torch.int16)[:-3]).all())  # bitwise (not ±0 and NaN)
    assert bool(out[-3].isnan()) and out[-2] == 0 and out[-1] == 0
    normal = x.isfinite() & (x.abs() >= torch.finfo(torch.float32).smallest_normal)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)  # the low 16 bits dropped
    assert bool((rtz[normal].float() == truncated[normal]).all())  # (the interpreter's own, for normal values)
    assert bool((out[normal].float() != rtz[normal].float()).any())  # (the two differ somewhere)
    half = torch.empty(x.shape, dtype=torch.float16)
    _downcast_kernel[(1,)](x, half, rtz, N=x.numel())
    assert bool((half[normal] == x[normal].half()).all())
