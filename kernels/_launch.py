"""What every launcher needs: interpreter detection, block sizes, index width, input checks."""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.overrides import has_torch_function
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import Autotuner, driver
from triton.runtime.jit import JITFunction

try:  # (triton 3.6 - 3.9; private)
    from triton.runtime import _async_compile
except ImportError:
    _async_compile = None

from ._tuning_cache import TuningCache

MAX_INT32 = 2**31 - 1
# What every launch compiles with (the interpreter ignores it): multiply-adds fused into FFMA, named because
# triton 3.9 warns that its default turns to unfused in 3.10, which would split every one of the kernels'
# multiply-adds in two (and round twice).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` is a constexpr function: ~3 µs a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (>= 1), on the host (``triton.next_power_of_2``: ~4 µs a call)."""
    return 1 << max(n - 1, 0).bit_length()


# Whether ``@triton.jit`` made this package's kernels interpreter objects: triton decides when the decorator runs, at
# import, from TRITON_INTERPRET (and so do we, once: the launchers ask at every launch, and an environment lookup
# is ~1 µs of host time).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were imported)."""
    return INTERPRETING


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset of these tensors overflows int32 (then kernels index in int64)."""
    return any(t.numel() > MAX_INT32 for t in tensors)


def interpreter_blocks(C: int, hw: int) -> tuple[int, int]:
    """One large ``(BLOCK_C, BLOCK_P)`` tile per small image: the interpreter's cost grows with the
    number of programs, not with the block size."""
    return min(next_power_of_2(C), 256), min(next_power_of_2(hw), 4096)


def autotuning() -> bool:
    """False with ``CONVCRF_AUTOTUNE=0`` (quick GPU test runs: no benchmarking)."""
    return os.environ.get("CONVCRF_AUTOTUNE", "1") != "0"


def tuning_off(configs: list) -> list:
    """``CONVCRF_AUTOTUNE=0``: the first surviving autotune config, no benchmarking (quick GPU test runs)."""
    return configs if autotuning() else configs[:1]


def message_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """A message pass's output dtype for ``Q`` in ``q_dtype``: float32 where ``Q`` is stored in bfloat16 or float16
    (a message is a sum of up to k² weighted values: float16 ends at 65504, which the original mode's first pass,
    on log-probabilities, passes with logits in the hundreds), else ``Q``'s."""
    return torch.float32 if q_dtype in (torch.bfloat16, torch.float16) else q_dtype


def check_on_device(**tensors: torch.Tensor | None) -> None:
    """Kernels run on CUDA tensors (or on CPU tensors under the interpreter), all of a launch's on one device: a
    kernel reads its pointers on the device it runs on, and another GPU's memory is an illegal access or, with
    peer access, silently slow. None: an operand not given."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not interpreting() and not t.is_cuda:
            raise ValueError(
                f"{name} is on {t.device}: the Triton backend needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for CPU tensors); use backend='torch' on the CPU"
            )
        if first is None:
            first = name, t.device
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}: put them on one device")


# CUDA's limit on a grid's y and z dimensions (x: 2^31 - 1), where the kernels' grids hold the batch and the blurred
# kernels the pooled rows.
MAX_GRID_YZ = 65535


def grid_limit() -> int:
    """:data:`MAX_GRID_YZ`, read at the call (for the callers that route around it: ``functional.mean_field``)."""
    return MAX_GRID_YZ


def check_grid(**sizes: int) -> None:
    """A ValueError for a size (the batch, the pooled rows) beyond what a CUDA grid holds in y or z, where the kernel
    puts it, instead of the launch's 'invalid argument'."""
    for name, n in sizes.items():
        if n > MAX_GRID_YZ:
            raise ValueError(f"{name}={n}: the kernel's grid holds it in y or z, where CUDA allows at most "
                             f"{MAX_GRID_YZ} blocks; split it (ConvCRF and mean_field split the batch)")


def check_flag(nonfinite: torch.Tensor | None, like: torch.Tensor) -> None:
    """A kernel's ``nonfinite`` flag (the input check's, which the kernels that read an input whole set as they read
    it): None, or a one-element float32 tensor on the device of ``like``."""
    if nonfinite is not None and (not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.float32
                                  or nonfinite.numel() != 1 or nonfinite.device != like.device):
        got = (f"{nonfinite.dtype} {tuple(nonfinite.shape)} on {nonfinite.device}"
               if isinstance(nonfinite, torch.Tensor) else type(nonfinite).__name__)
        raise ValueError(f"nonfinite must be a one-element float32 tensor on {like.device}, got {got}")


# The tensor types a launcher takes without the dispatcher (not fake, no subclass's __torch_dispatch__); a
# module's parameters are passed as they are.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class LibraryOp:
    """A launcher registered as the ``torch.library`` custom op ``name`` (``op``: what ``torch.compile`` captures
    as one node and autograd differentiates; ``op.register_fake`` and ``op.register_autograd`` as usual), called
    as its plain Python function ``fn`` where nothing needs the op: not compiling or tracing (``torch.jit``,
    ``torch.fx``), no dispatch mode, plain tensors or parameters, none of which requires grad with grad enabled.
    The dispatcher's round trip costs ~8 µs of host time a call on this project's CPU (a do-nothing op: 9.9 µs
    through it, 1.7 direct; ``bench/host_overhead.py``), against 12-23 µs of our launchers' own Python: small
    images, launch-bound, pay it at every launch."""

    def __init__(self, name: str, fn: Callable[..., object], mutates_args: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)

    def __call__(self, *args: object) -> object:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
                or has_torch_function(args)):  # also fx proxies and __torch_function__ subclasses
            return self.op(*args)
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor) and (type(a) not in PLAIN_TENSORS or (grad and a.requires_grad)):
                return self.op(*args)
        return self.fn(*args)


def library_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable[..., object]], LibraryOp]:
    """Decorator: ``fn`` as a :class:`LibraryOp` named ``name`` (that writes into ``mutates_args``)."""
    return lambda fn: LibraryOp(name, fn, mutates_args)


# CONVCRF_DIRECT_LAUNCH=0: every launch takes triton's own path (DirectLaunch is then a pass-through).
DIRECT_LAUNCH = os.environ.get("CONVCRF_DIRECT_LAUNCH", "1") != "0"
# Specialisations a DirectLaunch holds before it starts again (each a compiled kernel triton holds anyway).
MAX_DIRECT_LAUNCHES = 1024
# CONVCRF_TUNE_EVERY_SHAPE=1: the autotuner benchmarks every new shape (triton's key), not one per size class.
TUNE_BY_SIZE_CLASS = os.environ.get("CONVCRF_TUNE_EVERY_SHAPE", "0") == "0"
# Threads that compile the configs a tuning will time (CONVCRF_COMPILE_THREADS; below 2: the tuner compiles them): by
# default the cores this process may run on, at most 8.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
COMPILE_THREADS = int(os.environ.get("CONVCRF_COMPILE_THREADS", str(min(8, _CORES))))


def compile_configs(tuner: Autotuner, jit: JITFunction, grid: object, args: tuple, kwargs: dict) -> None:
    """Compile every config ``tuner`` will time for this launch, in :data:`COMPILE_THREADS` threads, before it times
    them: it compiles each at its first launch, one after the other. A compile is about half Python (the kernel's
    code generation, which holds the GIL) and half MLIR, LLVM and ptxas, which do not: through the stub driver on
    this project's 2-core CPU a cold message pass at k = 11 (7 configs) took 12.1 s tuned as triton does, 8.6 s
    compiled in 2 threads first. A config that fails to compile is left to the tuner (which skips what runs out of
    resources). Nothing where the tuner has its key's pick already (a launch that differs from a tuned one only in
    what triton's key leaves out: an operand's alignment, a constexpr that is not in the key): it times nothing."""
    if COMPILE_THREADS < 2 or _async_compile is None or _async_compile.active_mode.get():
        return  # (one thread, or the caller compiles asynchronously already)
    nargs = dict(zip(tuner.arg_names, args, strict=False))
    # The tuner's key, as Autotuner.run makes it (triton 3.6 - 3.9): the key arguments' values, every dtype.
    named = {name: value for name, value in {**nargs, **kwargs}.items() if name in tuner.arg_names}
    key = [named[name] for name in tuner.keys if name in named]
    if tuple(key + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]) in tuner.cache:
        return
    configs = tuner.early_config_prune(tuner.configs, nargs, **kwargs) if tuner.early_config_prune else tuner.configs
    if len(configs) < 2:
        return
    with (ThreadPoolExecutor(min(COMPILE_THREADS, len(configs))) as pool,
          _async_compile.AsyncCompileMode(pool, ignore_errors=True)):
        for config in configs:
            jit.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())


def size_class(n: int) -> tuple[int, int]:
    """The half-octave of ``n >= 0``: its bit length and the two leading bits (``[256, 384)``, ``[384, 512)``,
    ``[512, 768)``, ...): sizes within ~1.5× of each other share a tuned config."""
    b = n.bit_length()
    return b, n >> max(b - 2, 0)


def _device_of(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (-1 on the CPU)."""
    return t.get_device()


def _specialisation(args: tuple) -> list:
    """What triton's caches tell apart in positional arguments: a tensor's dtype and 16-byte alignment (the
    binder's ``D``), an int's value (the binder's ``== 1`` and ``% 16``, the autotuner's key), a float's type
    only (not specialised: a varying float must not grow the table), any other value's type and value."""
    return [(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else
            (type(a), None if type(a) is float else a) for a in args]


class DirectLaunch:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel or its ``triton.autotune`` (``fn``), the
    calls after the first of each specialisation launching the compiled kernel directly.

    Triton's path costs 60-110 µs of host time a launch of the autotuned message pass on this project's CPU (the
    autotuner's key, which tests each argument's membership in a list; the binder's specialisation of every
    argument; the compile cache's key), against 13-27 µs for the launcher's Python before it and 5-25 for this
    class's (``bench/host_overhead.py``, through a stub driver). Small images are launch-bound: that is the
    inference's time.

    The first call of a specialisation goes through triton (compiling, tuning) and records the ``CompiledKernel``
    it returns with the constexprs that completed its arguments (the keyword arguments, the tuned config, the
    defaults); a later call with the same specialisation passes the kernel's launcher what triton's path would
    (``tests/test_direct_launch.py`` compares the two through a stub driver, for every launcher). The
    specialisation: the device, the keyword arguments and :func:`_specialisation` of each positional one, which
    holds whatever either of triton's caches keys on. What triton checks at every launch and this does not:
    changed globals of the kernel and triton's debug knobs (set them before the first launch). ``grid`` functions
    read the keyword arguments only. Not under the interpreter (no compiled kernels) or with
    ``CONVCRF_DIRECT_LAUNCH=0``: triton's path.

    ``sizes``: the names of an autotuned kernel's positional int arguments (its grid's height and width) whose
    :func:`size_class` replaces their value in the tuning's key. The autotuner keys on the exact shape and
    benchmarks every config of a new one (~0.1 s a config with triton's default timing: seconds an image for a
    folder of photographs of a few hundred sizes); here the first shape of a size class (same keyword arguments,
    other positional arguments and dtypes) is tuned, and the others launch the plain kernel with its config
    (compiled if new, untimed). ``CONVCRF_TUNE_EVERY_SHAPE=1``: the autotuner's own key. The size classes' picks are
    kept on disk (:class:`~._tuning_cache.TuningCache`), so that a new process launches a size class tuned before,
    on the same GPU with the same kernel source, triton and configs, untimed."""

    def __init__(self, fn: object, sizes: tuple[str, ...] = ()) -> None:
        self.fn = fn
        jit = fn
        while not isinstance(jit, JITFunction) and hasattr(jit, "fn"):  # (the Python function, interpreted)
            jit = jit.fn
        self.jit = jit
        params = inspect.signature(getattr(jit, "fn", jit)).parameters
        self.names = tuple(params)
        self.defaults = {name: p.default for name, p in params.items()}
        self.lock = threading.Lock()
        # key -> (the kernel, its launcher, its function and packed metadata, the constexprs, the grid's meta)
        self.launches: dict[tuple, tuple] = {}
        self.tuner = fn if isinstance(fn, Autotuner) else None
        self.tuned_from = self._tuner_state()
        self.size_at = tuple(2 + self.names.index(name) for name in sizes)  # (in the key: device, keywords, args)
        self.tuned: dict[tuple, object] = {}  # size-class key -> the config its first shape was tuned to
        self.kept: TuningCache | None = None  # the picks on disk, for the tuner's configs of now

    def _tuner_state(self) -> tuple[object, object] | None:
        """The autotuner's configs and cache, the objects: replacing either (as tests do, to force a config)
        empties the table."""
        return None if self.tuner is None else (self.tuner.configs, self.tuner.cache)

    def __getitem__(self, grid: object) -> Callable[..., object]:
        if INTERPRETING:
            return self.fn[grid]
        return functools.partial(self._launch, grid)

    def _launch(self, grid: object, *args: object, **kwargs: object) -> object:
        device = driver.active.get_current_device()
        index = _device_of(args[0])  # (every kernel's first operand is a tensor)
        if index != device and index >= 0:
            # Triton launches on the current device, not the operands': switch to theirs for the launch.
            driver.active.set_current_device(index)
            try:
                return self._launch(grid, *args, **kwargs)
            finally:
                driver.active.set_current_device(device)
        if not DIRECT_LAUNCH:
            return self.fn[grid](*args, **kwargs)
        tuner = self.tuner
        if tuner is not None and (tuner.cache is not self.tuned_from[1] or tuner.configs is not self.tuned_from[0]):
            self.launches.clear()
            self.tuned.clear()
            self.kept = None
            self.tuned_from = self._tuner_state()
        key = (device, tuple(kwargs.items()), *_specialisation(args))
        hit = self.launches.get(key)
        if hit is None:
            return self._first(key, grid, args, kwargs)
        kernel, run, handles, tail, meta = hit
        if callable(grid):
            grid = grid(meta)
        args += tail
        _run(hit, device, grid, args)
        if _RECORDING.launches is not None:
            _RECORDING.launches.append((hit, device, grid, args))
        return kernel

    def _first(self, key: tuple, grid: object, args: tuple, kwargs: dict) -> object:
        """Triton's launch, and the record of what it launched (unless it launched no compiled kernel: a
        stubbed launch, a pre-run hook, an asynchronous compile)."""
        size_key = None
        if self.size_at and TUNE_BY_SIZE_CLASS:
            size_key = list(key)
            for i in self.size_at:
                size_key[i] = size_class(size_key[i][1])
            size_key = tuple(size_key)
        with self.lock:  # (the autotuner's best_config is the launch's only while no other thread launches)
            config = self.tuned.get(size_key)
            keep = size_key is not None and config is None and autotuning()  # (a pick kept on disk)
            if keep:
                if self.kept is None:
                    self.kept = TuningCache(self.jit, self.tuner.configs)
                config = self.kept.get(key[0], size_key)
            if config is not None:
                kernel = self.jit[grid](*args, **kwargs, **config.all_kwargs())
                if keep and isinstance(kernel, CompiledKernel):
                    self.tuned[size_key] = config
            else:
                if self.tuner is not None and autotuning():
                    compile_configs(self.tuner, self.jit, grid, args, kwargs)
                kernel = self.fn[grid](*args, **kwargs)
                config = getattr(self.fn, "best_config", None)
                if size_key is not None and isinstance(kernel, CompiledKernel):
                    self.tuned[size_key] = config
                    if keep:
                        self.kept.put(key[0], size_key, config)
        if isinstance(kernel, CompiledKernel) and not self.jit.pre_run_hooks:
            meta = {**kwargs, **(config.all_kwargs() if config is not None else {})}
            tail = tuple(meta[name] if name in meta else self.defaults[name] for name in self.names[len(args):])
            if len(self.launches) >= MAX_DIRECT_LAUNCHES:
                self.launches.clear()
            hit = self.launches[key] = (kernel, kernel.run, (kernel.function, kernel.packed_metadata), tail, meta)
            if _RECORDING.launches is not None:
                _RECORDING.launches.append((hit, key[0], grid(meta) if callable(grid) else grid, args + tail))
        return kernel


def _hooked(hook: object) -> bool:
    """Whether a launch hook of triton's knobs would do anything: triton 3.6 and 3.9 hold an empty ``HookChain``
    (never None) unless a profiler (proton) or the user adds one."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _run(hit: tuple, device: int, grid: tuple, args: tuple) -> None:
    """Launch a recorded kernel (a :class:`DirectLaunch` table entry) as triton's launch path would, but for the
    launch metadata, which only the launch hooks read: with none installed the launcher gets None for the
    metadata and both hooks (it then calls none) instead of a new ``LazyDict`` and two empty chains to call,
    ~3 µs of host time a launch on this project's CPU (``bench/host_overhead.py``)."""
    kernel, run, handles = hit[:3]
    stream = driver.active.get_current_stream(device)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if _hooked(enter) or _hooked(leave):
        metadata = kernel.launch_metadata(grid, stream, *args)
    else:
        metadata = enter = leave = None
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, *handles, metadata, enter,
        leave, *args)


# False: every Repeat call is its function's (bench/host_overhead.py times both).
REPEAT = True


class _Recording(threading.local):
    """The launches :class:`DirectLaunch` makes on this thread while a :class:`Repeat` records (else None)."""

    launches: list | None = None


_RECORDING = _Recording()


class Repeat:
    """``fn(*inputs) -> output`` whose work is one launch through a :class:`DirectLaunch` (a launcher called
    with the same other operands each time: a loop's iteration), launched again without ``fn``'s Python.

    The first call runs ``fn`` and records its launch: the compiled kernel, the grid and the arguments, among
    which the inputs and the output are found by identity. A later call allocates an output like the first's
    (uninitialised: the launch must write all of it, as the launchers' outputs are ``torch.empty``) and launches
    the same kernel with the same arguments, its inputs and output in their places: 8-11 µs of host time where
    ``kernels.message_pass`` (validation, the launcher's Python, the table's key) took 23-27 on this project's
    CPU (stub driver; the launch itself ~2-3).

    Every other tensor the launch read must be one of ``constants`` (what ``fn`` closes over, the same at each
    call); where one is not (``fn`` made it: a conversion, a copy), ``fn`` launched other than once, or nothing
    was recorded (the interpreter, triton's path), every call is ``fn``'s. So is a call whose inputs differ from
    the first's in shape, strides, dtype or 16-byte alignment, or made while compiling, tracing, under a dispatch
    mode or with an input that requires grad with grad enabled (the ops must be seen)."""

    def __init__(self, fn: Callable[..., torch.Tensor], constants: tuple[torch.Tensor | None, ...] = ()) -> None:
        self.fn = fn
        self.constants = tuple(t for t in constants if t is not None)
        self.plan: tuple | None = None
        self.recorded = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not REPEAT or torch.compiler.is_compiling():  # (a trace records nothing: no thread state to guard on)
            return self.fn(*inputs)
        plan = self.plan
        if plan is None or not self._plain(inputs):
            return self.fn(*inputs) if self.recorded else self._record(inputs)
        hit, device, grid, template, input_slots, output_slots, like, out_like = plan
        for t, (shape, stride, dtype, align) in zip(inputs, like, strict=True):
            if t.shape != shape or t.stride() != stride or t.dtype != dtype or t.data_ptr() & 15 != align:
                return self.fn(*inputs)
        shape, stride, dtype, align, torch_device = out_like
        out = torch.empty_strided(shape, stride, dtype=dtype, device=torch_device)
        if out.data_ptr() & 15 != align or driver.active.get_current_device() != device:
            return self.fn(*inputs)
        args = list(template)
        for at, i in input_slots:
            args[at] = inputs[i]
        for at in output_slots:
            args[at] = out
        _run(hit, device, grid, tuple(args))
        return out

    @staticmethod
    def _plain(inputs: tuple) -> bool:
        """Nothing but this call needs to see the op: no compiler, tracer, dispatch mode or gradient."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))

    def _record(self, inputs: tuple) -> torch.Tensor:
        self.recorded = True
        outer, _RECORDING.launches = _RECORDING.launches, []
        try:
            out = self.fn(*inputs)
            launches = _RECORDING.launches
        finally:
            _RECORDING.launches = outer
        if len(launches) == 1 and isinstance(out, torch.Tensor) and self._plain(inputs):
            self.plan = self._plan(*launches[0], inputs, out)
        return out

    def _plan(self, hit: tuple, device: int, grid: tuple, args: tuple, inputs: tuple, out: torch.Tensor
              ) -> tuple | None:
        """What a later call needs: the arguments with the inputs and output left out, and their places."""
        template, input_slots, output_slots = list(args), [], []
        for at, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            given = next((i for i, t in enumerate(inputs) if a is t), None)
            if a is out:
                output_slots.append(at)
            elif given is not None:
                input_slots.append((at, given))
            elif any(a is t for t in self.constants):
                continue
            else:
                return None  # a tensor fn made: a later call would read this one's stale values
            template[at] = None
        if not output_slots:
            return None
        like = tuple((t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in inputs)
        out_like = (out.shape, out.stride(), out.dtype, out.data_ptr() & 15, out.device)
        return hit, device, tuple(grid), tuple(template), tuple(input_slots), tuple(output_slots), like, out_like
