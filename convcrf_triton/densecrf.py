"""A pydensecrf-compatible API on top of :class:`~convcrf_triton.ConvCRF` (SPEC §4).

Switch from pydensecrf by changing the import::

    import convcrf_triton.densecrf as dcrf            # was: import pydensecrf.densecrf as dcrf
    from convcrf_triton.densecrf import unary_from_softmax  # was: from pydensecrf.utils import ...

    d = dcrf.DenseCRF2D(W, H, n_labels)
    d.setUnaryEnergy(unary_from_softmax(probs))       # U [n_labels, H*W] float32 = -log p
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb_uint8_HxWx3, compat=10)
    Q = d.inference(5)                                # [n_labels, H*W] float32
    labels = np.argmax(Q, axis=0).reshape(H, W)       # or d.map(Q).reshape(H, W)

Arrays in and out are numpy with pydensecrf's shapes and dtypes; the work runs on the GPU when there is
one (``device=`` overrides). pydensecrf's step-by-step calls run too (``Q, tmp1, tmp2 = d.startInference()``,
``d.stepInference(Q, tmp1, tmp2)`` updating ``Q`` in place, ``d.klDivergence(Q)`` with pydensecrf's formula), and
so does its way in for images that are not RGB (:func:`create_pairwise_gaussian`, :func:`create_pairwise_bilateral`
then ``d.addPairwiseEnergy(feats, compat)``: a grey image, or up to 3 channels with a bandwidth each).

**How pydensecrf's model maps onto ConvCRF.** pydensecrf runs mean-field over a *fully connected* CRF
with Potts compatibilities (or the label compatibilities below): ``Q_0 = softmax(-U)``, then ``n_iter`` times
``Q = softmax(-U + Σ_g compat_g · n_g ⊙ (G_g (n_g ⊙ Q)))`` with ``n_g = 1/sqrt(G_g 1)``
(``NORMALIZE_SYMMETRIC``, its default; ``NO_NORMALIZATION`` drops ``n_g``), where ``G_g`` is a Gaussian
filter over all pixel pairs, evaluated approximately by a permutohedral lattice. Here:

- ``addPairwiseGaussian(sxy, compat)`` → ConvCRF's smoothness kernel: ``pos_sdims = sxy``,
  ``pos_compat = compat``;
- ``addPairwiseBilateral(sxy, srgb, rgbim, compat)`` → the appearance kernel with position
  (``col_use_pos=True``): ``col_sdims = sxy``, ``col_schan = srgb``, ``col_compat = compat``;
- the update ``-U + message`` is ConvCRF's ``Z = (u − w)·L + w·M`` with a scalar ``w = 1``, ``u = 2``
  (``L = log_softmax(-U)`` differs from ``-U`` by a per-pixel constant, which softmax ignores);
  ``NORMALIZE_SYMMETRIC`` → ``norm="sym"`` (``merge=False``), ``NO_NORMALIZATION`` → ``norm="none"``;
- the Gaussians are exact, but each pixel only talks to the ``filter_size × filter_size`` window of the
  grid pooled by ``blur``, i.e. to pixels within ``(filter_size // 2) · blur`` pixels (the ConvCRF
  locality assumption), and the message excludes the pixel itself (textbook mean-field; pydensecrf's
  lattice includes a self term of weight ``n_g²``, small unless the Gaussian is very narrow).

``filter_size`` and ``blur`` are chosen from the widest ``sxy`` added (:func:`choose_window`): the finest
blur (2, 4, 6, …) at which a ``filter_size ≤ 31`` window reaches ``1.5·sxy`` pixels, which is what agreed
best with pydensecrf in our measurements (pydensecrf's common ``sxy=3`` Gaussian + ``sxy=80`` bilateral →
``filter_size=31, blur=8``). Pass ``filter_size``/``blur`` to ``DenseCRF2D`` to choose yourself (smaller
windows are faster on the CPU); when such a window reaches less than ``1.5·sxy`` a :class:`LocalityWarning`
is given once, naming the ``filter_size``/``blur`` that would cover it.

``compat`` is pydensecrf's: a number (Potts), a vector ``[n_labels]`` (diagonal) or a matrix
``[n_labels, n_labels]`` (symmetrised, ``(m + mᵀ) / 2``), an energy whose term of the update is
``−compat @ filtered Q`` (Potts ``w`` being ``−w · I``, so a matrix ``w · (1 − I)`` gives Potts' result): a term
with a vector or matrix is passed on its own (``functional.mean_field``'s matrix ``pos_compat``/``col_compat``).

Anisotropic bandwidths too: ``sxy=(sx, sy)`` (columns, rows, as pydensecrf), ``srgb=(sr, sg, sb)``, and
:func:`create_pairwise_gaussian`'s ``sdims=(s_rows, s_columns)`` (a bandwidth a feature channel of the Gaussian).

Not supported (they raise ``NotImplementedError``): ``NORMALIZE_BEFORE``/
``NORMALIZE_AFTER``, mixed normalisations, two Gaussians (or bilaterals) with different bandwidths,
``addPairwiseEnergy`` with features other than :func:`create_pairwise_gaussian`'s and
:func:`create_pairwise_bilateral`'s (positions over their bandwidths, then up to 3 image channels), and parameter
learning.
"""

from __future__ import annotations

import math
import sys
import warnings
from numbers import Number
from typing import Any

import numpy as np
import torch

from . import functional
from .config import MAX_FILTER_SIZE
from .module import ConvCRF

__all__ = [
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
    "NORMALIZE_SYMMETRIC", "DenseCRF2D", "LocalityWarning", "choose_window", "compute_unary",
    "create_pairwise_bilateral", "create_pairwise_gaussian", "softmax_to_unary", "unary_from_labels",
    "unary_from_softmax", "window_reach",
]

# pydensecrf's enum values (KernelType, NormalizationType).
CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = 0, 1, 2
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3

COVER = 1.5  # a window "covers" a Gaussian of bandwidth sxy when it reaches COVER * sxy pixels

_warned: set[tuple[float, int, int]] = set()


class LocalityWarning(UserWarning):
    """The ConvCRF window does not reach as far as a pairwise term's ``sxy`` asks (SPEC §4)."""


def window_reach(filter_size: int, blur: int) -> int:
    """How far (pixels) a ``filter_size``/``blur`` window reaches from each pixel: ``(k // 2) · blur``."""
    return (filter_size // 2) * blur


def choose_window(sxy: float) -> tuple[int, int]:
    """The automatic ``(filter_size, blur)`` for the widest pairwise bandwidth ``sxy``: the finest blur
    (2, 4, 6, …) at which a window of ``filter_size ≤ 31`` reaches ``1.5 · sxy`` pixels, with the
    smallest such ``filter_size``. E.g. ``sxy=3`` → ``(7, 2)``, ``sxy=20`` → ``(31, 2)``,
    ``sxy=80`` → ``(31, 8)``.

    Measured on voc7 against pydensecrf (label agreement, SPEC §6 unaries, 5 iterations): blur 2 beats
    blur 1 at the same reach, a reach of 1.5·sxy at a finer blur beats 2·sxy at a coarser one (for
    ``sxy=80``: ``(31, 8)`` 94.9%, ``(31, 12)`` 93.5%, ``(31, 4)`` 93.6%, ``(11, 4)`` 91.5%).
    """
    need = COVER * sxy
    blur = 2
    while True:
        radius = max(1, math.ceil(need / blur - 1e-9))
        if 2 * radius + 1 <= MAX_FILTER_SIZE:
            return 2 * radius + 1, blur
        blur += 2


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (default: CUDA when available, else the CPU), checked now rather than at the
    first inference."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but no CUDA device is available here: use device='cpu' (or leave it "
                         "unset)")
    return dev


def _outside_this_module() -> int:
    """The ``stacklevel`` of the first frame outside this module, for a warning given by this function's caller."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        level, frame = level + 1, frame.f_back
    return level


def _one_or_each(values: list[float]) -> float | tuple[float, ...]:
    """Bandwidths a channel as one number where they are equal, else as a tuple (an anisotropic Gaussian)."""
    return values[0] if max(values) - min(values) <= 1e-6 * max(values) else tuple(values)


def _widest(sxy: float | tuple[float, ...]) -> float:
    return max(sxy) if isinstance(sxy, tuple) else sxy


def _argument(value: float | tuple[float, ...] | np.ndarray, device: torch.device) -> float | torch.Tensor:
    """A term's bandwidth or compat as ``functional.mean_field`` takes it: a number as it is; bandwidths of one a
    channel or a label-compatibility matrix as a float32 tensor on ``device``."""
    return torch.tensor(value, dtype=torch.float32, device=device) if np.ndim(value) else value


def _compat(compat: Any, n_labels: int) -> float | np.ndarray:
    """pydensecrf's ``compat`` as the factor of a term's message in ConvCRF's sign (the update adds it): a Potts weight
    ``w`` as the number ``w``; a vector ``v`` as ``−diag(v)``, a matrix ``m`` as ``−(m + mᵀ) / 2`` (float64
    ``[n_labels, n_labels]``), pydensecrf subtracting ``compat @ filtered Q`` for both."""
    if isinstance(compat, bool) or not isinstance(compat, (Number, np.ndarray, list, tuple)):
        raise ValueError(f"compat must be a number, a vector [{n_labels}] or a matrix [{n_labels}, {n_labels}], got "
                         f"{type(compat).__name__}")
    arr = np.asarray(compat)
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise ValueError(f"compat must be numeric, got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"compat must be finite, got {compat!r}")
    if arr.ndim == 0:
        return float(arr)
    n = n_labels
    if arr.shape == (n,):
        return -np.diag(arr.astype(np.float64))
    if arr.shape == (n, n):
        m = arr.astype(np.float64)
        return -(m + m.T) / 2
    raise ValueError(f"compat must be a number, a vector [{n}] or a matrix [{n}, {n}] for n_labels={n}, got shape "
                     f"{arr.shape}")


def _sum_compats(a: float | np.ndarray, b: float | np.ndarray) -> float | np.ndarray:
    """Two terms' factors (:func:`_compat`) of the same kernel added: a number ``w`` is ``w · I`` beside a matrix."""
    if np.ndim(a) == np.ndim(b):
        return a + b
    matrix, number = (a, b) if np.ndim(a) else (b, a)
    return matrix + number * np.eye(len(matrix))


def _normalization(normalization: int) -> str:
    if normalization == NORMALIZE_SYMMETRIC:
        return "sym"
    if normalization == NO_NORMALIZATION:
        return "none"
    if normalization in (NORMALIZE_BEFORE, NORMALIZE_AFTER):
        raise NotImplementedError("NORMALIZE_BEFORE/NORMALIZE_AFTER are not supported: use NORMALIZE_SYMMETRIC "
                                  "(the default) or NO_NORMALIZATION")
    raise ValueError(f"normalization={normalization!r} is not one of pydensecrf's normalisation types")


def _check_kernel(kernel: int) -> None:
    # The kernel type only matters for parameter learning, which is not offered here.
    if kernel not in (CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL):
        raise ValueError(f"kernel={kernel!r} is not one of CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL")


class DenseCRF2D:
    """pydensecrf's ``DenseCRF2D(width, height, n_labels)`` on ConvCRF (see the module docstring).

    Extra keyword arguments: ``filter_size``/``blur`` fix the window instead of choosing it from the
    widest ``sxy`` (:func:`choose_window`); ``device`` (default: CUDA when available, else CPU) and
    ``backend`` (``"auto" | "triton" | "torch"``) pick where and how ConvCRF runs.
    """

    def __init__(self, width: int, height: int, n_labels: int, *, filter_size: int | None = None,
                 blur: int | None = None, device: str | torch.device | None = None, backend: str = "auto") -> None:
        for name, v in (("width", width), ("height", height), ("n_labels", n_labels)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.width, self.height, self.n_labels = int(width), int(height), int(n_labels)
        self.filter_size, self.blur, self.backend = filter_size, blur, backend
        self.device = _device(device)
        if filter_size is not None or blur is not None:  # validate now, not at inference time
            ConvCRF(2, filter_size=filter_size or 11, blur=blur or 4, backend=backend)
        self._unary: np.ndarray | None = None
        self._gaussian: dict[str, Any] | None = None
        self._bilateral: dict[str, Any] | None = None
        self._passer: functional.MessagePasser | None = None  # (the step API's message: _message)
        self._step_logits: torch.Tensor | None = None  # (the step API's -U: stepInference)

    # ---- energies ---------------------------------------------------------------------------------------

    def setUnaryEnergy(self, unary: np.ndarray) -> None:  # noqa: N802 (pydensecrf's name)
        """``unary [n_labels, width·height]`` = −log p (float32; other float dtypes are converted)."""
        arr = np.asarray(unary)
        want = (self.n_labels, self.width * self.height)
        if arr.shape != want:
            raise ValueError(f"Bad shape for unary energy (Need {want}, got {arr.shape})")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"unary energy must be a float array, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("unary energy contains NaN or Inf (clip probabilities before taking -log)")
        self._unary = np.array(arr, dtype=np.float32)
        self._step_logits = None

    def _add(self, slot: str, term: dict[str, Any]) -> None:
        self._passer = None
        old = getattr(self, slot)
        if old is None:
            setattr(self, slot, term)
            return
        same = all(np.array_equal(old[k], term[k]) if k == "image" else old[k] == term[k]
                   for k in term if k != "compat")
        if not same:
            raise NotImplementedError(
                f"a second {slot[1:]} term with other bandwidths, image or normalisation: ConvCRF has one "
                "smoothness (Gaussian) and one appearance (bilateral) kernel"
            )
        old["compat"] = _sum_compats(old["compat"], term["compat"])  # the same kernel twice: the terms add up

    def addPairwiseGaussian(self, sxy: Any, compat: Any, kernel: int = DIAG_KERNEL,  # noqa: N802
                            normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """The smoothness kernel ``exp(-|p_i − p_j|² / 2 sxy²)`` with its label compatibility ``compat``."""
        _check_kernel(kernel)
        self._add("_gaussian", {"sxy": _position_bandwidths(sxy), "compat": _compat(compat, self.n_labels),
                                "norm": _normalization(normalization)})

    def addPairwiseBilateral(self, sxy: Any, srgb: Any, rgbim: np.ndarray, compat: Any,  # noqa: N802
                             kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """The appearance kernel ``exp(-|p_i − p_j|² / 2 sxy² − |I_i − I_j|² / 2 srgb²)`` with its label
        compatibility ``compat``; ``rgbim [height, width, 3]`` uint8."""
        _check_kernel(kernel)
        im = np.asarray(rgbim)
        if im.dtype != np.uint8:
            raise ValueError(f"rgbim must be a uint8 array, got {im.dtype}")
        want = (self.height, self.width, 3)
        if im.shape != want:
            raise ValueError(f"Bad shape for pairwise bilateral (Need {want}, got {im.shape})")
        self._add("_bilateral", {"sxy": _position_bandwidths(sxy), "srgb": _one_or_each(_bandwidths(srgb, 3, "srgb")),
                                 "image": np.array(im), "compat": _compat(compat, self.n_labels),
                                 "norm": _normalization(normalization)})

    def addPairwiseEnergy(self, features: np.ndarray, compat: Any, kernel: int = DIAG_KERNEL,  # noqa: N802
                          normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """A pairwise term from the features :func:`create_pairwise_gaussian` (``[2, width·height]``: the smoothness
        kernel) or :func:`create_pairwise_bilateral` (``[2 + c, width·height]``, ``c ≤ 3`` image channels: the
        appearance kernel) make, pydensecrf's or these: rows 0 and 1 the pixel's row and column over one bandwidth,
        the others its channels over theirs (any per-channel bandwidths, any image values: a grey image too). Other
        features raise ``NotImplementedError``: ConvCRF's kernels are windows over the image's positions."""
        _check_kernel(kernel)
        feats = np.asarray(features)
        H, W = self.height, self.width
        if feats.ndim != 2 or feats.shape[1] != H * W or not np.issubdtype(feats.dtype, np.floating):
            raise ValueError(f"features must be a float array of shape [D, {H * W}] (D >= 2), got "
                             f"{feats.shape} {feats.dtype}")
        if not np.all(np.isfinite(feats)):
            raise ValueError("features contain NaN or Inf")
        sxy = _position_bandwidth(feats[:2], H, W)
        term = {"sxy": sxy, "compat": _compat(compat, self.n_labels), "norm": _normalization(normalization)}
        channels = feats.shape[0] - 2
        if channels == 0:
            self._add("_gaussian", term)
            return
        if channels > 3:
            raise NotImplementedError(f"{channels} feature channels besides the positions: ConvCRF's appearance "
                                      "kernel takes up to 3 (an RGB image)")
        # The channels, already over their bandwidths, as a float image (unused channels 0: no difference).
        image = np.zeros((H, W, 3), np.float32)
        image[..., :channels] = feats[2:].T.reshape(H, W, channels)
        self._add("_bilateral", {**term, "srgb": 1.0, "image": image})

    # ---- inference --------------------------------------------------------------------------------------

    def window(self) -> tuple[int, int]:
        """The ``(filter_size, blur)`` inference uses (fixed in the constructor, else :func:`choose_window`
        of the widest ``sxy`` added)."""
        terms = [t for t in (self._gaussian, self._bilateral) if t is not None]
        widest = max((_widest(t["sxy"]) for t in terms), default=1.0)
        auto_k, auto_blur = choose_window(widest)
        return self.filter_size or auto_k, self.blur or auto_blur

    def _warn_locality(self, filter_size: int, blur: int) -> None:
        for name, t in (("addPairwiseGaussian", self._gaussian), ("addPairwiseBilateral", self._bilateral)):
            if t is None:
                continue
            sxy = _widest(t["sxy"])
            if not np.any(t["compat"]) or window_reach(filter_size, blur) >= COVER * sxy - 1e-9:
                continue
            key = (sxy, filter_size, blur)
            if key in _warned:
                continue
            _warned.add(key)
            k, b = choose_window(sxy)
            warnings.warn(
                f"{name}(sxy={sxy:g}): the ConvCRF window (filter_size={filter_size}, blur={blur}) reaches "
                f"{window_reach(filter_size, blur)} px, less than 1.5·sxy = {COVER * sxy:g} px, so longer-range "
                f"interactions are dropped; DenseCRF2D(..., filter_size={k}, blur={b}) would cover it",
                LocalityWarning, stacklevel=_outside_this_module(),  # (the caller of inference(), stepInference(), ...)
            )

    def _params(self) -> dict[str, Any]:
        """:func:`~convcrf_triton.functional.mean_field`'s parameters of the terms added: window, bandwidths, compat
        weights (numbers, or ``[n_labels, n_labels]`` float32 matrices on the device), normalisation."""
        g, b = self._gaussian, self._bilateral
        norms = {t["norm"] for t in (g, b) if t is not None}
        if len(norms) > 1:
            raise NotImplementedError("the Gaussian and the bilateral term must use the same normalization")
        filter_size, blur = self.window()
        self._warn_locality(filter_size, blur)
        terms = ((g, "compat", 0.0), (b, "compat", 0.0), (g, "sxy", 3.0), (b, "sxy", 80.0), (b, "srgb", 13.0))
        pos_compat, col_compat, pos_sdims, col_sdims, col_schan = (
            _argument(t[key] if t else default, self.device) for t, key, default in terms)
        return dict(filter_size=filter_size, blur=blur, pos_sdims=pos_sdims, pos_compat=pos_compat,
                    col_sdims=col_sdims, col_schan=col_schan, col_compat=col_compat, col_use_pos=True,
                    norm=norms.pop() if norms else "none")

    def _image(self) -> torch.Tensor:
        """The bilateral term's image as ConvCRF takes it: ``[1, 3, height, width]`` float32 on the device."""
        if self._bilateral is not None:
            rgb = torch.from_numpy(self._bilateral["image"]).permute(2, 0, 1)[None]
        else:
            rgb = torch.zeros(1, 3, self.height, self.width, dtype=torch.uint8)
        return rgb.to(self.device, torch.float32)

    def _unary_logits(self) -> torch.Tensor:
        """``-U`` as ``[1, n_labels, height, width]`` float32 on the device (negated there: one pass over ``U`` on
        the host fewer, the transfer's)."""
        n, H, W = self.n_labels, self.height, self.width
        U = self._unary if self._unary is not None else np.zeros((n, H * W), np.float32)
        return torch.from_numpy(U).reshape(1, n, H, W).to(self.device).neg()

    def inference(self, n_iter: int) -> np.ndarray:
        """``n_iter`` mean-field iterations: ``Q [n_labels, width·height]`` float32 (columns sum to 1)."""
        if not isinstance(n_iter, (int, np.integer)) or isinstance(n_iter, bool) or n_iter < 0:
            raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
        unary = self._unary_logits()
        if n_iter == 0 or (self._gaussian is None and self._bilateral is None):
            return self._flat(torch.softmax(unary, dim=1))
        with torch.no_grad():  # (textbook mean-field with w = 1, u = 2: the module docstring)
            Q = functional.mean_field(unary, self._image(), num_iter=int(n_iter), weight=1.0, unary_weight=2.0,
                                      final_softmax=True, backend=self.backend, **self._params())
        return self._flat(Q)

    def _flat(self, Q: torch.Tensor) -> np.ndarray:
        """``[1, n_labels, height, width]`` → a numpy ``[n_labels, width·height]`` float32 array."""
        return Q.reshape(self.n_labels, -1).float().cpu().numpy()

    # ---- step by step (pydensecrf's startInference / stepInference / klDivergence) --------------------------

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: N802 (pydensecrf's name)
        """``Q_0 = softmax(-U)`` ``[n_labels, width·height]`` float32 and pydensecrf's two scratch arrays (empty:
        nothing is kept in them here), for :meth:`stepInference` and :meth:`klDivergence`::

            Q, tmp1, tmp2 = d.startInference()
            for i in range(5):
                print(i, d.klDivergence(Q))
                d.stepInference(Q, tmp1, tmp2)       # Q now equals d.inference(i + 1)
        """
        empty = np.zeros((0, 0), np.float32)
        return self._flat(torch.softmax(self._unary_logits(), dim=1)), empty, empty.copy()

    def stepInference(self, Q: np.ndarray, tmp1: Any = None, tmp2: Any = None) -> None:  # noqa: N802
        """One mean-field iteration, in place: ``Q ← softmax(-U + message(Q))`` (``tmp1``, ``tmp2``: pydensecrf's
        scratch, unused)."""
        self._check_marginals(Q)
        if self._step_logits is None:  # (-U on the device, once for every step)
            self._step_logits = self._unary_logits()
        Z = self._step_logits
        if self._gaussian is not None or self._bilateral is not None:
            Z = Z + self._message(Q)
        Q[...] = self._flat(torch.softmax(Z, dim=1))

    def klDivergence(self, Q: np.ndarray) -> float:  # noqa: N802 (pydensecrf's name)
        """pydensecrf's KL-divergence of the marginals ``Q`` from the CRF's distribution, up to a constant:
        ``Σ Q log max(Q, 1e-20) + Σ U Q − Σ Q ⊙ message(Q)`` (summed in float64, as pydensecrf does, whose Potts
        terms add ``Q ⊙ (−compat · filtered Q)``)."""
        self._check_marginals(Q)
        q = np.asarray(Q, dtype=np.float64)
        kl = float((q * np.log(np.maximum(q, 1e-20))).sum())
        if self._unary is not None:
            kl += float((self._unary.astype(np.float64) * q).sum())
        if self._gaussian is not None or self._bilateral is not None:
            M = self._message(Q).reshape(self.n_labels, -1).double().cpu().numpy()
            kl -= float((q * M).sum())
        return kl

    def _check_marginals(self, Q: Any) -> None:
        want = (self.n_labels, self.width * self.height)
        if not isinstance(Q, np.ndarray) or Q.shape != want or Q.dtype != np.float32:
            got = f"{type(Q).__name__} {getattr(Q, 'shape', '')} {getattr(Q, 'dtype', '')}".strip()
            raise TypeError(f"Q must be the float32 numpy array of shape {want} that startInference returned, "
                            f"got {got}")

    def _message(self, Q: np.ndarray) -> torch.Tensor:
        """The pairwise message ``Σ_g compat_g · n_g ⊙ (G_g (n_g ⊙ Q))`` of the marginals ``Q`` (the same one
        :meth:`inference` adds), ``[1, n_labels, height, width]`` float32; its weights are built once."""
        with torch.no_grad():
            if self._passer is None:
                params = self._params()
                ops = functional.resolve_backend(self.backend, self.device)
                self._passer = functional.MessagePasser(self._image(), keep_centre=False, ops=ops, **params)
            return self._passer(torch.from_numpy(Q).reshape(1, self.n_labels, self.height, self.width)
                                .to(self.device))

    def map(self, Q: np.ndarray | int) -> np.ndarray:
        """The most likely label per pixel, ``[width·height]`` int64, from ``Q`` (or from ``Q`` computed
        by ``inference(n_iter)`` when given an iteration count)."""
        if isinstance(Q, (int, np.integer)) and not isinstance(Q, bool):
            Q = self.inference(int(Q))
        arr = np.asarray(Q)
        if arr.shape != (self.n_labels, self.width * self.height):
            raise ValueError(f"Q must have shape {(self.n_labels, self.width * self.height)}, got {arr.shape}")
        return np.argmax(arr, axis=0).astype(np.int64)


# ---- pydensecrf.utils -----------------------------------------------------------------------------------


def unary_from_softmax(sm: np.ndarray, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """Probabilities ``[n_labels, ...]`` → unary ``[n_labels, N]`` float32 = −log p (as pydensecrf.utils):
    ``scale`` mixes in the uniform distribution (``scale·p + (1 − scale)/n``), ``clip`` bounds p below."""
    sm = np.asarray(sm)
    num_cls = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * np.ones(sm.shape) / num_cls
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([num_cls, -1]).astype(np.float32)


def create_pairwise_gaussian(sdims: Any, shape: tuple[int, int]) -> np.ndarray:
    """Smoothness features ``[2, H·W]`` float32 for :meth:`DenseCRF2D.addPairwiseEnergy` (as pydensecrf.utils):
    each pixel's row over ``sdims[0]`` and column over ``sdims[1]`` (``shape = (H, W)``)."""
    H, W = _grid_shape(shape)
    sy, sx = _bandwidths(sdims, 2, "sdims")
    rows, cols = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
    return np.stack([rows / np.float32(sy), cols / np.float32(sx)]).reshape(2, -1)


def create_pairwise_bilateral(sdims: Any, schan: Any, img: np.ndarray, chdim: int = -1) -> np.ndarray:
    """Appearance features ``[2 + c, H·W]`` float32 for :meth:`DenseCRF2D.addPairwiseEnergy` (as
    pydensecrf.utils): :func:`create_pairwise_gaussian`'s positions, then the ``c`` channels of ``img`` (an
    ``[H, W]`` image with ``chdim=-1``, else channels along ``chdim``) over ``schan`` (one number or one a
    channel)."""
    arr = np.asarray(img)
    im = arr[np.newaxis] if chdim == -1 else np.moveaxis(arr, chdim, 0)
    if im.ndim != 3:
        raise ValueError(f"img must be [H, W] with chdim=-1 or [H, W, c] with its channel axis chdim, got "
                         f"shape {arr.shape} and chdim={chdim}")
    channels = im.astype(np.float32)
    scales = _bandwidths(schan, channels.shape[0], "schan")
    channels /= np.asarray(scales, np.float32).reshape(-1, 1, 1)
    positions = create_pairwise_gaussian(sdims, channels.shape[1:])
    return np.concatenate([positions, channels.reshape(channels.shape[0], -1)])


def _grid_shape(shape: Any) -> tuple[int, int]:
    dims = tuple(int(v) for v in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"shape must be (height, width) of a 2-D image, got {shape!r}")
    return dims  # type: ignore[return-value]


def _bandwidths(value: Any, n: int, name: str) -> list[float]:
    """``n`` finite, positive bandwidths from one number or ``n`` numbers."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be one finite number > 0 or {n} of them, got {value!r}")
    return arr.tolist()


def _position_bandwidths(sxy: Any) -> float | tuple[float, float]:
    """pydensecrf's ``sxy`` (one number, or ``(sx, sy)``: columns, rows) as ConvCRF's position bandwidth: one number, or
    ``(rows, columns)``."""
    sx, sy = _bandwidths(sxy, 2, "sxy")
    return _one_or_each([sy, sx])


def _position_bandwidth(rows: np.ndarray, H: int, W: int) -> float | tuple[float, float]:
    """The bandwidths ``(s_rows, s_columns)`` (one number where equal) of features whose rows 0 and 1 are each
    pixel's row and column over them (:func:`create_pairwise_gaussian`'s), or ``NotImplementedError``."""
    rows = rows.astype(np.float64)
    grid = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    scales = []
    for row, coord, n in zip(rows, grid, (H, W), strict=True):
        if n > 1:
            step = row[coord.reshape(-1) == 1][0]  # (the first pixel one row, or one column, on: 1 / s)
            ok = step > 0 and np.allclose(row, coord.reshape(-1) * step, rtol=1e-5, atol=1e-6 * step * n)
            if not ok:
                raise NotImplementedError(
                    "addPairwiseEnergy: features whose rows 0 and 1 are not each pixel's row and column over a "
                    "bandwidth (create_pairwise_gaussian / create_pairwise_bilateral make them) are not supported: "
                    "ConvCRF's kernels are windows over the image's positions"
                )
            scales.append(1.0 / step)
        else:
            scales.append(None)  # (one row or column: any bandwidth, the other's)
    known = [s for s in scales if s is not None] or [1.0]
    return _one_or_each([s if s is not None else known[0] for s in scales])


def unary_from_labels(labels: np.ndarray, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """A label map → unary ``[n_labels, N]`` float32 that trusts each label with ``gt_prob`` (as
    pydensecrf.utils). With ``zero_unsure``, label 0 means "unsure" (uniform) and labels ``1..n_labels``
    are classes ``0..n_labels−1``; without it, labels ``0..n_labels−1`` are the classes."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob!r}")
    if n_labels < 2:
        raise ValueError(f"n_labels must be >= 2, got {n_labels!r}")
    labels = np.asarray(labels).flatten()
    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)
    U = np.full((n_labels, len(labels)), n_energy, dtype="float32")
    U[labels - 1 if zero_unsure else labels, np.arange(U.shape[1])] = p_energy
    if zero_unsure:
        U[:, labels == 0] = -np.log(1.0 / n_labels)
    return U


def softmax_to_unary(sm: np.ndarray, GT_PROB: float = 1) -> np.ndarray:  # noqa: N803 (pydensecrf's name)
    """Deprecated in pydensecrf (a ``DeprecationWarning`` here): :func:`unary_from_softmax` with ``scale =
    GT_PROB`` (none at 1) and no clipping."""
    warnings.warn("softmax_to_unary is deprecated (as in pydensecrf): use unary_from_softmax", DeprecationWarning,
                  stacklevel=2)
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def compute_unary(labels: np.ndarray, M: int, GT_PROB: float = 0.5) -> np.ndarray:  # noqa: N803
    """Deprecated in pydensecrf (a ``DeprecationWarning`` here): :func:`unary_from_labels` ``(labels, M,
    GT_PROB)``."""
    warnings.warn("compute_unary is deprecated (as in pydensecrf): use unary_from_labels", DeprecationWarning,
                  stacklevel=2)
    return unary_from_labels(labels, M, GT_PROB)
