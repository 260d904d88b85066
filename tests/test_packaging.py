"""The wheel a user installs: the kernels as ``convcrf_triton.kernels`` (never a bare top-level ``kernels``), every
module of the tree, the typing marker, the licence and the command's entry point; no tests or benchmarks.

Built from a copy of the project's sources (the tree stays untouched) with the installed setuptools, offline.
"""

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
