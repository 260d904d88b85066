"""The autotuner's picks kept on disk: a new process launches a size class's tuned config without timing again.

Triton's autotuner times every config of a kernel at each new key (triton's default timing, ~0.1 s a config: 28
configs for a first ``ConvCRF(21)`` inference, against 1.3-12.7 ms for a whole inference on an H200, run 4) and
forgets the picks with the process, so that a ``convcrf-triton refine`` of one image, a notebook's restart or each
process of a ``torchrun`` paid the tuning again. :class:`~._launch.DirectLaunch` tunes the first
shape of a size class; this keeps its pick in a JSON file a kernel, keyed by what the pick was made for:

- the file's name: the kernel's name and a digest of its source with its callees' (``JITFunction.cache_key``), the
  triton version and the tuner's configs, so that an edited kernel or another config list starts a new file;
- an entry's key: the GPU (the compile target and the driver's device properties: H100 and H200, both sm_90, differ
  in their memory clock) and the size-class key (the keyword arguments, each positional argument's dtype and
  alignment or value, the sizes' half-octaves);
- an entry: the config (its keyword arguments, warps, stages, CTAs and register cap).

Where: ``CONVCRF_TUNE_CACHE`` (a directory, or ``0`` for none), else ``convcrf_tuning/`` in triton's cache directory
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``), which clearing triton's cache clears too. A file that cannot be
read or holds something else counts as empty; one that cannot be written is warned of once and left. Writers
replace the file whole (read, merge, write a temporary, rename): two processes that tune at once may each keep
only their own new entries, which costs a tuning, never a wrong pick.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction


def directory() -> Path | None:
    """Where the picks are kept (``CONVCRF_TUNE_CACHE``, read at each new size class), or None when not."""
    where = os.environ.get("CONVCRF_TUNE_CACHE", "")
    if where == "0":
        return None
    return Path(where) if where else Path(knobs.cache.dir) / "convcrf_tuning"


def _plain(value: object) -> object:
    """``value`` (a size-class key's part) as JSON: dtypes and types by name, tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # (a torch.dtype: "torch.float32")


def _config_entry(config: triton.Config) -> dict:
    return {"kwargs": config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def _config(entry: object) -> triton.Config | None:
    """The config an entry describes, or None if it is not one (a damaged or foreign file)."""
    try:
        kwargs = entry["kwargs"]
        if not isinstance(kwargs, dict) or not all(v is None or isinstance(v, (bool, int, float, str))
                                                   for v in kwargs.values()):
            return None
        counts = [entry[name] for name in ("num_warps", "num_stages", "num_ctas")]
        maxnreg = entry["maxnreg"]
        if not all(type(n) is int and n > 0 for n in counts) or not (maxnreg is None or type(maxnreg) is int):
            return None
        return triton.Config(dict(kwargs), num_warps=counts[0], num_stages=counts[1], num_ctas=counts[2],
                             maxnreg=maxnreg)
    except (TypeError, KeyError):
        return None


class TuningCache:
    """The picks of one autotuned kernel (``jit``, tuned over ``configs``) for every GPU and size class."""

    _warned = False

    def __init__(self, jit: JITFunction, configs: list[triton.Config]) -> None:
        text = json.dumps([jit.cache_key, triton.__version__, [_config_entry(c) for c in configs]], sort_keys=True,
                          default=str)
        self.name = f"{jit.__name__}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"
        self.devices: dict[int, list] = {}
        self.entries: dict[str, object] | None = None  # the file's, read at the first lookup
        self.path: Path | None = None

    def _key(self, device: int, size_key: tuple) -> str:
        """The entry's key: the GPU described, and :class:`DirectLaunch`'s size-class key but its device index."""
        if device not in self.devices:
            target = driver.active.get_current_target()
            props = driver.active.utils.get_device_properties(device)
            self.devices[device] = [target.backend, target.arch, _plain(sorted(props.items()))]
        return json.dumps([self.devices[device], _plain(size_key[1:])])

    def _read(self, path: Path) -> dict[str, object]:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, device: int, size_key: tuple) -> triton.Config | None:
        """The pick kept for ``size_key`` on ``device``, if any."""
        where = directory()
        if where is None:
            return None
        path = where / self.name
        if self.entries is None or path != self.path:
            self.path, self.entries = path, self._read(path)
        entry = self.entries.get(self._key(device, size_key))
        return None if entry is None else _config(entry)

    def put(self, device: int, size_key: tuple, config: triton.Config) -> None:
        """Keep ``config`` as the pick for ``size_key`` on ``device``."""
        where = directory()
        if where is None:
            return
        path = where / self.name
        entries = self._read(path)
        entries[self._key(device, size_key)] = _config_entry(config)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            where.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
            tmp.replace(path)
        except OSError as exc:
            if not TuningCache._warned:
                TuningCache._warned = True
                warnings.warn(f"convcrf_triton: the autotuner's picks cannot be kept in {where} ({exc}); set "
                              "CONVCRF_TUNE_CACHE to a writable directory, or to 0 to keep none", stacklevel=2)
            return
        self.path, self.entries = path, entries
