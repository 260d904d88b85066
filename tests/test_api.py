"""The public API's behaviour (SPEC §1–§3): ``CRFConfig``/``ConvCRF`` validation, input checks of
``ConvCRF.forward``/``functional.mean_field``, backend resolution, dtypes and layouts, parameters and
state, ``ConvCRF.from_convcrf_conf`` against the original formulation, and invariances.

Shapes: unary ``[B, C, H, W]`` logits, image ``[B, 3, H, W]`` RGB in [0, 255]. Everything but the
backend tests runs on ``backend='torch'`` (conftest sets ``TRITON_INTERPRET=1``, so ``'auto'`` on CPU
tensors would run the Triton kernels in the interpreter).
"""

from __future__ import annotations

import copy
import importlib
import math
from typing import Any

import pytest
import torch
from oracle import convcrf_conf, unfold_crf
from torch import nn

import convcrf_triton
from convcrf_triton import ConvCRF, CRFConfig, functional, mean_field, reference

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _inputs(
    seed: int, B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random logits ``[B, C, H, W]`` (std 2) and an RGB image ``[B, 3, H, W]`` in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2.0
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255.0
    return unary.to(dtype), image.to(dtype)


def _small(C: int = 4, **kw: Any) -> ConvCRF:
    """A small, fast CRF on the PyTorch path."""
    args: dict[str, Any] = dict(filter_size=5, blur=2, num_iter=3, backend="torch")
    args.update(kw)
    return ConvCRF(C, **args)



def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """``max |actual - expected| <= tol * max(1, max |expected|)`` (logits can reach the hundreds)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------
# 1. constructor validation
# ---------------------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("filter_size", 2),
    ("filter_size", 4),
    ("filter_size", 1),
    ("filter_size", 33),
    ("filter_size", 3.0),
    ("filter_size", True),
    ("filter_size", 0),
    ("filter_size", -3),
    ("blur", 3),
    ("blur", 0),
    ("blur", -2),
    ("blur", 2.0),
    ("num_iter", 0),
    ("num_iter", -1),
    ("num_iter", 2.5),
    ("num_classes", 0),
    ("num_classes", -1),
    ("num_classes", 2.0),
    ("num_classes", True),
    ("weight", "matrix"),
    ("weight", None),
    ("weight", "Vector"),
    ("norm", "l2"),
    ("norm", None),
    ("mode", "original"),
    ("backend", "cuda"),
    ("storage", "fp8"),
    ("storage", "bf16"),
    ("precision", "tf32x3"),
    ("precision", "bfloat16"),
    ("backend", "Torch"),
    ("backend", ""),
    ("backend", None),
    ("weight_init", math.nan),
    ("unary_weight", math.inf),
    ("col_use_pos", 1),
    ("merge", "yes"),
    ("convcomp", None),
    ("trainable", 0),
    ("final_softmax", "no"),
]
BAD_PARAMS += [
    (name, v)
    for name in ("pos_sdims", "col_sdims", "col_schan")
    for v in (0, 0.0, -1, -1.0, math.nan, math.inf, -math.inf)
]
BAD_PARAMS += [(name, v) for name in ("pos_compat", "col_compat") for v in (math.nan, math.inf, -math.inf)]


def _kwargs(name: str, value: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": 5}
    kw[name] = value
    return kw


@pytest.mark.parametrize(("name", "value"), BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_config_rejects_bad_value(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        CRFConfig(**_kwargs(name, value))


@pytest.mark.parametrize(("name", "value"), BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_module_rejects_bad_value(name: str, value: Any) -> None:
    kw = _kwargs(name, value)
    num_classes = kw.pop("num_classes")
    with pytest.raises(ValueError, match=name):
        ConvCRF(num_classes, **kw)


def test_sym_norm_needs_merge_false() -> None:
    with pytest.raises(ValueError, match="norm"):
        CRFConfig(num_classes=3, norm="sym", merge=True)
    with pytest.raises(ValueError, match="norm"):
        ConvCRF(3, norm="sym")  # merge defaults to True
    crf = ConvCRF(3, norm="sym", merge=False)
    assert crf.config.norm == "sym" and crf.config.merge is False


@pytest.mark.parametrize(
    "kw",
    [
        {"filter_size": 3},
        {"filter_size": 31},
        {"blur": 1},
        {"blur": 2},
        {"blur": 8},
        {"num_iter": 1},
        {"num_classes": 1},
        {"pos_compat": 0.0, "col_compat": -2.0},
        {"pos_sdims": 1e-3, "col_sdims": 1e6, "col_schan": 0.5},
        {"weight": "scalar", "norm": "sym", "merge": False, "convcomp": True, "trainable": True},
        {"mode": "convcrf", "final_softmax": True, "backend": "triton"},
    ],
)
def test_valid_edge_values_construct(kw: dict[str, Any]) -> None:
    kw = {"num_classes": 4, **kw}
    cfg = CRFConfig(**kw)
    for key, val in kw.items():
        assert getattr(cfg, key) == val
    num_classes = kw.pop("num_classes")
    crf = ConvCRF(num_classes, **kw)
    assert crf.config == cfg
    assert crf.num_classes == num_classes


def test_config_defaults_match_spec() -> None:
    cfg = ConvCRF(21).config
    assert (cfg.filter_size, cfg.blur, cfg.num_iter) == (11, 4, 5)
    assert (cfg.pos_sdims, cfg.pos_compat, cfg.col_sdims, cfg.col_schan, cfg.col_compat) == (3, 3, 80, 13, 10)
    assert cfg.col_use_pos is False and cfg.weight == "vector" and cfg.weight_init == 0.2
    assert cfg.unary_weight == 1.0 and cfg.norm == "none" and cfg.merge is True and cfg.convcomp is False
    assert cfg.trainable is False and cfg.backend == "auto"
    assert cfg.to_dict()["num_classes"] == 21


# ---------------------------------------------------------------------------------------------------------
# 2. input checks
# ---------------------------------------------------------------------------------------------------------


def _call(via: str, unary: Any, image: Any, C: int = 4) -> torch.Tensor:
    if via == "module":
        return _small(C)(unary, image)
    return mean_field(unary, image, filter_size=5, blur=2, num_iter=2, backend="torch")


VIAS = ["module", "functional"]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("bad", ["unary", "image"])
@pytest.mark.parametrize("value", [None, 3.0, "x", [[1.0]]], ids=["None", "float", "str", "list"])
def test_non_tensor_is_type_error(via: str, bad: str, value: Any) -> None:
    unary, image = _inputs(0, 1, 4, 6, 5)
    args = {"unary": unary, "image": image, bad: value}
    with pytest.raises(TypeError, match=bad):
        _call(via, args["unary"], args["image"])


@pytest.mark.parametrize("via", VIAS)
def test_numpy_input_is_type_error(via: str) -> None:
    unary, image = _inputs(0, 1, 4, 6, 5)
    with pytest.raises(TypeError, match="unary"):
        _call(via, unary.numpy(), image)
    with pytest.raises(TypeError, match=r"image must be a torch\.Tensor, got ndarray \(torch\.from_numpy\(image\)\)"):
        _call(via, unary, image.numpy())


@pytest.mark.parametrize("via", VIAS)
def test_common_image_mistakes_name_the_fix(via: str) -> None:
    """An 8-bit image and a channels-last one, the two forms images are read in, get the conversion in the error."""
    unary, image = _inputs(0, 1, 4, 6, 5)
    with pytest.raises(TypeError, match=r"got torch\.uint8 \(an 8-bit image: image\.float\(\)"):
        _call(via, unary, image.to(torch.uint8))
    unary, image = _inputs(0, 1, 4, 6, 7)
    with pytest.raises(ValueError, match=r"got 6 \(shape \(1, 6, 7, 3\)\) \(channels last .*permute\(0, 3, 1, 2\)\)"):
        _call(via, unary, image.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match=r"got torch\.int64$"):  # no image hint for the unary
        _call(via, unary.long(), image)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("unary_shape", "image_shape", "name"),
    [
        ((4, 6, 5), (1, 3, 6, 5), "unary"),  # 3-D unary
        ((1, 4, 6, 5), (3, 6, 5), "image"),  # 3-D image
        ((4, 6, 5), (3, 6, 5), "unary"),  # both 3-D
        ((1, 1, 4, 6, 5), (1, 3, 6, 5), "unary"),  # 5-D unary
        ((1, 4, 6, 5), (1, 4, 6, 5), "image"),  # RGBA image
        ((1, 4, 6, 5), (1, 1, 6, 5), "image"),  # grey image
        ((2, 4, 6, 5), (1, 3, 6, 5), "batch"),  # B mismatch
        ((1, 4, 6, 5), (2, 3, 6, 5), "batch"),
        ((1, 4, 7, 5), (1, 3, 6, 5), "height"),  # H mismatch
        ((1, 4, 6, 5), (1, 3, 6, 4), "width"),  # W mismatch
    ],
)
def test_bad_shapes_are_value_errors(via: str, unary_shape: tuple, image_shape: tuple, name: str) -> None:
    g = torch.Generator().manual_seed(1)
    unary = torch.randn(*unary_shape, generator=g)
    image = torch.rand(*image_shape, generator=g) * 255
    with pytest.raises(ValueError, match=name):
        _call(via, unary, image)


@pytest.mark.parametrize("C", [1, 3, 5, 21])
def test_module_rejects_wrong_class_count(C: int) -> None:
    unary, image = _inputs(2, 1, C, 6, 5)
    with pytest.raises(ValueError, match="num_classes"):
        _small(4)(unary, image)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("bad", ["unary", "image"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_dtype_is_type_error(via: str, bad: str, dtype: torch.dtype) -> None:
    unary, image = _inputs(3, 1, 4, 6, 5)
    args = {"unary": unary, "image": image}
    args[bad] = args[bad].clamp(0, 1 if dtype == torch.bool else 100).to(dtype)
    with pytest.raises(TypeError, match=bad):
        _call(via, args["unary"], args["image"])


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("bad", ["unary", "image"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_is_value_error(via: str, bad: str, value: float, dtype: torch.dtype) -> None:
    unary, image = _inputs(4, 2, 4, 6, 5, dtype)
    args = {"unary": unary, "image": image}
    args[bad][1, 0, 3, 2] = value
    with pytest.raises(ValueError, match=bad):
        _call(via, args["unary"], args["image"])


@pytest.mark.parametrize("blur", [1, 2])
@pytest.mark.parametrize("bad", ["unary", "image"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_is_value_error_on_the_triton_path(blur: int, bad: str, value: float, dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference on the Triton path tests the values in the kernels that read the inputs whole, in one class of one
    pixel of the second image: the set-up the unary, the features kernel (float32 images) the image; a float64
    image, which PyTorch's ops pool, is summed on its own, the unary still tested by the set-up."""
    summed = []
    total = functional._total
    monkeypatch.setattr(functional, "_total", lambda t: summed.append(t.shape[1]) or total(t))
    unary, image = _inputs(5, 2, 4, 7, 9, dtype)
    args = {"unary": unary, "image": image}
    mean_field(unary, image, filter_size=3, blur=blur, num_iter=2, backend="triton")
    assert summed == ([] if dtype == torch.float32 else [3])
    args[bad][1, 2, 6, 8] = value
    with pytest.raises(ValueError, match=f"{bad} contains NaN or Inf"):
        mean_field(args["unary"], args["image"], filter_size=3, blur=blur, num_iter=2, backend="triton")


def test_logits_beyond_the_triton_range_are_value_errors() -> None:
    """The Triton set-ups scale the logits by log2 e, which overflows float32 above ~2.36e38: such finite logits
    are a ValueError there (not NaN logits), at blur 1 and 2; below it, logits whose per-pixel sum overflows
    (four classes of 2e38) set the flag but are accepted, and the PyTorch path takes both."""
    unary, image = _inputs(7, 1, 4, 6, 5)
    for blur in (1, 2):
        huge = unary.clone()
        huge[0, 2, :, :3] = 3e38
        with pytest.raises(ValueError, match="beyond the 2.36e\\+38 the Triton kernels take"):
            mean_field(huge, image, filter_size=3, blur=blur, num_iter=2, backend="triton")
        assert bool(torch.isfinite(mean_field(huge, image, filter_size=3, blur=blur, num_iter=2,
                                              backend="torch")[0, :, :, 3:]).all())
        large = unary.clone()
        large[0, :, :, :3] = 2e38
        out = mean_field(large, image, filter_size=3, blur=blur, num_iter=2, backend="triton")
        assert bool(torch.isfinite(out[0, :, :, 3:]).all())


def test_finite_colours_whose_sum_overflows_are_accepted_on_the_triton_path() -> None:
    """The features kernel's test sums a cell's colours, which finite values can overflow: the element-wise
    confirmation lets them through, and the inference runs."""
    unary, image = _inputs(6, 1, 4, 6, 5)
    image[0, :, 2, 3] = 3e38
    out = mean_field(unary, image, filter_size=3, blur=2, num_iter=2, backend="triton")
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(("dtype", "huge"), [(torch.float64, 1e308), (torch.float32, 3e38)])
def test_finite_values_whose_sum_overflows_are_accepted(via: str, dtype: torch.dtype, huge: float) -> None:
    """The value check sums each input (float32 sums, float64 ones for float64), which finite values can
    overflow: the element-wise confirmation then lets them through, and the inference runs (softmax of logits of
    ``huge``: that class)."""
    unary, image = _inputs(6, 1, 4, 6, 5, dtype)
    unary[0, 2, :, :3] = huge
    out = _call(via, unary, image)
    assert bool(torch.isfinite(out[0, :, :, 3:]).all()) and bool((out[0].argmax(0)[:, :3] == 2).all())


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("unary_shape", "image_shape"),
    [
        ((0, 4, 6, 5), (0, 3, 6, 5)),
        ((1, 4, 0, 5), (1, 3, 0, 5)),
        ((1, 4, 6, 0), (1, 3, 6, 0)),
        ((0, 4, 0, 0), (0, 3, 0, 0)),
    ],
)
def test_empty_tensors_are_value_errors(via: str, unary_shape: tuple, image_shape: tuple) -> None:
    with pytest.raises(ValueError, match="empty"):
        _call(via, torch.zeros(unary_shape), torch.zeros(image_shape))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", ["pos_sdims", "pos_compat", "col_sdims", "col_schan", "col_compat", "weight",
                                  "unary_weight", "compat_matrix"])
def test_a_tensor_argument_on_another_device_is_named(backend: str, name: str) -> None:
    """A parameter on another device than the inputs is a ValueError naming it, on either backend (PyTorch's path
    raised a RuntimeError from inside an op, or none for a number it copied; the kernels would read another
    device's memory). 'meta' stands in for another device on a CPU."""
    unary, image = _inputs(41, 1, 3, 6, 5)
    value = torch.eye(3, device="meta") if name == "compat_matrix" else torch.tensor(3.0, device="meta")
    kwargs = {"col_use_pos": True} if name == "col_sdims" else {}
    with pytest.raises(ValueError, match=f"{name} is on meta but unary is on cpu"):
        mean_field(unary, image, filter_size=3, blur=2, num_iter=1, backend=backend, **{name: value}, **kwargs)


def test_a_module_on_another_device_than_its_inputs_says_so() -> None:
    unary, image = _inputs(42, 1, 3, 6, 5)
    crf = _small(3, convcomp=True).to("meta")
    with pytest.raises(ValueError, match=r"is on meta but unary is on cpu.*crf\.to\('cpu'\)"):
        crf(unary, image)


@pytest.mark.parametrize("launcher", ["message_pass", "mean_field_step", "blur_step"])
def test_kernel_operands_on_two_devices_are_named(launcher: str) -> None:
    """The kernels' own functions name the operand that is not on the first one's device."""
    from convcrf_triton import kernels

    Q, K = torch.rand(1, 3, 4, 5), torch.rand(1, 9, 4, 5)
    other = torch.rand(1, 3, 4, 5, device="meta")
    with pytest.raises(ValueError, match="is on meta but .* is on cpu"):
        if launcher == "message_pass":
            kernels.message_pass(K, other)
        elif launcher == "mean_field_step":
            kernels.mean_field_step(Q, Q, torch.ones(1, device="meta"), None, K, None, None, [2, 3], 3, False, True)
        else:
            kernels.blur_step(Q, Q[:, :1], torch.ones(2, 3), other[..., :2, :3], 2, pool=True, softmax=True)


@pytest.mark.parametrize("blur", [1, 4])
def test_an_inference_on_a_device_that_is_not_the_current_one(device: torch.device, blur: int) -> None:
    """Inputs and module on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (Triton launches on the
    current device) and give what the same inference gives with cuda:1 current; cuda:0 stays current."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (CONVCRF_TEST_DEVICE=cuda)")
    unary, image = _inputs(43, 2, 5, 37, 45)
    crf = ConvCRF(5, filter_size=5, blur=blur, num_iter=3, backend="triton").to("cuda:1")
    with torch.no_grad(), torch.cuda.device(1):
        want = crf(unary.to("cuda:1"), image.to("cuda:1"))
    with torch.no_grad(), torch.cuda.device(0):
        got = crf(unary.to("cuda:1"), image.to("cuda:1"))
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("blur", [1, 2])
def test_autocast_does_not_lower_the_inference_precision(backend: str, blur: int) -> None:
    """Under a caller's bfloat16 autocast the inference and its gradients are the float32 ones, bit for bit (the
    compatibility's einsum between kernels ran in bfloat16: logits 0.02-0.05 off instead of 5e-6)."""
    unary, image = _inputs(44, 2, 6, 9, 7)
    crf = ConvCRF(6, filter_size=3, blur=blur, num_iter=2, backend=backend, convcomp=True, trainable=True)
    with torch.no_grad():
        crf.compat_matrix.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(44)) * 0.5)
    outs, grads = [], []
    for autocast in (False, True):
        u = unary.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = crf(u, image)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([u.grad, *(p.grad.clone() for p in crf.parameters())])
        crf.zero_grad()
    assert outs[1].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])
    for plain, cast in zip(*grads, strict=True):
        assert torch.equal(plain, cast)


def test_batches_beyond_the_grid_limit_run_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' grids hold the batch in y or z (at most 65535 on CUDA): a larger batch runs in chunks of that
    many images (here the limit patched to 2, a batch of 5 of 2 pooled rows: three chunks), with the same bits, and
    a NaN in the last chunk is still a ValueError."""
    from convcrf_triton.kernels import _launch, blur_iteration

    unary, image = _inputs(45, 5, 4, 4, 7)
    crf = ConvCRF(4, filter_size=3, blur=2, num_iter=2, backend="auto")
    want = crf(unary, image)
    starts = []
    real = blur_iteration.blur_start
    monkeypatch.setattr(blur_iteration, "blur_start", lambda u, *a, **k: starts.append(u.shape[0]) or real(u, *a, **k))
    monkeypatch.setattr(convcrf_triton.kernels, "blur_start", blur_iteration.blur_start)
    monkeypatch.setattr(_launch, "MAX_GRID_YZ", 2)
    assert torch.equal(crf(unary, image), want)
    assert starts == [2, 2, 1]
    unary[4, 1, 2, 5] = math.nan
    with pytest.raises(ValueError, match="unary contains NaN"):
        crf(unary, image)


@pytest.mark.parametrize("launcher", ["message_pass", "fused_message_pass", "mean_field_step", "band_message_pass",
                                      "gaussian_features", "gaussian_weights", "blur_start", "blur_start rows",
                                      "mean_field_start", "blur_step rows"])
def test_kernels_name_a_size_beyond_the_grid_limit(monkeypatch: pytest.MonkeyPatch, launcher: str) -> None:
    """A batch (or, for the blurred kernels, pooled rows) beyond CUDA's grid limit in y and z (patched to 2 here)
    is a ValueError naming it before any launch (on a GPU the launch failed with 'invalid argument')."""
    from convcrf_triton.kernels import _launch

    from convcrf_triton import kernels

    monkeypatch.setattr(_launch, "MAX_GRID_YZ", 2)
    B, rows = (1, 6) if launcher.endswith("rows") else (3, 2)
    Q, K, f = torch.rand(B, 3, rows, 5), torch.rand(B, 9, rows, 5), torch.rand(B, 5, rows, 5)
    calls = {
        "message_pass": lambda: kernels.message_pass(K, Q),
        "fused_message_pass": lambda: kernels.fused_message_pass(f, [2, 3], torch.ones(2), Q, 3, False),
        "mean_field_step": lambda: kernels.mean_field_step(Q, Q, torch.ones(1), None, K, None, None, [2, 3], 3, False,
                                                           True),
        "band_message_pass": lambda: kernels.band_message_pass(K, Q),
        "gaussian_features": lambda: kernels.gaussian_features(
            Q, 1, pos_sdims=3.0, col_sdims=80.0, col_schan=13.0, pos_compat=3.0, col_compat=10.0, col_use_pos=False),
        "gaussian_weights": lambda: kernels.gaussian_weights(f, [2, 3], torch.ones(2), 3, False),
        "blur_start": lambda: kernels.blur_start(Q, 2),
        "blur_start rows": lambda: kernels.blur_start(Q, 2),
        "mean_field_start": lambda: kernels.mean_field_start(Q, torch.ones(3)),
        "blur_step rows": lambda: kernels.blur_step(Q, Q[:, :1], torch.ones(2, 3), Q[..., ::2, ::2], 2, pool=True,
                                                    softmax=True),
    }
    name = "pooled_rows=3" if launcher.endswith("rows") else "batch=3"
    with pytest.raises(ValueError, match=f"{name}: the kernel's grid holds it in y or z, where CUDA allows at most 2"):
        calls[launcher]()


@pytest.mark.parametrize("blur", [1, 2])
def test_images_taller_than_the_grid_limit_take_the_composed_loop(monkeypatch: pytest.MonkeyPatch, blur: int) -> None:
    """The blurred kernels' grids hold the pooled rows in y: at blur > 1 an image with more (here the limit patched
    to 4, an image of 5 pooled rows) runs the loop of separate message passes and PyTorch ops, to the same result.
    At blur 1 the set-up's grid holds an image's pixels in one row: the one-launch steps run."""
    from convcrf_triton.kernels import _launch

    unary, image = _inputs(46, 1, 4, 9 * blur // 2 + 1, 7)  # (5 pooled rows at blur 2, 5 rows at blur 1)
    crf = ConvCRF(4, filter_size=3, blur=blur, num_iter=2, backend="auto")
    want = crf(unary, image)
    monkeypatch.setattr(_launch, "MAX_GRID_YZ", 4)
    starts = []
    for name in ("blur_start", "mean_field_start"):
        real = getattr(convcrf_triton.kernels, name)
        monkeypatch.setattr(convcrf_triton.kernels, name,
                            lambda *a, name=name, real=real, **k: starts.append(name) or real(*a, **k))
    _assert_close_scaled(crf(unary, image), want, 1e-5)
    assert starts == ([] if blur > 1 else ["mean_field_start"])


@pytest.mark.parametrize("name,shape", [("pos_compat", (4, 4)), ("col_compat", (3,)), ("col_compat", (1, 3, 3))])
def test_label_compatibility_of_another_shape_is_a_value_error(name: str, shape: tuple) -> None:
    unary, image = torch.randn(1, 3, 5, 6), torch.rand(1, 3, 5, 6)
    with pytest.raises(ValueError, match=rf"{name} must be a number, a one-element tensor or a \[C, C\] = \[3, 3\]"):
        mean_field(unary, image, **{name: torch.ones(shape)})


def test_functional_rejects_zero_classes() -> None:
    with pytest.raises(ValueError, match="unary"):
        mean_field(torch.zeros(1, 0, 4, 4), torch.zeros(1, 3, 4, 4), backend="torch")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton") as info:
        functional.resolve_backend("triton", torch.device("cpu"))
    assert "CUDA" in str(info.value)
    assert functional.resolve_backend("auto", torch.device("cpu")) is reference
    assert functional.resolve_backend("torch", torch.device("cpu")) is reference
    unary, image = _inputs(5, 1, 3, 5, 4)
    with pytest.raises(ValueError, match="triton"):
        ConvCRF(3, filter_size=3, blur=1, num_iter=1, backend="triton")(unary, image)
    with pytest.raises(ValueError, match="triton"):
        mean_field(unary, image, filter_size=3, blur=1, num_iter=1, backend="triton")
    # 'auto' quietly falls back to the PyTorch path
    crf = ConvCRF(3, filter_size=3, blur=1, num_iter=1, backend="auto")
    torch.testing.assert_close(
        crf(unary, image),
        ConvCRF(3, filter_size=3, blur=1, num_iter=1, backend="torch")(unary, image),
        rtol=0,
        atol=0,
    )


def test_triton_backend_on_cpu_with_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = importlib.import_module("convcrf_triton.kernels")
    assert functional.resolve_backend("triton", torch.device("cpu")) is kernels
    assert functional.resolve_backend("auto", torch.device("cpu")) is kernels
    assert functional.resolve_backend("torch", torch.device("cpu")) is reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert functional.resolve_backend("auto", torch.device("cpu")) is reference


@pytest.mark.parametrize("backend", ["cuda", "Auto", "", None, "reference"])
def test_resolve_backend_rejects_unknown(backend: Any) -> None:
    with pytest.raises(ValueError, match="backend"):
        functional.resolve_backend(backend, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# 3. behaviour
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blur", [1, 2, 4])
def test_any_shape_on_successive_calls(blur: int) -> None:
    C = 3
    crf = ConvCRF(C, filter_size=7, blur=blur, num_iter=2, backend="torch")
    for seed, (B, H, W) in enumerate(
        [(1, 1, 1), (1, 1, 9), (3, 7, 5), (1, 23, 17), (3, 1, 1), (2, 9, 1), (1, 7, 5)]
    ):
        unary, image = _inputs(10 + seed, B, C, H, W)
        out = crf(unary, image)
        assert out.shape == unary.shape
        assert out.dtype == unary.dtype
        assert bool(torch.isfinite(out).all())
        # the same inputs through a fresh module give the same answer (no state carried between calls)
        fresh = ConvCRF(C, filter_size=7, blur=blur, num_iter=2, backend="torch")
        torch.testing.assert_close(out, fresh(unary, image), rtol=0, atol=0)


def test_single_pixel_with_centre_zero_is_unary() -> None:
    """1×1 image, textbook mode: no neighbours, so M = 0 and Z = (u − w)·log_softmax(unary)."""
    unary, image = _inputs(20, 2, 5, 1, 1)
    crf = ConvCRF(5, filter_size=3, blur=1, num_iter=3, backend="torch")
    expected = (1.0 - 0.2) * torch.log_softmax(unary, dim=1)
    torch.testing.assert_close(crf(unary, image), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blur", [1, 2])
def test_half_precision_inputs(dtype: torch.dtype, blur: int) -> None:
    unary, image = _inputs(21, 2, 4, 9, 7, dtype)
    crf = _small(4, blur=blur)
    out = crf(unary, image)
    assert out.dtype == dtype
    assert out.shape == unary.shape
    expected = crf(unary.float(), image.float())  # the same (rounded) values in float32
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
    # half unary with a float32 image (and vice versa) follows the unary's dtype
    assert crf(unary, image.float()).dtype == dtype
    assert crf(unary.float(), image).dtype == torch.float32


def test_float64_in_float64_out() -> None:
    unary, image = _inputs(22, 2, 4, 9, 7, torch.float64)
    crf = _small(4)
    out = crf(unary, image)
    assert out.dtype == torch.float64
    out32 = crf(unary.float(), image.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out.float(), out32, rtol=1e-4, atol=1e-4 * float(out32.abs().max()))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded_batch"])
def test_non_contiguous_inputs(layout: str) -> None:
    B, C, H, W = 2, 4, 9, 7
    unary, image = _inputs(23, B, C, H, W)
    if layout == "transposed":  # a view whose H and W strides are swapped
        u = unary.transpose(2, 3).contiguous().transpose(2, 3)
        im = image.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":  # every other column of a wider tensor
        u = torch.zeros(B, C, H, 2 * W).index_copy_(3, torch.arange(0, 2 * W, 2), unary)[..., ::2]
        im = torch.zeros(B, 3, H, 2 * W).index_copy_(3, torch.arange(0, 2 * W, 2), image)[..., ::2]
    elif layout == "channels_last":
        u = unary.contiguous(memory_format=torch.channels_last)
        im = image.contiguous(memory_format=torch.channels_last)
    else:  # batch of identical images as a stride-0 expand
        unary = unary[:1].expand(B, -1, -1, -1).contiguous()
        image = image[:1].expand(B, -1, -1, -1).contiguous()
        u, im = unary[:1].expand(B, -1, -1, -1), image[:1].expand(B, -1, -1, -1)
    assert not u.is_contiguous() and not im.is_contiguous()
    torch.testing.assert_close(u, unary, rtol=0, atol=0)
    for crf in (_small(C), _small(C, norm="sym", merge=False, blur=1, convcomp=True)):
        expected = crf(unary, image)
        out = crf(u, im)
        assert out.shape == unary.shape
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_backend_attribute_is_assignable() -> None:
    C = 3
    unary, image = _inputs(24, 1, C, 6, 5)
    crf = ConvCRF(C, filter_size=3, blur=2, num_iter=2, backend="torch")
    assert crf.backend == "torch"
    ref_out = crf(unary, image)
    crf.backend = "auto"
    assert crf.backend == "auto" and crf.config.backend == "auto"
    auto_out = crf(unary, image)  # the Triton kernels, in the interpreter
    torch.testing.assert_close(auto_out, ref_out, rtol=1e-5, atol=1e-5 * float(ref_out.abs().max()))
    crf.backend = "triton"
    assert crf.backend == "triton"
    crf.backend = "torch"
    assert crf.backend == "torch"
    torch.testing.assert_close(crf(unary, image), ref_out, rtol=0, atol=0)
    for bad in ("cuda", "Torch", "", None, 1):
        with pytest.raises(ValueError, match="backend"):
            crf.backend = bad
        assert crf.backend == "torch"
    assert "backend='torch'" in repr(crf)


LEARNABLE = {"weight", "log_pos_sdims", "log_col_schan", "pos_compat", "col_compat"}


@pytest.mark.parametrize("weight", ["vector", "scalar"])
@pytest.mark.parametrize("convcomp", [False, True])
def test_trainable_parameters(weight: str, convcomp: bool) -> None:
    C = 5
    crf = _small(C, weight=weight, convcomp=convcomp, trainable=True, weight_init=0.3)
    params = dict(crf.named_parameters())
    assert isinstance(crf.weight, nn.Parameter)
    assert params["weight"] is crf.weight and crf.weight.requires_grad
    assert crf.weight.shape == ((1, C, 1, 1) if weight == "vector" else ())
    assert torch.all(crf.weight == 0.3)
    if convcomp:
        assert isinstance(crf.compat_matrix, nn.Parameter)
        assert params["compat_matrix"] is crf.compat_matrix
        assert crf.compat_matrix.shape == (C, C)
        assert set(params) == LEARNABLE | {"compat_matrix"}
    else:
        assert crf.compat_matrix is None
        assert set(params) == LEARNABLE
    assert dict(crf.named_buffers()) == {}
    # gradients reach the parameters
    unary, image = _inputs(25, 1, C, 6, 5)
    crf(unary, image).square().sum().backward()
    for p in crf.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0)


@pytest.mark.parametrize("weight", ["vector", "scalar"])
@pytest.mark.parametrize("convcomp", [False, True])
def test_frozen_are_buffers(weight: str, convcomp: bool) -> None:
    C = 5
    crf = ConvCRF(C, weight=weight, convcomp=convcomp, trainable=False, backend="torch")
    assert list(crf.parameters()) == []
    buffers = dict(crf.named_buffers())
    assert buffers["weight"] is crf.weight and not isinstance(crf.weight, nn.Parameter)
    assert not crf.weight.requires_grad
    assert crf.weight.shape == ((1, C, 1, 1) if weight == "vector" else ())
    assert crf.weight.dim() == (4 if weight == "vector" else 0)
    if convcomp:
        assert buffers["compat_matrix"] is crf.compat_matrix
        assert not isinstance(crf.compat_matrix, nn.Parameter)
        assert set(buffers) == LEARNABLE | {"compat_matrix"}
    else:
        assert set(buffers) == LEARNABLE
    assert set(crf.state_dict()) == set(buffers)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("weight", ["vector", "scalar"])
def test_state_dict_round_trip(trainable: bool, weight: str) -> None:
    C = 4
    kw = dict(weight=weight, convcomp=True, trainable=trainable)
    src = _small(C, **kw)
    g = torch.Generator().manual_seed(26)
    with torch.no_grad():
        src.weight.copy_(torch.rand(src.weight.shape, generator=g))
        src.compat_matrix.copy_(torch.randn(C, C, generator=g) * 0.1)
        src.log_col_schan.add_(0.3)
        src.pos_compat.mul_(1.5)
    unary, image = _inputs(27, 2, C, 8, 7)
    expected = src(unary, image)
    dst = _small(C, **kw)
    assert not torch.equal(dst(unary, image), expected)
    state = src.state_dict()
    assert set(state) == LEARNABLE | {"compat_matrix"}
    dst.load_state_dict(state)
    torch.testing.assert_close(dst(unary, image), expected, rtol=0, atol=0)
    torch.testing.assert_close(dst.weight, src.weight, rtol=0, atol=0)


def test_to_float64() -> None:
    C = 4
    crf = _small(C, convcomp=True)
    unary, image = _inputs(28, 2, C, 8, 7, torch.float64)
    expected = crf(unary, image)
    crf64 = crf.to(torch.float64)
    assert crf64 is crf
    assert crf.weight.dtype == torch.float64 and crf.compat_matrix.dtype == torch.float64
    out = crf(unary, image)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    out32 = crf(unary.float(), image.float())  # a float64 module still returns the input's dtype
    assert out32.dtype == torch.float32
    trainable = _small(C, trainable=True).double()
    assert isinstance(trainable.weight, nn.Parameter) and trainable.weight.dtype == torch.float64
    assert trainable(unary, image).dtype == torch.float64


def test_final_softmax_returns_probabilities() -> None:
    C = 4
    unary, image = _inputs(29, 2, C, 8, 7)
    logits = _small(C)(unary, image)
    probs = _small(C, final_softmax=True)(unary, image)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 8, 7), rtol=1e-5, atol=1e-5)


def test_module_equals_functional() -> None:
    C = 4
    crf = _small(C, weight="vector", convcomp=True, col_use_pos=True, mode="convcrf")
    g = torch.Generator().manual_seed(30)
    with torch.no_grad():
        crf.weight.copy_(torch.rand(1, C, 1, 1, generator=g))
    unary, image = _inputs(31, 2, C, 8, 7)
    expected = mean_field(
        unary,
        image,
        filter_size=5,
        blur=2,
        num_iter=3,
        col_use_pos=True,
        weight=crf.weight,
        compat_matrix=crf.compat_matrix,
        mode="convcrf",
        backend="torch",
        # the module holds bandwidths as logs: pass exactly the values it uses
        pos_sdims=crf.log_pos_sdims.exp(),
        col_sdims=crf.log_col_sdims.exp(),
        col_schan=crf.log_col_schan.exp(),
    )
    torch.testing.assert_close(crf(unary, image), expected, rtol=0, atol=0)


def test_public_names() -> None:
    assert convcrf_triton.ConvCRF is ConvCRF
    assert convcrf_triton.CRFConfig is CRFConfig
    assert convcrf_triton.mean_field is mean_field
    assert issubclass(ConvCRF, nn.Module)


# ---------------------------------------------------------------------------------------------------------
# 4. from_convcrf_conf against the original formulation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("B", "C", "H", "W"), [(2, 21, 37, 29), (2, 5, 16, 16), (1, 3, 13, 21)])
def test_from_conf_default_matches_original(B: int, C: int, H: int, W: int) -> None:
    unary, image = _inputs(40 + H, B, C, H, W)
    crf = ConvCRF.from_convcrf_conf(convcrf_conf(), num_classes=C, backend="torch")
    assert crf.config.mode == "convcrf" and crf.num_classes == C
    expected = unfold_crf(unary, image, convcrf_conf(), C)
    _assert_close_scaled(crf(unary, image), expected, 1e-4)


CONF_VARIANTS = {
    "blur1": dict(blur=1, filter_size=7),
    "blur2": dict(blur=2),
    "filter5": dict(filter_size=5),
    "sym": dict(merge=False, norm="sym"),
    "sym_blur1": dict(merge=False, norm="sym", blur=1, filter_size=5),
    "merge_false": dict(merge=False),
    "convcomp": dict(convcomp=True),
    "scalar": dict(weight="scalar", weight_init=0.7),
    "weight_none": dict(weight=None),
    "final_softmax": dict(final_softmax=True),
    "use_bias": dict(col_feats={"use_bias": True}),
    "feats": dict(pos_feats={"sdims": 2, "compat": 5}, col_feats={"sdims": 40, "schan": 20, "compat": 4}),
    "unary_weight": dict(unary_weight=0.5, weight_init=0.4),
    "trainable": dict(trainable=True),
}


@pytest.mark.parametrize("variant", list(CONF_VARIANTS))
def test_from_conf_variants_match_original(variant: str) -> None:
    conf = convcrf_conf(**CONF_VARIANTS[variant])
    B, C, H, W = 2, 5, 19, 14
    unary, image = _inputs(50, B, C, H, W)
    crf = ConvCRF.from_convcrf_conf(conf, num_classes=C, backend="torch")
    comp_weight = None
    if conf["convcomp"]:
        assert crf.compat_matrix is not None and crf.compat_matrix.shape == (C, C)
        torch.testing.assert_close(crf.compat_matrix, torch.full((C, C), 0.1 * math.sqrt(2.0 / C)))
        comp_weight = crf.compat_matrix.view(C, C, 1, 1)
    else:
        assert crf.compat_matrix is None
    if conf["trainable"]:
        assert isinstance(crf.weight, nn.Parameter)
    else:
        assert list(crf.parameters()) == []
    with torch.no_grad():
        out = crf(unary, image)
    expected = unfold_crf(unary, image, conf, C, comp_weight=comp_weight)
    _assert_close_scaled(out, expected, 1e-4)
    if conf["final_softmax"]:
        torch.testing.assert_close(out.sum(1), torch.ones(B, H, W), rtol=1e-5, atol=1e-5)


def test_from_conf_convcomp_learned_matrix_matches_original() -> None:
    C = 4
    conf = convcrf_conf(convcomp=True, filter_size=5, blur=2)
    crf = ConvCRF.from_convcrf_conf(conf, num_classes=C, backend="torch")
    g = torch.Generator().manual_seed(51)
    with torch.no_grad():
        crf.compat_matrix.copy_(torch.randn(C, C, generator=g) * 0.2)
    unary, image = _inputs(52, 2, C, 11, 9)
    expected = unfold_crf(unary, image, conf, C, comp_weight=crf.compat_matrix.view(C, C, 1, 1))
    _assert_close_scaled(crf(unary, image), expected, 1e-4)


def test_from_conf_partial_dict_takes_original_defaults() -> None:
    C = 3
    crf = ConvCRF.from_convcrf_conf({"blur": 2, "pos_feats": {"sdims": 5}}, num_classes=C, backend="torch")
    cfg = crf.config
    assert (cfg.blur, cfg.filter_size, cfg.pos_sdims) == (2, 11, 5.0)
    assert (cfg.pos_compat, cfg.col_schan) == (3.0, 13.0)
    assert cfg.backend == "torch"
    assert ConvCRF.from_convcrf_conf({}, num_classes=C).backend == "auto"
    unary, image = _inputs(53, 1, C, 10, 9)
    expected = unfold_crf(unary, image, convcrf_conf(blur=2, pos_feats={"sdims": 5}), C)
    _assert_close_scaled(crf(unary, image), expected, 1e-4)


def test_from_conf_does_not_mutate_conf() -> None:
    conf = convcrf_conf(blur=2, col_feats={"use_bias": True})
    before = copy.deepcopy(conf)
    ConvCRF.from_convcrf_conf(conf, num_classes=3)
    assert conf == before


@pytest.mark.parametrize("conf", [None, [("blur", 4)], "conf", 3], ids=["None", "list", "str", "int"])
def test_from_conf_not_a_dict(conf: Any) -> None:
    with pytest.raises(TypeError, match="conf"):
        ConvCRF.from_convcrf_conf(conf, num_classes=3)


@pytest.mark.parametrize("key", ["logsoftmax", "softmax"])
def test_from_conf_unsupported_flags(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ConvCRF.from_convcrf_conf(convcrf_conf(**{key: False}), num_classes=3)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(blur=3), "blur"),
        (dict(filter_size=4), "filter_size"),
        (dict(norm="sym"), "norm"),  # merge=True
        (dict(weight="matrix"), "weight"),
        (dict(pos_feats={"sdims": 0}), "pos_sdims"),
        (dict(col_feats={"schan": -1}), "col_schan"),
    ],
)
def test_from_conf_bad_values(kw: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ConvCRF.from_convcrf_conf(convcrf_conf(**kw), num_classes=3)


# ---------------------------------------------------------------------------------------------------------
# 5. invariances (reference path, float64)
# ---------------------------------------------------------------------------------------------------------

INV_SETTINGS = {
    "textbook_blur1": dict(filter_size=5, blur=1),
    "textbook_blur4": dict(filter_size=7, blur=4),
    "convcrf_blur2": dict(filter_size=5, blur=2, mode="convcrf"),
    "sym_blur4": dict(filter_size=5, blur=4, norm="sym", col_use_pos=True),
}


def _mf(unary: torch.Tensor, image: torch.Tensor, **kw: Any) -> torch.Tensor:
    return mean_field(unary, image, num_iter=3, backend="torch", **kw)


@pytest.mark.parametrize("setting", list(INV_SETTINGS))
def test_batch_equals_per_image(setting: str) -> None:
    kw = INV_SETTINGS[setting]
    C = 4
    unary, image = _inputs(60, 3, C, 11, 9, torch.float64)
    weight = torch.linspace(0.1, 0.6, C, dtype=torch.float64).view(1, C, 1, 1)
    out = _mf(unary, image, weight=weight, **kw)
    for b in range(3):
        single = _mf(unary[b : b + 1], image[b : b + 1], weight=weight, **kw)
        torch.testing.assert_close(out[b : b + 1], single, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("setting", list(INV_SETTINGS))
@pytest.mark.parametrize("with_compat", [False, True])
def test_class_permutation_equivariance(setting: str, with_compat: bool) -> None:
    kw = INV_SETTINGS[setting]
    C = 5
    unary, image = _inputs(61, 2, C, 11, 9, torch.float64)
    g = torch.Generator().manual_seed(62)
    weight = torch.rand(1, C, 1, 1, generator=g, dtype=torch.float64)
    compat = torch.randn(C, C, generator=g, dtype=torch.float64) * 0.1 if with_compat else None
    perm = torch.randperm(C, generator=g)
    assert not torch.equal(perm, torch.arange(C))
    out = _mf(unary, image, weight=weight, compat_matrix=compat, **kw)
    out_p = _mf(
        unary[:, perm],
        image,
        weight=weight[:, perm],
        compat_matrix=None if compat is None else compat[perm][:, perm],
        **kw,
    )
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("setting", list(INV_SETTINGS))
@pytest.mark.parametrize(("H", "W"), [(11, 7), (9, 13), (5, 5)])
def test_transpose_equivariance(setting: str, H: int, W: int) -> None:
    kw = INV_SETTINGS[setting]
    C = 3
    unary, image = _inputs(63 + H, 2, C, H, W, torch.float64)
    out = _mf(unary, image, **kw)
    out_t = _mf(unary.transpose(2, 3), image.transpose(2, 3), **kw)
    torch.testing.assert_close(out_t, out.transpose(2, 3), rtol=1e-12, atol=1e-10)


def test_module_invariances_float64() -> None:
    """The same invariances through ``ConvCRF`` (blur 4, odd sizes) on a float64 module."""
    C = 4
    crf = ConvCRF(C, filter_size=5, blur=4, num_iter=3, backend="torch").double()
    with torch.no_grad():
        crf.weight.copy_(torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64).view(1, C, 1, 1))
    unary, image = _inputs(70, 2, C, 13, 7, torch.float64)
    out = crf(unary, image)
    torch.testing.assert_close(
        crf(unary.transpose(2, 3), image.transpose(2, 3)), out.transpose(2, 3), rtol=1e-12, atol=1e-10
    )
    torch.testing.assert_close(crf(unary[1:], image[1:]), out[1:], rtol=1e-12, atol=1e-10)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = ConvCRF(C, filter_size=5, blur=4, num_iter=3, backend="torch").double()
    with torch.no_grad():
        permuted.weight.copy_(crf.weight[:, perm])
    torch.testing.assert_close(permuted(unary[:, perm], image), out[:, perm], rtol=1e-12, atol=1e-10)
