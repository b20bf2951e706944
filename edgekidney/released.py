"""The models the project ships, found by name or by folder (numpy-free, torch-free).

A released model is a folder (``models/kidney-stone-ct-v3/`` in the repository) holding its ONNX
forms with their sidecars, ``MODEL_CARD.md`` and ``SHA256SUMS``: an INT8 form per target when it holds
the accuracy gates (``model-int8cpu.onnx`` for ONNX Runtime, ``model-int8trt.onnx`` for
``build-engine``), else the FP16 form ``model-fp16.onnx`` for both. Wherever a command takes a model it
also takes:

- the folder itself (its CPU form, or for ``build-engine`` its GPU form);
- the release's name, looked up in ``$EDGEKIDNEY_MODELS``, the repository's ``models/`` (a source
  checkout or an editable install) and ``<prefix>/share/edgekidney/models`` (where the wheel puts it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgekidney.errors import InputError

RELEASED = "kidney-stone-ct-v3"
FORMS = {"cpu": ("model-int8cpu.onnx", "model-fp16.onnx"), "gpu": ("model-int8trt.onnx", "model-fp16.onnx")}


def form_file(folder: Path, form: str = "cpu") -> Path | None:
    """The file a release folder offers for ``form`` (cpu | gpu), or None."""
    return next((folder / name for name in FORMS[form] if (folder / name).is_file()), None)


def model_name(path: Path) -> str:
    """How reports name a model file: ``kidney-stone-ct-v3/model-int8cpu.onnx`` for a release's form (its
    folder holds the card), else the file's own name."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if (path.parent / "MODEL_CARD.md").is_file() else path.name


def search_path() -> list[Path]:
    """Folders searched for a release by name, in order."""
    folders = [Path(p) for p in os.environ.get("EDGEKIDNEY_MODELS", "").split(os.pathsep) if p]
    folders.append(Path(__file__).resolve().parents[1] / "models")
    folders.append(Path(sys.prefix) / "share" / "edgekidney" / "models")
    return folders


def find_release(name: str) -> Path | None:
    for folder in search_path():
        candidate = folder / name
        if form_file(candidate) is not None:
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
    chosen = form_file(folder, "gpu" if form == "gpu" else "cpu")
    if chosen is None:
        raise InputError(f"{folder}: holds no {' or '.join(FORMS[form])}; pass the model file itself")
    return chosen
