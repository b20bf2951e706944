"""The models the project ships, found by name or by folder (numpy-free, torch-free).

A released model is a folder (``models/kidney-stone-ct-v1/`` in the repository) holding the on-device
CPU form ``model-int8cpu.onnx``, the GPU-ready form ``model-int8trt.onnx`` for ``build-engine``, their
sidecars, ``MODEL_CARD.md`` and ``SHA256SUMS``. Wherever a command takes a model it also takes:

- the folder itself (its CPU form is used, or ``--backend trt``'s GPU form where that applies);
- the release's name, looked up in ``$EDGEKIDNEY_MODELS``, the repository's ``models/`` (a source
  checkout or an editable install) and ``<prefix>/share/edgekidney/models`` (where the wheel puts it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgekidney.errors import InputError

RELEASED = "kidney-stone-ct-v1"
CPU_FILE = "model-int8cpu.onnx"
GPU_FILE = "model-int8trt.onnx"


def search_path() -> list[Path]:
    """Folders searched for a release by name, in order."""
    folders = [Path(p) for p in os.environ.get("EDGEKIDNEY_MODELS", "").split(os.pathsep) if p]
    folders.append(Path(__file__).resolve().parents[1] / "models")
    folders.append(Path(sys.prefix) / "share" / "edgekidney" / "models")
    return folders


def find_release(name: str) -> Path | None:
    for folder in search_path():
        candidate = folder / name
        if (candidate / CPU_FILE).is_file():
            return candidate
    return None


def resolve_model(model: str | Path, form: str = "cpu") -> Path:
    """A model argument -> the file to open: a file as given, a release folder's file, or a release by name."""
    path = Path(model)
    if path.is_file():
        return path
    folder = path if path.is_dir() else (find_release(str(model)) if len(path.parts) == 1 else None)
    if folder is None:
        if path.exists() or len(path.parts) != 1:
            raise InputError(f"{model}: no such model file")
        where = ", ".join(str(p) for p in search_path())
        raise InputError(f"{model}: no such model file, and no released model of that name (searched {where})")
    chosen = folder / (GPU_FILE if form == "gpu" else CPU_FILE)
    if not chosen.is_file():
        raise InputError(f"{folder}: holds no {chosen.name}; pass the model file itself")
    return chosen
