"""torch.compile(ConvCRF) captures the whole model as one graph (fullgraph=True): on the reference path,
and on the Triton path, whose kernels are torch.library custom ops with fake implementations."""

import pytest
import torch

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


def test_inductor_compiles_the_reference_path():
    torch._dynamo.reset()
    unary, image = _inputs()
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=2, backend="torch")
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
