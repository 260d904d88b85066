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
