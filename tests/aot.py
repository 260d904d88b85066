"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.

Tests run under ``TRITON_INTERPRET=1``, where ``@triton.jit`` yields interpreter objects that cannot be
compiled (their ``@triton.jit`` callees are interpreter objects too). So the compile runs in a child
process with ``TRITON_INTERPRET`` removed, which re-imports the kernel by module and name: the kernel must
be a module-level attribute (one child per test process, serving its compiles). The child writes the cubin
and the TritonGPU IR (its layouts: which lanes and registers hold which elements); this process inspects the
cubin with the ``cuobjdump`` shipped in the triton wheel. Compiled cubins are cached in ``CONVCRF_AOT_CACHE``
(default ``<repo>/.aot_cache``), keyed by the source of the kernel's package, the arguments and the triton
version.
"""

import base64
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import triton
from convcrf_triton.kernels._launch import COMPILE_OPTIONS

CACHE_DIR = Path(os.environ.get("CONVCRF_AOT_CACHE", Path(__file__).resolve().parents[1] / ".aot_cache"))
_USAGE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")


@dataclass(frozen=True)
class ResourceUsage:
    """Per-thread registers and stack bytes (from cuobjdump), shared memory bytes per block, and arch.

    ``shared`` is the dynamic shared memory Triton launches the kernel with (cuobjdump's static SHARED is
    always 0 for Triton kernels).
    """

    reg: int
    stack: int
    shared: int
    arch: int


def _python_fn(fn: object) -> object:
    """Strip autotune/heuristics/jit/interpreter wrappers down to the plain Python function."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _source_digest(module_name: str) -> str:
    """Hash the kernel's module and every loaded module of its top-level package (its helpers)."""
    top = module_name.split(".")[0]
    ours = [m for n, m in list(sys.modules.items()) if n in (module_name, top) or n.startswith(top + ".")]
    files = {m.__file__ for m in ours if getattr(m, "__file__", None)}
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.encode() + Path(file).read_bytes())
    return digest.hexdigest()


def _cuobjdump(args: list[str], cubin: bytes) -> str:
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except RuntimeError as exc:
        raise RuntimeError(f"cuobjdump not found (set TRITON_CUOBJDUMP_PATH): {exc}") from exc
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True, check=True).stdout


def _compile(
    fn: object,
    signature: dict[str, str],
    constexprs: dict[str, object],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] = (),
) -> dict:
    """The cache entry: ``cubin`` (base64), ``shared`` (bytes) and ``ttgir``, compiled in a child process
    unless cached."""
    pyfn = _python_fn(fn)
    module, name = pyfn.__module__, pyfn.__qualname__
    module_ref = sys.modules[module].__file__ if module == "__main__" else module
    request = {
        "module": module_ref,
        "name": name,
        "signature": signature,
        "constexprs": constexprs,
        "arch": arch,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "divisible": list(divisible),
    }
    key_text = json.dumps([request, _source_digest(module), triton.__version__, "ttgir"], sort_keys=True)
    path = CACHE_DIR / f"{name}-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.json"
    if not path.exists():
        reply = _Compiler.instance().compile(request)
        if "error" in reply:
            raise RuntimeError(f"AOT compile of {module}.{name} for sm_{arch} failed:\n{reply['error'][-4000:]}")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(reply))
        tmp.replace(path)
    return json.loads(path.read_text())


class _Compiler:
    """The child process that compiles, one per test process, kept for its requests: importing torch, triton and
    the kernels takes ~3 s a process, about as long as a compile (a child per compile spent most of the cold
    suite's AOT time importing). Requests and replies are JSON lines; a reply starts with :data:`_REPLY` (other
    output of the compile is not the reply)."""

    _current: "_Compiler | None" = None

    def __init__(self) -> None:
        # triton.language itself must be imported with the interpreter off.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    @classmethod
    def instance(cls) -> "_Compiler":
        if cls._current is None or cls._current.proc.poll() is not None:
            cls._current = cls()
        return cls._current

    def compile(self, request: dict) -> dict:
        """The cache entry for ``request``, or ``{"error": traceback}``."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        return {"error": f"the compiler process ended (exit status {self.proc.wait()})"}


_REPLY = "AOT-REPLY "


def compile_for(
    fn: object,
    signature: dict[str, str],
    constexprs: dict[str, object],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] = (),
) -> ResourceUsage:
    """Compile ``fn`` for ``sm_<arch>`` and return its resource usage.

    ``signature`` maps each runtime argument to a Triton type ("*fp32", "i32", ...); ``constexprs`` maps
    each ``tl.constexpr`` argument to its value (JSON-serialisable: int, float, bool, str); ``divisible``
    names the arguments known to be multiples of 16 (as a launch specialises aligned pointers and sizes).
    """
    entry = _compile(fn, signature, constexprs, arch, num_warps, num_stages, divisible)
    match = _USAGE_RE.search(_cuobjdump(["--dump-resource-usage"], base64.b64decode(entry["cubin"])))
    if match is None:
        raise RuntimeError("unexpected cuobjdump --dump-resource-usage output")
    return ResourceUsage(reg=int(match[1]), stack=int(match[2]), shared=entry["shared"], arch=arch)


def sass(
    fn: object,
    signature: dict[str, str],
    constexprs: dict[str, object],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] = (),
) -> str:
    """Compile ``fn`` like :func:`compile_for` and return the SASS listing (``cuobjdump -sass``)."""
    entry = _compile(fn, signature, constexprs, arch, num_warps, num_stages, divisible)
    return _cuobjdump(["-sass"], base64.b64decode(entry["cubin"]))


def ttgir(fn: object, signature: dict[str, str], constexprs: dict[str, object], arch: int, **launch) -> str:
    """Compile ``fn`` like :func:`compile_for` (``launch``: its ``num_warps``, ``num_stages``, ``divisible``) and
    return its TritonGPU IR, after the layout passes."""
    return _compile(fn, signature, constexprs, arch, **launch)["ttgir"]


_LAYOUT_DEF = re.compile(r"^(#[\w.]+) = (.*)$", re.M)
_MEMORY_OP = re.compile(r"\b(tt\.load|tt\.store) %[^:]*: tensor<([0-9x]+)x!tt\.ptr<\w+>, (#[\w.]+)>")


def memory_layouts(ir: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor ``tt.load`` and ``tt.store`` of a TritonGPU IR listing: (op, shape, layout definition)."""
    defs = dict(_LAYOUT_DEF.findall(ir))
    return [(op, tuple(int(n) for n in shape.split("x")), defs.get(name, name))
            for op, shape, name in _MEMORY_OP.findall(ir)]


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
_BACK_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.128 R4, desc[...]`` → ``LDG``."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def loops(listing: str) -> list[list[str]]:
    """The instructions of every loop of a ``cuobjdump -sass`` listing (a branch back to a lower address and
    everything from its target to it), innermost and outer loops alike, in address order."""
    code = [(int(m[1], 16), m[2]) for m in _SASS_LINE.finditer(listing)]
    found = []
    for addr, text in code:
        back = _BACK_BRANCH.search(text)
        if back and int(back[1], 16) < addr:
            found.append([t for a, t in code if int(back[1], 16) <= a <= addr])
    return found


def hot_loop(listing: str) -> list[str]:
    """The loop of a ``cuobjdump -sass`` listing with the fewest instructions per ``FFMA``: the hot loop."""
    bodies = [body for body in loops(listing) if any(opcode(t) == "FFMA" for t in body)]
    if not bodies:
        raise AssertionError("no loop with an FFMA in the listing")
    return min(bodies, key=lambda body: len(body) / sum(opcode(t) == "FFMA" for t in body))


def instructions_per_ffma(listing: str) -> float:
    """The hot loop's instructions per ``FFMA``: its overhead (address and mask arithmetic, loads, layout
    conversions) per multiply-add."""
    body = hot_loop(listing)
    return len(body) / sum(opcode(t) == "FFMA" for t in body)


def _serve() -> None:
    """Child-process side: for each request line, the cache entry (or the error's traceback) as a reply line."""
    for line in sys.stdin:
        try:
            reply = _child(json.loads(line))
        except Exception:  # noqa: BLE001 (the request's failure, reported to the test that made it)
            reply = {"error": traceback.format_exc()}
        print(_REPLY + json.dumps(reply), flush=True)


def _child(request: dict) -> dict:
    """Import the kernel, compile it: the cache entry."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    triton.knobs.runtime.interpret = False  # even if the kernel module sets TRITON_INTERPRET
    if request["module"].endswith(".py"):  # kernel defined in a script run as __main__
        spec = importlib.util.spec_from_file_location("_aot_kernel_module", request["module"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(request["module"])
    fn = getattr(module, request["name"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    # Constexprs left out take the kernel's defaults, as in a launch.
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items() if p.default is not p.empty}
    constexprs = {**{n: v for n, v in defaults.items() if n not in request["signature"]}, **request["constexprs"]}
    # Like JITFunction.run (triton 3.6 - 3.9): every argument in order, constexprs typed "constexpr".
    signature = {a: "constexpr" if a in constexprs else request["signature"][a] for a in fn.arg_names}
    # The launches' options (fused multiply-adds), whatever the triton version's default.
    options = {"num_warps": request["num_warps"], "num_stages": request["num_stages"], **COMPILE_OPTIONS}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in request["divisible"]}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", request["arch"], 32), options=options)
    cubin = base64.b64encode(compiled.asm["cubin"]).decode()
    return {"cubin": cubin, "shared": compiled.metadata.shared, "ttgir": compiled.asm["ttgir"]}


if __name__ == "__main__":
    _serve()
