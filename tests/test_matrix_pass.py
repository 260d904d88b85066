"""The PyTorch path's message pass as matrix products (``convcrf_triton.matrix_pass``) against the definition."""

from __future__ import annotations

import pytest
import torch

from convcrf_triton import functional, matrix_pass, reference

FORMS = [matrix_pass.DensePass, lambda K: matrix_pass.BandPass(K, range(round(K.shape[1] ** 0.5)))]
# The band form's two ways from its channels-last products to the planar M: (form, matrix_pass._TRANSPOSE_ELEMENTS).
FORMS_AND_TRANSPOSES = [pytest.param(FORMS[0], 1 << 62, id="dense"), pytest.param(FORMS[1], 1 << 62, id="band"),
                        pytest.param(FORMS[1], 0, id="band-transposed")]


def _matrix(K):
    """``A[b, p, q]`` of the message pass, a pixel and tap at a time in float64: ``A[p, p + d_t] = K[t, p]`` where
    ``p + d_t`` lies in the grid."""
    B, kk, h, w = K.shape
    k = round(kk**0.5)
    A = torch.zeros(B, h * w, h * w, dtype=torch.float64)
    for t in range(kk):
        dy, dx = t // k - k // 2, t % k - k // 2
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    A[:, y * w + x, (y + dy) * w + x + dx] = K[:, t, y, x].double()
    return A


def _definition(K, Q):
    """``M = A Q`` over the flattened pixels, ``Q`` flushed as the pass flushes it."""
    Qf = reference._pass_operand(Q, Q.dtype).double()
    return (Qf.flatten(2) @ _matrix(K).mT).view(Q.shape)


@pytest.mark.parametrize(("form", "transpose_elements"), FORMS_AND_TRANSPOSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(("B", "k", "h", "w"), [(1, 11, 13, 20), (2, 5, 2, 11), (2, 7, 1, 1), (1, 9, 6, 5),
                                                (1, 3, 9, 17), (2, 5, 7, 1), (1, 13, 3, 40)])
def test_each_form_equals_the_definition(form, transpose_elements, dtype, B, k, h, w, monkeypatch):
    """Random weights with a third of the taps 0, ``Q`` with a value below the pass's floor; ``K`` in float16 storage
    too (the products in float32). Against ``A Q`` in float64 (``A`` a pixel and tap at a time) and the window sums.
    Shapes: tiles cut by the image's edge (``w`` not a multiple of 8), grids narrower and shorter than the window;
    the band form's products moved to ``M`` both ways."""
    monkeypatch.setattr(matrix_pass, "_TRANSPOSE_ELEMENTS", transpose_elements)
    g = torch.Generator().manual_seed(k * 1000 + h * 10 + w)
    K = torch.rand(B, k * k, h, w, generator=g, dtype=torch.float64)
    K[:, 1::3] = 0
    K = K.to(dtype)
    Q = torch.randn(B, 3, h, w, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    Q[..., 0, 0] = 1e-39
    got = form(K)(Q)
    assert got.dtype == Q.dtype and got.shape == Q.shape and got.is_contiguous()
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), _definition(K, Q), rtol=tol, atol=tol)
    torch.testing.assert_close(got, reference.message_pass(K, Q), rtol=tol, atol=tol)


def test_band_rows_are_the_live_ones():
    """``BandPass`` over the rows of taps with a weight equals it over every row (the dead rows' bands are 0), and a
    row that reaches outside the grid everywhere is dropped."""
    g = torch.Generator().manual_seed(4)
    K = torch.rand(2, 81, 5, 19, generator=g)
    K.unflatten(1, (9, 9))[:, [0, 2, 3, 8]] = 0
    Q = torch.rand(2, 4, 5, 19, generator=g)
    live = matrix_pass.BandPass(K, [1, 4, 5, 6, 7])
    assert live.rows == [1, 4, 5, 6, 7] and live.bands.shape[1] == 5
    torch.testing.assert_close(live(Q), matrix_pass.BandPass(K, range(9))(Q), rtol=1e-6, atol=1e-6)
    assert matrix_pass.BandPass(torch.rand(1, 81, 3, 19), range(9)).rows == [2, 3, 4, 5, 6]  # (|dy| <= 2)


def test_matrix_pass_picks_the_form_the_sizes_call_for():
    """Dense where the grid is small against the taps reaching it, bands where their products are not many more
    than the window's, None where the window sums win, where the matrices would pass their bounds, where ``K``
    requires a gradient."""
    g = torch.Generator().manual_seed(8)
    pick = matrix_pass.matrix_pass
    assert isinstance(pick(torch.rand(1, 961, 16, 16, generator=g)), matrix_pass.DensePass)
    assert isinstance(pick(torch.rand(1, 49, 8, 8, generator=g)), matrix_pass.DensePass)
    assert isinstance(pick(torch.rand(1, 121, 30, 40, generator=g)), matrix_pass.BandPass)
    assert isinstance(pick(torch.rand(2, 25, 30, 40, generator=g)), matrix_pass.BandPass)
    assert pick(torch.rand(2, 9, 30, 40, generator=g)) is None  # (k = 3: 10 products a pixel against 3 sums)
    K = torch.rand(1, 121, 30, 40, generator=g)
    assert pick(K, [60]) is None  # (one live tap)
    assert isinstance(pick(K, list(range(55, 66))), matrix_pass.BandPass)  # (one row: 18 products against 11 sums)
    assert pick(K, [dy * 11 + 5 for dy in range(1, 10)]) is None  # (a tap a row: 9 · 18 against 9)
    assert pick(K.requires_grad_()) is None
    assert isinstance(pick(torch.zeros(1, 961, 60, 100)), matrix_pass.BandPass)  # (A: 6000² > _DENSE_ELEMENTS)
    assert pick(torch.zeros(1, 121, 1400, 1400)) is None  # (bands 11 · 1400 · 176 · 8 · 18 > _BAND_ELEMENTS)


def test_the_forms_are_differentiable_in_q():
    """``DensePass`` passes ``Q``'s gradient for any ``K``, ``BandPass`` for a symmetric one (a Gaussian's weights),
    and says it does not otherwise (float64 gradcheck; ``Q`` with a value below the flush, whose gradient is 0, and
    a gradient of 1e-30, which the gradient's pass keeps)."""
    g = torch.Generator().manual_seed(9)
    form = matrix_pass.DensePass(torch.rand(2, 25, 3, 4, generator=g, dtype=torch.float64))
    Q = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert form.differentiable and torch.autograd.gradcheck(form, (Q,))
    feats = torch.randn(2, 3, 6, 21, generator=g, dtype=torch.float64)
    K = reference.gaussian_weights(feats, (3,), torch.tensor([2.0], dtype=torch.float64), 5, False)
    assert not matrix_pass.BandPass(K, range(5)).differentiable
    form = matrix_pass.BandPass(K, range(5), symmetric=True)
    Q = torch.randn(2, 3, 6, 21, generator=g, dtype=torch.float64, requires_grad=True)
    assert form.differentiable and torch.autograd.gradcheck(form, (Q,))
    Q = Q.detach().clone()
    Q[0, 0, 0, 0] = 1e-300  # (gradcheck's step would cross the flush there)
    Q.requires_grad_()
    G = torch.full_like(Q, 1e-30)
    (grad,) = torch.autograd.grad(form(Q), Q, G)
    (want,) = torch.autograd.grad(reference.message_pass(K, Q), Q, G)  # (the written-out backward)
    assert grad[0, 0, 0, 0] == 0 and grad.abs().min() < 1e-30 < grad.abs().max()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", ["none", "sym"])
@pytest.mark.parametrize(("H", "W", "k", "blur", "form"), [(17, 22, 11, 1, "DensePass"), (17, 22, 5, 3, "DensePass"),
                                                            (30, 45, 5, 1, "BandPass"), (44, 52, 7, 2, "BandPass")])
def test_inference_through_the_matrix_forms_equals_the_window_sums(norm, H, W, k, blur, form, monkeypatch):
    """A whole inference with the message pass as matrix products and as window sums: the same within float32
    rounding, and the unary's gradient (the bands' own, by the weights' symmetry)."""
    g = torch.Generator().manual_seed(H + k)
    unary = torch.randn(2, 5, H, W, generator=g)
    image = torch.rand(2, 3, H, W, generator=g) * 255
    run = dict(filter_size=k, blur=blur, num_iter=3, norm=norm, col_use_pos=norm == "sym", final_softmax=True,
               backend="torch")
    used = []
    pick = matrix_pass.matrix_pass
    monkeypatch.setattr(functional, "matrix_pass", lambda K, taps, symmetric: used.append(
        (type(pick(K, taps)).__name__, K.requires_grad)) or pick(K, taps, symmetric))
    results = []
    for forms in (True, False):
        if not forms:
            monkeypatch.setattr(functional, "matrix_pass", lambda K, taps, symmetric: None)
        with torch.no_grad():
            out = functional.mean_field(unary, image, **run)
        u = unary.clone().requires_grad_()
        (functional.mean_field(u, image, **run) * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
        results.append((out, u.grad))
    assert (form, False) in used
    (matrix, matrix_grad), (window, window_grad) = results
    torch.testing.assert_close(matrix, window, rtol=1e-5, atol=1e-6)
    # (the gradient's sums cancel: an absolute bound, a part in 1e5 of its largest entry)
    torch.testing.assert_close(matrix_grad, window_grad, rtol=1e-4, atol=1e-5 * window_grad.abs().max().item())
