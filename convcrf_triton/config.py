"""The CRF's hyper-parameters as one validated dataclass (SPEC §1 "Public API")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

NORMS = ("none", "sym")
WEIGHTS = ("vector", "scalar")
MODES = ("textbook", "convcrf")
BACKENDS = ("auto", "triton", "torch")
STORAGES = ("float32", "bfloat16", "float16")
PRECISIONS = ("float32", "tf32")
SCHEDULES = ("cosine", "constant")  # the training's learning rate (train.train)
LOSSES = ("lovasz", "cross_entropy")  # the training's objective (train.train)
MAX_FILTER_SIZE = 31


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        _fail(name, value, "one of " + ", ".join(allowed))


@dataclass(frozen=True)
class CRFConfig:
    """Every parameter of ConvCRF mean-field inference.

    ``mode="textbook"`` is the mean-field of SPEC §1 (first pass on ``softmax(L)``, centre tap 0);
    ``mode="convcrf"`` reproduces the original ConvCRF code (first pass on ``L``, centre tap kept).
    ``final_softmax`` returns probabilities instead of logits after the last iteration.
    ``storage`` is the dtype the tensors between kernels are kept in (the Gaussian weights ``K`` and the
    probabilities ``Q`` the message pass reads); arithmetic and logits stay float32 (float64 inputs: float64).
    float16's range ends at 6e-8 below (weights smaller round to 0 or a few subnormal steps), which
    ``norm="sym"``'s normaliser ``1/sqrt(sum of weights)`` amplifies where a pixel's colour is far from all its
    neighbours': prefer bfloat16 there (on a random-noise image, k = 5, the logits 20% of the largest off the
    float64 result; bfloat16 and float32 alike 1.2%).
    ``precision="tf32"`` lets inference on the Triton backend run the pooled-grid message passes (blur > 1) of
    filter sizes 7..21 as TF32 tensor-core products (messages within ~2e-4 relative instead of float32's 1e-6).
    """

    num_classes: int
    filter_size: int = 11
    blur: int = 4
    num_iter: int = 5
    pos_sdims: float = 3.0
    pos_compat: float = 3.0
    col_sdims: float = 80.0
    col_schan: float = 13.0
    col_compat: float = 10.0
    col_use_pos: bool = False
    weight: str = "vector"
    weight_init: float = 0.2
    unary_weight: float = 1.0
    norm: str = "none"
    merge: bool = True
    convcomp: bool = False
    trainable: bool = False
    backend: str = "auto"
    mode: str = "textbook"
    final_softmax: bool = False
    storage: str = "float32"
    precision: str = "float32"

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_classes) or self.num_classes < 1:
            _fail("num_classes", self.num_classes, "an integer >= 1")
        k = self.filter_size
        if not is_int(k) or k % 2 == 0 or not 3 <= k <= MAX_FILTER_SIZE:
            _fail("filter_size", k, f"an odd integer in 3..{MAX_FILTER_SIZE}")
        if not is_int(self.blur) or not (self.blur == 1 or (self.blur >= 2 and self.blur % 2 == 0)):
            _fail("blur", self.blur, "1 or an even integer >= 2")
        if not is_int(self.num_iter) or self.num_iter < 1:
            _fail("num_iter", self.num_iter, "an integer >= 1")
        for name in ("pos_sdims", "col_sdims", "col_schan"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, v, "a finite number > 0 (a Gaussian bandwidth)")
        for name in ("pos_compat", "col_compat", "weight_init", "unary_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, v, "a finite number")
        for name, allowed in (("weight", WEIGHTS), ("norm", NORMS), ("mode", MODES), ("backend", BACKENDS),
                              ("storage", STORAGES), ("precision", PRECISIONS)):
            check_choice(name, getattr(self, name), allowed)
        for name in ("col_use_pos", "merge", "convcomp", "trainable", "final_softmax"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.norm == "sym" and self.merge:
            _fail("norm", self.norm, "'none' when merge=True ('sym' normalises each Gaussian: merge=False)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
