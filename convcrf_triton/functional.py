"""The ConvCRF algorithm, stateless (SPEC §1), with backend dispatch (SPEC §3).

``mean_field`` is the whole model: features → blur pooling → Gaussian weights → T × [message pass →
compatibility → weighted sum with the unary → softmax]. The two hot ops (Gaussian weights and message
passing) come from a backend: :mod:`convcrf_triton.reference` (PyTorch) or :mod:`convcrf_triton.kernels`
(Triton); everything around them is shared PyTorch.

Shapes: ``unary: [B, C, H, W]`` logits, ``image: [B, 3, H, W]`` RGB, features on the pooled grid
``[B, D, h, w]`` with ``h, w = ceil(H / blur), ceil(W / blur)``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F

from . import reference
from .cell_bands import cell_band_loop, softmax_
from .config import BACKENDS, PRECISIONS, STORAGES, check_choice
from .matrix_pass import BandPass, DensePass, TracedPass, matrix_pass
from .resample import blur_pool, blur_upsample, eager_cpu

Number = float | torch.Tensor
# ``storage``: the dtype K and the message pass's Q are kept in (None: the compute dtype).
STORAGE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                                 "float16": torch.float16}
# Classes the one-launch mean-field step holds in one tile: all of them; with a 1×1 compatibility its
# [C, C] matrix too (compiled for sm_80/sm_90: no spills up to 32 classes, spills at 64).
STEP_MAX_CLASSES = 256
STEP_MAX_CLASSES_COMPAT = 32
# The largest logit magnitude the Triton set-ups take: their softmax runs in base 2 on u · log2 e, which float32
# holds up to its largest value (3.4e38) over log2 e. PyTorch's path takes every finite logit.
MAX_TRITON_LOGIT = torch.finfo(torch.float32).max / math.log2(math.e)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The module implementing the hot ops: Triton on CUDA (or CPU under ``TRITON_INTERPRET=1``)."""
    check_choice("backend", backend, BACKENDS)
    triton_ok = device.type == "cuda" or (device.type == "cpu" and _interpreting())
    if backend == "triton" and not triton_ok:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on the CPU use backend='torch' or 'auto', "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    if backend == "torch" or not triton_ok:
        return reference
    from . import kernels

    return kernels


def check_inputs(unary: torch.Tensor, image: torch.Tensor) -> ValueCheck | None:
    """Clear errors for bad inputs instead of a kernel failure or a silent wrong answer: types, shapes and devices
    here; the values (NaN/Inf) by the :class:`ValueCheck` this returns (None inside a compiled graph or a CUDA
    graph being recorded, where a host sync cannot be)."""
    for name, t in (("unary", unary), ("image", image)):
        if not isinstance(t, torch.Tensor):
            hint = f" (torch.from_numpy({name}))" if type(t).__module__ == "numpy" else ""
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            hint = " (an 8-bit image: image.float(), whose [0, 255] is the default scale)" if name == "image" else ""
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}{hint}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if image.shape[1] != 3:
        hint = " (channels last [B, H, W, 3]? image.permute(0, 3, 1, 2))" if image.shape[3] == 3 else ""
        raise ValueError(f"image must have 3 (RGB) channels, got {image.shape[1]} (shape {tuple(image.shape)}){hint}")
    if (unary.shape[0], *unary.shape[2:]) != (image.shape[0], *image.shape[2:]):
        raise ValueError(
            f"unary {tuple(unary.shape)} and image {tuple(image.shape)} must agree in batch size, height "
            "and width"
        )
    if unary.device != image.device:
        raise ValueError(f"unary is on {unary.device} but image is on {image.device}: use one device")
    if torch.compiler.is_compiling() or (unary.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    return ValueCheck(unary, image)


def check_devices(unary: torch.Tensor, **tensors: object) -> None:
    """A ValueError naming the first of ``tensors`` (the parameters: numbers or tensors) that is a tensor on another
    device than ``unary``, instead of PyTorch's error from inside an op or, on the Triton path, a kernel reading
    another device's memory."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != unary.device:
            raise ValueError(f"{name} is on {t.device} but unary is on {unary.device}: every tensor argument must be "
                             f"on the inputs' device (a ConvCRF module: crf.to({str(unary.device)!r}))")


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """``t``'s CUDA device made the current one where it is not (Triton launches on the current device, and the
    loop's replays, ``kernels.Repeat``, on the device they were recorded on); else nothing (also while compiling:
    the compiled code sets the device of its graph)."""
    if t.is_cuda and not torch.compiler.is_compiling() and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def without_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``t``'s device type where it is on: the inference computes in float32 (float64) whatever the
    caller's mixed precision, as it does for half inputs (``storage`` and ``precision`` choose what is rounded).
    Under an fp16/bf16 autocast the PyTorch ops between kernels (the compatibility's einsum: a batched matmul)
    ran in half precision: logits 0.02-0.05 off float32's instead of 5e-6 on a CPU with bfloat16, and with float16
    messages beyond 65504 (``mode='convcrf'``'s first pass) would overflow."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class ValueCheck:
    """The input check's NaN/Inf test of ``unary`` and ``image``, with one host sync: :meth:`raise_if_nonfinite`,
    which the caller puts after the inference's launches, so that the GPU is not left waiting at its start.

    A Triton kernel that reads an input whole tests it as it reads it (the set-ups ``blur_start`` and
    ``mean_field_start`` the unary, ``gaussian_features`` the image): it sets the flag :meth:`flag` hands it where
    the values it sums are not finite. An input no kernel tested is summed here, in one reduction (a NaN/Inf makes
    the sum non-finite; in float32, float64 inputs in their own dtype: a float64 sum of float32 made PyTorch write a
    float64 copy first, H200 1024×2048 C = 21: 105 + 55 µs a tensor). Both tests also fire on an overflow of finite
    values, which the element-wise test then rules out. On the Triton path of an inference the flags spare it a read
    of the unary (C·H·W values: its largest input) and of the image, and two launches. A kernel whose arithmetic
    holds values up to a ``limit`` only (the set-ups' base-2 scaling: :data:`MAX_TRITON_LOGIT`) says so with its
    flag, whose test then also raises for finite values beyond it: a ValueError, not the NaNs the kernel made."""

    NAMES = ("unary", "image")

    def __init__(self, unary: torch.Tensor, image: torch.Tensor) -> None:
        self.tensors = (unary, image)
        self.flags: torch.Tensor | None = None  # [2] float32, one a name: made at the first flag()
        self.flagged = [False, False]
        self.limits: list[float | None] = [None, None]

    def flag(self, name: str, limit: float | None = None) -> torch.Tensor:
        """The flag of ``name`` (``'unary'`` or ``'image'``), a one-element float32 tensor (0: not tested yet) for the
        kernel that reads that input whole to set to 1 where its values are not finite; ``limit``: the largest
        magnitude that kernel takes, if any."""
        i = self.NAMES.index(name)
        if self.flags is None:
            self.flags = self.tensors[0].new_zeros(2, dtype=torch.float32)
        self.flagged[i], self.limits[i] = True, limit
        return self.flags[i : i + 1]

    def raise_if_nonfinite(self) -> None:
        """The ValueError for a NaN/Inf in ``unary`` or ``image``."""
        if all(self.flagged):
            values = self.flags
        else:
            values = torch.stack([self.flags[i] if flagged else _total(t)
                                  for i, (flagged, t) in enumerate(zip(self.flagged, self.tensors, strict=True))])
        checks = zip(self.NAMES, self.tensors, self.flagged, self.limits, values.tolist(), strict=True)
        for name, t, flagged, limit, value in checks:
            if not (value != 0 if flagged else not math.isfinite(value)):
                continue
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf values")
            if limit is not None and (largest := float(t.detach().abs().max())) > limit:
                raise ValueError(f"{name} holds values of magnitude {largest:.3g}, beyond the {limit:.3g} the Triton "
                                 "kernels take (float32 in base 2): scale them down or use backend='torch'")


def _flag(check: ValueCheck | None, name: str, limit: float | None = None) -> torch.Tensor | None:
    """``check``'s flag of ``name`` for the kernel that reads that input whole (None: no check)."""
    return None if check is None else check.flag(name, limit)


def _total(t: torch.Tensor) -> torch.Tensor:
    return t.detach().sum(dtype=torch.float32 if t.element_size() <= 4 else None).float()


def _position(B: int, H: int, W: int, blur: int, like: torch.Tensor) -> torch.Tensor:
    """Pooled pixel positions ``(y, x)`` in full-resolution units: ``[B, 2, h, w]`` (a broadcast view)."""
    ys = torch.arange(H, device=like.device, dtype=like.dtype).view(H, 1).expand(H, W)
    xs = torch.arange(W, device=like.device, dtype=like.dtype).view(1, W).expand(H, W)
    pos = blur_pool(torch.stack([ys, xs])[None], blur)
    return pos.expand(B, -1, -1, -1)


def features(
    image: torch.Tensor, blur: int, pos_sdims: Number, col_sdims: Number, col_schan: Number, col_use_pos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, bandwidth-scaled features: smoothness ``[B, 2, h, w]`` and appearance ``[B, 3|5, h, w]``. A bandwidth
    is one number (or one-element tensor), or a tensor of one a channel: ``(rows, columns)`` for the positions,
    ``(r, g, b)`` for the colours."""
    B, _, H, W = image.shape
    pos = _position(B, H, W, blur, image)
    colour = blur_pool(image, blur) / _per_channel(col_schan)
    if col_use_pos:
        colour = torch.cat([pos / _per_channel(col_sdims), colour], dim=1)
    return (pos / _per_channel(pos_sdims)).contiguous(), colour.contiguous()


def _per_channel(bandwidth: Number) -> Number:
    """A bandwidth of one a channel (a tensor of ``n > 1`` values) as ``[1, n, 1, 1]``; one bandwidth as it is."""
    if isinstance(bandwidth, torch.Tensor) and bandwidth.numel() > 1:
        return bandwidth.reshape(1, -1, 1, 1)
    return bandwidth


def _as_vector(value: Number, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number or a one-element tensor) as ``[1]`` in the dtype and on the device of ``like``: a number
    by a fill, not a host-to-device copy (which waits for the host, and would be one more node in a recorded
    CUDA graph)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device).reshape(1)
    return like.new_full((1,), value)


def unary_setup(unary: torch.Tensor, mode: str, unary_weight: Number, weight: Number
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first iteration's input ``Q`` (``softmax(u)``; ``mode='convcrf'``: ``log_softmax(u)``) and the
    loop-invariant unary term ``(unary_weight - w) · log_softmax(u)``, both ``[B, C, H, W]``."""
    L = F.log_softmax(unary, dim=1)
    Q = L if mode == "convcrf" else torch.softmax(L, dim=1)
    return Q, (unary_weight - weight) * L


def softmax_of_sum(unary_term: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``softmax(unary_term + M)`` over the classes (dim 1) of ``[B, C, H, W]`` tensors, consuming ``M`` (a message
    the caller made): on the CPU, where nothing is differentiated, in ``M``'s memory, with no probability below
    ``C · tiny`` (the dtype's smallest normal number).

    Each full-resolution temporary costs its page faults there (malloc hands such sizes back to the system), and
    denormal numbers take x86's slow path: on a natural image the probabilities of a peaked ``Q`` fall that low, and
    an ``exp_`` producing them took 37 ms where it takes 5. One thread of a 2-core AMD EPYC, 375×500, C = 21, blur 4,
    k = 11, the original-compatible mode on a VOC image and its SPEC §6 unary: the inference 194 → 152 ms (median of
    8, interleaved; random inputs 166 → 163). The floor moves a probability by less than ``C · tiny`` (2.5e-37 in
    float32), which the message pass zeroes anyway (``reference._flush_below``)."""
    if not eager_cpu(M) or (torch.is_grad_enabled() and (M.requires_grad or unary_term.requires_grad)):
        return torch.softmax(unary_term + M, dim=1)
    return softmax_(M.add_(unary_term))


def _per_class(value: Number, C: int, like: torch.Tensor) -> torch.Tensor | None:
    """``value`` (a number, or a tensor of 1 or ``C`` values) as ``C`` contiguous float32 values on the device of
    ``like`` (a number by a fill, not a host-to-device copy); None if it holds another count."""
    if isinstance(value, torch.Tensor):
        v = value.reshape(-1).float()
    else:
        v = like.new_full((1,), value, dtype=torch.float32)
    return v.expand(C).contiguous() if v.numel() in (1, C) else None


def mixer(weight: Number | None, compat_matrix: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``M ↦ w · (M + compat_matrix @ M)`` per pixel (``M: [B, C, h, w]``): what turns a message into its
    term of the logits (``weight=None``: the compatibility only)."""

    def mix(M: torch.Tensor) -> torch.Tensor:
        if compat_matrix is not None:
            M = M + torch.einsum("dc,bchw->bdhw", compat_matrix, M)
        return M if weight is None else weight * M

    return mix


def label_compatibility(value: Number) -> bool:
    """Whether a Gaussian's compat weight ``value`` is a ``[C, C]`` label-compatibility matrix (its term of the message
    is ``value @ M`` per pixel) rather than a number or a one-element tensor (``value · M``)."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.numel() > 1


@dataclass
class _Gaussian:
    """One message-passing term: weights (materialised ``K`` or features for the fused kernel),
    its outer compat weight (a number, or a ``[C, C]`` label-compatibility matrix) and, with ``norm='sym'``, its
    normaliser ``n = 1/sqrt(g * 1)``."""

    feats: torch.Tensor
    dims: tuple[int, ...]
    compats: torch.Tensor
    K: torch.Tensor | None  # (None: the fused kernel's, or every pass through ``matrix``)
    scale: Number | torch.Tensor | None = None
    norm: torch.Tensor | None = None
    taps: list[int] | None = None  # (the PyTorch path's taps of K with a weight: reference.live_taps)
    matrix: DensePass | BandPass | TracedPass | None = None  # (the PyTorch path's pass as matrix products)


def to_storage(X: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``X`` in the ``storage`` dtype, saturating where float16's range (±65504) ends: with ``norm='sym'`` the pass
    reads ``n ⊙ Q``, and a pixel whose Gaussian's weights all but vanish (a colour far from every neighbour's) has
    ``n`` up to 1e10. Rounded to infinity, that pixel's value made every message it reaches NaN (its weights,
    zero, times infinity); saturated, it sends them next to nothing, as the true ``g · n ⊙ Q`` (g ≤ 1/n²). Also
    ``mode='convcrf'``'s first ``Q``, the log-probabilities, below -65504 (logits that far apart): the class's
    probability is 0 either way (the set-up kernels that store a ``Q`` saturate so too: ``kernels._math.as_stored``)."""
    if X.dtype == storage:
        return X
    if storage == torch.float16:
        big = torch.finfo(torch.float16).max
        X = X.clamp(-big, big)
    return X.to(storage)


class MessagePasser:
    """``Q [B, C, H, W] → M [B, C, H, W]``: the pairwise message through the blur path.

    Built once per forward (features, and ``K`` unless fused, are reused by every iteration).
    """

    def __init__(self, image: torch.Tensor, *, filter_size: int, blur: int, pos_sdims: Number,
                 pos_compat: Number, col_sdims: Number, col_schan: Number, col_compat: Number,
                 col_use_pos: bool, norm: str, keep_centre: bool, ops: ModuleType,
                 storage: torch.dtype | None = None, precision: str = "float32", check: ValueCheck | None = None
                 ) -> None:
        self.k, self.blur, self.keep_centre, self.H, self.W = filter_size, blur, keep_centre, *image.shape[-2:]
        self.storage = storage
        self._scratch: torch.Tensor | None = None  # (n ⊙ Q of norm='sym': _normalised)
        # The band kernel's product precision for inference's passes and for the blur-1 step
        # (kernels.band_precision), or None: the direct kernel.
        self.band = None if ops is reference else ops.band_precision(filter_size, precision)
        self.band_step = None if ops is reference else ops.band_precision(filter_size, precision, step=True)
        scalars = dict(pos_sdims=pos_sdims, col_sdims=col_sdims, col_schan=col_schan, pos_compat=pos_compat,
                       col_compat=col_compat)
        learns_weights = torch.is_grad_enabled() and any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in (image, *scalars.values())
        )
        feats = compats = None
        if (ops is not reference and not learns_weights and image.dtype == torch.float32
                and all(ops.takes_scalar(v, image) for v in scalars.values())):
            # One launch for the features and compat weights (PyTorch's ops below: ~10 on the GPU).
            feats, compats = ops.gaussian_features(image, blur, col_use_pos=col_use_pos, **scalars,
                                                   nonfinite=_flag(check, "image"))
            pos, col = feats[:, :2], feats[:, 2:]
        else:
            pos, col = features(image, blur, pos_sdims, col_sdims, col_schan, col_use_pos)
        self.ops = ops
        # On the Triton backend the weights are differentiated by recomputing them (the fused op, or the two-pass
        # op learned_message_pass, which reads K and recomputes only for the gradient); K is built without one.
        self.learns_weights = learns_weights and ops is not reference
        element_size = 4 if storage is None else storage.itemsize
        fused = ops is not reference and ops.prefer_fused(filter_size, pos.numel() // 2, element_size)
        floor, unit = None, 1.0
        # One merged kernel where the compat weights are numbers (also merge=False: the blur path is linear, so the sum
        # is the same); a Gaussian of its own, its compat weight applied to its message, with norm='sym' or a
        # label-compatibility matrix.
        if norm == "none" and not any(label_compatibility(v) for v in (pos_compat, col_compat)):
            if feats is None:
                feats = torch.cat([pos, col], 1)
                compats = torch.cat([_as_vector(pos_compat, pos), _as_vector(col_compat, pos)])
            terms = [(feats, (2, col.shape[1]), compats, None)]
        else:
            # The PyTorch path's weights for the normaliser (reference.normalised_weights): each times a power of
            # two, divided out of the normaliser and the outer compat weight.
            if ops is reference and norm == "sym":
                floor, unit = reference.normalised_weights(pos.dtype, storage)
            one = pos.new_full((1,), unit)
            if unit != 1.0:
                pos_compat, col_compat = pos_compat / unit, col_compat / unit
            terms = [(pos.contiguous(), (2,), one, pos_compat), (col.contiguous(), (col.shape[1],), one, col_compat)]
        self.gaussians = []
        for f, dims, compats, scale in terms:
            K = None
            if not fused:
                with torch.set_grad_enabled(ops is reference and torch.is_grad_enabled()):
                    K = ops.gaussian_weights(f, dims, compats, filter_size, keep_centre, out_dtype=storage,
                                             **({} if floor is None else {"floor": floor}))
            # (A Gaussian of its own may be narrower than the window, and norm='sym' zeroes only the weights
            # below the smallest normal number.)
            taps = reference.live_taps(K) if ops is reference and scale is not None else None
            matrix = matrix_pass(K, taps, symmetric=True) if ops is reference else None  # (a Gaussian's K)
            if matrix is not None and (matrix.differentiable or not torch.is_grad_enabled()):
                K = None  # (every pass takes the matrix form: its memory back)
            self.gaussians.append(_Gaussian(f, dims, compats, K, scale, taps=taps, matrix=matrix))
        if norm == "sym":
            ones = pos.new_ones(image.shape[0], 1, self.H, self.W)
            for g in self.gaussians:
                total = self._pass(g, ones)
                g.norm = torch.rsqrt((total if unit == 1.0 else total / unit) + 1e-20)

    def _pooled_pass(self, g: _Gaussian, Xp: torch.Tensor) -> torch.Tensor:
        """The message of the pooled ``Xp [B, C, h, w]`` (read in the storage dtype), on the pooled grid."""
        if self.storage is not None:
            Xp = to_storage(Xp, self.storage)
        tracked = torch.is_grad_enabled() and Xp.requires_grad
        if g.matrix is not None and (g.matrix.differentiable or not tracked):
            return g.matrix(Xp)
        if g.K is None:
            return self.ops.fused_message_pass(g.feats, g.dims, g.compats, Xp, self.k, self.keep_centre)
        if self.learns_weights:
            return self.ops.learned_message_pass(g.K, g.feats, g.dims, g.compats, Xp, self.k, self.keep_centre)
        if self.band is not None and not tracked:
            return self.ops.band_message_pass(g.K, Xp, self.band)
        if g.taps is not None:
            return reference.message_pass(g.K, Xp, g.taps)
        return self.ops.message_pass(g.K, Xp)

    def _pass(self, g: _Gaussian, X: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
        Mp = self._pooled_pass(g, blur_pool(X, self.blur)).to(X.dtype)
        Mp = Mp if mix is None else mix(Mp)
        return blur_upsample(Mp, self.blur, self.H, self.W)

    def steps(self, unary: torch.Tensor, mode: str, unary_weight: Number, weight: Number,
              compat_matrix: torch.Tensor | None, num_iter: int, final_softmax: bool, check: ValueCheck | None = None
              ) -> torch.Tensor | None:
        """All ``num_iter`` iterations with one launch per full-resolution pass, where that applies: the
        Triton backend, one merged Gaussian (``norm='none'``), nothing to differentiate. None otherwise (then
        the caller composes the message pass with PyTorch ops).

        Blur 1: one launch for the set-up (:func:`~convcrf_triton.kernels.mean_field_start`: the first ``Q`` and the
        unary term ``(unary_weight - w) · log_softmax(u)``), then one launch per iteration
        (:func:`~convcrf_triton.kernels.mean_field_step`; every class in one
        tile; :func:`~convcrf_triton.kernels.band_mean_field_step` where ``kernels.band_precision`` says). Every
        iteration but the last returns the next ``Q`` in the storage dtype; with the kernels' channels-last step
        the tensors are converted once before the loop and once after it.
        Blur > 1: one launch for the set-up (:func:`~convcrf_triton.kernels.blur_start`: the unary's log-sum-exp
        and the first pooled ``Q``); each iteration the message on the pooled grid, then one launch for everything
        at full resolution (:func:`~convcrf_triton.kernels.blur_step`: the unary term ``(unary_weight - w) ·
        log_softmax(u)`` from ``u`` and its log-sum-exp, upsample, add, softmax, pool), which hands the next
        iteration its pooled ``Q`` directly. No C×H×W tensor but the output is written. Either set-up tests the
        unary's values for ``check``."""
        tensors = (unary, unary_weight, weight, compat_matrix, *(g.feats for g in self.gaussians),
                   *(g.compats for g in self.gaussians))
        if (self.ops is reference or num_iter < 1 or len(self.gaussians) != 1 or self.gaussians[0].norm is not None
                # (CUDA's grid limit in y: blur_start's and blur_step's grids hold the pooled rows there)
                or (self.blur > 1 and -(-self.H // self.blur) > self.ops.grid_limit())
                or self.gaussians[0].scale is not None
                or (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))):
            return None
        C = unary.shape[1]
        a = _per_class(unary_weight - weight, C, unary)  # the unary term's factor
        if a is None:
            return None
        if self.blur > 1:
            w = _per_class(weight, C, unary)
            if not self.ops.blur_step_enabled() or w is None:
                return None
            factors = torch.stack([a, w])
            mix = mixer(None, compat_matrix)  # w is applied by blur_step
            # (the pooled Q in the storage dtype, as the message pass reads it)
            lse, Qp = self.ops.blur_start(unary, self.blur, log=mode == "convcrf", out_dtype=self.storage,
                                          nonfinite=_flag(check, "unary", MAX_TRITON_LOGIT))
            g = self.gaussians[0]
            # The iterations but the last launch again what the first launched (kernels.Repeat).
            pooled_pass = self.ops.Repeat(lambda Qp: self._pooled_pass(g, Qp).to(unary.dtype),
                                          constants=(g.K, g.feats, g.compats))
            # (The compatibility outside: its sum is a tensor the step's call would make, which rules a replay out.)
            step = self.ops.Repeat(lambda Mp: self.ops.blur_step(unary, lse, factors, Mp, self.blur, pool=True,
                                                                 softmax=True, out_dtype=self.storage),
                                   constants=(unary, lse, factors))
            for _ in range(num_iter - 1):
                Qp = step(mix(pooled_pass(Qp)))
            return self.ops.blur_step(unary, lse, factors, mix(pooled_pass(Qp)), self.blur, pool=False,
                                      softmax=final_softmax)
        if C > (STEP_MAX_CLASSES_COMPAT if compat_matrix is not None else STEP_MAX_CLASSES):
            return None
        g = self.gaussians[0]
        Q, unary_term = self.ops.mean_field_start(unary, a, log=mode == "convcrf", out_dtype=self.storage,
                                                  nonfinite=_flag(check, "unary", MAX_TRITON_LOGIT))
        dtype = unary_term.dtype
        weight = weight.reshape(-1) if isinstance(weight, torch.Tensor) else unary.new_full((1,), weight, dtype=dtype)
        band = (self.band_step is not None and g.K is not None
                and C <= self.ops.band_step_max_classes(compat_matrix is not None))
        channels_last = not band and self.ops.step_channels_last()

        def step(Q: torch.Tensor, softmax: bool, out_dtype: torch.dtype) -> torch.Tensor:
            if band:
                return self.ops.band_mean_field_step(Q, unary_term, weight, compat_matrix, g.K, softmax, out_dtype,
                                                     self.band_step)
            return self.ops.mean_field_step(
                Q, unary_term, weight, compat_matrix, g.K, g.feats if g.K is None else None,
                g.compats if g.K is None else None, g.dims, self.k, self.keep_centre, softmax, out_dtype=out_dtype,
                channels_last=C if channels_last else None,
            )

        if channels_last:
            Q, unary_term = self.ops.to_channels_last(Q), self.ops.to_channels_last(unary_term)
        repeat = self.ops.Repeat(lambda Q: step(Q, True, self.storage or dtype),
                                 constants=(unary_term, weight, compat_matrix, g.K, g.feats, g.compats))
        for _ in range(num_iter - 1):
            Q = repeat(Q)
        Q = step(Q, final_softmax, dtype)
        return self.ops.from_channels_last(Q, C) if channels_last else Q

    def cell_bands(self, unary: torch.Tensor, mode: str, unary_weight: Number, weight: Number,
                   compat_matrix: torch.Tensor | None, num_iter: int, final_softmax: bool) -> torch.Tensor | None:
        """All ``num_iter`` iterations with the full-resolution work a band of pooled rows at a time
        (:func:`~convcrf_triton.cell_bands.cell_band_loop`): the PyTorch path on the CPU outside ``torch.compile``,
        at blur > 1, nothing to differentiate. None otherwise."""
        tensors = (unary, weight, unary_weight, compat_matrix,
                   *(t for g in self.gaussians for t in (g.feats, g.compats, g.scale, g.norm)))
        if (self.ops is not reference or self.blur == 1 or num_iter < 1 or not eager_cpu(unary)
                or (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))):
            return None
        mix = mixer(weight, compat_matrix)

        def message(g: _Gaussian) -> Callable[[torch.Tensor], torch.Tensor]:
            pooled_mix = mix if g.scale is None else partial(_scaled_mix, scale=g.scale, mix=mix)
            return lambda P: pooled_mix(self._pooled_pass(g, P).to(P.dtype))

        return cell_band_loop(unary, [(message(g), g.norm) for g in self.gaussians], self.blur,
                              unary_weight - weight, mode, num_iter, final_softmax)

    def __call__(self, Q: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The message of ``Q``, with ``mix`` (a per-pixel linear map over classes: the compatibility
        and the weight ``w``) applied on the pooled grid, before upsampling: they commute with the
        upsampling and the normaliser, and the pooled grid is blur² times smaller."""
        M = None
        for g in self.gaussians:
            pooled_mix = mix
            if g.scale is not None:  # (the outer compat weight, on the pooled grid too)
                pooled_mix = partial(_scaled_mix, scale=g.scale, mix=mix)
            if g.norm is None:
                term = self._pass(g, Q, pooled_mix)
            else:
                term = _product(g.norm, self._pass(g, self._normalised(g.norm, Q), pooled_mix))
            if M is None:
                M = term
            else:
                M = _sum(M, term)
        return M

    def _normalised(self, n: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """``n ⊙ Q``, which the pass reads once: outside autograd in one buffer that every Gaussian and iteration
        reuses (a fresh one took its page faults each time: 4 ms against 0.8 at 366×500, C = 21, on this CPU)."""
        if not _in_place(Q) or n.requires_grad:
            return n * Q
        if self._scratch is None or self._scratch.shape != Q.shape or self._scratch.dtype != Q.dtype:
            self._scratch = torch.empty_like(Q, memory_format=torch.contiguous_format)
        return torch.mul(n, Q, out=self._scratch)


def _scaled_mix(Mp: torch.Tensor, scale: Number | torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor] | None
                ) -> torch.Tensor:
    Mp = torch.einsum("dc,bchw->bdhw", scale, Mp) if label_compatibility(scale) else Mp * scale
    return Mp if mix is None else mix(Mp)


def _in_place(X: torch.Tensor) -> bool:
    """Whether full-resolution arithmetic may overwrite ``X``, a tensor the message's computation made: where autograd
    does not record it (each full-resolution temporary costs its page faults on the CPU: 15 MB at 366×500, C = 21)."""
    return not (torch.is_grad_enabled() and X.requires_grad)


def _product(n: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return X.mul_(n) if _in_place(X) and not n.requires_grad else n * X


def _sum(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return M.add_(X) if _in_place(M) and not X.requires_grad else M + X


def mean_field(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    filter_size: int = 11,
    blur: int = 4,
    num_iter: int = 5,
    pos_sdims: Number = 3.0,
    pos_compat: Number | torch.Tensor = 3.0,
    col_sdims: Number = 80.0,
    col_schan: Number = 13.0,
    col_compat: Number | torch.Tensor = 10.0,
    col_use_pos: bool = False,
    weight: Number = 0.2,
    unary_weight: Number = 1.0,
    norm: str = "none",
    compat_matrix: torch.Tensor | None = None,
    mode: str = "textbook",
    final_softmax: bool = False,
    backend: str = "auto",
    storage: str = "float32",
    precision: str = "float32",
) -> torch.Tensor:
    """ConvCRF mean-field inference: ``unary [B, C, H, W]``, ``image [B, 3, H, W]`` → refined logits.

    ``weight``: a scalar or ``[1, C, 1, 1]`` per-class weight ``w``; ``compat_matrix``: ``[C, C]`` learned
    1×1 compatibility (``M += compat_matrix @ M`` over classes) or None; ``pos_compat``, ``col_compat``: each
    Gaussian's compat weight, a number (or one-element tensor) or a ``[C, C]`` label-compatibility matrix ``μ``
    of its own (its term of the message ``μ @ M_g`` per pixel, before ``compat_matrix`` and ``w``: pydensecrf's
    per-term compatibilities, with its sign, through :mod:`~convcrf_triton.densecrf`; a Gaussian with a matrix is
    passed on its own, not merged, so inference takes the composed loop); ``pos_sdims``, ``col_sdims``,
    ``col_schan``: a bandwidth, or a tensor of one a channel (``[2]``: rows, columns; ``[3]``: r, g, b: anisotropic
    Gaussians, pydensecrf's tuples); ``mode='convcrf'`` reproduces
    the original ConvCRF code (first pass on the log-probabilities, centre tap kept). Half and bfloat16
    inputs are computed in float32 and returned in their dtype; float64 stays float64; a caller's autocast is
    off inside. Inputs may be on any CUDA device (the kernels run on theirs, current or not). ``storage``
    (``'float32' | 'bfloat16' | 'float16'``) is the dtype the Gaussian weights ``K`` and the probabilities read
    by the message pass are kept in between kernels (half the bytes and, for ``K``, half the memory); the
    arithmetic and the logits stay in the compute dtype. ``precision='tf32'`` lets the Triton backend run the
    inference message passes of filter sizes 7..21 as TF32 tensor-core products on rounded operands (messages
    within ~2e-4 of float32 relative to the largest, outside the 1e-4 of the default ``'float32'``; see
    ``kernels.band_precision``): the pooled-grid passes of blur > 1 and the passes of configurations without a
    one-launch step; the blur-1 step, passes that carry a gradient, the PyTorch backend and the other filter
    sizes stay float32.
    """
    check_choice("storage", storage, STORAGES)
    check_choice("precision", precision, PRECISIONS)
    check = check_inputs(unary, image)
    C = unary.shape[1]
    matrix, per_channel = f"a [C, C] = [{C}, {C}] label-compatibility matrix", "bandwidths (one a channel)"
    for name, value, shape, what in (("pos_compat", pos_compat, (C, C), matrix),
                                     ("col_compat", col_compat, (C, C), matrix),
                                     ("pos_sdims", pos_sdims, (2,), f"[2] {per_channel}"),
                                     ("col_sdims", col_sdims, (2,), f"[2] {per_channel}"),
                                     ("col_schan", col_schan, (3,), f"[3] {per_channel}")):
        if isinstance(value, torch.Tensor) and value.numel() != 1 and tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a number, a one-element tensor or {what}, got shape {tuple(value.shape)}")
    check_devices(unary, pos_sdims=pos_sdims, pos_compat=pos_compat, col_sdims=col_sdims, col_schan=col_schan,
                  col_compat=col_compat, weight=weight, unary_weight=unary_weight, compat_matrix=compat_matrix)
    out_dtype = unary.dtype
    dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
    ops = resolve_backend(backend, unary.device)

    def infer(unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        passer = MessagePasser(
            image, filter_size=filter_size, blur=blur, pos_sdims=pos_sdims, pos_compat=pos_compat,
            col_sdims=col_sdims, col_schan=col_schan, col_compat=col_compat, col_use_pos=col_use_pos, norm=norm,
            keep_centre=mode == "convcrf", ops=ops, storage=STORAGE_DTYPES[storage], precision=precision, check=check,
        )
        Q = passer.steps(unary, mode, unary_weight, weight, compat_matrix, num_iter, final_softmax, check)
        if Q is None:
            Q = passer.cell_bands(unary, mode, unary_weight, weight, compat_matrix, num_iter, final_softmax)
        if Q is None:
            Q, unary_term = unary_setup(unary, mode, unary_weight, weight)
            mix = mixer(weight, compat_matrix)
            for i in range(num_iter):
                M = passer(Q, mix)
                Q = softmax_of_sum(unary_term, M) if i < num_iter - 1 or final_softmax else unary_term + M  # last: Z
        return Q

    with on_device(unary), without_autocast(unary):
        unary, image = unary.to(dtype), image.to(dtype)
        weight, unary_weight = (v.to(dtype) if isinstance(v, torch.Tensor) else v for v in (weight, unary_weight))
        compat_matrix = None if compat_matrix is None else compat_matrix.to(dtype)
        pos_compat, col_compat = (v.to(dtype) if label_compatibility(v) else v for v in (pos_compat, col_compat))
        B = unary.shape[0]
        step = B if ops is reference else ops.grid_limit()  # (the kernels' grids hold the batch in y or z)
        if B <= step:
            Q = infer(unary, image)
        else:  # each image is a CRF of its own
            Q = torch.cat([infer(unary[b : b + step], image[b : b + step]) for b in range(0, B, step)])
        if check is not None:
            check.raise_if_nonfinite()  # after the launches: the inference's one host sync
        return Q.to(out_dtype)
