"""Test configuration: where the Triton kernels run; find the shared data.

By default every kernel runs under Triton's CPU interpreter on CPU tensors. ``CONVCRF_TEST_DEVICE=cuda``
runs the kernel tests (the ``device`` fixture's users) compiled on the GPU instead; the tests written for
the interpreter alone are then skipped. ``TRITON_INTERPRET`` must be set before triton is first imported,
so it is set here, at the top of the first module pytest imports. Under the interpreter, helper calls skip its
repeated patching of ``triton.language`` (:mod:`fast_interpreter`).
"""

import os

DEVICE = os.environ.get("CONVCRF_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"CONVCRF_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

if os.environ["TRITON_INTERPRET"] not in ("", "0"):
    import fast_interpreter

    fast_interpreter.install()  # about half the interpreted kernels' time (see its docstring)

VOC7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc7"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: a GPU-sized case, run only with CONVCRF_TEST_DEVICE=cuda")


def pytest_collection_modifyitems(config, items):
    """On the GPU only the tests that take the ``device`` fixture run: the rest drive the kernels with CPU
    tensors, which only the interpreter accepts. Under the interpreter the GPU-sized cases are skipped."""
    if DEVICE == "cuda":
        skip = pytest.mark.skip(reason="CONVCRF_TEST_DEVICE=cuda runs only the device tests")
        for item in items:
            if "device" not in getattr(item, "fixturenames", ()):
                item.add_marker(skip)
    else:
        skip = pytest.mark.skip(reason="a GPU-sized case: run with CONVCRF_TEST_DEVICE=cuda")
        for item in items:
            if item.get_closest_marker("gpu_only"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """Where the kernel tests put their tensors: ``cpu`` (interpreter) or ``cuda`` (compiled)."""
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("CONVCRF_TEST_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(DEVICE)


@pytest.fixture
def every_call(monkeypatch):
    """For tests that count the kernels' function calls of an inference: compiled, ``kernels.Repeat`` replays the
    middle iterations' launches without calling the functions (``test_direct_launch.py`` tests that), so here
    every iteration calls them, as under the interpreter."""
    from convcrf_triton.kernels import _launch

    monkeypatch.setattr(_launch, "REPEAT", False)


@pytest.fixture(scope="session")
def voc7() -> Path:
    """``../shared/data/voc7`` (images/ and labels/): skipped when absent, a failure under CI
    (``CONVCRF_REQUIRE_DATA=1``)."""
    if not (VOC7 / "images").is_dir():
        if os.environ.get("CONVCRF_REQUIRE_DATA") == "1":
            pytest.fail(f"CONVCRF_REQUIRE_DATA=1 but the data set is missing: {VOC7}")
        pytest.skip(f"data set not found at {VOC7} (it lives in the project's shared/ folder)")
    return VOC7
