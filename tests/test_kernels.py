"""Every Triton kernel against the PyTorch reference: run by Triton's interpreter on CPU tensors, or
compiled on the GPU with ``CONVCRF_TEST_DEVICE=cuda`` (the ``device`` fixture; larger shapes there, which
span many programs and the autotuned tile shapes).

The reference runs in float64 on the same device; the kernels compute in float32, so errors are relative
to the largest magnitude of the reference output (SPEC §7: 1e-5).
"""

import sys

import pytest
import torch
import triton
from convcrf_triton.kernels import _launch
from convcrf_triton.kernels import message_passing as mp

from convcrf_triton import functional, kernels, reference

RTOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-30)
    return ((got.double() - want.double()).abs().max() / scale).item()


def make_inputs(seed, B, C, h, w, dims, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, sum(dims), h, w, generator=g) * 0.7
    compats = torch.rand(len(dims), generator=g) * 5 + 0.5
    Q = torch.softmax(torch.randn(B, C, h, w, generator=g), 1).to(dtype)
    return feats.to(device), compats.to(device), Q.to(device)


def step_inputs(case, seed, size, device):
    """A mean-field-step case's inputs (2 images of ``case.get("size", size)``): unary logits, RGB image, ``w``
    (one value if ``case["scalar"]``, else per class) and the ``[C, C]`` compatibility or None."""
    g = torch.Generator().manual_seed(seed)
    B, C, (H, W) = 2, case["C"], case.get("size", size)
    unary = (torch.randn(B, C, H, W, generator=g) * 2).to(device)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    weight = (torch.tensor(0.3) if case["scalar"] else torch.rand(1, C, 1, 1, generator=g)).to(device)
    compat = (torch.randn(C, C, generator=g) * 0.1).to(device) if case["compat"] else None
    return unary, image, weight, compat


def on_gpu_only(*cases):
    """Cases too large for the interpreter: run with ``CONVCRF_TEST_DEVICE=cuda`` only."""
    return [pytest.param(*c, marks=pytest.mark.gpu_only) if isinstance(c, tuple) else
            pytest.param(c, marks=pytest.mark.gpu_only) for c in cases]


# (k, B, C, h, w, dims): k over SPEC §7's set, odd and degenerate sizes, C from 1 to 150, one or two
# Gaussians with 2, 3 and 5 feature channels.
CASES = [
    (3, 1, 1, 1, 1, (2, 3)),
    (3, 3, 2, 7, 9, (2, 3)),
    (5, 1, 19, 13, 1, (2,)),
    (5, 2, 21, 1, 17, (5,)),
    (7, 1, 21, 37, 45, (2, 3)),
    (11, 3, 5, 19, 23, (2, 5)),
    (13, 1, 150, 9, 11, (2, 3)),
    (31, 1, 3, 33, 35, (2, 3)),
    (31, 2, 2, 5, 7, (3,)),
    *on_gpu_only(
        (3, 2, 21, 129, 257, (2, 3)),
        (7, 1, 256, 64, 75, (2, 3)),
        (11, 1, 21, 188, 250, (2, 3)),
        (15, 2, 37, 61, 97, (2, 5)),
        (31, 1, 19, 97, 131, (2, 3)),
    ),
]


@pytest.mark.parametrize("k,B,C,h,w,dims", CASES)
def test_gaussian_weights(k, B, C, h, w, dims, device):
    keep_centre = bool(h % 2)
    feats, compats, _ = make_inputs(k * 100 + h, B, C, h, w, dims, device=device)
    want = reference.gaussian_weights(feats.double(), dims, compats.double(), k, keep_centre)
    got = kernels.gaussian_weights(feats, dims, compats, k, keep_centre)
    assert got.shape == (B, k * k, h, w) and got.dtype == torch.float32
    assert rel_err(got, want) < RTOL
    # Taps reaching outside the image are exactly zero, and the centre only when asked to be.
    centre = got[:, k * k // 2]
    assert bool((centre == 0).all()) != keep_centre or h * w == 0


@pytest.mark.parametrize("k,B,C,h,w,dims", CASES)
def test_two_pass_and_fused_message_pass(k, B, C, h, w, dims, device):
    feats, compats, Q = make_inputs(k * 7 + w, B, C, h, w, dims, device=device)
    K = reference.gaussian_weights(feats.double(), dims, compats.double(), k, False)
    want = reference.message_pass(K, Q.double())
    two_pass = kernels.message_pass(K.float(), Q)
    fused = kernels.fused_message_pass(feats, dims, compats, Q, k, False)
    for got in (two_pass, fused):
        assert got.shape == Q.shape and got.dtype == Q.dtype
        assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_q_accumulates_in_float32(dtype, device):
    feats, compats, Q = make_inputs(3, 2, 6, 11, 13, (2, 3), dtype, device)
    want = reference.fused_message_pass(feats.double(), (2, 3), compats.double(), Q.double(), 5, False)
    got = kernels.fused_message_pass(feats, (2, 3), compats, Q, 5, False)
    assert got.dtype == torch.float32  # the sum, in float32 (kernels._launch.message_dtype), not rounded back
    assert rel_err(got, want) < 1e-5


def test_int64_indexing_path(monkeypatch, device):
    """The IDX64 variant (chosen when a tensor has >= 2^31 elements) computes the same numbers."""
    feats, compats, Q = make_inputs(5, 3, 4, 9, 10, (2, 3), device=device)
    want = kernels.fused_message_pass(feats, (2, 3), compats, Q, 5, True)
    want_k = kernels.gaussian_weights(feats, (2, 3), compats, 5, True)
    for module in ("merged_kernel", "message_passing"):
        monkeypatch.setattr(sys.modules[f"convcrf_triton.kernels.{module}"], "needs_int64", lambda *t: True)
    assert torch.equal(kernels.fused_message_pass(feats, (2, 3), compats, Q, 5, True), want)
    assert torch.equal(kernels.gaussian_weights(feats, (2, 3), compats, 5, True), want_k)
    assert _launch.needs_int64(torch.empty(1).expand(2**16, 2**15 + 1))


@pytest.mark.parametrize("unroll", [2, 4])
def test_unrolled_taps_match_reference(unroll, monkeypatch, device):
    """Taps UNROLL at a time (the GPU autotune configs' factors), the last group masked (25 taps, 3 % 2 = 1)."""
    if device.type == "cuda":
        pytest.skip("on the GPU the autotuner runs every factor; this sets the interpreter's")
    monkeypatch.setattr(mp, "INTERPRETER_UNROLL", unroll)
    for k in (3, 5):
        feats, compats, Q = make_inputs(unroll + k, 2, 3, 7, 9, (2, 3), device=device)
        K = reference.gaussian_weights(feats.double(), (2, 3), compats.double(), k, False)
        want = reference.message_pass(K, Q.double())
        assert rel_err(kernels.message_pass(K.float(), Q), want) < RTOL
        assert rel_err(kernels.fused_message_pass(feats, (2, 3), compats, Q, k, False), want) < RTOL
        unary = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(k))
        want = reference.message_pass(K, Q.double()) * 0.3 + unary.double()
        got = kernels.mean_field_step(Q, unary.float(), torch.tensor(0.3), None, K.float(), None, None, (2, 3), k,
                                      False, False)
        assert rel_err(got, want) < RTOL


# Blocks whose every pixel and neighbour lies inside the image walk the window without masks (_window_sum's
# interior path). 16-pixel blocks on a 40-pixel-wide image give both kinds, and blocks on either side of each
# bound: rows that start on a block (x0 = 0: border) and blocks that straddle two rows (x0 = 32), x0 = 8
# (interior from row R on) and x0 = 24 (ends on the right edge: border).
INTERIOR_TILE = {"BLOCK_C": 8, "BLOCK_P": 16}


@pytest.mark.parametrize("unroll", [1, 2])
@pytest.mark.parametrize("fused,width", [(False, 44), (False, 42), (True, 40)])
def test_interior_blocks_match_reference(fused, width, unroll, device):
    """Every neighbour load of an interior block unmasked, against the reference (k = 5 with UNROLL 2: a
    masked last tap of each border row; k = 9: the interior's tap rows in two chunks, three when fused). The
    two-pass weights are random, nonzero at the taps outside the image too, so that only Q's zeros outside
    the image (the masks) make those taps vanish. Width 44 (a multiple of 4, blocks across rows): the two-pass
    interior's 16-byte chunks (chunks -1 .. 1 at k = 9's first 8 taps, chunk 1 alone at its last), and on two
    images the border blocks' too but near the batch's ends (EDGE: values outside the image, the other image's
    rows among them, zeroed); 42: its 4-byte loop, border blocks likewise on two images. 40, fused: the border
    blocks' unmasked loop too (EDGE, each weight outside the image zeroed; on two images at k = 3 and 5, one at
    k = 9, which takes longest). 10 rows: at k = 9 an image's interior blocks are those of rows 4 and 5 (two at
    widths 44 and 42, one at 40)."""
    cfg = triton.Config({**INTERIOR_TILE, "UNROLL": unroll}, num_warps=1)
    B = 1 if fused and unroll == 1 else 2
    feats, compats, Q = make_inputs(17 + unroll, B, 5, 10, width, (2, 3), device=device)
    for k in (3, 5) if unroll == 2 else (3, 9):
        if fused:
            K = reference.gaussian_weights(feats.double(), (2, 3), compats.double(), k, False)
        else:
            K = torch.rand(B, k * k, 10, width, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        want = reference.message_pass(K.to(device), Q.double())
        if fused:
            got = mp._launch(Q, None, feats, compats, (2, 3), k, False, config=cfg)
        else:
            got = mp._launch(Q, K.float().to(device), None, None, (), k, False, config=cfg)
        assert rel_err(got, want) < RTOL


def test_aligned_needs_width_and_pointers():
    """The 16-byte chunks (ALIGNED) only for widths that are multiples of 4 and 16-byte aligned data."""
    buf = torch.zeros(64)
    assert (mp._aligned(48, buf, None), mp._aligned(44, buf, None), mp._aligned(42, buf, None)) == (16, 4, 0)
    assert mp._aligned(48, buf[1:], None) == 0 and mp._aligned(44, buf, buf[2:]) == 0


@pytest.mark.parametrize("channels_last,width", [(False, 42), (True, 40), (False, 44)])
def test_interior_blocks_of_the_step_match_reference(channels_last, width, monkeypatch, device):
    """The one-launch step (planar, and channels-last: 16-byte class loads with the padding classes' mask) over
    interior and border blocks; planar at width 44, the 16-byte chunks, the border blocks' (EDGE) among them."""
    if device.type == "cuda":
        pytest.skip("on the GPU the step's tile is step_blocks'; this sets the interpreter's")
    monkeypatch.setattr(mp, "STEP_CHANNELS_LAST", channels_last)
    monkeypatch.setattr(mp, "interpreter_blocks", lambda C, hw: (triton.next_power_of_2(C), 16))
    seen = []
    step = kernels.mean_field_step
    monkeypatch.setattr(kernels, "mean_field_step",
                        lambda *a, **kw: seen.append(kw["channels_last"]) or step(*a, **kw))
    case = dict(C=5, scalar=False, compat=True)
    unary, image, weight, compat = step_inputs(case, 3, (9, width), device)
    kw = dict(filter_size=5, blur=1, num_iter=2, mode="textbook", weight=weight, compat_matrix=compat)
    with torch.no_grad():
        got = functional.mean_field(unary, image, backend="triton", **kw)
    want = functional.mean_field(unary.double(), image.double(), backend="torch", **{**kw, "weight": weight.double()})
    assert seen == [5 if channels_last else None] * 2
    assert rel_err(got, want) < RTOL


@pytest.mark.gpu_only
def test_int64_indexing_on_a_tensor_past_2_to_the_31(device):
    """A real K of 49·6700² > 2^31 elements (8.8 GB): the bottom rows, whose offsets overflow int32, against
    the reference on a strip (the message at a row needs rows within k//2 of it only)."""
    k, h, w, halo = 7, 6700, 6700, 3
    feats, compats, Q = make_inputs(17, 1, 2, h, w, (2, 3), device=device)
    K = kernels.gaussian_weights(feats, (2, 3), compats, k, False)
    assert _launch.needs_int64(K)
    got = kernels.message_pass(K, Q)[..., -8:, :]
    del K
    strip = slice(h - 8 - halo, h)
    want = reference.fused_message_pass(feats[..., strip, :].double(), (2, 3), compats.double(),
                                        Q[..., strip, :].double(), k, False)[..., halo:, :]
    assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_wrt_q_is_a_message_pass_of_the_output_gradient(fused, device):
    feats, compats, Q = make_inputs(11, 2, 3, 8, 9, (2, 3), device=device)
    grad_out = torch.randn_like(Q)
    Qr = Q.double().requires_grad_()
    reference.fused_message_pass(feats.double(), (2, 3), compats.double(), Qr, 5, False).backward(grad_out.double())
    Qt = Q.clone().requires_grad_()
    if fused:
        out = kernels.fused_message_pass(feats, (2, 3), compats, Qt, 5, False)
    else:
        out = kernels.message_pass(kernels.gaussian_weights(feats, (2, 3), compats, 5, False), Qt)
    out.backward(grad_out)
    assert rel_err(Qt.grad, Qr.grad) < RTOL


# (k, B, C, h, w, dims, keep_centre, block_p) of the fused pass's weight gradient: class counts that fill the
# kernel's class loop exactly (21: 3 × 7), with padding classes (19: 3 × 7) and below one trip (2); a window
# wider than the image; k = 9, whose tap rows take two chunks of 5 (one tap past the row; masked, 3 of 3);
# blocks of 32 and 64 pixels on 2 and 3 images, most of which read their window unmasked (the first and last
# R rows of the batch masked), and blocks past the image's end.
WEIGHT_GRAD_CASES = [
    (3, 2, 21, 8, 9, (2, 3), False, None),
    (5, 1, 19, 6, 11, (5,), True, None),
    (7, 1, 2, 5, 13, (2, 3), False, None),
    (9, 1, 4, 11, 12, (3, 2), True, None),
    (3, 3, 21, 9, 14, (2, 3), False, 32),
    (5, 2, 19, 9, 11, (5,), True, 32),
    (9, 2, 3, 10, 13, (2, 3), False, 64),
    *on_gpu_only((11, 2, 21, 67, 93, (2, 3), False, None), (31, 1, 150, 40, 45, (2, 5), False, None),
                 (7, 3, 21, 64, 130, (2, 3), True, None)),
]


def _reference_weight_grads(feats, compats, Q, grad_out, dims, k, keep_centre):
    """float64 autograd through the reference fused pass: ``(dL/dfeats, dL/dcompats)``."""
    want = [t.double().requires_grad_() for t in (feats, compats)]
    reference.fused_message_pass(want[0], dims, want[1], Q.double(), k, keep_centre).backward(grad_out.double())
    return want[0].grad, want[1].grad


@pytest.mark.parametrize("k,B,C,h,w,dims,keep_centre,block_p", WEIGHT_GRAD_CASES)
def test_weight_grad_kernel_matches_reference(k, B, C, h, w, dims, keep_centre, block_p, device):
    """The weight-gradient kernel on its own, and through the fused pass's backward (default blocks)."""
    feats, compats, Q = make_inputs(k + C, B, C, h, w, dims, device=device)
    grad_out = torch.randn(Q.shape, generator=torch.Generator().manual_seed(k)).to(device)
    want_f, want_c = _reference_weight_grads(feats, compats, Q, grad_out, dims, k, keep_centre)
    if block_p is None:
        got_f, got_c = (t.clone().requires_grad_() for t in (feats, compats))
        kernels.fused_message_pass(got_f, dims, got_c, Q, k, keep_centre).backward(grad_out)
        got_f, got_c = got_f.grad, got_c.grad
    else:
        got_f, got_c = mp._weight_grad(Q, grad_out, feats, compats, dims, k, keep_centre, block_p=block_p)
    assert rel_err(got_f, want_f) < RTOL
    assert rel_err(got_c, want_c) < RTOL


@pytest.mark.parametrize("k,B,C,h,w,dims,keep_centre", [(3, 2, 5, 7, 12, (2, 3), False), (5, 1, 19, 9, 10, (5,), True)])
def test_learned_message_pass_differentiates_like_the_fused_pass(k, B, C, h, w, dims, keep_centre, device):
    """The two-pass op that reads K and differentiates Q, the features and the compat weights, against float64
    autograd through the reference fused pass: its output and all three gradients."""
    feats, compats, Q = make_inputs(k * C, B, C, h, w, dims, device=device)
    grad_out = torch.randn(Q.shape, generator=torch.Generator().manual_seed(C)).to(device)
    want = [t.double().requires_grad_() for t in (Q, feats, compats)]
    want_m = reference.fused_message_pass(want[1], dims, want[2], want[0], k, keep_centre)
    want_m.backward(grad_out.double())
    got = [t.clone().requires_grad_() for t in (Q, feats, compats)]
    K = kernels.gaussian_weights(feats, dims, compats, k, keep_centre)
    got_m = kernels.learned_message_pass(K, got[1], dims, got[2], got[0], k, keep_centre)
    got_m.backward(grad_out)
    assert rel_err(got_m, want_m) < RTOL
    for g, wt in zip(got, want, strict=True):
        assert rel_err(g.grad, wt.grad) < RTOL


def test_learned_message_pass_checks_the_weights_shape():
    feats, compats, Q = make_inputs(1, 1, 3, 5, 6, (2, 3))
    with pytest.raises(ValueError, match="K must be"):
        kernels.learned_message_pass(torch.zeros(1, 9, 5, 6), feats, (2, 3), compats, Q, 5, False)


def test_weight_grad_reads_outside_an_image_never_reach_its_gradient():
    """Unmasked blocks read their border taps from wherever the flat index falls (the neighbouring image's
    planes); a NaN there must not reach another image's feature gradients."""
    k, dims = 5, (2, 3)
    feats, compats, Q = make_inputs(5, 3, 3, 7, 10, dims)
    grad_out = torch.randn(Q.shape, generator=torch.Generator().manual_seed(5))
    for t in (feats, Q, grad_out):
        t[0] = float("nan")
        t[2] = float("nan")
    got_f, _ = mp._weight_grad(Q, grad_out, feats, compats, dims, k, False, block_p=32)
    want_f, _ = _reference_weight_grads(feats[1:2], compats, Q[1:2], grad_out[1:2], dims, k, False)
    assert rel_err(got_f[1:2], want_f) < RTOL


# The whole model on the Triton backend against the whole model on the reference backend.
MODEL_CASES = [
    dict(filter_size=3, blur=1, mode="textbook"),
    dict(filter_size=5, blur=2, mode="convcrf"),
    dict(filter_size=7, blur=4, mode="textbook", norm="sym"),
    dict(filter_size=7, blur=1, mode="convcrf", norm="sym", col_use_pos=True),
    dict(filter_size=11, blur=4, mode="convcrf", convcomp=True),
    dict(filter_size=13, blur=2, mode="textbook", weight=0.7, unary_weight=1.3),
    *on_gpu_only(
        dict(filter_size=11, blur=1, mode="convcrf", size=(120, 163)),
        dict(filter_size=7, blur=3, mode="textbook", norm="sym", size=(250, 190)),
        dict(filter_size=21, blur=2, mode="convcrf", convcomp=True, size=(97, 130)),
    ),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mean_field_triton_matches_reference(case, device):
    case = dict(case)
    g = torch.Generator().manual_seed(case["filter_size"] * 10 + case["blur"])
    B, C, (H, W) = 3, 4, case.pop("size", (17, 23))
    unary = (torch.randn(B, C, H, W, generator=g) * 2).to(device)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    if case.pop("convcomp", False):
        case["compat_matrix"] = (torch.randn(C, C, generator=g) * 0.1).to(device)
    want = functional.mean_field(unary.double(), image.double(), num_iter=3, backend="torch", **case)
    got = functional.mean_field(unary, image, num_iter=3, backend="triton", **case)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < RTOL


def test_auto_backend_uses_the_kernels_under_the_interpreter():
    assert functional.resolve_backend("auto", torch.device("cpu")) is kernels
    assert functional.resolve_backend("torch", torch.device("cpu")) is reference


def test_fused_rule_is_documented_and_monotone():
    # The H200 measurements: two-pass on 512² at every k, fused at large k on 128², fused when K is huge.
    assert not any(kernels.prefer_fused(k, 512 * 512) for k in (3, 7, 11, 31))
    assert not kernels.prefer_fused(7, 128 * 128) and kernels.prefer_fused(15, 128 * 128)
    assert kernels.prefer_fused(21, 1024 * 2048) and not kernels.prefer_fused(11, 1024 * 2048)
    for n in (64 * 64, 128 * 128, 512 * 512, 4 * 1024 * 2048):
        flags = [kernels.prefer_fused(k, n) for k in range(3, 32, 2)]
        assert flags == sorted(flags)


# The one-launch mean-field step (blur 1, one merged Gaussian, inference): two-pass (k < 7) and fused weights,
# both modes, 1×1 compatibility as tl.dot, scalar and per-class w, C from 1 to 150, final softmax.
STEP_CASES = [
    dict(k=3, C=1, mode="textbook", compat=False, scalar=True, final_softmax=False),
    dict(k=5, C=5, mode="convcrf", compat=True, scalar=False, final_softmax=False),
    dict(k=7, C=21, mode="textbook", compat=True, scalar=False, final_softmax=True),
    dict(k=11, C=150, mode="convcrf", compat=False, scalar=False, final_softmax=False),
    dict(k=5, C=32, mode="textbook", compat=True, scalar=False, final_softmax=False),
    dict(k=15, C=3, mode="textbook", compat=True, scalar=True, final_softmax=False),
    *on_gpu_only(
        dict(k=7, C=21, mode="convcrf", compat=True, scalar=False, final_softmax=False, size=(131, 257)),
        dict(k=11, C=256, mode="textbook", compat=False, scalar=False, final_softmax=True, size=(64, 97)),
        dict(k=3, C=19, mode="textbook", compat=False, scalar=True, final_softmax=False, size=(200, 301)),
    ),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mean_field_step_matches_reference(case, monkeypatch, device, every_call):
    calls = []
    step, start = kernels.mean_field_step, kernels.mean_field_start
    monkeypatch.setattr(kernels, "mean_field_step", lambda *a, **kw: calls.append("step") or step(*a, **kw))
    monkeypatch.setattr(kernels, "mean_field_start",
                        lambda *a, **kw: calls.append((kw["log"], kw["nonfinite"] is not None)) or start(*a, **kw))
    unary, image, weight, compat = step_inputs(case, case["k"] + case["C"], (13, 9), device)
    kw = dict(filter_size=case["k"], blur=1, num_iter=3, mode=case["mode"], weight=weight, compat_matrix=compat,
              final_softmax=case["final_softmax"])
    with torch.no_grad():
        got = functional.mean_field(unary, image, backend="triton", **{**kw, "final_softmax": False})
    want = functional.mean_field(unary.double(), image.double(), backend="torch",
                                 **{**kw, "weight": weight.double(), "compat_matrix": compat, "final_softmax": False})
    # One set-up (which tests the unary's values for the input check), every iteration one step.
    assert calls == [(case["mode"] == "convcrf", True)] + ["step"] * 3
    assert rel_err(got, want) < RTOL
    if case["final_softmax"]:
        # Probabilities: softmax moves each by at most 2·max|ΔZ| (its ∞-norm Lipschitz bound), so their
        # error is judged against the logits' own error (relative to 1e-5 it is an absolute error, which
        # float32 logits of magnitude ~50 already reach through rounding alone); and the in-kernel softmax
        # must be the softmax of the logits that the same step returns without it.
        with torch.no_grad():
            probs = functional.mean_field(unary, image, backend="triton", **kw)
        want_probs = torch.softmax(want, 1)
        assert (probs.double() - want_probs).abs().max().item() <= 2 * (got.double() - want).abs().max().item() + 1e-6
        assert (probs - torch.softmax(got, 1)).abs().max().item() < 4e-6  # a few float32 ulps of 1


def test_mean_field_step_is_skipped_when_gradients_are_needed(monkeypatch):
    monkeypatch.setattr(kernels, "mean_field_step", lambda *a, **kw: pytest.fail("the step is not differentiable"))
    unary = torch.randn(1, 3, 6, 7, requires_grad=True)
    functional.mean_field(unary, torch.rand(1, 3, 6, 7) * 255, filter_size=3, blur=1, backend="triton").sum().backward()
    assert unary.grad is not None


def test_mean_field_step_leaves_wide_compatibilities_to_the_separate_ops(monkeypatch):
    """With a 1×1 compatibility over more than 32 classes its [C, C] tile would spill: no one-launch step."""
    monkeypatch.setattr(kernels, "mean_field_step", lambda *a, **kw: pytest.fail("C = 33 with compat"))
    C = 33
    with torch.no_grad():
        got = functional.mean_field(torch.randn(1, C, 5, 6), torch.rand(1, 3, 5, 6) * 255, filter_size=3, blur=1,
                                    num_iter=2, compat_matrix=torch.eye(C) * 0.1, backend="triton")
    assert got.shape == (1, C, 5, 6)


# Low-precision storage: K and the probabilities the message pass reads kept in bfloat16/float16, the sums and
# the logits in float32. Judged against the float32 path: the storage's rounding (2^-8, 2^-11 relative) on the
# messages, and the labels (argmax) unchanged almost everywhere.
STORAGE_BOUNDS = {"bfloat16": (torch.bfloat16, 2e-2), "float16": (torch.float16, 3e-3)}


@pytest.mark.parametrize("storage", sorted(STORAGE_BOUNDS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("blur,filter_size,mode", [(1, 5, "textbook"), (2, 7, "convcrf")])
def test_low_precision_storage_against_float32(storage, backend, blur, filter_size, mode, device):
    g = torch.Generator().manual_seed(blur + filter_size)
    B, C, H, W = 2, 5, 23, 29
    unary = (torch.randn(B, C, H, W, generator=g) * 2).to(device)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    kw = dict(filter_size=filter_size, blur=blur, num_iter=3, mode=mode, backend=backend)
    with torch.no_grad():
        want = functional.mean_field(unary, image, **kw)
        got = functional.mean_field(unary, image, storage=storage, **kw)
    assert got.dtype == torch.float32
    err = rel_err(got, want)
    assert 0 < err < STORAGE_BOUNDS[storage][1], err  # > 0: the storage really was used
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() > 0.99


@pytest.mark.parametrize("scale", [300.0, 1e5])
@pytest.mark.parametrize("blur", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_storage_of_the_original_modes_large_messages(backend, blur, scale, device):
    """mode='convcrf' passes the log-probabilities first: logits a few hundred apart (the original code's reach
    them) on a smooth image give messages of ~3e5 at k = 11, past float16's 65504 (they were infinite). Messages
    are float32 sums whatever the storage (kernels._launch.message_dtype), so float16 storage stays within its
    rounding of float32 storage. Logits 1e5 apart: log-probabilities past -65504, saturated where Q is stored
    (functional.to_storage, kernels._math.as_stored), a probability of 0 either way."""
    g = torch.Generator().manual_seed(12)
    unary = (torch.randn(1, 3, 12, 14, generator=g) * scale).to(device)
    image = (100 + torch.rand(1, 3, 12, 14, generator=g) * 10).to(device)  # smooth: every colour weight ~10
    kw = dict(filter_size=11, blur=blur, num_iter=2, mode="convcrf", backend=backend)
    with torch.no_grad():
        want = functional.mean_field(unary, image, **kw)
        got = functional.mean_field(unary, image, storage="float16", **kw)
    assert bool(got.isfinite().all())
    assert rel_err(got, want) < STORAGE_BOUNDS["float16"][1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_storage_of_a_normalised_isolated_pixel(backend, device):
    """norm='sym' reads ``n ⊙ Q``; a pixel whose colour is far from all its neighbours' (255 in a dark image:
    colour weights exp(-(255/13)²/2), 0 in float32) has n = 1e10, beyond float16: it became infinity, and
    infinity times its zero weights made every message NaN. Saturated, the output is the float32 storage's
    within float16's rounding (found by tests/fuzz.py on a random image)."""
    g = torch.Generator().manual_seed(11)
    unary = (torch.randn(1, 3, 9, 12, generator=g) * 2).to(device)
    image = torch.rand(1, 3, 9, 12, generator=g) * 20
    image[0, :, 4, 5] = 255.0
    kw = dict(filter_size=5, blur=1, num_iter=2, norm="sym", backend=backend)
    with torch.no_grad():
        want = functional.mean_field(unary, image.to(device), **kw)
        got = functional.mean_field(unary, image.to(device), storage="float16", **kw)
    assert bool(got.isfinite().all())
    assert 0 < rel_err(got, want) < STORAGE_BOUNDS["float16"][1]


@pytest.mark.parametrize("storage", sorted(STORAGE_BOUNDS))
@pytest.mark.parametrize("blur,filter_size", [(2, 7), (4, 3)])
def test_low_precision_storage_rounds_where_pytorch_does(storage, blur, filter_size, device):
    """Blur > 1 (the pooled grid's two-pass loop): the Triton path stores K and the pooled Q where the PyTorch path
    rounds them, to nearest (also in the interpreter: tests/fast_interpreter.py), so the two agree far closer
    than either agrees with float32: in the interpreter within 1/20 of the storage's bound (its truncation of
    bfloat16 was 5e-3 apart); on the GPU within 1/4, as its exp2 approximation and PyTorch's exp give weights an
    ulp or two apart, of which a few round the other way (~1e-3 of the largest logit each in bfloat16)."""
    g = torch.Generator().manual_seed(blur)
    unary = (torch.randn(2, 5, 23, 29, generator=g) * 2).to(device)
    image = (torch.rand(2, 3, 23, 29, generator=g) * 255).to(device)
    kw = dict(filter_size=filter_size, blur=blur, num_iter=3, mode="convcrf", storage=storage)
    with torch.no_grad():
        want = functional.mean_field(unary, image, backend="torch", **kw)
        got = functional.mean_field(unary, image, backend="triton", **kw)
    assert rel_err(got, want) < STORAGE_BOUNDS[storage][1] / (20 if _launch.interpreting() else 4)


@pytest.mark.parametrize("storage", sorted(STORAGE_BOUNDS))
def test_low_precision_weights_are_the_rounded_float32_weights(storage, device):
    dtype = STORAGE_BOUNDS[storage][0]
    feats, compats, Q = make_inputs(9, 2, 3, 11, 13, (2, 3), device=device)
    K32 = kernels.gaussian_weights(feats, (2, 3), compats, 5, False)
    K = kernels.gaussian_weights(feats, (2, 3), compats, 5, False, out_dtype=dtype)
    # rounded to nearest: within half a unit in the last place (the interpreter's truncation is mended by
    # tests/fast_interpreter.py), with room for a float32 ulp of K32 (another compilation) and for subnormals
    info = torch.finfo(dtype)
    bound = K32.abs() * (info.eps / 2 + 2.0**-22) + info.smallest_normal * info.eps / 2
    assert K.dtype == dtype and bool(((K.float() - K32).abs() <= bound).all())
    # the message pass reads the stored K and Q as they are, sums in float32 and returns the sums in float32 (a
    # float16 message could overflow), on both backends
    want = reference.message_pass(K.double(), Q.to(dtype).double())
    for ops in (kernels, reference):
        got = ops.message_pass(K, Q.to(dtype))
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6
    passer = functional.MessagePasser(
        (torch.rand(1, 3, 9, 10) * 255).to(device), filter_size=5, blur=1, pos_sdims=3.0, pos_compat=3.0,
        col_sdims=80.0, col_schan=13.0, col_compat=10.0, col_use_pos=False, norm="none", keep_centre=False,
        ops=kernels, storage=dtype)
    assert passer.gaussians[0].K is not None and passer.gaussians[0].K.dtype == dtype


def test_storage_is_validated():
    with pytest.raises(ValueError, match="storage='int8' is not allowed"):
        functional.mean_field(torch.randn(1, 2, 4, 4), torch.rand(1, 3, 4, 4), storage="int8", backend="torch")
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.gaussian_weights(torch.randn(1, 5, 4, 4), (2, 3), torch.ones(2), 3, False, out_dtype=torch.float64)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_every_tuned_config_matches_reference(cfg, fused, device):
    """Each tile shape / unroll factor the autotuner may pick, launched as it is (k = 5: 25 taps, a masked
    last group for UNROLL 2 and 4; C = 21 over several class blocks; pixels over several blocks)."""
    feats, compats, Q = make_inputs(31, 2, 21, 9, 29, (2, 3), device=device)
    K = reference.gaussian_weights(feats.double(), (2, 3), compats.double(), 5, False)
    want = reference.message_pass(K, Q.double())
    if fused:
        got = mp._launch(Q, None, feats, compats, (2, 3), 5, False, config=cfg)
    else:
        got = mp._launch(Q, K.float(), None, None, (), 5, False, config=cfg)
    assert rel_err(got, want) < RTOL


def test_autotune_pruning_and_switch(monkeypatch):
    """Configs with class blocks far wider than C, or over 16 tile elements a thread, are pruned, and the 8-warp
    tiles from k = 9 (they spilled from k = 11); CONVCRF_AUTOTUNE=0 keeps the first survivor only (no benchmarking)."""
    kept = mp._prune(mp.TUNE_CONFIGS, {"C": 3}, KSIZE=7)
    assert kept and all(c.kwargs["BLOCK_C"] <= 8 for c in kept) and len(kept) > 1
    assert all(c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_P"] <= 16 * 32 * c.num_warps for c in kept)
    for k in (3, 7, 9, 15, 31):
        warps = {c.num_warps for c in mp._prune(mp.TUNE_CONFIGS, {"C": 21}, KSIZE=k)}
        assert warps == ({2, 4, 8} if k <= 7 else {2, 4}), (k, warps)
    step = mp._prune_step(mp.STEP_CONFIGS, {"C": 150}, HAS_COMPAT=False)
    assert {c.num_warps for c in step} == {8} and len(step) == 2
    monkeypatch.setenv("CONVCRF_AUTOTUNE", "0")
    assert mp._prune(mp.TUNE_CONFIGS, {"C": 3}, KSIZE=7) == kept[:1]
    assert len(mp._prune_step(mp.STEP_CONFIGS, {"C": 150}, HAS_COMPAT=False)) == 1


# The channels-last step: classes of a pixel contiguous, padded to a multiple of 4, for 16-byte loads.
CL_CASES = [
    dict(k=5, C=5, mode="convcrf", compat=True, scalar=False, final_softmax=False),
    dict(k=15, C=21, mode="textbook", compat=False, scalar=True, final_softmax=True),
    dict(k=3, C=150, mode="textbook", compat=False, scalar=False, final_softmax=False),
    *on_gpu_only(dict(k=7, C=21, mode="textbook", compat=True, scalar=False, final_softmax=False, size=(131, 257))),
]


@pytest.mark.parametrize("case", CL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_channels_last_step_matches_reference(case, monkeypatch, device, every_call):
    monkeypatch.setattr(mp, "STEP_CHANNELS_LAST", True)
    seen = []
    step = kernels.mean_field_step
    monkeypatch.setattr(kernels, "mean_field_step",
                        lambda *a, **kw: seen.append(kw["channels_last"]) or step(*a, **kw))
    unary, image, weight, compat = step_inputs(case, case["k"] * case["C"], (11, 9), device)
    C = case["C"]
    kw = dict(filter_size=case["k"], blur=1, num_iter=3, mode=case["mode"], weight=weight, compat_matrix=compat)
    with torch.no_grad():
        got = functional.mean_field(unary, image, backend="triton", **kw)
    assert seen == [C] * 3
    want = functional.mean_field(unary.double(), image.double(), backend="torch", **{**kw, "weight": weight.double()})
    assert rel_err(got, want) < RTOL
    if case["final_softmax"]:  # probabilities: judged by the logits' error (test_mean_field_step_matches_reference)
        with torch.no_grad():
            probs = functional.mean_field(unary, image, backend="triton", final_softmax=True, **kw)
        err = (probs.double() - torch.softmax(want, 1)).abs().max().item()
        assert err <= 2 * (got.double() - want).abs().max().item() + 1e-6


@pytest.mark.parametrize("k,forced", [(15, None), (21, None), (7, True), (15, False)])
def test_the_step_is_planar_unless_channels_last_is_forced(k, forced, monkeypatch, device):
    """The loop takes the planar step at every k (measured faster: ``step_channels_last``), the channels-last one
    only where ``STEP_CHANNELS_LAST`` forces it."""
    if forced is not None:
        monkeypatch.setattr(mp, "STEP_CHANNELS_LAST", forced)
    seen = []

    class Stop(Exception):
        pass

    def spy(*a, **kw):
        seen.append(kw["channels_last"])
        raise Stop

    monkeypatch.setattr(kernels, "mean_field_step", spy)
    unary, image, weight, _ = step_inputs(dict(C=3, scalar=True, compat=False), 7, (8, 8), device)
    with torch.no_grad(), pytest.raises(Stop):
        functional.mean_field(unary, image, backend="triton", filter_size=k, blur=1, num_iter=1, weight=weight)
    assert seen == [3 if forced else None]


def test_channels_last_layout_and_checks():
    x = torch.randn(2, 5, 3, 4)
    cl = kernels.to_channels_last(x)
    assert cl.shape == (2, 3, 4, 8) and bool((cl[..., 5:] == 0).all()) and cl.is_contiguous()
    assert torch.equal(kernels.from_channels_last(cl, 5), x)
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.mean_field_step(torch.zeros(1, 3, 4, 6), torch.zeros(1, 3, 4, 6), torch.tensor(0.5), None,
                                torch.zeros(1, 9, 3, 4), None, None, (2, 3), 3, False, True, channels_last=5)


def _doubling_op(name: str) -> tuple[_launch.LibraryOp, list[str]]:
    """A LibraryOp ``x -> 2x`` whose calls record which path ran: ``"fn"`` (the plain function) or ``"op"``."""
    ran: list[str] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        ran.append("fn")
        return x * 2

    lib = _launch.LibraryOp(f"convcrf_test::{name}", double)
    lib.op.register_autograd(lambda ctx, g: g * 2)
    op = lib.op
    lib.op = lambda *args: ran.append("op") or op(*args)
    return lib, ran


def test_library_op_calls_its_function_unless_the_op_is_needed():
    """The dispatcher is skipped for plain tensors and parameters that need no autograd (inference), and used for
    a tensor that requires grad (the registered backward runs), under a dispatch mode, for other tensor subclasses
    and for torch.fx's proxies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lib, ran = _doubling_op("double_paths")
    x = torch.arange(3.0)
    assert torch.equal(lib(x), 2 * x) and ran == ["fn"]
    ran.clear()
    y = x.clone().requires_grad_()
    lib(y).sum().backward()
    assert ran[0] == "op" and torch.equal(y.grad, torch.full((3,), 2.0))
    ran.clear()
    with torch.no_grad():
        lib(y)
    assert ran == ["fn"]
    ran.clear()

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        lib(x)
    assert ran[0] == "op"
    ran.clear()

    class Sub(torch.Tensor):
        pass

    lib(x.as_subclass(Sub))
    assert ran[0] == "op"
    ran.clear()
    graph = torch.fx.Graph()
    lib(torch.fx.Proxy(graph.placeholder("x")))  # symbolic tracing records the op
    assert ran == ["op"] and "convcrf_test.double_paths" in str(graph)
    ran.clear()
    with torch.no_grad():
        lib(torch.nn.Parameter(x))  # a module's weights at inference: plain
    assert ran == ["fn"]
