"""``ConvCRF.use_cuda_graphs``: replayed inference equals eager inference, records once per shape, sees
in-place parameter updates, and leaves CPU calls and gradient calls to the eager path."""

import copy
import dataclasses
import io

import pytest
import torch

from convcrf_triton import ConvCRF
from convcrf_triton.graphs import GraphCache


def _inputs(seed, B, C, H, W, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g) * 2).to(device), (torch.rand(B, 3, H, W, generator=g) * 255).to(device)


@pytest.mark.parametrize("blur,filter_size", [(1, 5), (2, 7)])
def test_replay_matches_eager_and_records_once_per_shape(blur, filter_size, device):
    # On the CPU nothing is recorded and both models run eagerly: the PyTorch backend there, not ten inferences
    # in the interpreter that compare its kernels with themselves.
    backend = "auto" if device.type == "cuda" else "torch"
    crf = ConvCRF(4, filter_size=filter_size, blur=blur, num_iter=3, convcomp=True, backend=backend).to(device)
    eager = ConvCRF(4, filter_size=filter_size, blur=blur, num_iter=3, convcomp=True, backend=backend).to(device)
    eager.load_state_dict(crf.state_dict())
    crf.use_cuda_graphs()
    with torch.no_grad():
        for seed, shape in enumerate([(2, 4, 9, 11), (2, 4, 9, 11), (1, 4, 12, 7), (2, 4, 9, 11)]):
            unary, image = _inputs(seed, *shape, device)
            got, want = crf(unary, image), eager(unary, image)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        crf.weight.data.mul_(3.0)  # in place: the next replay reads the new values
        eager.weight.data.mul_(3.0)
        torch.testing.assert_close(crf(unary, image), eager(unary, image), rtol=1e-5, atol=1e-5)
    assert crf._graphs.captures == (2 if device.type == "cuda" else 0)


def test_a_new_config_records_anew(device):
    """The replay follows the module's config: after ``num_iter`` or the backend changes, the next call records
    (on the GPU) and gives the eager output of the new config, not the old graph's."""
    backend = "triton" if device.type == "cuda" else "torch"
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=3, backend=backend).to(device).use_cuda_graphs()
    eager = copy.deepcopy(crf).use_cuda_graphs(False)
    unary, image = _inputs(11, 1, 3, 10, 12, device)
    with torch.no_grad():
        crf(unary, image)
        for change in (dict(num_iter=1), dict(backend="torch")):
            crf.config = eager.config = dataclasses.replace(crf.config, **change)
            torch.testing.assert_close(crf(unary, image), eager(unary, image), rtol=1e-5, atol=1e-5)
    assert crf._graphs.captures == (3 if device.type == "cuda" else 0)


def test_the_key_holds_the_context():
    config = ["a"]
    cache = GraphCache(lambda x: x, lambda: [], context=lambda: config[0])
    before = cache.key((torch.ones(2),))
    config[0] = "b"
    assert cache.key((torch.ones(2),)) != before


def test_gradient_calls_run_eagerly(device):
    crf = ConvCRF(3, filter_size=3, blur=1, num_iter=2, trainable=True).to(device).use_cuda_graphs()
    unary, image = _inputs(5, 1, 3, 9, 8, device)
    crf(unary.requires_grad_(), image).sum().backward()
    assert unary.grad is not None and crf.weight.grad is not None and crf._graphs.captures == 0


def test_graph_cache_rejects_gradients_and_bad_sizes():
    with pytest.raises(ValueError, match="max_entries"):
        GraphCache(lambda x: x, lambda: [], max_entries=0)
    cache = GraphCache(lambda x: x, lambda: [])
    with pytest.raises(RuntimeError, match="inference"):
        cache(torch.ones(2, requires_grad=True))


def test_recorded_under_inference_mode_replays_under_no_grad(device):
    crf = ConvCRF(3, filter_size=3, blur=2, num_iter=2).to(device).use_cuda_graphs()
    unary, image = _inputs(7, 1, 3, 10, 12, device)
    with torch.inference_mode():
        first = crf(unary, image)
    with torch.no_grad():
        again = crf(unary * 0.5, image)
        want = ConvCRF(3, filter_size=3, blur=2, num_iter=2).to(device)(unary * 0.5, image)
    assert first.shape == again.shape == unary.shape
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_replays_on_two_streams_wait_for_each_other(device):
    """A replay on a second stream must not refill the static inputs before the first stream's replay, held back
    on the GPU, has read them (nor overwrite the output before its copy): each replay waits for the last."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs are recorded on the GPU only")
    crf = ConvCRF(4, filter_size=5, blur=1, num_iter=2).to(device).use_cuda_graphs()
    eager = ConvCRF(4, filter_size=5, blur=1, num_iter=2).to(device)
    a, b = _inputs(11, 1, 4, 20, 24, device), _inputs(12, 1, 4, 20, 24, device)
    with torch.no_grad():
        crf(*a)  # recorded
        torch.cuda.synchronize()
        first, second = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(first):
            torch.cuda._sleep(100_000_000)  # this stream's replay starts ~50 ms later on the GPU
            got_a = crf(*a)
        with torch.cuda.stream(second):
            got_b = crf(*b)
        torch.cuda.synchronize()
        torch.testing.assert_close(got_a, eager(*a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_b, eager(*b), rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_record_graphs_of_their_own():
    """deepcopy and pickle (torch.save of the module) keep graph replay on, with its size, in a cache of the
    copy's own (its method, its parameters), and nothing recorded."""
    crf = ConvCRF(3, filter_size=3, blur=1, num_iter=2, backend="torch").use_cuda_graphs(max_entries=3)
    buffer = io.BytesIO()
    torch.save(crf, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(crf), torch.load(buffer, weights_only=False)):
        assert twin._graphs is not crf._graphs and twin._graphs.max_entries == 3 and not twin._graphs.entries
        assert twin._graphs.fn.__self__ is twin
        assert [t.data_ptr() for t in twin._graphs.state()] == [t.data_ptr() for t in twin.buffers()]
        unary, image = _inputs(9, 1, 3, 6, 7, "cpu")
        torch.testing.assert_close(twin(unary, image), crf(unary, image), rtol=0, atol=0)
    assert copy.deepcopy(ConvCRF(3))._graphs is None
