"""Gradients: float64 gradcheck of the reference path for every input and parameter, the Triton backward
(under the interpreter) against the reference's autograd, and gradients that must be exactly zero."""

import pytest
import torch

from convcrf_triton import ConvCRF, functional

MODES = [
    dict(filter_size=3, blur=1, mode="textbook"),
    dict(filter_size=5, blur=2, mode="convcrf"),
    dict(filter_size=3, blur=2, mode="textbook", norm="sym", col_use_pos=True),
    dict(filter_size=5, blur=1, mode="convcrf", norm="sym"),
    dict(filter_size=3, blur=2, mode="textbook", label_compat=True),  # ([C, C] pos_compat, col_compat)
    dict(filter_size=3, blur=1, mode="textbook", col_use_pos=True, anisotropic=True),  # (a bandwidth a channel)
]
ids = ["-".join(f"{k}={v}" for k, v in m.items()) for m in MODES]


def _inputs(seed, B, C, H, W, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(B, C, H, W, generator=g, dtype=dtype) * 2
    image = torch.rand(B, 3, H, W, generator=g, dtype=dtype) * 255
    return unary, image


def _params(C, dtype, seed=0, label_compat=False, anisotropic=False):
    """Every learnable quantity, as leaf tensors: per-class weight, compat weights (``label_compat``: ``[C, C]``
    label-compatibility matrices), log-bandwidths (``anisotropic``: one a channel), 1×1 compat."""
    g = torch.Generator().manual_seed(seed)

    def compat(value):
        return torch.randn(C, C, generator=g, dtype=dtype) * value if label_compat else torch.tensor(value, dtype=dtype)

    return {
        "weight": (torch.rand(1, C, 1, 1, generator=g, dtype=dtype) * 0.5 + 0.1),
        "pos_compat": compat(3.0),
        "col_compat": compat(10.0),
        "log_pos_sdims": torch.tensor([2.0, 4.0] if anisotropic else 3.0, dtype=dtype).log(),
        "log_col_sdims": torch.tensor([9.0, 6.0] if anisotropic else 8.0, dtype=dtype).log(),
        "log_col_schan": torch.tensor([30.0, 50.0, 80.0] if anisotropic else 40.0, dtype=dtype).log(),
        "compat_matrix": torch.randn(C, C, generator=g, dtype=dtype) * 0.2,
    }


def _run(unary, image, p, backend, num_iter=2, label_compat=False, anisotropic=False, **mode):
    return functional.mean_field(
        unary, image, num_iter=num_iter, backend=backend, weight=p["weight"], pos_compat=p["pos_compat"],
        col_compat=p["col_compat"], pos_sdims=p["log_pos_sdims"].exp(), col_sdims=p["log_col_sdims"].exp(),
        col_schan=p["log_col_schan"].exp(), compat_matrix=p["compat_matrix"], **mode,
    )


@pytest.mark.parametrize("mode", MODES, ids=ids)
def test_gradcheck_reference_every_input_and_parameter(mode):
    unary, image = _inputs(1, 2, 3, 5, 6)
    params = _params(3, torch.float64, label_compat=mode.get("label_compat", False),
                     anisotropic=mode.get("anisotropic", False))
    names = list(params)

    def f(unary, image, *values):
        return _run(unary, image, dict(zip(names, values, strict=True)), "torch", **mode)

    inputs = [t.requires_grad_() for t in (unary, image, *params.values())]
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
@pytest.mark.parametrize("mode", MODES, ids=ids)
def test_triton_backward_matches_reference(mode, fused, device, monkeypatch):
    """Relative error ≤ 1e-5 against float64, or no worse than 4× the float32 reference's own error: a
    scalar gradient summed over every pixel and tap (e.g. a compat weight's, 1e3 times smaller than its
    terms) loses digits to cancellation in float32 whatever the implementation. The reference's error is the
    larger of its two float32 backwards': the written-out one and autograd's through the plain ops (their sums in
    other orders: 1.7e-5 and 4.2e-5 of a compat weight's gradient where the Triton backward's is 8.3e-5). Both ways
    of learning the weights: the two-pass op that reads K (learned_message_pass, where K is allowed) and the fused
    op."""
    from convcrf_triton import kernels, reference

    monkeypatch.setattr(kernels, "prefer_fused", lambda *args: fused)
    unary, image = _inputs(2, 2, 4, 9, 11, torch.float32)
    grad_out = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend, dtype, plain in (("torch", torch.float64, False), ("torch", torch.float32, False),
                                  ("torch", torch.float32, True), ("triton", torch.float32, False)):
        params = {k: v.to(device, dtype).requires_grad_()
                  for k, v in _params(4, torch.float64, label_compat=mode.get("label_compat", False),
                                      anisotropic=mode.get("anisotropic", False)).items()}
        u, im = unary.to(device, dtype).requires_grad_(), image.to(device, dtype).requires_grad_()
        with monkeypatch.context() as patch:
            if plain:
                patch.setattr(reference, "written_backward", lambda *tensors: False)
            _run(u, im, params, backend, **mode).backward(grad_out.to(device, dtype))
        grads[backend, dtype, plain] = {"unary": u.grad, "image": im.grad, **{k: v.grad for k, v in params.items()}}
    for name, want in grads["torch", torch.float64, False].items():
        got = grads["triton", torch.float32, False][name]
        if not mode.get("col_use_pos") and name == "log_col_sdims":
            assert got is None and want is None
            continue

        def rel(x, want=want):
            return ((x.double() - want).abs().max() / want.abs().max()).item()

        ref32 = max(rel(grads["torch", torch.float32, plain][name]) for plain in (False, True))
        assert rel(got) < max(1e-5, 4 * ref32), f"{name}: {rel(got):.2e} (float32 reference: {ref32:.2e})"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_gradient_outside_the_reach_of_the_window(backend):
    """After T iterations with blur 1 a pixel only sees unaries within T·(k//2) pixels (Chebyshev)."""
    unary, image = _inputs(4, 1, 2, 13, 12, torch.float32)
    unary.requires_grad_()
    out = functional.mean_field(unary, image, filter_size=3, blur=1, num_iter=3, backend=backend)
    out[0, :, 0, 0].sum().backward()
    reach = 3 * 1
    grad = unary.grad[0].abs().sum(0)
    assert bool((grad[reach + 1 :, :] == 0).all()) and bool((grad[:, reach + 1 :] == 0).all())
    assert bool((grad[: reach + 1, : reach + 1] > 0).any())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_colour_bandwidth_gradient_on_a_flat_image(backend):
    """With a constant image every colour difference is 0, so the colour Gaussian is 1 whatever θ_β."""
    crf = ConvCRF(3, filter_size=5, blur=2, num_iter=2, trainable=True, backend=backend)
    unary, _ = _inputs(5, 1, 3, 8, 9, torch.float32)
    image = torch.full((1, 3, 8, 9), 77.0)
    crf(unary, image).square().sum().backward()
    assert crf.log_col_schan.grad is not None and crf.log_col_schan.grad.item() == 0.0
    assert crf.log_pos_sdims.grad.abs().item() > 0 and crf.col_compat.grad.abs().item() > 0
