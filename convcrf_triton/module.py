"""``ConvCRF``: the drop-in ``nn.Module`` (SPEC §1 "Public API"). It owns parameters only; the algorithm
lives in :mod:`convcrf_triton.functional`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import functional
from .config import BACKENDS, CRFConfig, check_choice
from .graphs import GraphCache

CHECKPOINT_FORMAT = "convcrf-triton/1"

# The original ConvCRF code's default configuration (its keys, our names in the comments).
CONVCRF_DEFAULT_CONF: dict[str, Any] = {
    "filter_size": 11, "blur": 4, "merge": True, "norm": "none", "weight": "vector", "unary_weight": 1,
    "weight_init": 0.2, "trainable": False, "convcomp": False, "logsoftmax": True, "softmax": True,
    "final_softmax": False, "pos_feats": {"sdims": 3, "compat": 3},
    "col_feats": {"sdims": 80, "schan": 13, "compat": 10, "use_bias": False},
}


class ConvCRF(nn.Module):
    """Convolutional CRF: refines segmentation logits with the image by mean-field inference.

    ``forward(unary [B, C, H, W], image [B, 3, H, W] RGB in [0, 255]) → logits [B, C, H, W]``; any B, H, W
    on every call. The learnable quantities (the per-class or scalar weight ``weight``, the compat
    weights ``pos_compat``/``col_compat``, the bandwidths as ``log_pos_sdims``/``log_col_schan``
    (/``log_col_sdims`` with ``col_use_pos``) and, with ``convcomp=True``, the 1×1 compatibility
    ``compat_matrix [C, C]``) are ``nn.Parameter``s when ``trainable`` and buffers otherwise, so
    ``state_dict()`` holds them either way and an optimiser sees exactly the learnable set.
    """

    def __init__(
        self,
        num_classes: int,
        filter_size: int = 11,
        blur: int = 4,
        num_iter: int = 5,
        pos_sdims: float = 3.0,
        pos_compat: float = 3.0,
        col_sdims: float = 80.0,
        col_schan: float = 13.0,
        col_compat: float = 10.0,
        col_use_pos: bool = False,
        weight: str = "vector",
        weight_init: float = 0.2,
        unary_weight: float = 1.0,
        norm: str = "none",
        merge: bool = True,
        convcomp: bool = False,
        trainable: bool = False,
        backend: str = "auto",
        *,
        mode: str = "textbook",
        final_softmax: bool = False,
        storage: str = "float32",
        precision: str = "float32",
    ) -> None:
        super().__init__()
        self.config = CRFConfig(
            num_classes=num_classes, filter_size=filter_size, blur=blur, num_iter=num_iter,
            pos_sdims=pos_sdims, pos_compat=pos_compat, col_sdims=col_sdims, col_schan=col_schan,
            col_compat=col_compat, col_use_pos=col_use_pos, weight=weight, weight_init=weight_init,
            unary_weight=unary_weight, norm=norm, merge=merge, convcomp=convcomp, trainable=trainable,
            backend=backend, mode=mode, final_softmax=final_softmax, storage=storage, precision=precision,
        )
        shape = (1, num_classes, 1, 1) if weight == "vector" else ()
        self._register("weight", torch.full(shape, float(weight_init)))
        # Bandwidths are held as logs, so that learning keeps them positive.
        self._register("log_pos_sdims", torch.tensor(math.log(pos_sdims)))
        self._register("log_col_schan", torch.tensor(math.log(col_schan)))
        if col_use_pos:
            self._register("log_col_sdims", torch.tensor(math.log(col_sdims)))
        self._register("pos_compat", torch.tensor(float(pos_compat)))
        self._register("col_compat", torch.tensor(float(col_compat)))
        if convcomp:
            self._register("compat_matrix", torch.full((num_classes, num_classes), 0.1 * math.sqrt(2.0 / num_classes)))
        else:
            self.compat_matrix = None
        self._graphs: GraphCache | None = None

    def _register(self, name: str, value: torch.Tensor) -> None:
        if self.config.trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def backend(self) -> str:
        """``'auto' | 'triton' | 'torch'`` (SPEC §3); assignable."""
        return self.config.backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_choice("backend", value, BACKENDS)
        self.config = dataclasses.replace(self.config, backend=value)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def use_cuda_graphs(self, enabled: bool = True, max_entries: int = 8) -> ConvCRF:
        """Replay CUDA inference from CUDA graphs recorded once per input shape (see
        :mod:`convcrf_triton.graphs`): for small images, where launch gaps dominate. Applies to calls on
        CUDA tensors without gradients (``torch.no_grad()`` / ``torch.inference_mode()``), on any stream or
        thread; other calls, and calls inside the caller's own CUDA-graph recording, run eagerly. Each recorded
        shape keeps its buffers on the GPU (the ``max_entries`` most recent); a new ``config`` (``backend``, ...)
        records anew. Returns ``self``."""
        self._graphs = GraphCache(self._infer, lambda: [*self.parameters(), *self.buffers()], max_entries,
                                  context=lambda: self.config) if enabled else None
        return self

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) records graphs of its own: the cache holds this module's method, its recorded
        # graphs and a lock, none of which carries over; only whether it is on and its size do.
        state = dict(super().__getstate__())
        graphs = state.pop("_graphs", None)
        state["_graph_entries"] = None if graphs is None else graphs.max_entries
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        entries = state.pop("_graph_entries", None)
        super().__setstate__(state)
        self._graphs = None
        if entries is not None:
            self.use_cuda_graphs(max_entries=entries)

    def forward(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``unary [B, C, H, W]`` logits, ``image [B, 3, H, W]`` → refined logits ``[B, C, H, W]``."""
        cfg = self.config
        if isinstance(unary, torch.Tensor) and unary.dim() == 4 and unary.shape[1] != cfg.num_classes:
            raise ValueError(f"unary has {unary.shape[1]} classes (shape {tuple(unary.shape)}) but this "
                             f"ConvCRF was built for num_classes={cfg.num_classes}")
        if (self._graphs is not None and isinstance(unary, torch.Tensor) and unary.is_cuda
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing()):  # inside the caller's own recording: eager
            check = functional.check_inputs(unary, image)
            out = self._graphs(unary, image)
            if check is not None:
                check.raise_if_nonfinite()  # after the replay's launch
            return out
        return self._infer(unary, image)

    def _infer(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return functional.mean_field(
            unary, image, filter_size=cfg.filter_size, blur=cfg.blur, num_iter=cfg.num_iter,
            pos_sdims=self.log_pos_sdims.exp(), pos_compat=self.pos_compat,
            col_sdims=self.log_col_sdims.exp() if cfg.col_use_pos else cfg.col_sdims,
            col_schan=self.log_col_schan.exp(), col_compat=self.col_compat, col_use_pos=cfg.col_use_pos,
            weight=self.weight, unary_weight=cfg.unary_weight, norm=cfg.norm,
            compat_matrix=self.compat_matrix, mode=cfg.mode, final_softmax=cfg.final_softmax,
            backend=cfg.backend, storage=cfg.storage, precision=cfg.precision,
        )

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (config and parameters) that :meth:`load` reads back."""
        torch.save({"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "state_dict": self.state_dict()},
                   path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu", backend: str | None = None
             ) -> ConvCRF:
        """A ``ConvCRF`` from a checkpoint written by :meth:`save` (optionally on another ``backend``)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a convcrf-triton checkpoint (written by ConvCRF.save)")
        config = dict(ckpt["config"])
        if backend is not None:
            config["backend"] = backend
        crf = cls(**config)
        crf.load_state_dict(ckpt["state_dict"])
        return crf

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"num_classes={cfg.num_classes}, filter_size={cfg.filter_size}, blur={cfg.blur}, "
                f"num_iter={cfg.num_iter}, mode={cfg.mode!r}, backend={cfg.backend!r}")

    @classmethod
    def from_convcrf_conf(cls, conf: Mapping[str, Any], num_classes: int, backend: str = "auto") -> ConvCRF:
        """Build the CRF the original ConvCRF code builds from its config dict, quirks included.

        Missing keys take the original defaults; ``weight=None`` (``L + M``) becomes a fixed scalar
        ``w = 1`` with ``unary_weight = 2``. ``logsoftmax=False`` and ``softmax=False`` are not supported.
        """
        if not isinstance(conf, Mapping):
            raise TypeError(f"conf must be a dict (the original ConvCRF config), got {type(conf).__name__}")
        c = {**CONVCRF_DEFAULT_CONF, **conf}
        pos = {**CONVCRF_DEFAULT_CONF["pos_feats"], **c["pos_feats"]}
        col = {**CONVCRF_DEFAULT_CONF["col_feats"], **c["col_feats"]}
        for key in ("logsoftmax", "softmax"):
            if not c[key]:
                raise ValueError(f"conf[{key!r}]=False is not supported: only the original default (True)")
        weight, weight_init, unary_weight = c["weight"], c["weight_init"], c["unary_weight"]
        if weight is None:
            weight, weight_init, unary_weight = "scalar", 1.0, 2.0
        return cls(
            num_classes, filter_size=c["filter_size"], blur=c["blur"], pos_sdims=float(pos["sdims"]),
            pos_compat=float(pos["compat"]), col_sdims=float(col["sdims"]), col_schan=float(col["schan"]),
            col_compat=float(col["compat"]), col_use_pos=bool(col["use_bias"]), weight=weight,
            weight_init=float(weight_init), unary_weight=float(unary_weight), norm=c["norm"], merge=c["merge"],
            convcomp=c["convcomp"], trainable=c["trainable"], backend=backend, mode="convcrf",
            final_softmax=c["final_softmax"],
        )
