"""torch.compile(ConvCRF) captures the whole model as one graph (fullgraph=True): on the reference path,
and on the Triton path, whose kernels are torch.library custom ops with fake implementations."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._functorch.aot_autograd import make_boxed_func

from convcrf_triton import ConvCRF


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 13, 11, generator=g), torch.rand(2, 3, 13, 11, generator=g) * 255


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    unary, image = _inputs()
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=2, norm="sym", merge=False, convcomp=True, trainable=True,
                  backend=backend)
    want = crf(unary, image)
    want.square().sum().backward()
    eager_grads = {k: v.grad.clone() for k, v in crf.named_parameters()}
    crf.zero_grad()
    got = torch.compile(crf, fullgraph=True, backend="aot_eager")(unary, image)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(getattr(crf, name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("norm", ["none", "sym"])
@pytest.mark.parametrize(("filter_size", "blur", "size", "form"), [(3, 2, (13, 11), "dense"),
                                                                    (5, 1, (12, 30), "band")])
def test_inductor_compiles_the_reference_path(norm, filter_size, blur, size, form):
    """Inference, one graph: with ``norm='sym'`` the eager loop's in-place products and sums and its reused
    ``n ⊙ Q`` buffer (``out=``) trace too; the message pass through ``matrix_pass``'s ops, dense or banded."""
    from convcrf_triton import matrix_pass

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    unary, image = torch.randn(2, 3, *size, generator=g), torch.rand(2, 3, *size, generator=g) * 255
    plan = matrix_pass._plan((2, filter_size**2, -(-size[0] // blur), -(-size[1] // blur)), None)
    assert (plan == "dense") == (form == "dense") and plan is not None
    crf = ConvCRF(3, filter_size=filter_size, blur=blur, num_iter=2, norm=norm, merge=norm == "none",
                  backend="torch")
    with torch.no_grad():
        want = crf(unary, image)
        got = torch.compile(crf, fullgraph=True)(unary, image)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fullgraph_inference_on_the_triton_path():
    """Inference on the Triton path is one graph of the kernels' ops, the features' launch among them."""
    torch._dynamo.reset()
    unary, image = _inputs()
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=2, col_use_pos=True, backend="triton")
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    with torch.no_grad():
        want = crf(unary, image)
        got = torch.compile(crf, fullgraph=True, backend=record)(unary, image)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert "convcrf_triton.gaussian_features.default" in targets
    assert "convcrf_triton.blur_step.default" in targets


# Sizes whose remainders modulo the blur differ (so do the pooled grids' paddings), the last smaller than the first.
SIZES = [(13, 11), (16, 9), (10, 14)]


def _eager_and_inputs(backend: str, blur: int):
    crf = ConvCRF(3, filter_size=3, blur=blur, num_iter=2, col_use_pos=True, backend=backend).eval()
    g = torch.Generator().manual_seed(blur)
    inputs = [(torch.randn(1, 3, H, W, generator=g), torch.rand(1, 3, H, W, generator=g) * 255) for H, W in SIZES]
    return crf, inputs


@pytest.mark.parametrize(("backend", "blur"), [("torch", 1), ("torch", 2), ("triton", 4)])
def test_one_graph_serves_every_image_size(backend: str, blur: int) -> None:
    """``torch.compile(dynamic=True)`` traces one whole graph for every image size: nothing in the traced code (the blur
    path's padding, pooling and cropping, the weights' windows, the message pass's bands) specialises on the
    height or width, so a folder of images of many sizes compiles once, not once a size up to dynamo's limit."""
    torch._dynamo.reset()
    crf, inputs = _eager_and_inputs(backend, blur)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(crf, dynamic=True, fullgraph=True, backend=counter)
    with torch.no_grad():
        for i, (unary, image) in enumerate(inputs):
            got = compiled(unary, image)
            if i == 0:
                frames = counter.frame_count
            torch.testing.assert_close(got, crf(unary, image), rtol=1e-5, atol=1e-5, msg=str(SIZES[i]))
    assert counter.frame_count == frames, "a new image size recompiled"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_with_a_dynamic_height_and_width(backend: str) -> None:
    """``torch.export`` with symbolic height and width, from ``blur · filter_size`` pixels up (smaller grids meet
    PyTorch's size-1 special cases, which export specialises): the exported program runs every size in its range,
    the smallest too, and equals the eager module (the Triton path's program holds this package's ops)."""
    crf, inputs = _eager_and_inputs(backend, 2)
    g = torch.Generator().manual_seed(0)
    inputs.append((torch.randn(1, 3, 6, 7, generator=g), torch.rand(1, 3, 6, 7, generator=g) * 255))
    H, W = torch.export.Dim("H", min=6, max=4096), torch.export.Dim("W", min=6, max=4096)
    with torch.no_grad():
        program = torch.export.export(crf, inputs[0], dynamic_shapes=({2: H, 3: W}, {2: H, 3: W}))
        for unary, image in inputs:
            torch.testing.assert_close(program.module()(unary, image), crf(unary, image), rtol=1e-5, atol=1e-5)


def _call_targets(crf: ConvCRF, unary: torch.Tensor, image: torch.Tensor) -> set[str]:
    """The ops of the graph ``torch.compile`` traces for one call."""
    torch._dynamo.reset()
    targets = set()

    def record(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch.compile(crf, fullgraph=True, backend=record)(unary, image)
    return targets


def _aten_targets(crf: ConvCRF, unary: torch.Tensor, image: torch.Tensor) -> set[str]:
    """The ATen ops of the forward graph AOTAutograd traces for a training call."""
    torch._dynamo.reset()
    targets = set()

    def record(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    torch.compile(crf, fullgraph=True, backend=aot_autograd(fw_compiler=record))(unary, image)
    return targets


REFERENCE_OPS = {f"convcrf_triton.{name}.default"
                 for name in ("reference_gaussian_weights", "reference_message_pass", "reference_blur_pool",
                              "reference_blur_upsample", "matrix_pass_weights", "matrix_message_pass")}


def test_a_cpu_inference_compiles_the_eager_ops_as_custom_ops() -> None:
    """Traced for a CPU inference, the weights, the message pass and the resampling are custom ops running the eager
    code (inductor's own code for their k² shifted views compiled ~10× slower and ran 2-5× slower); where a gradient
    flows (the message passes of trainable parameters), and in an exported program, ATen ops."""
    crf, inputs = _eager_and_inputs("torch", 2)
    with torch.no_grad():  # (the message pass through matrix_pass's ops, which call the window sums' where they win)
        assert REFERENCE_OPS - {"convcrf_triton.reference_message_pass.default"} <= _call_targets(crf, *inputs[0])
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=2, trainable=True, backend="torch")
    assert "aten.addcmul.default" in {str(t) for t in _aten_targets(crf, *inputs[0])}
    with torch.no_grad():
        program = torch.export.export(crf, inputs[0])
    assert not any("convcrf_triton" in str(node.target) for node in program.graph.nodes)


@pytest.mark.parametrize("op", sorted(REFERENCE_OPS))
def test_the_custom_ops_agree_with_their_fake_implementations(op: str) -> None:
    """``torch.library.opcheck``: schema, fake shapes and strides (the upsampling's output is rows of a taller
    tensor; the matrix form's size is known when it runs) and the compiled dispatch, on odd sizes."""
    from convcrf_triton import matrix_pass, reference, resample

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 7, 9, generator=g)
    # (the matrix ops on a dense, a banded and a window-sum size)
    Ks = [torch.rand(2, 25, 7, 9, generator=g), torch.rand(1, 25, 12, 30, generator=g),
          torch.rand(1, 9, 12, 30, generator=g)]
    samples = {
        "matrix_pass_weights": [(matrix_pass._weights_op, (K,)) for K in Ks],
        "matrix_message_pass": [(matrix_pass._pass_op, (K, matrix_pass._weights_op(K),
                                                        torch.rand(K.shape[0], 4, *K.shape[2:], generator=g)))
                                for K in Ks],
        "gaussian_weights": (reference._gaussian_weights_op, (feats, [2, 3], torch.tensor([3.0, 10.0]), 5, False,
                                                              None, None)),
        "message_pass": (reference._message_pass_op, (torch.rand(2, 25, 7, 9, generator=g),
                                                      torch.rand(2, 4, 7, 9, generator=g))),
        "blur_pool": (resample._pool_op, (torch.randn(2, 4, 13, 11, generator=g), 4)),
        "blur_upsample": (resample._upsample_op, (torch.randn(2, 4, 4, 3, generator=g), 4, 13, 11)),
    }
    sample = samples[op.split(".")[1].removeprefix("reference_")]
    for fn, args in sample if isinstance(sample, list) else [sample]:
        torch.library.opcheck(fn, args)
