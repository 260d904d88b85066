"""The reference path against the independent float64 loop oracle (tests/oracle.py) on tiny inputs.

Every mode of SPEC §1: textbook and original-compatible, merged and ``norm='sym'``, blur 1/2/4 with odd
sizes, ``col_use_pos``, scalar and per-class weights, the 1×1 compatibility, ``final_softmax``.
"""

import numpy as np
import pytest
import torch
from oracle import naive_crf

from convcrf_triton import functional, reference

CASES = [
    dict(filter_size=3, blur=1, mode="textbook"),
    dict(filter_size=3, blur=1, mode="convcrf"),
    dict(filter_size=5, blur=2, mode="textbook", norm="sym", merge=False),
    dict(filter_size=3, blur=4, mode="convcrf", norm="sym", merge=False),
    dict(filter_size=5, blur=1, mode="textbook", col_use_pos=True, final_softmax=True),
    dict(filter_size=3, blur=2, mode="convcrf", convcomp=True),
    dict(filter_size=7, blur=4, mode="textbook", scalar_weight=True),
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
    want = naive_crf(unary, image, num_iter=3, weight=weight, compat=compat, **params, **case)
    case.pop("merge", None)
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
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 13, 11, generator=g, dtype=dtype)
    K = reference.gaussian_weights(feats, (2, 3), torch.tensor([3.0, 10.0], dtype=dtype), 5, False)
    Q = torch.rand(2, 4, 13, 11, generator=g, dtype=dtype)
    whole = reference.message_pass(K, Q)
    monkeypatch.setattr(reference, "_BAND_BYTES", band_bytes)
    banded = reference.message_pass(K, Q)
    assert torch.equal(banded, whole) and whole.abs().min() > 0
