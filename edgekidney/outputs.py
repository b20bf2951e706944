"""Where a command may write: checked before any work, so that a bad path costs a one-line error and
not a traceback after the whole study, and no result ever overwrites one of the inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from edgekidney.errors import InputError


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def check_outputs(inputs: Iterable[Path], files: dict[str, Path | None] | None = None,
                  folders: dict[str, Path | None] | None = None) -> None:
    """``files``: option -> a file to write ('-' is stdout); ``folders``: option -> a folder to write
    into. Raises InputError when one is a folder (a file), a file (a folder), an input file or a file
    in an input folder (it would be written over), or lies under something that is not a folder."""
    given, files, folders = [_resolved(p) for p in inputs], files or {}, folders or {}
    for flag, path in [*files.items(), *folders.items()]:
        if path is None or str(path) == "-":
            continue
        target = _resolved(path)
        as_folder = flag in folders
        if target.exists() and target.is_dir() != as_folder:
            raise InputError(f"{flag} {path}: is {'a file' if as_folder else 'a folder'}; "
                             f"give {'a folder' if as_folder else 'a file name'}")
        for src in given:
            if target == src or (target.is_file() and src.is_dir() and src in target.parents):
                raise InputError(f"{flag} {path}: would write over an input ({'the file' if target == src else 'in'} "
                                 f"{src})")
        for parent in target.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"{flag} {path}: {parent} is not a folder")
                break
