"""The tensor-core (banded matrix product) message pass against the float64 reference message pass."""

import pytest
import torch
from convcrf_triton.kernels import band_product as band
from test_kernels import RTOL, make_inputs, on_gpu_only, rel_err, step_inputs

from convcrf_triton import functional, kernels, reference

# (k, B, C, h, w): SPEC §7's k, grids smaller than a patch and not multiples of it, C from 1 to 150 (several
# class blocks).
CASES = [
    (3, 1, 1, 1, 1),
    (3, 2, 3, 7, 9),
    (5, 1, 19, 13, 1),
    (7, 1, 21, 9, 17),
    (11, 3, 5, 19, 23),
    (13, 1, 150, 9, 11),
    (31, 1, 3, 20, 21),
    *on_gpu_only((11, 1, 21, 188, 250), (31, 2, 19, 97, 131), (7, 1, 256, 64, 75)),
]


@pytest.mark.parametrize("k,B,C,h,w", CASES)
def test_band_message_pass_matches_reference(k, B, C, h, w, device):
    feats, compats, Q = make_inputs(k * 7 + C, B, C, h, w, (2, 3), device=device)
    K = reference.gaussian_weights(feats.double(), (2, 3), compats.double(), k, False)
    want = reference.message_pass(K, Q.double())
    got = kernels.band_message_pass(K.float(), Q)
    assert got.shape == Q.shape and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= RTOL * max(want.abs().max().item(), 1e-30)


@pytest.mark.parametrize("k", [7, 11, 21])
def test_band_message_pass_in_tf32_stays_within_3e_4(k, device):
    """One tf32 product per product on operands rounded to the nearest tf32: the issue keeps a tensor-core
    variant only within 3e-4 (relative to the largest message). Truncated operands, as the tensor cores take
    float32 ones, were 7-9e-4 off (H100): the rounding happens in the kernel, so the interpreter shows it too.
    tf32x3 keeps float32's accuracy."""
    feats, compats, Q = make_inputs(k, 1, 21, 30, 37, (2, 3), device=device)
    K = reference.gaussian_weights(feats.double(), (2, 3), compats.double(), k, False)
    want = reference.message_pass(K, Q.double())
    err = rel_err(kernels.band_message_pass(K.float(), Q, "tf32"), want)
    assert 1e-5 < err < 3e-4  # rounded (not float32), and close
    assert rel_err(kernels.band_message_pass(K.float(), Q, "tf32x3"), want) < 3e-6


def test_tf32_rounding_is_to_nearest_and_symmetric(device):
    """The operand rounding: float32 → nearest tf32 (10 mantissa bits), halves away from zero, sign kept
    (the convcrf mode's first pass reads log-probabilities)."""
    x = torch.tensor([1 + 2**-11, 1 + 2**-11 - 2**-23, 1 + 3 * 2**-11, 0.0, 3.0, 1 - 2**-12], device=device)
    want = torch.tensor([1 + 2**-10, 1.0, 1 + 2**-9, 0.0, 3.0, 1.0], device=device)
    for sign in (1, -1):
        K = torch.ones(1, 1, 1, x.numel(), device=device)
        got = kernels.band_message_pass(K, (sign * x).reshape(1, 1, 1, -1), "tf32")
        assert torch.equal(got.reshape(-1), sign * want)


@pytest.mark.gpu_only
def test_band_message_pass_offsets_past_int32_inside_a_patch(device):
    """k = 31 over 1024 × 2048: K's offsets fit int32 (2.0e9 elements, so no int64 indexing), but a patch's 62
    neighbourhood rows reach 61 · 31 planes past its first tap row."""
    g = torch.Generator(device).manual_seed(3)
    K = torch.rand(1, 31 * 31, 1024, 2048, device=device, generator=g)
    Q = torch.rand(1, 2, 1024, 2048, device=device, generator=g)
    assert rel_err(kernels.band_message_pass(K, Q), kernels.message_pass(K, Q).double()) < RTOL


def test_band_message_pass_reads_low_precision_weights(device):
    feats, compats, Q = make_inputs(9, 2, 4, 10, 12, (2, 3), device=device)
    K = kernels.gaussian_weights(feats, (2, 3), compats, 5, False, out_dtype=torch.bfloat16)
    want = reference.message_pass(K.double(), Q.double())
    assert rel_err(kernels.band_message_pass(K, Q), want) < RTOL


def test_band_message_pass_rejects_bad_arguments():
    K, Q = torch.rand(1, 9, 4, 5), torch.rand(1, 2, 4, 5)
    with pytest.raises(ValueError, match="precision='fp16' is not allowed"):
        kernels.band_message_pass(K, Q, "fp16")
    with pytest.raises(ValueError, match=r"K must be \[B, k\*k, h, w\]"):
        kernels.band_message_pass(torch.rand(1, 8, 4, 5), Q)
    with pytest.raises(ValueError, match="same grid"):
        kernels.band_message_pass(K, torch.rand(1, 2, 4, 6))
    with pytest.raises(ValueError, match="filter sizes up to 31, got k=33"):
        kernels.band_message_pass(torch.rand(1, 33 * 33, 4, 5), Q)
    assert band.PRECISIONS[0] == "tf32x3"


def test_switched_on_it_carries_the_blurred_inference(monkeypatch, device, every_call):
    """``kernels.band_product.BAND``: the pooled-grid message passes of inference go through the band kernel
    (the benchmark's triton-band whole-model rows); a pass whose input needs a gradient keeps the differentiable
    direct kernel."""
    monkeypatch.setattr(band, "BAND", True)
    calls = []
    op = kernels.band_message_pass
    monkeypatch.setattr(kernels, "band_message_pass", lambda *a, **kw: calls.append(1) or op(*a, **kw))
    g = torch.Generator().manual_seed(4)
    unary = (torch.randn(2, 3, 11, 14, generator=g) * 2).to(device)
    image = (torch.rand(2, 3, 11, 14, generator=g) * 255).to(device)
    kw = dict(filter_size=7, blur=2, num_iter=3, mode="convcrf")
    with torch.no_grad():
        got = functional.mean_field(unary, image, backend="triton", **kw)
    assert len(calls) == 3
    want = functional.mean_field(unary.double(), image.double(), backend="torch", **kw)
    assert rel_err(got, want) < RTOL
    grads = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        weight = torch.tensor(0.5, device=device, dtype=dtype, requires_grad=True)
        functional.mean_field(unary.to(dtype), image.to(dtype), backend=backend, weight=weight, **kw).sum().backward()
        grads.append(weight.grad)
    # Only the first pass (Q = L, no gradient to carry) may take the band kernel while training.
    assert len(calls) == 4 and abs(grads[0].item() - grads[1].item()) <= 1e-4 * abs(grads[1].item())


def test_band_precision_by_filter_size_and_switch(monkeypatch):
    assert [band.band_precision(k, "tf32") for k in (3, 5, 7, 21, 23, 31)] == [None, None, "tf32", "tf32", None, None]
    assert band.band_precision(11) is None and band.band_precision(11, "float32") is None
    assert band.band_precision(11, "tf32", step=True) is None  # the blur-1 step stays direct
    monkeypatch.setattr(band, "BAND", True)
    assert band.band_precision(3) == band.band_precision(11, "tf32") == band.band_precision(7, step=True) == "tf32x3"


@pytest.mark.parametrize("k,blur,routed", [(7, 2, True), (9, 4, True), (5, 2, False), (7, 1, False)])
def test_tf32_precision_routes_inference_passes_to_the_band_kernel(k, blur, routed, monkeypatch, device, every_call):
    """``precision='tf32'``: inference's pooled-grid passes of k in 7..21 run on the band kernel in tf32; other
    filter sizes, and the blur-1 one-launch step, on the direct kernel. The messages are within 3e-4 (the test
    above); three iterations compound that to ~5e-4 of the refined logits."""
    precisions = []
    for name in ("band_message_pass", "band_mean_field_step"):
        op = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, op=op: precisions.append(a[-1]) or op(*a))
    case = dict(C=4, scalar=False, compat=blur == 2)
    unary, image, weight, compat = step_inputs(case, k, (9, 13), device)
    kw = dict(filter_size=k, blur=blur, num_iter=3, weight=weight)
    with torch.no_grad():
        got = functional.mean_field(unary, image, compat_matrix=compat, backend="triton", precision="tf32", **kw)
    assert precisions == (["tf32"] * 3 if routed else [])
    want = functional.mean_field(unary.double(), image.double(), compat_matrix=None if compat is None else
                                 compat.double(), backend="torch", **{**kw, "weight": weight.double()})
    assert rel_err(got, want) < (1e-3 if routed else RTOL)


@pytest.mark.gpu_only
def test_tf32_precision_keeps_the_labels_on_the_gpu(device):
    """One tf32 product per product puts the messages ~1e-4 off; mean-field amplifies that only where classes
    tie. A CPU emulation (K and Q rounded to tf32 in the PyTorch path) keeps 99.999% of voc7's labels: the GPU
    must keep 99.5% of these harsher random ones."""
    for k, blur in ((11, 2), (7, 4)):
        unary, image, weight, _ = step_inputs(dict(C=21, scalar=False, compat=False), k, (130, 150), device)
        kw = dict(filter_size=k, blur=blur, weight=weight, backend="triton")
        with torch.no_grad():
            want = functional.mean_field(unary, image, **kw)
            got = functional.mean_field(unary, image, precision="tf32", **kw)
        assert not torch.equal(got, want)  # tf32 ran
        assert (got.argmax(1) == want.argmax(1)).double().mean().item() >= 0.995


# The one-launch mean-field step on the band kernel (blur 1, two-pass weights, inference), switched on.
STEP_CASES = [
    dict(k=3, C=2, mode="textbook", compat=False, scalar=True, final_softmax=False),
    dict(k=7, C=21, mode="convcrf", compat=True, scalar=False, final_softmax=True),
    dict(k=11, C=64, mode="textbook", compat=False, scalar=False, final_softmax=False),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_band_step_matches_reference(case, monkeypatch, device, every_call):
    monkeypatch.setattr(band, "BAND", True)
    calls = []
    op = kernels.band_mean_field_step
    monkeypatch.setattr(kernels, "band_mean_field_step", lambda *a, **kw: calls.append(1) or op(*a, **kw))
    unary, image, weight, compat = step_inputs(case, case["k"] + case["C"], (9, 13), device)
    kw = dict(filter_size=case["k"], blur=1, num_iter=3, mode=case["mode"], compat_matrix=compat,
              final_softmax=case["final_softmax"])
    with torch.no_grad():
        got = functional.mean_field(unary, image, weight=weight, backend="triton", **kw)
    assert len(calls) == 3
    ref = {**kw, "compat_matrix": None if compat is None else compat.double()}
    want = functional.mean_field(unary.double(), image.double(), weight=weight.double(), backend="torch", **ref)
    if case["final_softmax"]:  # probabilities: judged on the logits' scale
        logits = functional.mean_field(unary.double(), image.double(), weight=weight.double(), backend="torch",
                                       **{**ref, "final_softmax": False})
        assert (got.double() - want).abs().max().item() < RTOL * logits.abs().max().item()
    else:
        assert rel_err(got, want) < RTOL


def test_band_step_limits(monkeypatch):
    monkeypatch.setattr(band, "BAND", True)
    K, Q = torch.rand(1, 9, 4, 5), torch.softmax(torch.rand(1, 65, 4, 5), 1)
    with pytest.raises(ValueError, match="up to 64 classes"):
        kernels.band_mean_field_step(Q, Q, torch.tensor(0.5), None, K, True)
    with pytest.raises(ValueError, match=r"up to 32 classes \(32 with a compat_matrix\)"):
        kernels.band_mean_field_step(Q[:, :33], Q[:, :33], torch.tensor(0.5), torch.zeros(33, 33), K, True)
    with pytest.raises(ValueError, match="weight must hold 1 or C=3"):
        kernels.band_mean_field_step(Q[:, :3], Q[:, :3], torch.ones(2), None, K, True)
    calls = []
    step = kernels.mean_field_step
    monkeypatch.setattr(kernels, "mean_field_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    with torch.no_grad():  # 65 classes: the direct step
        functional.mean_field(torch.randn(1, 65, 4, 5), torch.rand(1, 3, 4, 5) * 255, filter_size=3, blur=1, num_iter=2,
                              backend="triton")
    assert len(calls) == 2
