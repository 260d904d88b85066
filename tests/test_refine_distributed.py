"""``convcrf-triton refine`` on a folder under ``torchrun --nproc-per-node 2`` (two CPU processes, gloo): the
ranks share the folder, every output is written once and equals a single-process run, and one summary line
is printed. One subprocess (torch starts twice); well under a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convcrf_triton import cli
from convcrf_triton.data import read_labels, synthetic_unary, write_labels
from convcrf_triton.scene import make_scene

FAST = ["--backend", "torch", "--filter-size", "5", "--blur", "2", "--iters", "3"]


def test_torchrun_two_processes_shard_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch.distributed.run")
    images, probs = tmp_path / "images", tmp_path / "probs"
    images.mkdir()
    probs.mkdir()
    n = 5
    for i in range(n):
        rgb, labels = make_scene(24, 32, seed=i)
        Image.fromarray(rgb).save(images / f"im{i}.png")
        np.save(probs / f"im{i}.npy", synthetic_unary(labels, 21, seed=i).astype(np.float32))
    # One output is already there: the rank that owns it skips it.
    (tmp_path / "out").mkdir()
    write_labels(tmp_path / "out" / "im3.png", np.zeros((24, 32), np.int64))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convcrf_triton", "refine", "--images", str(images), "--probs", str(probs),
           "--out", str(tmp_path / "out"), *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("refined")]
    assert len(summary) == 1, proc.stdout
    assert "refined 4 images, skipped 1 already done" in summary[0] and "on 2 processes" in summary[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"im{i}.png" for i in range(n)]

    # The same folder refined in one process gives the same labels.
    rc = cli.main(["refine", "--images", str(images), "--probs", str(probs), "--out", str(tmp_path / "single"),
                   *FAST])
    assert rc == 0, capsys.readouterr().err
    for i in range(n):
        if i != 3:
            assert np.array_equal(read_labels(tmp_path / "out" / f"im{i}.png"),
                                  read_labels(tmp_path / "single" / f"im{i}.png")), i

    # A bad input on one rank: that rank says which (one line of ours), the others finish and nobody hangs.
    (probs / "im1.npy").write_bytes(b"not a numpy file")  # im1 belongs to rank 1
    cmd[cmd.index("--out") + 1] = str(tmp_path / "out2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("convcrf-triton")]
    assert ours == [f"convcrf-triton refine: error: [rank 1] probs {probs / 'im1.npy'}: not a readable .npy array "
                    "(numpy.save of a numeric array)"], proc.stderr[-3000:]
    assert "refined" not in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["im0.png", "im2.png", "im4.png"]  # rank 0's
