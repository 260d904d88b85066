"""The blurred iteration's full-resolution kernel (``kernels.blur_step``) against the PyTorch composition
it replaces (``blur_upsample``, add, softmax, ``blur_pool``) in float64, and its place in the mean-field loop."""

import pytest
import torch
from convcrf_triton.kernels import blur_iteration
from test_kernels import RTOL, on_gpu_only, rel_err

from convcrf_triton import functional, kernels

# (B, C, H, W, blur): padding on one or both sides, a single pooled row/column, non-power-of-two blur,
# C from 1 to 150.
CASES = [
    (2, 5, 13, 11, 4),
    (1, 21, 16, 16, 4),
    (1, 3, 7, 9, 3),
    (2, 2, 1, 5, 2),
    (1, 1, 6, 3, 2),
    (1, 19, 30, 17, 8),
    (1, 150, 2, 5, 2),
    *on_gpu_only(*[(c,) for c in [(1, 21, 512, 1024, 4), (2, 19, 250, 333, 3), (1, 150, 97, 131, 4),
                                  (3, 7, 301, 299, 8)]]),
]
OUTPUTS = [(True, True), (False, True), (False, False)]  # (pool, softmax)


@pytest.mark.parametrize("pool,softmax", OUTPUTS, ids=["pooled-probabilities", "probabilities", "logits"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_blur_step_matches_composition(case, pool, softmax, device):
    B, C, H, W, s = case
    g = torch.Generator().manual_seed(B * 1000 + C * 10 + s)
    h, w = -(-H // s), -(-W // s)
    A = torch.randn(B, C, H, W, generator=g) * 3
    M = torch.randn(B, C, h, w, generator=g) * 3
    Z = A.double() + functional.blur_upsample(M.double(), s, H, W)
    want = torch.softmax(Z, 1) if softmax else Z
    if pool:
        want = functional.blur_pool(want, s)
    got = kernels.blur_step(A.to(device), M.to(device), s, pool=pool, softmax=softmax)
    assert got.shape == want.shape and got.dtype == torch.float32
    # Probabilities are judged on the logits' scale (softmax is 1-Lipschitz in the max norm): the bilinear
    # source index is float32 arithmetic, as in PyTorch's float32 upsampling (1e-7 of an index of ~1000).
    scale = Z.abs().max() if softmax else want.abs().max()
    assert ((got.cpu().double() - want).abs().max() / scale).item() < RTOL


def test_blur_step_output_dtype_and_errors():
    A, M = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 2, 2)
    assert kernels.blur_step(A, M, 4, pool=False, softmax=False, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="blur must be an int >= 2"):
        kernels.blur_step(A, M, 1, pool=True, softmax=True)
    with pytest.raises(ValueError, match=r"message must be the pooled grid \(1, 3, 4, 4\)"):
        kernels.blur_step(A, M, 2, pool=True, softmax=True)
    with pytest.raises(ValueError, match="needs softmax=True"):
        kernels.blur_step(A, M, 4, pool=True, softmax=False)
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.blur_step(A[0], M, 4, pool=True, softmax=True)


def _counting(monkeypatch):
    calls = []
    step = kernels.blur_step
    monkeypatch.setattr(kernels, "blur_step", lambda *a, **kw: calls.append(kw) or step(*a, **kw))
    return calls


# The whole blurred model: one blur_step per iteration for inference with one merged Gaussian, the composed
# PyTorch path otherwise; both against the float64 reference backend.
MODEL_CASES = [
    dict(filter_size=5, blur=2, mode="convcrf", final_softmax=False),
    dict(filter_size=3, blur=4, mode="textbook", final_softmax=True, compat=True, per_class=True),
    dict(filter_size=7, blur=3, mode="textbook", final_softmax=False, storage="bfloat16"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_blurred_mean_field_runs_one_blur_step_per_iteration(case, monkeypatch, device):
    case = dict(case)
    g = torch.Generator().manual_seed(case["filter_size"] * 10 + case["blur"])
    B, C, H, W = 2, 5, 14, 19
    unary = (torch.randn(B, C, H, W, generator=g) * 2).to(device)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    if case.pop("compat", False):
        case["compat_matrix"] = (torch.randn(C, C, generator=g) * 0.1).to(device)
    if case.pop("per_class", False):
        case["weight"] = (torch.rand(1, C, 1, 1, generator=g) + 0.2).to(device)
    storage = case.pop("storage", "float32")
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = functional.mean_field(unary, image, num_iter=3, backend="triton", storage=storage, **case)
    assert [(c["pool"], c["softmax"]) for c in calls] == [(True, True), (True, True), (False, case["final_softmax"])]
    ref = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    want = functional.mean_field(unary.double(), image.double(), num_iter=3, backend="torch", **ref)
    if storage == "float32":
        assert rel_err(got, want) < RTOL
    else:  # the message pass reads bfloat16: compare with the same storage through the composed path
        monkeypatch.setattr(blur_iteration, "BLUR_STEP", False)
        with torch.no_grad():
            composed = functional.mean_field(unary, image, num_iter=3, backend="triton", storage=storage, **case)
        assert len(calls) == 3 and rel_err(got, composed) < 1e-4


@pytest.mark.parametrize("why", ["norm", "grad", "switched-off"])
def test_blurred_mean_field_composes_where_blur_step_does_not_apply(why, monkeypatch):
    g = torch.Generator().manual_seed(3)
    unary, image = torch.randn(1, 3, 9, 10, generator=g), torch.rand(1, 3, 9, 10, generator=g) * 255
    weight = torch.tensor(0.4, requires_grad=why == "grad")
    if why == "switched-off":
        monkeypatch.setattr(blur_iteration, "BLUR_STEP", False)
    calls = _counting(monkeypatch)
    kw = dict(filter_size=3, blur=2, num_iter=2, norm="sym" if why == "norm" else "none")
    got = functional.mean_field(unary, image, weight=weight, backend="triton", **kw)
    assert calls == []
    want = functional.mean_field(unary.double(), image.double(), weight=weight.detach().double(), backend="torch", **kw)
    assert rel_err(got.detach(), want) < RTOL


def test_blur_step_one_class_at_a_time(monkeypatch, device):
    """The GPU's class loop (one class per iteration) under the interpreter too, which otherwise takes every
    class at once: a ragged last block of the interpreter's class tile as well."""
    g = torch.Generator().manual_seed(11)
    A, M = torch.randn(2, 5, 9, 14, generator=g) * 3, torch.randn(2, 5, 3, 5, generator=g) * 3
    Z = A.double() + functional.blur_upsample(M.double(), 3, 9, 14)
    for block_c in (1, 2):
        monkeypatch.setattr(blur_iteration, "INTERPRETER_MAX_BLOCK_C", block_c)
        got = kernels.blur_step(A.to(device), M.to(device), 3, pool=True, softmax=True)
        want = functional.blur_pool(torch.softmax(Z, 1), 3)
        assert rel_err(got.cpu(), want) < RTOL
