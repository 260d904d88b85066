"""``python -m convcrf_triton``: the ``convcrf-triton`` command line."""

from .cli import main

raise SystemExit(main())
