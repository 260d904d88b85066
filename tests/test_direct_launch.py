"""``kernels._launch.DirectLaunch`` passes the compiled kernel's launcher exactly what triton's own launch path
would: every launcher of the package, through a stub driver (``stub_driver.py``: kernels compile for sm_90, the
launches are recorded), in a child process where triton is not interpreting.

For each case the child records the launches of one call with direct launches off (triton's path), then of
two calls with them on (the first records the compiled kernels, the second launches them directly: no call
reaches ``JITFunction.run``), and reports where the two sides differ: the grid, the compiled kernel (the stub's
function handle is its cubin's hash, so a kernel compiled for another specialisation differs), its packed
metadata, the hooks, and each argument (a tensor by dtype, shape, strides and 16-byte alignment: the runs
allocate their outputs anew; anything else by type and value).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = ["inference blur 4", "inference blur 4 compat", "inference blur 4 bfloat16", "inference blur 1",
         "inference blur 1 channels-last", "inference blur 4 with a launch hook",
         "misaligned operands", "fused message pass", "training", "band message pass", "band step", "one size class"]
REPEATED = ("blur_step", "message_pass", "mean_field_step")  # the functions an inference's iterations replay
TRITON_CACHE = str(HERE.parent / ".aot_cache" / "triton")  # (the children's compiles, kept as the AOT tests' are)


@pytest.fixture(scope="module")
def child_report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CONVCRF_AUTOTUNE="0", CONVCRF_TUNE_CACHE="0", TRITON_CACHE_DIR=TRITON_CACHE)
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=HERE)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tuning_process(kept: str, heights: str, threads: int = 2, memory_clock: int | None = None) -> list[dict]:
    """A process's mean-field steps on grids ``heights`` × 64, tuned (every config), the picks kept in ``kept``,
    compiled in ``threads``, on the stub's GPU or one whose memory clock (kHz) is ``memory_clock``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CONVCRF_AUTOTUNE="1", CONVCRF_TUNE_CACHE=kept, TRITON_CACHE_DIR=TRITON_CACHE,
               CONVCRF_COMPILE_THREADS=str(threads))
    clock = [] if memory_clock is None else ["--memory-clock", str(memory_clock)]
    done = subprocess.run([sys.executable, __file__, "--tuning", heights, *clock], env=env, capture_output=True,
                          text=True, timeout=600, cwd=HERE)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_direct_launches_match_tritons_path(child_report: dict, case: str) -> None:
    report = child_report[case]
    assert report["launches"] > 0
    assert report["differences"] == []
    assert report["through_triton_on_repeat"] == 0


@pytest.mark.parametrize("case", CASES)
def test_launch_hooks_get_their_metadata(child_report: dict, case: str) -> None:
    """With a launch hook installed (a profiler's) every direct launch passes the hooks and a launch-metadata
    object, as triton's path does; with none, the launcher gets None for all three (nothing to call)."""
    hooks = ["'metadata'", "'hooks'", "'no hooks'"] if "hook" in case else ["'no hooks'"] * 3
    assert child_report[case]["hooks"] == [f"[{', '.join(hooks)}]"]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("inference")])
def test_inferences_replay_the_middle_iterations(child_report: dict, case: str) -> None:
    """Of an inference's 4 iterations the first calls the launchers' functions (``kernels.Repeat`` records their
    launches) and the next replay them: at blur 4 the pooled pass in every later iteration and the step in the
    two middle ones (the last writes the full-resolution logits), the compatibility between them a tensor of
    PyTorch's, and with bfloat16 storage too (the pass's message is float32: no conversion after it, which
    made a tensor the step read); at blur 1 the step in the middle ones."""
    calls = child_report[case]["calls"]
    assert calls == ({"blur_step": 2, "message_pass": 1} if "blur 4" in case else {"mean_field_step": 2})


def test_shapes_of_one_size_class_are_tuned_once(child_report: dict) -> None:
    """The autotuner (every config, ``CONVCRF_AUTOTUNE=1``) times the mean-field step's configs for the first grid of
    a size class only: 20×64, then 23×64 (the same half-octaves: no timing), then 40×64 (another: timed)."""
    first, same_class, other_class = child_report["tunings by size class"]
    assert first > 0 and same_class == 0 and other_class == first


def test_tuned_picks_outlive_the_process(tmp_path: Path) -> None:
    """A size class's pick is kept on disk: a second process launches it for another grid of the class without
    timing, and times a new class; on another GPU, with ``CONVCRF_TUNE_CACHE=0`` or a damaged file, a process times
    again. (The
    stub times each config faster than the one before: the tuner picks the step's last config, 2 taps unrolled, not
    the first, which ties and ``CONVCRF_AUTOTUNE=0`` would launch.)"""
    kept = tmp_path / "tuning"
    first = _tuning_process(str(kept), "20")
    assert first == [{"timings": 2, "unroll": 2, "compiled": ["pool", "pool"]}]
    (file,) = kept.iterdir()
    assert len(json.loads(file.read_text())) == 1
    # 23: the kept pick, compiled alone; 40: a new class, the other config compiled for its tuning; 41: in 40's class
    assert _tuning_process(str(kept), "23,40,41") == [{"timings": 0, "unroll": 2, "compiled": ["main"]},
                                                     {"timings": 2, "unroll": 2, "compiled": ["pool"]},
                                                     {"timings": 0, "unroll": 2, "compiled": []}]
    assert len(json.loads(file.read_text())) == 2 and list(kept.iterdir()) == [file]
    # another GPU of the same architecture (an H200 is an H100's sm_90 with faster memory): its own pick
    assert _tuning_process(str(kept), "23", memory_clock=3200000) == first
    assert len(json.loads(file.read_text())) == 3
    assert _tuning_process("0", "23") == first
    file.write_text('{"not": "an entry"')
    assert _tuning_process(str(kept), "23") == first
    assert len(json.loads(file.read_text())) == 1


def test_a_tuning_compiles_its_configs_in_threads_first() -> None:
    """The configs a tuning will time are compiled in threads before it times them (a compile is half code
    generation in Python, half MLIR, LLVM and ptxas, which release the GIL); with one thread the tuner compiles
    each as it first launches it. The pick is the same."""
    assert _tuning_process("0", "20", threads=1) == [{"timings": 2, "unroll": 2, "compiled": ["main", "main"]}]


@pytest.mark.parametrize("active,tuned", [(False, False), (True, False), (False, True)])
def test_configs_compile_at_once_unless_the_caller_compiles_asynchronously(monkeypatch, active: bool,
                                                                           tuned: bool) -> None:
    """Every pruned config is warmed up (compiled) in the pool; not inside a caller's own ``AsyncCompileMode``
    (triton allows one at a time: the tuner then compiles as it times), nor where the tuner has its key's pick
    (it times nothing: its key is the key arguments' values and the operands' dtypes)."""
    from types import SimpleNamespace

    import torch
    from convcrf_triton.kernels import _launch
    from triton.runtime import _async_compile

    monkeypatch.setattr(_launch, "COMPILE_THREADS", 2)
    warmed = []
    jit = SimpleNamespace(warmup=lambda *args, grid, **kwargs: warmed.append((args, grid, kwargs)))
    configs = [SimpleNamespace(all_kwargs=lambda u=u: {"UNROLL": u, "num_warps": 4}) for u in (1, 2, 4)]
    q = torch.zeros(2, dtype=torch.float16)
    tuner = SimpleNamespace(configs=configs, arg_names=["q", "C", "KSIZE"], keys=["C", "KSIZE"],
                            cache={(5, 7, "torch.float16"): configs[0]} if tuned else {(5, 7, "torch.float32"): None},
                            early_config_prune=lambda configs, nargs, **kwargs: configs[:2] if nargs["C"] == 5 else [])
    token = _async_compile.active_mode.set(object() if active else None)
    try:
        _launch.compile_configs(tuner, jit, (3, 1), (q, 5), {"KSIZE": 7})
    finally:
        _async_compile.active_mode.reset(token)
    want = [((q, 5), (3, 1), {"KSIZE": 7, "UNROLL": u, "num_warps": 4}) for u in (1, 2)]
    assert warmed == ([] if active or tuned else want)


@pytest.mark.parametrize("entry", [None, [], {}, {"kwargs": {"UNROLL": 2}}, {"kwargs": [2], "num_warps": 4},
                                   {"kwargs": {"UNROLL": [2]}, "num_warps": 4, "num_stages": 3, "num_ctas": 1,
                                    "maxnreg": None},
                                   {"kwargs": {}, "num_warps": 0, "num_stages": 3, "num_ctas": 1, "maxnreg": None},
                                   {"kwargs": {}, "num_warps": 4.0, "num_stages": 3, "num_ctas": 1, "maxnreg": None},
                                   {"kwargs": {}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": "x"}])
def test_a_kept_entry_that_is_no_config_is_ignored(entry: object) -> None:
    from convcrf_triton.kernels import _tuning_cache

    assert _tuning_cache._config(entry) is None


def test_a_kept_entry_is_the_config_it_was() -> None:
    import triton
    from convcrf_triton.kernels import _tuning_cache

    config = triton.Config({"BLOCK_C": 8, "BLOCK_P": 128, "UNROLL": 4}, num_warps=8, num_stages=2, maxnreg=168)
    entry = json.loads(json.dumps(_tuning_cache._config_entry(config)))
    assert _tuning_cache._config(entry).all_kwargs() == config.all_kwargs()


def test_repeat_launches_what_the_call_launches(child_report: dict) -> None:
    """``kernels.Repeat`` replays a message pass's launch with new inputs and outputs, and gives a misaligned input
    or another grid to the pass itself (the same launches as the pass alone, output shapes included); a pass
    that reads a tensor it made, or a constant it was not told of, is never replayed."""
    report = child_report["repeat"]
    assert report["replays"] and report["shapes"] and report["differences"] == []
    for case in ("made a tensor", "undeclared constant"):
        assert report[case] == {"replays": False, "differences": []}


def test_launches_run_on_their_operands_device(child_report: dict) -> None:
    """Triton launches on the current device, not the operands': with device 0 current and the operands on device
    1, both launch paths make device 1 current for the launch (a kernel reading another GPU's memory faults, or
    with peer access reads it slowly) and device 0 again after it."""
    assert child_report["other device"] == [[[1], 0]] * 3


def test_a_replaced_autotuner_cache_empties_the_table(child_report: dict) -> None:
    """Forcing a config as the blur test does (a new ``configs`` and ``cache`` on the autotuner) reaches the
    launch: its compiled kernel is the forced config's, not the recorded one."""
    assert child_report["forced config"] == {"launches": 1, "block_pixels": 256}


@pytest.mark.parametrize(("blur", "filter_size", "channels_last"), [(4, 3, None), (1, 5, False), (1, 5, True)])
def test_direct_launches_compute_what_tritons_path_does_on_the_gpu(device, monkeypatch, blur: int, filter_size: int,
                                                                   channels_last: bool | None) -> None:
    """On a GPU: an inference through triton's path and two with direct launches (the second launching every
    kernel directly) give the same bits."""
    if device.type != "cuda":
        pytest.skip("needs CUDA: under the interpreter every launch takes triton's path")
    import torch
    from convcrf_triton.kernels import _launch, message_passing

    from convcrf_triton import ConvCRF

    g = torch.Generator().manual_seed(blur * 100 + filter_size)
    unary = torch.randn(2, 21, 67, 130, generator=g).to(device)
    image = (torch.rand(2, 3, 67, 130, generator=g) * 255).to(device)
    crf = ConvCRF(21, filter_size=filter_size, blur=blur, num_iter=3, backend="triton").to(device)
    monkeypatch.setattr(message_passing, "STEP_CHANNELS_LAST", channels_last)
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", False)
    with torch.no_grad():
        want = crf(unary, image)
        monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
        runs = [crf(unary, image) for _ in range(2)]
    for got in runs:
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# the child
# ---------------------------------------------------------------------------------------------------------


HOOKS = slice(6, 9)  # a launch's metadata and its enter and exit hooks, in the stub's record


def _hook(metadata: object) -> None:
    """A launch hook (the stub launches call none)."""


def _describe(value: object) -> object:
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride()), value.data_ptr() % 16]
    if type(value).__name__ == "HookChain":  # (triton's knobs: the same objects on both paths)
        return "hooks" if value.calls else "no hooks"
    if type(value).__name__ == "LazyDict":
        return "metadata"  # (a new object per launch)
    return [type(value).__name__, value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)]


def _describe_launch(launch: tuple) -> list:
    """The launch's arguments described; with no hook installed (an empty chain or None: the launcher calls
    nothing) the metadata, which only hooks read, and the hooks as one "no hooks"."""
    described = [_describe(x) for x in launch]
    if all(d in ("no hooks", ["NoneType", None]) for d in described[HOOKS][1:]):
        described[HOOKS] = ["no hooks"] * 3
    return described


def _differences(want: list[tuple], got: list[tuple]) -> list[str]:
    if len(want) != len(got):
        return [f"{len(want)} launches through triton, {len(got)} direct"]
    out = []
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        da, db = _describe_launch(a), _describe_launch(b)
        if da != db:
            where = [j for j in range(max(len(da), len(db))) if j >= min(len(da), len(db)) or da[j] != db[j]]
            out.append(f"launch {i} ({a[4]}): arguments {where[:5]} differ: {[da[j] for j in where[:3] if j < len(da)]}"
                       f" vs {[db[j] for j in where[:3] if j < len(db)]}")
    return out


def _cases():
    import torch
    from convcrf_triton.kernels import message_passing

    from convcrf_triton import ConvCRF, kernels

    g = torch.Generator().manual_seed(0)
    unary = torch.randn(1, 5, 24, 64, generator=g)
    image = torch.rand(1, 3, 24, 64, generator=g) * 255
    Q = torch.rand(1, 5, 24, 64, generator=g)
    feats = torch.randn(1, 5, 24, 64, generator=g)
    compats = torch.tensor([3.0, 10.0])
    K = kernels.gaussian_weights(feats, [2, 3], compats, 5, False)
    lse = torch.logsumexp(unary, 1, keepdim=True)
    factors, message = torch.ones(2, 5), torch.randn(1, 5, 6, 16, generator=g)
    # 4 bytes past a 16-byte boundary: another specialisation of the kernels (the message pass's ALIGNED
    # constexpr tells it too, the blur step's 16-byte loads only triton's)
    misaligned_q = torch.empty(Q.numel() + 1)[1:].view_as(Q).copy_(Q)
    misaligned_u = torch.empty(unary.numel() + 1)[1:].view_as(unary).copy_(unary)

    def misaligned():
        for u in (unary, misaligned_u):
            kernels.blur_step(u, lse, factors, message, 4, pool=False, softmax=True)
        for q in (Q, misaligned_q):
            kernels.message_pass(K, q)

    def inference(blur, k, channels_last=None, convcomp=False, storage="float32"):
        crf = ConvCRF(5, filter_size=k, blur=blur, num_iter=4, backend="triton", convcomp=convcomp,
                      storage=storage)  # (iterations 2-3: Repeat's)

        def run():
            message_passing.STEP_CHANNELS_LAST = channels_last
            with torch.no_grad():
                crf(unary, image)
            message_passing.STEP_CHANNELS_LAST = None
        return run

    def hooked(run):  # (a launch hook installed, as a profiler such as proton installs one)
        from triton import knobs

        def with_hook():  # (a chain of its own, which the stub's records keep once it is put back)
            empty = knobs.runtime.launch_enter_hook
            knobs.runtime.launch_enter_hook = type(empty)()
            knobs.runtime.launch_enter_hook.add(_hook)
            try:
                run()
            finally:
                knobs.runtime.launch_enter_hook = empty
        return with_hook

    def training():
        crf = ConvCRF(5, filter_size=3, blur=1, num_iter=1, backend="triton", trainable=True)
        crf(unary, image).sum().backward()

    def one_size_class():  # (two grids of one size class: the second launched with the first's tuned config)
        for h in (20, 23):
            q, k = torch.rand(1, 5, h, 64, generator=g), torch.rand(1, 25, h, 64, generator=g)
            kernels.message_pass(k, q)
            u = torch.randn(1, 5, h, 64, generator=g)
            kernels.blur_step(u, torch.logsumexp(u, 1, keepdim=True), factors,
                              torch.randn(1, 5, -(-h // 4), 16, generator=g), 4, pool=True, softmax=True)

    return {
        "inference blur 4": inference(4, 3),
        "inference blur 4 compat": inference(4, 3, convcomp=True),
        "inference blur 4 bfloat16": inference(4, 3, storage="bfloat16"),
        "inference blur 1": inference(1, 5),
        "inference blur 4 with a launch hook": hooked(inference(4, 3)),
        "inference blur 1 channels-last": inference(1, 5, True),
        "misaligned operands": misaligned,
        "fused message pass": lambda: kernels.fused_message_pass(feats, [2, 3], compats, Q, 5, False),
        "training": training,
        "band message pass": lambda: kernels.band_message_pass(K, Q),
        "band step": lambda: kernels.band_mean_field_step(Q, Q, torch.ones(5), None, K, True),
        "one size class": one_size_class,
    }


def _other_device(stub) -> list:
    """``kernels.message_pass`` on operands that say they are on device 1 (a patched ``_launch._device_of``) while
    device 0 is current: through triton's path, then twice directly (the second from ``DirectLaunch``'s table);
    each time the devices current at the launches and the one current after the call."""
    import torch
    from convcrf_triton.kernels import _launch

    from convcrf_triton import kernels

    g = torch.Generator().manual_seed(1)
    Q, K = torch.rand(1, 3, 8, 16, generator=g), torch.rand(1, 9, 8, 16, generator=g)
    real, runs = _launch._device_of, []
    _launch._device_of = lambda t: 1
    try:
        for direct in (False, True, True):
            _launch.DIRECT_LAUNCH = direct
            stub.launches.clear()
            stub.devices.clear()
            kernels.message_pass(K, Q)
            runs.append([list(stub.devices), stub.device])
    finally:
        _launch._device_of = real
        _launch.DIRECT_LAUNCH = True
    return runs


def _forced_config(stub) -> dict:
    """The blur step launched once, then with its autotuner's configs and cache replaced by one other config."""
    import torch
    import triton
    from convcrf_triton.kernels import blur_iteration

    from convcrf_triton import kernels

    u = torch.randn(1, 5, 24, 64)
    lse = torch.logsumexp(u, 1, keepdim=True)
    factors, message = torch.ones(2, 5), torch.randn(1, 5, 6, 16)
    kernels.blur_step(u, lse, factors, message, 4, pool=False, softmax=True)
    tuner = blur_iteration._blur_step_tuned
    tuner.configs, tuner.cache = [triton.Config({"BLOCK_PIXELS": 256, "BLOCK_C": 1}, num_warps=1)] * 2, {}
    stub.launches.clear()
    kernels.blur_step(u, lse, factors, message, 4, pool=False, softmax=True)
    at = 9 + blur_iteration._blur_step_launch.names.index("BLOCK_PIXELS")  # (9: the launcher's own arguments)
    return {"launches": len(stub.launches), "block_pixels": stub.launches[-1][at]}


def _step_timings(stub, h: int) -> int:
    """The stub's timings taken by a mean-field step (k = 3, 5 classes) on an ``h`` × 64 grid."""
    import torch

    from convcrf_triton import kernels

    g = torch.Generator().manual_seed(h)
    Q, A = torch.rand(1, 5, h, 64, generator=g), torch.randn(1, 5, h, 64, generator=g)
    K = torch.rand(1, 9, h, 64, generator=g)
    before = stub.benchmarks
    kernels.mean_field_step(Q, A, torch.ones(1), None, K, None, None, (), 3, False, True)
    return stub.benchmarks - before


def _tunings_by_size_class(stub) -> list[int]:
    """The stub's timings taken by the step's first launch on each of three grids, with every config tuned."""
    os.environ["CONVCRF_AUTOTUNE"] = "1"
    counts = [_step_timings(stub, h) for h in (20, 23, 40)]
    os.environ["CONVCRF_AUTOTUNE"] = "0"
    return counts


def tuning_child(heights: list[int], memory_clock: int | None) -> None:
    """Each step's timings, its launch's tap unroll factor and the threads that compiled for it ("main" or "pool"),
    the stub timing each config faster than the last."""
    sys.path.insert(0, str(HERE))
    import stub_driver

    stub = stub_driver.install()
    import triton.compiler
    from convcrf_triton.kernels import message_passing

    stub.timings, stub.launch_when_timing = (float(t) for t in range(10**6, 0, -1)), True
    if memory_clock is not None:
        properties = stub.utils.get_device_properties
        stub.utils.get_device_properties = lambda device: {**properties(device), "mem_clock_rate": memory_clock}
    compile_kernel, compiled = triton.compiler.compile, []

    def compile_in(*args, **kwargs):
        compiled.append("main" if threading.current_thread() is threading.main_thread() else "pool")
        return compile_kernel(*args, **kwargs)

    # (a JITFunction compiles through its attribute, which triton 3.9 takes from triton.compiler at the first launch,
    # 3.6 when the kernel is defined)
    triton.compiler.compile = compile_in
    jit = message_passing._mean_field_step_launch.jit
    if "compile" in vars(jit):
        jit.compile = compile_in
    unroll_at = 9 + message_passing._mean_field_step_launch.names.index("UNROLL")  # (9: the launcher's own)
    report = []
    for h in heights:
        compiled.clear()
        timings = _step_timings(stub, h)
        report.append({"timings": timings, "unroll": stub.launches[-1][unroll_at], "compiled": list(compiled)})
    print(json.dumps(report))


def _repeats(stub) -> dict:
    """``kernels.Repeat`` around a message pass: what its calls launch against what the pass alone launches
    (a list of differences, as for the cases), whether it replays, and when it must not."""
    import torch

    from convcrf_triton import kernels

    g = torch.Generator().manual_seed(1)
    K = torch.rand(1, 25, 24, 64, generator=g)
    Qs = [torch.rand(1, 5, 24, 64, generator=g) for _ in range(3)]
    # 4 bytes past a 16-byte boundary (the kernel's ALIGNED differs), and a batch of two (strides as the first's)
    odd = [torch.empty(Qs[0].numel() + 1)[1:].view_as(Qs[0]).copy_(Qs[0]), torch.rand(2, 5, 24, 64, generator=g)]

    def launches(fn, inputs):
        stub.launches.clear()
        outs = [fn(q) for q in inputs]
        return list(stub.launches), outs

    want, _ = launches(lambda q: kernels.message_pass(K, q), Qs + odd)
    repeat = kernels.Repeat(lambda q: kernels.message_pass(K, q), constants=(K,))
    got, outs = launches(repeat, Qs + odd)
    report = {"differences": _differences(want, got), "replays": repeat.plan is not None,
              "shapes": [list(o.shape) for o in outs] == [list(q.shape) for q in Qs + odd]}
    for name, fn, constants in [("made a tensor", lambda q: kernels.message_pass(K, q.clone()), (K,)),
                                ("undeclared constant", lambda q: kernels.message_pass(K, q), ())]:
        other = kernels.Repeat(fn, constants)
        got, _ = launches(other, Qs)
        report[name] = {"replays": other.plan is not None, "differences": _differences(want[:3], got)}
    return report


def child() -> None:
    sys.path.insert(0, str(HERE))
    import stub_driver
    from triton.runtime.jit import JITFunction

    stub = stub_driver.install()
    from convcrf_triton.kernels import _launch

    through_triton = []
    real_run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        through_triton.append(self)
        return real_run(self, *args, **kwargs)

    JITFunction.run = counted_run
    from convcrf_triton import kernels

    calls = {}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    for name in REPEATED:
        setattr(kernels, name, counting(name, getattr(kernels, name)))
    report = {}
    for name, run in _cases().items():
        _launch.DIRECT_LAUNCH = False
        stub.launches.clear()
        run()
        want = list(stub.launches)
        _launch.DIRECT_LAUNCH = True
        run()
        stub.launches.clear()
        through_triton.clear()
        calls.clear()
        run()
        report[name] = {"launches": len(want), "differences": _differences(want, stub.launches),
                        "through_triton_on_repeat": len(through_triton), "calls": dict(calls),
                        "hooks": sorted({str(_describe_launch(launch)[HOOKS]) for launch in stub.launches})}
    report["repeat"] = _repeats(stub)
    report["forced config"] = _forced_config(stub)
    report["other device"] = _other_device(stub)
    report["tunings by size class"] = _tunings_by_size_class(stub)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tuning"]:
        tuning_child([int(h) for h in sys.argv[2].split(",")], int(sys.argv[4]) if sys.argv[3:4] == ["--memory-clock"]
                     else None)
    else:
        child()
