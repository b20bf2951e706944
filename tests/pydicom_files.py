"""pydicom's own test files, only those that ship inside its wheel (3.0.0 and later), read from the
package folder: never ``get_testdata_file``, which looks in external sources and may try to download."""

from __future__ import annotations

from pathlib import Path

import pytest

# every one of these is in pydicom/data/test_files of the 3.0.0, 3.0.1 and 3.0.2 wheels
SHIPPED = {"CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "MR_small_jpeg_ls_lossless.dcm", "rtplan.dcm",
           "SC_rgb_rle.dcm"}


def shipped_file(name: str) -> str:
    """The path of a test file in pydicom's wheel; skips the test if this pydicom lacks it."""
    import pydicom.data

    assert name in SHIPPED, f"{name}: not known to ship with pydicom; build the file in the test instead"
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} not in this pydicom")
    return str(path)
