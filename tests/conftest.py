"""Test configuration: run every Triton kernel under Triton's CPU interpreter; find the shared data.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at the top of the
first module pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

VOC7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc7"


@pytest.fixture(scope="session")
def voc7() -> Path:
    """``../shared/data/voc7`` (images/ and labels/): skipped when absent, a failure under CI
    (``CONVCRF_REQUIRE_DATA=1``)."""
    if not (VOC7 / "images").is_dir():
        if os.environ.get("CONVCRF_REQUIRE_DATA") == "1":
            pytest.fail(f"CONVCRF_REQUIRE_DATA=1 but the data set is missing: {VOC7}")
        pytest.skip(f"data set not found at {VOC7} (it lives in the project's shared/ folder)")
    return VOC7
