"""``kernels.gaussian_features`` (the features and compat weights in one launch) against a float64 reference
written cell by cell from SPEC §1's blur pooling, and its place in an inference."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convcrf_triton import ConvCRF, functional, kernels


def reference_features(image, blur, pos_sdims, col_sdims, col_schan, col_use_pos):
    """float64 ``[B, 5|7, ceil(H/blur), ceil(W/blur)]``, one cell at a time: the mean row, column and colour of
    the real pixels of the cell (the grid centred on the image, padding split with the odd pixel after)."""
    image = image.double()
    B, _, H, W = image.shape
    h, w = math.ceil(H / blur), math.ceil(W / blur)
    top, left = math.ceil((h * blur - H) / 2), math.ceil((w * blur - W) / 2)
    out = torch.empty(B, 7 if col_use_pos else 5, h, w, dtype=torch.float64)
    for i in range(h):
        rows = range(max(i * blur - top, 0), min((i + 1) * blur - top, H))
        for j in range(w):
            cols = range(max(j * blur - left, 0), min((j + 1) * blur - left, W))
            y, x = sum(rows) / len(rows), sum(cols) / len(cols)
            colour = image[:, :, rows.start:rows.stop, cols.start:cols.stop].mean(dim=(2, 3)) / float(col_schan)
            position = [y / float(pos_sdims), x / float(pos_sdims)]
            if col_use_pos:
                position += [y / float(col_sdims), x / float(col_sdims)]
            out[:, : len(position), i, j] = torch.tensor(position, dtype=torch.float64)
            out[:, len(position):, i, j] = colour
    return out


def scalar(value, kind, device, index=0):
    """``value`` as a number, a 0-d float32 tensor, a one-element float64 tensor (a module's parameter: no
    gradient under no_grad); "mixed": the ``index``-th of number, 0-d, number, 1-d float64, ... (each scalar read
    from where its own flag says)."""
    if kind == "mixed":
        kind = ("number", "0d", "number", "1d64")[index % 4]
    if kind == "number":
        return value
    if kind == "0d":
        return torch.tensor(value, device=device)
    return torch.tensor([value], dtype=torch.float64, device=device)


# (B, H, W, blur, col_use_pos, scalar kind): odd sizes, blur 1 (no pooling), cells cut by both image edges,
# a blur larger than the image (one cell), batches.
CASES = [
    (1, 1, 1, 1, False, "number"),
    (2, 13, 17, 4, False, "0d"),
    (1, 9, 8, 1, True, "1d64"),
    (3, 7, 11, 2, True, "number"),
    (1, 5, 3, 8, False, "1d64"),
    (2, 23, 6, 6, True, "0d"),
    (1, 30, 41, 4, False, "number"),
    (2, 10, 9, 2, True, "mixed"),
]


@pytest.mark.parametrize("B,H,W,blur,col_use_pos,kind", CASES)
def test_features_match_the_float64_reference(B, H, W, blur, col_use_pos, kind, device):
    g = torch.Generator().manual_seed(B * 1000 + H * 10 + W)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    values = dict(pos_sdims=2.5 + blur, col_sdims=60.0 + H, col_schan=13.0 - blur / 4, pos_compat=3.5,
                  col_compat=-1.25 * W)
    scalars = {name: scalar(v, kind, device, i) for i, (name, v) in enumerate(values.items())}
    feats, compats = kernels.gaussian_features(image, blur, col_use_pos=col_use_pos, **scalars)
    want = reference_features(image.cpu(), blur, values["pos_sdims"], values["col_sdims"], values["col_schan"],
                              col_use_pos)
    assert feats.shape == want.shape and feats.dtype == torch.float32 and feats.is_contiguous()
    torch.testing.assert_close(feats.cpu().double(), want, rtol=1e-6, atol=0)  # float32 sums of <= 64
    assert compats.tolist() == [values["pos_compat"], values["col_compat"]]
    # The positions are exact (half-integers over a divisor, rounded once), as PyTorch's pooled positions are.
    n_pos = 4 if col_use_pos else 2
    torch.testing.assert_close(feats.cpu()[:, :n_pos], want[:, :n_pos].float(), rtol=0, atol=0)


def test_image_layout_and_dtype(device):
    """Any strides and float dtype: channels-last, a crop of a larger image and float16 give the features of
    the same values, contiguous."""
    g = torch.Generator().manual_seed(7)
    big = (torch.rand(2, 3, 19, 25, generator=g) * 255).to(device)
    image = big[:, :, 2:17, 3:22]
    args = dict(pos_sdims=3.0, col_sdims=80.0, col_schan=13.0, pos_compat=3.0, col_compat=10.0, col_use_pos=True)
    want, _ = kernels.gaussian_features(image.contiguous(), 4, **args)
    assert torch.equal(kernels.gaussian_features(image, 4, **args)[0], want)
    assert torch.equal(kernels.gaussian_features(image.contiguous(memory_format=torch.channels_last), 4, **args)[0],
                       want)
    half = image.half()
    torch.testing.assert_close(kernels.gaussian_features(half, 4, **args)[0],
                               kernels.gaussian_features(half.float(), 4, **args)[0], rtol=0, atol=0)


def test_equal_to_the_pytorch_features(device):
    """The PyTorch path (``functional.features``, training's) and the kernel agree to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(2, 3, 21, 18, generator=g) * 255).to(device)
    pos, col = functional.features(image, 4, 3.0, 70.0, 11.0, True)
    feats, _ = kernels.gaussian_features(image, 4, pos_sdims=3.0, col_sdims=70.0, col_schan=11.0, pos_compat=1.0,
                                         col_compat=1.0, col_use_pos=True)
    torch.testing.assert_close(feats, torch.cat([pos, col], 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3e38], ids=["nan", "inf", "-inf", "overflow"])
def test_nonfinite_flags_a_cell_whose_colours_do_not_sum_to_a_finite_number(value, device):
    """``nonfinite`` stays 0 for finite colours and is set to 1 by a NaN or an Inf in one channel of one pixel (of
    the second image, in a cell the image's edge cuts, the image channels-last), or by finite colours whose sum
    overflows (which the functional layer's element-wise test then lets through); the features are those of the
    kernel without the test."""
    g = torch.Generator().manual_seed(11)
    image = (torch.rand(2, 3, 13, 10, generator=g) * 255).to(device).contiguous(memory_format=torch.channels_last)
    args = dict(pos_sdims=3.0, col_sdims=80.0, col_schan=13.0, pos_compat=3.0, col_compat=10.0, col_use_pos=False)
    flag = torch.zeros(1, device=device)
    want, _ = kernels.gaussian_features(image, 4, **args)
    assert torch.equal(kernels.gaussian_features(image, 4, **args, nonfinite=flag)[0], want)
    assert flag.item() == 0
    if value == 3e38:
        image[1, :, 12, 9] = value
    else:
        image[1, 1, 12, 9] = value
    kernels.gaussian_features(image, 4, **args, nonfinite=flag)
    assert flag.item() == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=torch.rand(1, 4, 5, 5)), "image must be a floating-point \\[B, 3, H, W\\]"),
    (dict(image=torch.randint(0, 255, (1, 3, 5, 5))), "image must be a floating-point"),
    (dict(blur=0), "blur must be an int >= 1"),
    (dict(blur=2.0), "blur must be an int >= 1"),
    (dict(pos_sdims=torch.tensor([3.0, 3.0])), "pos_sdims must be a number or a one-element tensor"),
    (dict(col_compat=torch.ones(1, 2)), "col_compat must be a number or a one-element tensor"),
    (dict(col_schan=torch.tensor(13.0, requires_grad=True)), "does not differentiate col_schan"),
    (dict(image=torch.rand(1, 3, 5, 5, requires_grad=True)), "does not differentiate image"),
    (dict(nonfinite=torch.zeros(1, dtype=torch.int32)), "nonfinite must be a one-element float32 tensor"),
    (dict(nonfinite=torch.zeros(2)), "nonfinite must be a one-element float32 tensor"),
])
def test_bad_arguments_name_themselves(kwargs, match, device):
    args = dict(image=torch.rand(1, 3, 5, 5), blur=2, pos_sdims=3.0, col_sdims=80.0, col_schan=13.0,
                pos_compat=3.0, col_compat=10.0, col_use_pos=False)
    args.update(kwargs)
    args = {k: v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        kernels.gaussian_features(args.pop("image"), args.pop("blur"), **args)


class _Ops(TorchDispatchMode):
    """The names of the operators an inference dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm", ["none", "sym"])
def test_an_inference_builds_its_features_in_one_launch(norm, device):
    """Without gradients the Triton path builds the features with the kernel, not PyTorch's pooling (and
    gives the PyTorch backend's output); with them, PyTorch's differentiable ops."""
    g = torch.Generator().manual_seed(5)
    unary, image = torch.randn(2, 4, 11, 13, generator=g).to(device), (torch.rand(2, 3, 11, 13, generator=g)
                                                                       * 255).to(device)
    crf = ConvCRF(4, filter_size=3, blur=2, num_iter=2, norm=norm, merge=False, col_use_pos=True,
                  backend="triton").to(device)
    with torch.no_grad(), _Ops() as ops:
        got = crf(unary, image)
    # (PyTorch's features start from aten.arange, the positions)
    assert ops.names.count("convcrf_triton.gaussian_features") == 1 and "aten.arange" not in ops.names
    crf.backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(got, crf(unary, image), rtol=1e-5, atol=1e-5)
    trained = ConvCRF(4, filter_size=3, blur=2, num_iter=1, trainable=True, backend="triton").to(device)
    with _Ops() as ops:
        trained(unary, image).sum().backward()
    assert "convcrf_triton.gaussian_features" not in ops.names and "aten.arange" in ops.names
    assert trained.log_pos_sdims.grad is not None
