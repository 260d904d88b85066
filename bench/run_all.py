"""The whole benchmark sweep of one device into ``bench/results/<device-slug>/`` (CSV, meta.json, PNGs,
summary.md; autotune.csv on CUDA). Thin wrapper over ``convcrf-triton bench`` that also works from a bare
checkout (no ``pip install``): it maps ``kernels/`` to ``convcrf_triton.kernels`` itself.

    python bench/run_all.py --device cuda                # full GPU grid, cut at --time-budget (450 s)
    python bench/run_all.py --device cpu --threads 1     # this repo's committed CPU results (~15 min)
    python bench/run_all.py --quick                      # seconds; CI-sized

Every other flag is passed on to ``convcrf-triton bench`` (see ``--help``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bootstrap() -> None:
    """Import ``convcrf_triton`` (and ``convcrf_triton.kernels`` from ``kernels/``) from this checkout
    when the package is not installed."""
    try:
        import convcrf_triton.kernels  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "convcrf_triton" or m.startswith("convcrf_triton.")]:
        del sys.modules[name]
    import convcrf_triton

    spec = importlib.util.spec_from_file_location(
        "convcrf_triton.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["convcrf_triton.kernels"] = module
    spec.loader.exec_module(module)
    convcrf_triton.kernels = module


def main(argv: list[str] | None = None) -> int:
    bootstrap()
    import torch

    from convcrf_triton import benchmark

    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = benchmark.build_parser().parse_known_args(argv)
    if args.out is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available (use --device cpu)", file=sys.stderr)
            return 2
        threads = args.threads or (1 if args.quick and device == "cpu" else torch.get_num_threads())
        slug = benchmark.device_description(device, threads)[1]
        argv += ["--out", str(ROOT / "bench" / "results" / (slug + ("-quick" if args.quick else "")))]
    return benchmark.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
