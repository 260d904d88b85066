"""The wheel a user installs: the kernels as ``convcrf_triton.kernels`` (never a bare top-level ``kernels``), every
module of the tree, the typing marker, the licence and the command's entry point; no tests or benchmarks.

Built from a copy of the project's sources (the tree stays untouched) with the installed setuptools, offline.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("convcrf_triton", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out)], check=True, cwd=src)
    (path,) = out.glob("convcrf_triton-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_package_and_its_kernels(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    want = {f"convcrf_triton/{p.name}" for p in (ROOT / "convcrf_triton").glob("*.py")}
    want |= {f"convcrf_triton/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert want <= names, sorted(want - names)
    assert "convcrf_triton/py.typed" in names
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"convcrf_triton"}, top


def test_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    (info,) = {n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA")}
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: torch>=" in metadata
    assert "MIT License" in wheel.read(f"{info}/licenses/LICENSE").decode()
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "convcrf-triton = convcrf_triton.cli:main" in entry_points


WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
import numpy as np
import torch
import convcrf_triton.densecrf as dcrf
from convcrf_triton import ConvCRF, mean_field

u, im = torch.randn(1, 4, 20, 24), torch.rand(1, 3, 20, 24) * 255
assert ConvCRF(4, filter_size=5)(u, im).shape == (1, 4, 20, 24)
crf = ConvCRF(4, filter_size=5, blur=1, trainable=True, convcomp=True)
crf(u, im).square().sum().backward()
assert all(p.grad is not None for p in crf.parameters())
assert mean_field(u, im, filter_size=3, blur=2).shape == (1, 4, 20, 24)
d = dcrf.DenseCRF2D(24, 20, 4)
d.setUnaryEnergy(np.random.default_rng(0).random((4, 480), dtype=np.float32))
d.addPairwiseBilateral(sxy=5, srgb=13, rgbim=np.zeros((20, 24, 3), np.uint8), compat=10)
assert d.inference(2).shape == (4, 480)
try:
    ConvCRF(4, backend="triton")(u, im)
except ValueError as e:
    assert "backend='triton' needs CUDA" in str(e), e
else:
    raise AssertionError("backend='triton' on the CPU without triton did not raise")
assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
"""


def test_the_cpu_path_runs_without_triton() -> None:
    """triton has wheels for Linux only (pyproject's marker): on macOS or Windows the package installs without it,
    and inference, training and the pydensecrf API on the CPU never import it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", WITHOUT_TRITON], check=True, cwd=ROOT, env=env, timeout=300)
