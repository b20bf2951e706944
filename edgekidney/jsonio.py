"""Reports as JSON a machine can compare: one writer for the CLI and the benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` ('-' for stdout), creating parent folders."""
    text = json.dumps(obj, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
