"""The PyTorch path's CPU loop a band of pooled rows at a time (``convcrf_triton.cell_bands``): against the explicit
float64 oracle, and against the loop of whole full-resolution tensors it replaces (float64, every mode and option,
grid shapes whose border cells are short, one cell a band and every cell in one), then in float32; and where it runs.
Shapes: unary ``[B, C, H, W]``, image ``[B, 3, H, W]``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from oracle import naive_crf

from convcrf_triton import cell_bands, functional
from convcrf_triton.module import ConvCRF


def _inputs(seed: int, B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=dtype) * 3,
            torch.rand(B, 3, H, W, generator=g, dtype=dtype) * 255)


def _whole_tensors(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> torch.Tensor:
    """``mean_field(**kw)`` by the loop of whole tensors (the band loop declined)."""
    with monkeypatch.context() as m:
        m.setattr(functional.MessagePasser, "cell_bands", lambda self, *a: None)
        return functional.mean_field(**kw)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    loop = cell_bands.cell_band_loop
    monkeypatch.setattr(functional, "cell_band_loop", lambda *a, **kw: calls.append(1) or loop(*a, **kw))
    return calls


@pytest.mark.parametrize(("blur", "norm", "mode", "H", "W"), [
    (2, "none", "textbook", 7, 9), (4, "sym", "convcrf", 9, 6), (2, "sym", "textbook", 5, 12),
])
def test_equals_the_oracle(blur: int, norm: str, mode: str, H: int, W: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    unary, image = _inputs(blur + H, 2, 3, H, W)
    kw = dict(filter_size=5, blur=blur, num_iter=3, norm=norm, mode=mode, weight=0.7, col_use_pos=True)
    got = functional.mean_field(unary, image, backend="torch", **kw)
    want = naive_crf(unary.numpy(), image.numpy(), merge=norm == "none", **kw)
    assert calls
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


CASES = [  # blur, norm, mode, final_softmax, compat_matrix, per-class weight, B, C, H, W, num_iter, filter_size
    (2, "none", "textbook", False, False, False, 1, 4, 11, 14, 3, 5),
    (3, "sym", "convcrf", True, True, True, 2, 3, 13, 10, 2, 7),
    (4, "sym", "textbook", False, False, True, 1, 5, 21, 26, 4, 5),
    (4, "none", "convcrf", False, True, False, 2, 21, 17, 19, 1, 11),
    (5, "none", "textbook", True, False, True, 1, 2, 23, 9, 2, 3),
    (8, "sym", "textbook", False, False, False, 1, 3, 33, 41, 3, 9),
    (4, "sym", "convcrf", False, False, False, 3, 2, 3, 1, 2, 3),  # (one short cell)
    (2, "none", "textbook", False, False, False, 1, 1, 1, 7, 2, 3),
]


@pytest.mark.parametrize("band_bytes", [1, 1 << 30])  # (one pooled row a band; every row in one)
@pytest.mark.parametrize(("blur", "norm", "mode", "final_softmax", "compat", "per_class", "B", "C", "H", "W",
                          "num_iter", "k"), CASES)
def test_equals_the_loop_of_whole_tensors(blur: int, norm: str, mode: str, final_softmax: bool, compat: bool,
                                          per_class: bool, B: int, C: int, H: int, W: int, num_iter: int, k: int,
                                          band_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cell_bands, "_BAND_BYTES", band_bytes)
    monkeypatch.setattr(cell_bands, "_THREAD_BAND_BYTES", band_bytes)
    calls = _spy(monkeypatch)
    unary, image = _inputs(B * 1000 + H, B, C, H, W)
    g = torch.Generator().manual_seed(C)
    kw = dict(unary=unary, image=image, filter_size=k, blur=blur, num_iter=num_iter, norm=norm, mode=mode,
              final_softmax=final_softmax, backend="torch", col_use_pos=norm == "sym",
              weight=torch.rand(1, C, 1, 1, generator=g, dtype=torch.float64) if per_class else 0.4,
              compat_matrix=torch.randn(C, C, generator=g, dtype=torch.float64) * 0.2 if compat else None)
    got = functional.mean_field(**kw)
    assert calls
    want = _whole_tensors(monkeypatch, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = functional.mean_field(**{name: v.float() if isinstance(v, torch.Tensor) else v for name, v in kw.items()})
    assert got32.dtype == torch.float32
    assert ((got32.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_storage(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes read their pooled input in the storage dtype as the loop of whole tensors does (only the pooled
    sums' order differs: a value within a float32 ulp of a storage tie may round the other way)."""
    calls = _spy(monkeypatch)
    unary, image = _inputs(7, 1, 6, 19, 22, torch.float32)
    kw = dict(unary=unary, image=image, filter_size=7, blur=4, num_iter=3, norm="sym", backend="torch",
              storage=storage)
    got, want = functional.mean_field(**kw), _whole_tensors(monkeypatch, **kw)
    assert calls
    assert ((got - want).abs().max() / want.abs().max()).item() < (1e-3 if storage == "float16" else 8e-3)
    plain = functional.mean_field(**{**kw, "storage": "float32"})
    assert not torch.equal(got, plain)  # (the storage rounded)


def test_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch backend's CPU inference at blur > 1, with or without ``torch.no_grad``; not where a gradient
    flows, at blur 1, nor on the Triton backend (whose fallback loop is the GPU's)."""
    calls = _spy(monkeypatch)
    unary, image = _inputs(3, 1, 3, 9, 10, torch.float32)
    kw = dict(filter_size=3, num_iter=2, backend="torch")
    functional.mean_field(unary, image, blur=2, **kw)
    with torch.no_grad():
        ConvCRF(3, blur=2, trainable=True, **kw)(unary, image)
    assert len(calls) == 2
    ConvCRF(3, blur=2, trainable=True, **kw)(unary, image).sum().backward()
    functional.mean_field(unary.requires_grad_(), image, blur=2, **kw)
    functional.mean_field(unary.detach(), image, blur=1, **kw)
    functional.mean_field(unary.detach(), image, blur=2, norm="sym", **{**kw, "backend": "triton"})
    assert len(calls) == 2
