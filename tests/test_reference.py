"""The reference path against the independent float64 loop oracle (tests/oracle.py) on tiny inputs.

Every mode of SPEC §1: textbook and original-compatible, merged and ``norm='sym'``, blur 1/2/4 with odd
sizes, ``col_use_pos``, scalar and per-class weights, the 1×1 compatibility, a label-compatibility matrix per
Gaussian, anisotropic bandwidths, ``final_softmax``.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracle import naive_crf

from convcrf_triton import baselines, functional, reference

CASES = [
    dict(filter_size=3, blur=1, mode="textbook"),
    dict(filter_size=3, blur=1, mode="convcrf"),
    dict(filter_size=5, blur=2, mode="textbook", norm="sym", merge=False),
    dict(filter_size=3, blur=4, mode="convcrf", norm="sym", merge=False),
    dict(filter_size=5, blur=1, mode="textbook", col_use_pos=True, final_softmax=True),
    dict(filter_size=3, blur=2, mode="convcrf", convcomp=True),
    dict(filter_size=7, blur=4, mode="textbook", scalar_weight=True),
    dict(filter_size=5, blur=2, mode="textbook", norm="sym", merge=False, label_compat=True),
    dict(filter_size=3, blur=1, mode="convcrf", merge=False, label_compat=True, convcomp=True),
    dict(filter_size=5, blur=2, mode="textbook", col_use_pos=True, anisotropic=True),
    dict(filter_size=3, blur=1, mode="textbook", norm="sym", merge=False, col_use_pos=True, anisotropic=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("H,W", [(7, 9), (5, 6), (1, 4)])
def test_reference_matches_loop_oracle(case, H, W):
    case = dict(case)
    rng = np.random.default_rng(H * 100 + W + case["filter_size"])
    B, C = 2, 3
    unary = rng.normal(size=(B, C, H, W)) * 2
    image = rng.uniform(0, 255, size=(B, 3, H, W))
    weight = 0.7 if case.pop("scalar_weight", False) else rng.uniform(0.1, 0.9, size=C)
    compat = rng.normal(size=(C, C)) * 0.2 if case.pop("convcomp", False) else None
    params = dict(pos_sdims=2.5, pos_compat=3.0, col_sdims=5.0, col_schan=40.0, col_compat=4.0, unary_weight=1.1)
    if case.pop("anisotropic", False):  # (a bandwidth a channel: rows, columns; r, g, b)
        params.update(pos_sdims=np.array([1.5, 4.0]), col_sdims=np.array([6.0, 3.0]), col_schan=np.array([20, 40, 90.]))
    if case.pop("label_compat", False):
        params.update(pos_compat=rng.normal(size=(C, C)) * 3, col_compat=rng.normal(size=(C, C)) * 4)
    want = naive_crf(unary, image, num_iter=3, weight=weight, compat=compat, **params, **case)
    case.pop("merge", None)
    params = {name: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for name, v in params.items()}
    got = functional.mean_field(
        torch.from_numpy(unary), torch.from_numpy(image), num_iter=3, backend="torch",
        weight=torch.as_tensor(weight, dtype=torch.float64).reshape(1, -1, 1, 1),
        compat_matrix=None if compat is None else torch.from_numpy(compat), **params, **case,
    )
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_message_pass_is_symmetric_adjoint():
    """<M(Q), G> = <Q, M(G)>: the Gaussian kernel is symmetric, which the Triton backward relies on."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    K = reference.gaussian_weights(feats, (2, 3), torch.tensor([3.0, 10.0], dtype=torch.float64), 7, True)
    Q, G = torch.randn(2, 2, 4, 9, 11, generator=g, dtype=torch.float64)
    lhs = (reference.message_pass(K, Q) * G).sum()
    rhs = (Q * reference.message_pass(K, G)).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_reference_is_differentiable_in_every_input():
    g = torch.Generator().manual_seed(1)
    unary = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    image = (torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64) * 255).requires_grad_()
    theta = torch.tensor(13.0, dtype=torch.float64, requires_grad=True)
    weight = torch.full((1, 2, 1, 1), 0.3, dtype=torch.float64, requires_grad=True)

    def f(unary, image, theta, weight):
        return functional.mean_field(unary, image, filter_size=3, blur=2, num_iter=2, col_schan=theta,
                                     weight=weight, backend="torch")

    assert torch.autograd.gradcheck(f, (unary, image, theta, weight), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("band_bytes", [1, 3 * 2 * 4 * 11 * 8], ids=["1-row", "3-rows"])
def test_message_pass_in_row_bands_equals_one_band(band_bytes, dtype, monkeypatch):
    """Row bands (1 row, or 3 rows of float64 / 6 of float32, the last band shorter: h = 13) give every element
    the same multiply-adds in the same order as one band over the whole image: equal to the last bit."""
    monkeypatch.setattr(reference, "_TAP_ROWS_PER_TAP", 0)  # (a tap at a time, as on larger grids)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 13, 11, generator=g, dtype=dtype)
    K = reference.gaussian_weights(feats, (2, 3), torch.tensor([3.0, 10.0], dtype=dtype), 5, False)
    Q = torch.rand(2, 4, 13, 11, generator=g, dtype=dtype)
    whole = reference.message_pass(K, Q)
    monkeypatch.setattr(reference, "_BAND_BYTES", band_bytes)
    banded = reference.message_pass(K, Q)
    assert torch.equal(banded, whole) and whole.abs().min() > 0


def _weights_tap_by_tap(feats, dims, compats, k, keep_centre, floor=None):
    """Every tap computed on its own (no mirroring), in the operations' order of ``gaussian_weights``."""
    B, D, h, w = feats.shape
    r = k // 2
    padded = torch.nn.functional.pad(feats, (r, r, r, r))
    inside = torch.nn.functional.pad(feats.new_ones(h, w), (r, r, r, r))
    K = feats.new_zeros(B, k * k, h, w)
    for t in range(k * k):
        dy, dx = divmod(t, k)
        sq = (padded[:, :, dy : dy + h, dx : dx + w] - feats).square()
        start, weight = 0, None
        for g, c in enumerate(dims):
            gauss = reference._floored_exp(sq[:, start : start + c].sum(1).mul(-0.5), floor) * compats[g]
            weight = gauss if weight is None else weight + gauss
            start += c
        K[:, t] = weight * inside[dy : dy + h, dx : dx + w]
    if not keep_centre:
        K[:, k * k // 2] = 0
    return K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "h", "w"), [(3, 7, 9), (5, 2, 11), (11, 13, 4), (7, 1, 1), (13, 6, 20)])
@pytest.mark.parametrize("shear_pixels", [0, 64, reference._SHEAR_PIXELS], ids=["per-tap", "either", "sheared"])
def test_mirrored_taps_equal_the_taps_computed(k, h, w, dtype, shear_pixels, monkeypatch):
    """Half the taps are copies of the others, shifted (the weight is symmetric): the numbers of each tap computed
    on its own, including the taps that reach outside the image (to the bit with one or two channels a Gaussian;
    PyTorch may sum five channels in another order for another layout), and ``K`` symmetric to the bit. Copied a
    tap at a time and through the sheared view, in chunks of one tap row (``_CHUNK_ELEMENTS``) and of all."""
    monkeypatch.setattr(reference, "_SHEAR_PIXELS", shear_pixels)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1 if shear_pixels == 64 else reference._CHUNK_ELEMENTS)
    g = torch.Generator().manual_seed(k * 100 + h)
    for dims in ((2, 3), (5,)):
        feats = torch.randn(2, 5, h, w, generator=g, dtype=dtype) * 2
        compats = torch.rand(len(dims), generator=g, dtype=dtype) + 0.5
        for keep_centre in (False, True):
            got = reference.gaussian_weights(feats, dims, compats, k, keep_centre)
            want = _weights_tap_by_tap(feats, dims, compats, k, keep_centre)
            if dims == (2, 3):
                assert torch.equal(got, want)
            else:
                # (an ulp of a channel sum s moves exp(-s / 2) by s / 2 ulps; s / 2 <= 41 at the weights' floor)
                torch.testing.assert_close(got, want, rtol=100 * torch.finfo(dtype).eps, atol=0)
            r = k // 2
            for t in range(k * k):  # K[t(-d), p] = K[t(d), p - d] wherever p - d lies in the image
                dy, dx = t // k - r, t % k - r
                y, x = max(dy, 0), max(dx, 0)
                rows, cols = h - abs(dy), w - abs(dx)
                if rows > 0 and cols > 0:
                    assert torch.equal(got[:, k * k - 1 - t, y : y + rows, x : x + cols],
                                       got[:, t, y - dy : y - dy + rows, x - dx : x - dx + cols])


def _message_pass_by_unfold(K, Q):
    """``M[b, c, p] = sum_t K[b, t, p] * Q[b, c, p + d_t]`` through ``F.unfold``: the original ConvCRF's form
    (``baselines``), on the full grid."""
    B, _, h, w = Q.shape
    k = int(round(K.shape[1] ** 0.5))
    return baselines._unfold_compute(Q, K.view(B, k, k, h, w), 1, (0, 0))


@pytest.mark.parametrize(("k", "h", "w", "B"), [(3, 7, 9, 2), (5, 2, 11, 1), (7, 6, 5, 1), (9, 4, 13, 2),
                                                (11, 3, 2, 1), (5, 1, 1, 1)])
def test_written_out_gradients_equal_autograds_of_the_plain_forms(k, h, w, B):
    """The gradients that ``_GaussianWeights`` and ``_MessagePass`` write out, in float64, against autograd's
    through the weights tap by tap (no mirrored taps) and the message pass by unfold: random features scaled so
    that some exponents lie below the floor (no gradient there: a floor of 0.05 makes that visible), ``Q`` with
    values below its floor (zeroed by the pass, no gradient), every tap's weights random and both ways of the
    centre tap."""
    g = torch.Generator().manual_seed(k * 1000 + h * 10 + w)
    C, f64 = 4, dict(dtype=torch.float64)
    for dims, scale, floor in (((2, 3), 1.0, None), ((5,), 2.0, None), ((2, 3), 6.0, None), ((2, 3), 1.5, 0.05)):
        for keep_centre in (False, True):
            feats = (torch.randn(B, 5, h, w, generator=g, **f64) * scale).requires_grad_()
            compats = (torch.rand(len(dims), generator=g, **f64) + 0.5).requires_grad_()
            grad_K = torch.randn(B, k * k, h, w, generator=g, **f64)
            got = torch.autograd.grad(reference.gaussian_weights(feats, dims, compats, k, keep_centre, floor=floor),
                                      (feats, compats), grad_K)
            want = torch.autograd.grad(_weights_tap_by_tap(feats, dims, compats, k, keep_centre, floor),
                                       (feats, compats), grad_K)
            for x, y in zip(got, want, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12 * max(y.abs().max().item(), 1e-300))
    K = torch.randn(B, k * k, h, w, generator=g, **f64).requires_grad_()
    Q = torch.randn(B, C, h, w, generator=g, **f64)
    Q = Q.where(torch.rand(Q.shape, generator=g) < 0.8, Q * 1e-160).requires_grad_()  # (a fifth below the floor)
    grad_M = torch.randn(B, C, h, w, generator=g, **f64)
    got = torch.autograd.grad(reference.message_pass(K, Q), (K, Q), grad_M)
    floor = reference._flush_below(torch.float64)
    want = torch.autograd.grad(_message_pass_by_unfold(K, torch.nn.functional.hardshrink(Q, floor)), (K, Q), grad_M)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12 * y.abs().max().item())
    assert (got[1] == 0).sum() >= (Q.abs() <= floor).sum() > 0


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_written_out_gradients_keep_their_operands_dtypes(storage):
    """A float32 ``Q`` with ``K`` stored in ``storage``: the gradients come in the operands' dtypes and equal
    autograd's through the plain ops (the pass's ``_message_pass``, not the ``autograd.Function``) to rounding:
    float32's, or the storage's (autograd summed a mirrored tap's gradient into its tap's in the storage dtype)."""
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2, 5, 9, 10, generator=g).requires_grad_()
    compats = torch.tensor([3.0, 10.0], requires_grad=True)
    Q = torch.rand(2, 3, 9, 10, generator=g).requires_grad_()
    grad_M = torch.randn(2, 3, 9, 10, generator=g)
    inputs = (feats, compats, Q)

    def run(weights, message_pass):
        K = weights(feats, (2, 3), compats, 5, False, storage, None)
        return torch.autograd.grad(message_pass(K, Q), inputs, grad_M)

    got = run(reference.gaussian_weights, reference.message_pass)
    want = run(reference._gaussian_weights, reference._message_pass)
    for x, y, t in zip(got, want, inputs, strict=True):
        assert x.dtype == t.dtype
        tol = max(1e-5, torch.finfo(storage).eps)
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * y.abs().max().item())


def test_eager_gradients_are_written_out_and_traced_ones_autograds():
    """Eager, the two ops record their ``autograd.Function`` (autograd through their plain ops cloned a ``K``- or
    ``Q``-sized gradient a tap: ~18× the inference's time at blur 1 on the CPU); traced, the plain ops."""
    feats = torch.randn(1, 5, 6, 7, requires_grad=True)
    K = reference.gaussian_weights(feats, (2, 3), torch.tensor([3.0, 10.0]), 3, False)
    M = reference.message_pass(K, torch.rand(1, 2, 6, 7))
    assert type(K.grad_fn).__name__ == "_GaussianWeightsBackward"
    assert type(M.grad_fn).__name__ == "_MessagePassBackward"
    with torch.no_grad():
        assert reference.message_pass(K, torch.rand(1, 2, 6, 7)).grad_fn is None

    def traced(feats):
        return reference.message_pass(reference.gaussian_weights(feats, (2, 3), torch.tensor([3.0, 10.0]), 3, False),
                                      feats[:, :2])

    names = set()

    def backend(gm, example_inputs):
        names.update(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(traced, backend=backend, fullgraph=True)(feats)
    assert not any("Function" in n or "autograd" in n for n in names) and any("addcmul" in n for n in names)


def test_mirrored_taps_are_differentiable():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    compats = torch.tensor([3.0, 10.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, c: reference.gaussian_weights(f, (2, 3), c, 5, False), (feats, compats))


@pytest.mark.parametrize(("blur", "col_use_pos"), [(1, True), (1, False), (2, False)])
def test_sym_norm_in_float32_where_every_weight_lies_below_the_floor(blur, col_use_pos):
    """A random image: many pixels' colour weights all lie below float32's weight floor (1.1e-18), and
    ``norm='sym'``'s normaliser 1 / sqrt(sum K + 1e-20) scales them by up to 1e20. Floored, they sent O(1)
    messages (fuzz case 293664190: 0.30 of the largest output off float64); the float32 path stays within
    rounding of the float64 one."""
    g = torch.Generator().manual_seed(293664190)
    unary = torch.randn(3, 3, 8, 16, generator=g, dtype=torch.float64) * 3
    image = torch.rand(3, 3, 8, 16, generator=g, dtype=torch.float64) * 255
    kw = dict(filter_size=5, blur=blur, num_iter=3, norm="sym", col_use_pos=col_use_pos, final_softmax=True,
              backend="torch")
    want = functional.mean_field(unary, image, **kw)
    got = functional.mean_field(unary.float(), image.float(), **kw)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 5e-6  # (measured 2.0-4.8e-7)


FIRST_CALLS = """
import torch
import convcrf_triton  # noqa: F401
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    x = (torch.rand(6084, generator=g, dtype=torch.float64) * 4 + 0.1).to(dtype)
    for op in (torch.exp, torch.log, torch.sqrt):
        assert torch.equal(op(x), op(x)), (op.__name__, dtype)
"""


def test_a_process_first_vector_math_is_as_accurate_as_the_next():
    """MKL picks a vector-math function's kernel on its first call, and one of several threads making that call at
    once can take a low-accuracy one (pytorch/pytorch#188792): importing the package settles it
    (``reference._settle_mkl_dispatch``). Fresh processes with 2 threads: the first ``exp``, ``log`` and ``sqrt``
    of 6084 values equal the second, in 6 processes one after the other (without the settling, 4 processes of 10
    failed here, ``exp`` float32 up to 1.5e-4 off; 8 processes at once never failed: the race wants idle cores)."""
    for _ in range(6):
        run = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [False, True])
def test_weights_below_the_floor_are_zero_and_none_is_denormal(dtype, tiny):
    """A row of features whose neighbours' exponents -x²/2 straddle the floor's: each weight is exp(-x²/2) above
    the floor and 0 below it (a sliver within the clamp's rounding either), never a denormal number (the ``exp`` of
    ``log(tiny)`` rounded down, in float32, was one: x86 computes and multiplies those on its slow path)."""
    floor = torch.finfo(dtype).tiny if tiny else reference._flush_below(dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(400, generator=g, dtype=torch.float64) * 2 * math.sqrt(-2 * math.log(floor))  # (|x|: 0 to 2x)
    feats = torch.cumsum(x, 0).to(dtype).view(1, 1, 1, -1)
    K = reference.gaussian_weights(feats, (1,), torch.ones(1, dtype=dtype), 3, False,
                                   floor=floor if tiny else None).double()
    f = feats.double().flatten()
    want = torch.exp(-0.5 * (f[1:] - f[:-1]) ** 2)  # (the weight between x and x + 1, both ways)
    for got in (K[0, 5, 0, :-1], K[0, 3, 0, 1:]):
        above, below = want > floor * (1 + 1e-4), want < floor * (1 - 1e-4)
        assert above.sum() > 100 and below.sum() > 100
        torch.testing.assert_close(got[above], want[above], rtol=200 * torch.finfo(dtype).eps, atol=0)
        assert (got[below] == 0).all() and (got[got != 0] >= floor).all()
    assert (K[0, [0, 1, 2, 4, 6, 7, 8]] == 0).all()


def _every_tap(K, Q):
    """The message pass as the definition reads, every tap over ``Q`` padded with zeros."""
    k, (h, w) = round(K.shape[1] ** 0.5), Q.shape[-2:]
    padded = torch.nn.functional.pad(Q, [k // 2] * 4)
    return sum(K[:, t : t + 1] * padded[:, :, t // k : t // k + h, t % k : t % k + w] for t in range(k * k))


@pytest.mark.parametrize("tap_rows", [False, True], ids=["a-tap-at-a-time", "a-row-of-taps-at-a-time"])
def test_message_pass_skips_the_taps_it_is_told_are_zero(tap_rows, monkeypatch):
    """``taps`` (:func:`reference.live_taps`) and the taps outside the image: the same numbers, to the bit, a tap
    at a time or (small grids) a row of taps at a time, both the definition's within rounding."""
    if not tap_rows:
        monkeypatch.setattr(reference, "_TAP_ROWS_PER_TAP", 0)
    g = torch.Generator().manual_seed(3)
    K = torch.rand(2, 49, 5, 9, generator=g)
    K[:, ::3] = 0
    Q = torch.randn(2, 4, 5, 9, generator=g)
    taps = reference.live_taps(K)
    assert taps == [t for t in range(49) if t % 3] and reference.live_taps(torch.rand(1, 9, 2, 2)) is None
    negative = -K  # (a merged Gaussian's compat weights may be negative: a tap of negative weights is live)
    negative[1, 3, 4, 8] = -1.0
    assert reference.live_taps(negative) == sorted([3, *taps])
    assert torch.equal(reference.message_pass(K, Q, taps), reference.message_pass(K, Q))
    torch.testing.assert_close(reference.message_pass(K, Q, taps), _every_tap(K, Q), rtol=1e-6, atol=1e-6)
    K, Q = torch.rand(1, 49, 2, 3, generator=g), torch.rand(1, 2, 2, 3, generator=g)  # (most taps reach out)
    torch.testing.assert_close(reference.message_pass(K, Q), _every_tap(K, Q), rtol=1e-6, atol=1e-6)
    K = torch.rand(2, 121, 6, 9, generator=g, dtype=torch.float64)
    K[:, :22] = 0  # (tap rows 0 and 1 dead)
    Q = torch.randn(2, 5, 6, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reference.message_pass(K, Q, reference.live_taps(K)), _every_tap(K, Q), rtol=1e-13,
                               atol=1e-13)


def test_small_grids_take_a_row_of_taps_at_a_time():
    """The pass on a small grid (DenseCRF2D's 31×31 window on a 16×16 pooled grid: ``M`` within the row path's
    bounds) against a tap at a time: the same sums in another order (float32 rounding)."""
    g = torch.Generator().manual_seed(6)
    K, Q = torch.rand(1, 31 * 31, 16, 16, generator=g), torch.rand(1, 21, 16, 16, generator=g)
    assert Q.numel() <= min(reference._TAP_ROWS_PER_TAP * 31, reference._TAP_ROWS_MAX_PRODUCT // 31)
    rows = reference.message_pass(K, Q)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "_TAP_ROWS_PER_TAP", 0)
        taps = reference.message_pass(K, Q)
    torch.testing.assert_close(rows, taps, rtol=2e-6, atol=0)
    torch.testing.assert_close(rows.double(), _every_tap(K.double(), Q.double()), rtol=2e-6, atol=0)


@pytest.mark.parametrize("blur", [1, 2])
def test_sym_norm_weights_keep_the_pass_normal(blur, monkeypatch):
    """``norm='sym'`` on the PyTorch path keeps weights down to float32's smallest normal number (the normaliser
    counts them), scaled by a power of two so that each is at least the pass operand's floor: their products stay
    normal (x86's fast path). The output equals the unscaled computation's within rounding."""
    g = torch.Generator().manual_seed(blur)
    unary = torch.randn(2, 4, 9, 14, generator=g) * 3
    image = ((torch.rand(2, 1, 9, 14, generator=g) > 0.5) * 80.0).expand(2, 3, 9, 14)  # (colour weights exp(-57))
    kw = dict(filter_size=5, blur=blur, pos_sdims=3.0, pos_compat=3.0, col_sdims=80.0, col_schan=13.0,
              col_compat=10.0, col_use_pos=True, norm="sym", keep_centre=False, ops=reference)
    with monkeypatch.context() as m:
        m.setattr(functional, "matrix_pass", lambda K, taps, symmetric=False: None)  # (K kept)
        passer = functional.MessagePasser(image, **kw)
    floor, unit = reference.normalised_weights(torch.float32)
    assert unit == 2.0 ** 67 and floor == torch.finfo(torch.float32).tiny
    smallest = [gauss.K[gauss.K > 0].min().item() for gauss in passer.gaussians]
    assert min(smallest) >= reference._flush_below(torch.float32)
    assert smallest[1] < 1e-10 * unit  # (colour weights far below float32's default floor, 1.1e-18, kept)
    run = dict(filter_size=5, blur=blur, num_iter=3, norm="sym", col_use_pos=True, final_softmax=True,
               backend="torch")
    got = functional.mean_field(unary, image, **run)
    monkeypatch.setattr(reference, "normalised_weights", lambda dtype, storage=None: (torch.finfo(dtype).tiny, 1.0))
    unscaled = functional.mean_field(unary, image, **run)
    torch.testing.assert_close(got, unscaled, rtol=1e-6, atol=1e-7)

