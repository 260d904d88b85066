"""README.md's Python examples run as written, on small inputs.

Each ```python block of the README is executed with its placeholders (the user's network, images, folders)
defined first and a few edits that make it run here (each edit must find its text: a README whose example
changed fails this test until the edit is updated). On a machine without CUDA the GPU lines run on the CPU, on
the PyTorch path as a user's CPU does (not the tests' interpreted kernels).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def edited(block: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert old in block, f"README's example no longer contains {old!r}: update tests/test_readme.py"
        block = block.replace(old, new)
    return block


def block_with(marker: str) -> str:
    blocks = [b for b in python_blocks() if marker in b]
    assert len(blocks) == 1, f"expected one README example with {marker!r}, found {len(blocks)}"
    return blocks[0]


@pytest.fixture(autouse=True)
def users_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend="auto"`` on the CPU takes the PyTorch path, as outside the tests (the suite sets TRITON_INTERPRET=1,
    which would route it to the interpreted kernels: minutes for these examples)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def on_this_machine() -> list[tuple[str, str]]:
    return [] if torch.cuda.is_available() else [(".cuda()", ".cpu()"), ('"cuda:1"', '"cpu"')]


def test_every_example_is_covered() -> None:
    assert len(python_blocks()) == 3, "a README example was added or removed: cover it here"


def test_usage_example() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 29, 37)
    namespace = {
        "segmentation_net": lambda x: torch.randn(x.shape[0], 21, *x.shape[2:]),
        "images": images,
        "images_uint8": (images * 255).to(torch.uint8),
    }
    exec(edited(block_with("from convcrf_triton import ConvCRF\n\ncrf ="), on_this_machine()), namespace)
    refined, labels = namespace["refined"], namespace["labels"]
    assert refined.shape == (2, 21, 29, 37) and torch.isfinite(refined).all()
    assert labels.shape == (2, 29, 37)


def test_training_example(voc7: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = edited(block_with("from convcrf_triton.train import"), [
        ('load_samples("images/", "labels/")', f"load_samples({str(voc7 / 'images')!r}, {str(voc7 / 'labels')!r})[:2]"),
        ("epochs=40", "epochs=1"),
    ])
    namespace: dict = {}
    exec(code, namespace)
    assert (tmp_path / "crf.pt").is_file()
    assert namespace["crf"].config.convcomp


def test_pydensecrf_example() -> None:
    rng = np.random.default_rng(0)
    H, W, n_labels = 23, 31, 4
    probs = rng.dirichlet(np.ones(n_labels), size=(H, W)).transpose(2, 0, 1).astype(np.float32)
    namespace = {"W": W, "H": H, "n_labels": n_labels, "probs": probs,
                 "rgb_uint8_HxWx3": rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "print": lambda *a: None}
    exec(block_with("import convcrf_triton.densecrf as dcrf"), namespace)
    Q = namespace["Q"]
    assert Q.shape == (n_labels, H * W) and Q.dtype == np.float32
    np.testing.assert_allclose(Q.sum(0), 1, rtol=1e-5)
    assert namespace["labels"].shape == (H, W)
