"""Shared fixtures: real CT slices (where $EDGEKIDNEY_DATA points; README, "Real data"), a tiny trained run and its ONNX export.

Nothing is downloaded: the data are real slices already on disk (or synthetic DICOM made here), the
weights are random or made by the tests themselves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGEKIDNEY_DATA", REPO.parent / "shared" / "data" / "ct-kidney-axial"))


def real_data_or_skip() -> Path:
    if not (SHARED_DATA / "Stone").is_dir():
        pytest.skip(f"real CT slices not found at {SHARED_DATA} (set EDGEKIDNEY_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_data() -> Path:
    return real_data_or_skip()


def copy_slices(src: Path, dst: Path, classes=("Normal", "Stone"), numbers=()) -> Path:
    """Copy real slices by their file number (``Stone- (17).jpg`` is number 17)."""
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            f = src / c / f"{c}- ({n}).jpg"
            if f.exists():
                shutil.copy(f, dst / c / f.name)
    return dst


# Mutation runs (docs/mutation.md) start a pytest session per mutant: with EDGEKIDNEY_TINY_CACHE=DIR the
# tiny run below is trained once into DIR and reused by later sessions (never set in CI).
TINY_CACHE = Path(os.environ["EDGEKIDNEY_TINY_CACHE"]) if os.environ.get("EDGEKIDNEY_TINY_CACHE") else None


def _cached(name: str, tmp_path_factory, make) -> Path:
    """``make(folder)`` into a fresh temporary folder, or once into the cache folder."""
    if TINY_CACHE is None:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder, done = TINY_CACHE / name, TINY_CACHE / f"{name}.done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        make(folder)
        done.touch()
    return folder


@pytest.fixture(scope="session")
def small_real(tmp_path_factory, real_data) -> Path:
    """24 real slices per class: numbers 1-16 (train blocks) and 381-388 (validation block)."""
    numbers = list(range(1, 17)) + list(range(381, 389))
    return _cached("small_real", tmp_path_factory, lambda d: copy_slices(real_data, d, numbers=numbers))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_real) -> Path:
    """A real (tiny) training run on real slices: 64 px, 2 epochs."""
    from edgekidney.data.dataset import SplitConfig
    from edgekidney.model.train import TrainConfig, train

    def make(out):
        train(TrainConfig(data=small_real, out=out, weights="none", image_size=64, epochs=2, batch_size=8,
                          split=SplitConfig(val_fraction=0.34, block_size=8)), log=lambda s: None)

    return _cached("run", tmp_path_factory, make)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_run) -> Path:
    from edgekidney.model.export import export_onnx

    folder = _cached("onnx", tmp_path_factory, lambda d: export_onnx(tiny_run, d / "model.onnx", parity_images=4))
    if TINY_CACHE is None:
        return folder / "model.onnx"
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"  # a copy per session: tests may edit its sidecar
    shutil.copyfile(folder / "model.onnx", out)
    shutil.copyfile(folder / "model.json", out.with_suffix(".json"))
    return out
