"""Test configuration: run every Triton kernel under Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at the top of the
first module pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
