"""Where a command may write: checked before any work, so that a bad path costs a one-line error and
not a traceback after the whole study, and no result ever overwrites one of the inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from edgekidney.errors import InputError


def _read_as_input(target: Path, given: list[Path]) -> Path | None:
    """The input ``target`` is, or lies in and would be read from (a slice, a DICOM or NIfTI file in an
    input folder); None for anything else there (a report of an earlier run, written over freely)."""
    from edgekidney.data.decode import is_candidate_file
    from edgekidney.data.series import is_nifti

    for src in given:
        if target == src:
            return src
        if src.is_dir() and src in target.parents and target.is_file() and (is_candidate_file(target)
                                                                             or is_nifti(target)):
            return src
    return None


def check_outputs(inputs: Iterable[Path], files: dict[str, Path | None] | None = None,
                  folders: dict[str, Path | None] | None = None, model: Path | None = None) -> None:
    """``files``: option -> a file to write ('-' is stdout); ``folders``: option -> a folder to write
    into. Raises InputError when a file is a folder or a folder a file, when a file would write over an
    input (a file given, a slice or volume in a folder given, the model or its sidecar), or when one
    lies under something that is not a folder."""
    given = [Path(p).resolve() for p in inputs]
    models = [] if model is None else [Path(model).resolve(), Path(model).resolve().with_suffix(".json")]
    for flag, path in [*(files or {}).items(), *(folders or {}).items()]:
        if path is None or str(path) == "-":
            continue
        target = Path(path).resolve()
        as_folder = flag in (folders or {})
        if target.exists() and target.is_dir() != as_folder:
            raise InputError(f"{flag} {path}: is {'a file' if as_folder else 'a folder'}; "
                             f"give {'a folder' if as_folder else 'a file name'}")
        if not as_folder:
            if target in models:
                raise InputError(f"{flag} {path}: would write over the model")
            src = _read_as_input(target, given)
            if src is not None:
                raise InputError(f"{flag} {path}: would write over an input ({'the file' if target == src else 'in'} "
                                 f"{src})")
        for parent in target.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"{flag} {path}: {parent} is not a folder")
                break
