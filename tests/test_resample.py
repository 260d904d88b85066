"""The blur path's resampling and the loop's softmax against PyTorch's own ops (float64, then float32).

``blur_pool`` is ``avg_pool2d(count_include_pad=False)`` on the centred grid, ``blur_upsample`` ``interpolate(
bilinear, align_corners=False)`` cropped: on CPU tensors they are separable passes of strided views, so every
grid shape that puts a border cell short (sizes below, at and above multiples of ``blur``, one pixel) is compared.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from convcrf_triton import functional, resample
from convcrf_triton.resample import blur_padding, blur_pool, blur_upsample

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 31]


def avg_pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    pad = (blur_padding(x.shape[-2], blur), blur_padding(x.shape[-1], blur))
    return F.avg_pool2d(x, blur, stride=blur, padding=pad, count_include_pad=False)


def bilinear(m: torch.Tensor, blur: int, H: int, W: int) -> torch.Tensor:
    up = F.interpolate(m, scale_factor=blur, mode="bilinear", align_corners=False)
    py, px = blur_padding(H, blur), blur_padding(W, blur)
    return up[:, :, py : py + H, px : px + W]


@pytest.fixture(params=["eager", "traced"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which forms run: the CPU's separable passes, or those ``torch.compile``/``torch.export`` trace (sums over
    the padded tensor, gathers and lerps: no size-dependent ints or slices), chosen as tracing chooses them."""
    if request.param == "traced":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("blur", [2, 3, 4, 5, 8])
def test_pool_and_upsample_equal_pytorchs_ops(blur: int, path: str) -> None:
    g = torch.Generator().manual_seed(blur)
    for H, W in itertools.product(SIZES, SIZES[::2]):
        assert blur_padding(H, blur) == math.ceil(((blur - H % blur) % blur) / 2)
        x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
        want = avg_pool(x, blur)
        got = blur_pool(x, blur)
        assert got.shape == want.shape == (2, 3, -(-H // blur), -(-W // blur))
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14, msg=f"pool {H}x{W}")
        m = torch.randn(want.shape, generator=g, dtype=torch.float64, requires_grad=True)
        got_up = blur_upsample(m, blur, H, W)
        assert got_up.shape == (2, 3, H, W)
        # (interpolate's source coordinate is (dst + 0.5) · (1 / blur) - 0.5 in float64; ours exact per phase)
        want_up = bilinear(m, blur, H, W)
        torch.testing.assert_close(got_up, want_up, rtol=1e-14, atol=1e-14, msg=f"upsample {H}x{W}")
        # (the gradients: eager, the separable passes' written-out adjoints; traced, autograd's through the ops
        # training under torch.compile differentiates)
        for a, b, wrt in ((got, want, x), (got_up, want_up, m)):
            weights = torch.randn(a.shape, generator=g, dtype=torch.float64)
            (ga,), (gb,) = (torch.autograd.grad((v * weights).sum(), wrt) for v in (a, b))
            torch.testing.assert_close(ga, gb, rtol=1e-13, atol=1e-13, msg=f"gradient {H}x{W}")


def test_pooled_positions_stay_exact(path: str) -> None:
    """The features' positions are means of integer rows: halves and integers, exact (the Triton features kernel
    writes them so)."""
    for blur, H in itertools.product([2, 3, 4, 8], SIZES):
        rows = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1).expand(1, 1, H, 3)
        got = blur_pool(rows, blur)[0, 0, :, 0]
        pad = blur_padding(H, blur)
        want = [sum(range(max(i * blur - pad, 0), min((i + 1) * blur - pad, H)))
                / (min((i + 1) * blur - pad, H) - max(i * blur - pad, 0)) for i in range(-(-H // blur))]
        assert got.tolist() == want, (blur, H)


def test_float32_and_strided_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 21, 37, 45, generator=g).to(memory_format=torch.channels_last)
    torch.testing.assert_close(blur_pool(x, 4), avg_pool(x.double(), 4).float(), rtol=1e-6, atol=1e-6)
    m = torch.randn(1, 21, 45, 10, generator=g).transpose(-1, -2)  # [1, 21, 10, 45], not contiguous
    torch.testing.assert_close(blur_upsample(m, 4, 37, 179), bilinear(m.double(), 4, 37, 179).float(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1, 1000, 1 << 30])
def test_separable_passes_by_chunks_of_planes(chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU passes run a chunk of (image, class) planes at a time: one plane a chunk, a few, all give the same
    numbers."""
    monkeypatch.setattr(resample, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(chunk_bytes)
    x = torch.randn(2, 5, 19, 23, generator=g, dtype=torch.float64)
    torch.testing.assert_close(blur_pool(x, 4), avg_pool(x, 4), rtol=1e-14, atol=1e-14)
    m = torch.randn(2, 5, 5, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(blur_upsample(m, 4, 19, 23), bilinear(m, 4, 19, 23), rtol=1e-14, atol=1e-14)


def test_gradients_equal_pytorchs_ops() -> None:
    """Under autograd both separable passes record an ``autograd.Function`` whose backward is their adjoint (a
    strided copy a phase for the pooling, two strided adds a phase for the upsampling), through two of each."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((blur_pool(x, 4) * blur_pool(up, 4)).sum(), x)
    (want,) = torch.autograd.grad((avg_pool(x, 4) * avg_pool(up, 4)).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-14, atol=1e-14)
    m = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((blur_upsample(m, 4, 11, 13) * up).sum(), m)
    (want,) = torch.autograd.grad((bilinear(m, 4, 11, 13) * up).sum(), m)
    torch.testing.assert_close(grad, want, rtol=1e-14, atol=1e-14)
    assert type(blur_pool(x, 4).grad_fn).__name__ == "_SeparablePoolBackward"
    assert type(blur_upsample(m, 4, 11, 13).grad_fn).__name__ == "_SeparableUpsampleBackward"


@pytest.mark.parametrize("grad", [False, True])
def test_softmax_of_sum(grad: bool) -> None:
    g = torch.Generator().manual_seed(3)
    u = (torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64) * 40).requires_grad_(grad)
    M = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64) * 40  # logits ~100 apart: the max matters
    want = torch.softmax(u + M, 1)
    with torch.set_grad_enabled(grad):
        got = functional.softmax_of_sum(u, M.clone())
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    if grad:
        up = torch.randn(want.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad((got * up).sum(), u)[0],
                                   torch.autograd.grad((want * up).sum(), u)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_of_sum_keeps_probabilities_normal(dtype: torch.dtype) -> None:
    """A peaked ``Q`` (logits thousands apart, as a natural image drives them): the CPU path raises the
    probabilities that would be denormal or zero to at least the dtype's smallest normal number (x86 computes
    denormals on a slow path), moving none by more than ``C · tiny`` (and rounding)."""
    g = torch.Generator().manual_seed(4)
    C = 6
    u = torch.randn(1, C, 5, 8, generator=g, dtype=dtype) * 1000
    M = torch.randn(1, C, 5, 8, generator=g, dtype=dtype)
    want = torch.softmax(u + M, 1)
    tiny = torch.finfo(dtype).tiny
    assert (want < tiny).any()  # (the case holds denormal or zero probabilities)
    with torch.no_grad():
        got = functional.softmax_of_sum(u, M.clone())
    assert got.min() >= tiny * (1 - 1e-6)
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, want, rtol=rtol, atol=C * tiny * (1 + rtol))
    torch.testing.assert_close(got.sum(1), torch.ones_like(got.sum(1)))


@pytest.mark.parametrize("blur", [1, 3, 4])
@pytest.mark.parametrize("mode", ["textbook", "convcrf"])
def test_float32_cpu_loop_stays_within_rounding_of_float64(blur: int, mode: str) -> None:
    """The whole PyTorch loop in float32 (in-place softmax with its floor, the separable resampling) against the
    same loop in float64, on logits far enough apart that probabilities fall below float32's smallest normal."""
    g = torch.Generator().manual_seed(5 + blur)
    unary = torch.randn(2, 7, 23, 30, generator=g, dtype=torch.float64) * 40
    image = torch.rand(2, 3, 23, 30, generator=g, dtype=torch.float64) * 255
    kw = dict(filter_size=5, blur=blur, num_iter=4, mode=mode, backend="torch")
    with torch.no_grad():
        want = functional.mean_field(unary, image, **kw)
        assert (torch.softmax(unary.float(), 1) < torch.finfo(torch.float32).tiny).any()
        got = functional.mean_field(unary.float(), image.float(), **kw)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6  # (measured 1.1-1.6e-7)
