"""Self-checks of the two oracles in ``tests/oracle.py``: against each other, torch's pooling/upsampling,
and a dense all-pairs formulation (blur 1). Shapes: unary ``[B, C, H, W]``, image ``[B, 3, H, W]``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import (
    blur_padding,
    convcrf_conf,
    naive_avg_pool,
    naive_crf,
    naive_upsample_bilinear,
    unfold_crf,
)

TOL = 1e-10


def _inputs(seed: int, B: int, C: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    unary = rng.normal(0.0, 2.0, (B, C, H, W))
    image = rng.uniform(0.0, 255.0, (B, 3, H, W))
    return unary, image



def _naive_kwargs(conf: dict[str, Any], C: int) -> dict[str, Any]:
    """Map an original config dict onto ``naive_crf`` keyword arguments (convcrf mode)."""
    assert conf["logsoftmax"] and conf["softmax"] and conf["weight"] in ("scalar", "vector")
    weight = conf["weight_init"] if conf["weight"] == "scalar" else np.full(C, conf["weight_init"])
    return dict(
        filter_size=conf["filter_size"],
        blur=conf["blur"],
        pos_sdims=conf["pos_feats"]["sdims"],
        pos_compat=conf["pos_feats"]["compat"],
        col_sdims=conf["col_feats"]["sdims"],
        col_schan=conf["col_feats"]["schan"],
        col_compat=conf["col_feats"]["compat"],
        col_use_pos=conf["col_feats"]["use_bias"],
        weight=weight,
        unary_weight=conf["unary_weight"],
        norm=conf["norm"],
        merge=conf["merge"],
        mode="convcrf",
        final_softmax=conf["final_softmax"],
    )


# --- building blocks ----------------------------------------------------------------------------------


def test_pooled_size_formula() -> None:
    for s in (2, 4, 6, 8, 16):
        for n in range(1, 70):
            pad = blur_padding(n, s)
            assert 2 * pad <= s
            pooled = (n + 2 * pad - s) // s + 1
            assert pooled == math.ceil(n / s), (n, s)
            assert pad + n <= pooled * s  # the crop fits in the upsampled grid
            out = F.avg_pool2d(torch.ones(1, 1, n, n), s, stride=s, padding=pad, count_include_pad=False)
            assert out.shape[-1] == pooled


@pytest.mark.parametrize("s", [1, 2, 4, 6])
@pytest.mark.parametrize("hw", [(1, 1), (5, 11), (8, 8), (7, 9), (3, 2)])
def test_naive_avg_pool_matches_torch(s: int, hw: tuple[int, int]) -> None:
    H, W = hw
    x = np.random.default_rng(1).normal(size=(3, H, W))
    ref = F.avg_pool2d(
        torch.from_numpy(x)[None],
        s,
        stride=s,
        padding=(blur_padding(H, s), blur_padding(W, s)),
        count_include_pad=False,
    )[0].numpy()
    got = naive_avg_pool(x, s)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("s", [1, 2, 4, 6])
@pytest.mark.parametrize("hw", [(1, 1), (1, 4), (3, 5), (4, 4)])
def test_naive_bilinear_matches_torch(s: int, hw: tuple[int, int]) -> None:
    x = np.random.default_rng(2).normal(size=(2, *hw))
    ref = F.interpolate(torch.from_numpy(x)[None], scale_factor=s, mode="bilinear", align_corners=False)
    got = naive_upsample_bilinear(x, s)
    assert got.shape == ref.shape[1:]
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=0, atol=1e-13)


# --- naive (convcrf mode) vs unfold -------------------------------------------------------------------

CASES = [
    # (seed, H, W, k, blur, conf overrides)
    (0, 7, 9, 3, 1, {}),
    (1, 8, 8, 5, 2, {}),
    (2, 5, 11, 3, 4, {}),
    (3, 7, 9, 5, 4, {}),
    (4, 8, 8, 3, 4, {"merge": False, "norm": "sym"}),
    (5, 7, 9, 5, 2, {"merge": False, "norm": "sym"}),
    (6, 5, 11, 3, 1, {"merge": False, "norm": "sym"}),
    (7, 7, 9, 3, 2, {"merge": False}),
    (8, 8, 8, 5, 1, {"convcomp": True}),
    (9, 7, 9, 3, 4, {"convcomp": True}),
    (10, 5, 11, 5, 2, {"weight": "scalar", "weight_init": 0.7, "unary_weight": 1.3}),
    (11, 8, 8, 3, 2, {"final_softmax": True}),
    (12, 7, 9, 3, 4, {"col_feats": {"use_bias": True, "sdims": 5}}),
    (13, 6, 7, 5, 1, {"pos_feats": {"sdims": 1.5, "compat": 2.0}, "col_feats": {"schan": 40, "compat": 4}}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_naive_matches_unfold_float64(case: tuple) -> None:
    seed, H, W, k, blur, over = case
    B, C, T = 2, 3, 3
    unary, image = _inputs(seed, B, C, H, W)
    conf = convcrf_conf(filter_size=k, blur=blur, **over)
    comp = None
    compat = None
    if conf["convcomp"]:
        g = torch.Generator().manual_seed(seed)
        comp = torch.randn(C, C, 1, 1, generator=g, dtype=torch.float64) * 0.3
        compat = comp[:, :, 0, 0].numpy()
    ref = unfold_crf(torch.from_numpy(unary), torch.from_numpy(image), conf, C, num_iter=T, comp_weight=comp)
    assert ref.dtype == torch.float64 and ref.shape == (B, C, H, W)
    got = naive_crf(unary, image, num_iter=T, compat=compat, **_naive_kwargs(conf, C))
    err = np.abs(got - ref.numpy()).max()
    assert err < TOL, err


def test_unfold_default_convcomp_weight() -> None:
    B, C, H, W = 1, 3, 5, 6
    unary, image = _inputs(20, B, C, H, W)
    conf = convcrf_conf(filter_size=3, blur=2, convcomp=True)
    ref = unfold_crf(torch.from_numpy(unary), torch.from_numpy(image), conf, C, num_iter=2)
    compat = np.full((C, C), 0.1 * math.sqrt(2.0 / C))
    got = naive_crf(unary, image, num_iter=2, compat=compat, **_naive_kwargs(conf, C))
    assert np.abs(got - ref.numpy()).max() < TOL


def test_unfold_float32_follows_dtype() -> None:
    B, C, H, W = 2, 3, 7, 9
    unary, image = _inputs(21, B, C, H, W)
    conf = convcrf_conf(filter_size=5, blur=2)
    u32, i32 = torch.from_numpy(unary).float(), torch.from_numpy(image).float()
    ref32 = unfold_crf(u32, i32, conf, C, num_iter=3)
    assert ref32.dtype == torch.float32
    got = naive_crf(unary, image, num_iter=3, **_naive_kwargs(conf, C))
    assert np.abs(got - ref32.double().numpy()).max() < 1e-4


# --- dense all-pairs formulation (blur 1), both modes --------------------------------------------------


def _dense_crf(
    unary: np.ndarray,
    image: np.ndarray,
    k: int,
    T: int,
    w: float,
    mode: str,
    pos_sdims: float = 3.0,
    pos_compat: float = 3.0,
    col_schan: float = 13.0,
    col_compat: float = 10.0,
) -> np.ndarray:
    """Vectorised all-pairs mean field for one image ``[C, H, W]`` with the k×k window as a pair mask."""
    C, H, W = unary.shape
    ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    ys, xs = ys.ravel().astype(float), xs.ravel().astype(float)
    rgb = image.reshape(3, -1)
    dpos = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    dcol = ((rgb[:, :, None] - rgb[:, None, :]) ** 2).sum(0)
    K = pos_compat * np.exp(-dpos / (2 * pos_sdims**2)) + col_compat * np.exp(-dcol / (2 * col_schan**2))
    r = k // 2
    K *= (np.abs(ys[:, None] - ys[None]) <= r) & (np.abs(xs[:, None] - xs[None]) <= r)
    if mode == "textbook":
        np.fill_diagonal(K, 0.0)
    u = unary.reshape(C, -1)
    L = u - u.max(0) - np.log(np.exp(u - u.max(0)).sum(0))
    q = L if mode == "convcrf" else np.exp(L) / np.exp(L).sum(0)
    Z = L
    for it in range(T):
        M = q @ K.T  # M[c, p] = Σ_q K[p, q] Q[c, q]
        Z = (1 - w) * L + w * M
        if it != T - 1:
            q = np.exp(Z - Z.max(0)) / np.exp(Z - Z.max(0)).sum(0)
    return Z.reshape(C, H, W)


def test_textbook_hand_computed_2x2() -> None:
    """k=3, blur=1, 2×2 image, C=2, one iteration, written out by hand."""
    unary = np.array([[[[1.0, 0.0], [0.5, -1.0]], [[0.0, 2.0], [0.5, 1.0]]]])
    image = np.zeros((1, 3, 2, 2))
    image[0, :, 0, 1] = 13.0  # pixel (0,1) differs from the others by 13 in each channel
    w = 0.2
    got = naive_crf(unary, image, filter_size=3, blur=1, num_iter=1, weight=w, mode="textbook")[0]
    # pos Gaussian: exp(-d²/18), d² ∈ {1, 2}; col Gaussian: 1 or exp(-3/2) (3 channels differ by 1 θ)
    gc = math.exp(-1.5)
    pix = [(0, 0), (0, 1), (1, 0), (1, 1)]
    L = unary[0] - np.log(np.exp(unary[0]).sum(0))
    Q = np.exp(L)
    expected = np.zeros((2, 2, 2))
    for p in pix:
        for c in range(2):
            m = 0.0
            for q in pix:
                if q == p:
                    continue
                d2 = (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2
                col = gc if ((p == (0, 1)) != (q == (0, 1))) else 1.0
                m += (3.0 * math.exp(-d2 / 18.0) + 10.0 * col) * Q[c, q[0], q[1]]
            expected[c, p[0], p[1]] = (1 - w) * L[c, p[0], p[1]] + w * m
    assert np.abs(got - expected).max() < 1e-13


@pytest.mark.parametrize("mode", ["textbook", "convcrf"])
@pytest.mark.parametrize("hwk", [(4, 5, 3), (5, 4, 5), (3, 4, 9)])
def test_naive_matches_dense_blur1(mode: str, hwk: tuple[int, int, int]) -> None:
    H, W, k = hwk
    unary, image = _inputs(30 + H * W + k, 2, 3, H, W)
    got = naive_crf(unary, image, filter_size=k, blur=1, num_iter=3, weight=0.3, mode=mode)
    for b in range(2):
        ref = _dense_crf(unary[b], image[b], k, 3, 0.3, mode)
        assert np.abs(got[b] - ref).max() < TOL


def test_textbook_differs_from_convcrf() -> None:
    unary, image = _inputs(40, 1, 3, 6, 6)
    kw = dict(filter_size=3, blur=2, num_iter=2)
    a = naive_crf(unary, image, mode="textbook", **kw)
    b = naive_crf(unary, image, mode="convcrf", **kw)
    assert np.abs(a - b).max() > 1e-3


def test_naive_rejects_bad_args() -> None:
    unary, image = _inputs(41, 1, 2, 3, 3)
    with pytest.raises(ValueError):
        naive_crf(unary, image, filter_size=3, blur=1, num_iter=1, norm="sym", merge=True)
    with pytest.raises(ValueError):
        naive_crf(unary, image, filter_size=3, blur=3, num_iter=1)
    with pytest.raises(ValueError):
        naive_crf(unary, image, filter_size=3, blur=1, num_iter=1, mode="other")
