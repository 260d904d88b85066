"""Triton's interpreter without its repeated patching (about half the interpreted kernels' time in this suite),
and rounding float32 to bfloat16 as the GPU does.

The interpreter runs a launch inside a patch of ``triton.language`` (its builtins swapped for NumPy-backed ones,
undone when the launch ends), and patches it again at every call of a ``@triton.jit`` helper inside the kernel
(``InterpretedFunction.__call__`` → ``_patch_lang``): four ``inspect.getmembers`` scans, ~0.3 ms a call, for
attributes the launch's own patch has already set. Our loops call helpers per tap and per class (``gaussian``,
``_split4``, ...): a k = 31 fused message pass on a 5 × 7 image made 77 k such calls, 25 of its 75 s.

:func:`install` wraps ``_patch_lang`` so that it returns an empty patch where every ``triton.language`` module
the function sees is patched already (its ``program_id`` is no longer the builtin). What runs is unchanged: the
helper's patch would have set the same attributes and was never undone on its own (the interpreter drops it),
so the launch's restore is what undoes them either way.

It also makes the interpreter's float32 → bfloat16 conversion (a store of ``x.to(ptr.dtype.element_ty)`` into
bfloat16 storage) round to nearest even, as triton's default for a float downcast is and as the GPU's
``cvt.rn.bf16.f32`` does; the interpreter truncated (an error of up to a unit in the last place, every value
rounded towards zero: a bias of ~2e-3 relative on a sum of positive weights, where the GPU's errors cancel).
Explicit rounding modes (``fp_downcast_rounding="rtz"``) and every other conversion are left to the interpreter.

Triton 3.6 and 3.9 both have this structure; with any other, :func:`install` leaves the interpreter as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

_calls = {"patched": 0, "skipped": 0}  # read by the test of this module


def install() -> bool:
    """Patch the interpreter once per process; False if a part's structure is not the known one (that part left
    as it is)."""
    from triton.runtime import interpreter

    skips = _skip_repeated_patches(interpreter)
    rounds = _round_bfloat16_to_nearest(interpreter)
    return skips and rounds


def _round_bfloat16_to_nearest(interpreter: Any) -> bool:
    import numpy as np
    import torch
    import triton.language as tl
    from triton._C.libtriton import ir

    original = getattr(interpreter, "_convert_float", None)
    if original is None or getattr(original, "_rounds_to_nearest", False):
        return original is not None

    def convert_float(input: np.ndarray, input_dtype: Any, output_dtype: Any, rounding_mode: Any) -> np.ndarray:
        if (input_dtype == tl.float32 and output_dtype == tl.bfloat16
                and rounding_mode in (None, ir.ROUNDING_MODE.RTNE)):  # (None: the cast's default, RTNE)
            values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert_float._rounds_to_nearest = True
    interpreter._convert_float = convert_float
    return True


def _skip_repeated_patches(interpreter: Any) -> bool:
    import triton.language as tl

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_skips_repeats", False):
        return original is not None
    if not (hasattr(interpreter, "_LangPatchScope") and hasattr(tl.core, "is_builtin")):
        return False
    languages: dict[int, tuple[Any, ...]] = {}  # a module's globals → the triton.language modules it sees

    def patch_lang(fn: Callable) -> Any:
        key = id(fn.__globals__)
        seen = languages.get(key)
        if seen is None:
            seen = languages[key] = tuple(
                {id(v): v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}.values())
        if seen and not any(tl.core.is_builtin(lang.program_id) for lang in seen):
            _calls["skipped"] += 1
            return interpreter._LangPatchScope()
        _calls["patched"] += 1
        return original(fn)

    patch_lang._skips_repeats = True
    interpreter._patch_lang = patch_lang
    return True
