"""A run carried as FP16 pieces and rebuilt elsewhere (edgekidney.model.pieces): same answers, small pieces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgekidney.errors import InputError  # noqa: E402
from edgekidney.model.pieces import frozen_stages, join_run, pack_run  # noqa: E402


def _outputs(run, x):
    from edgekidney.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run, heads=True)
    with torch.no_grad():
        logits, distance, cam = model(torch.from_numpy(x))
    return torch.softmax(logits, 1).numpy(), distance.numpy(), cam.numpy()


def _val_slices(run, n=8):
    from edgekidney.data.arrays import load_arrays_with_geometry
    from edgekidney.data.dataset import read_manifest
    from edgekidney.model.checkpoint import load_checkpoint_card

    val = [s for s in read_manifest(run / "split.csv") if s.split == "val"][:n]
    return load_arrays_with_geometry(val, load_checkpoint_card(run).preprocessing)[0]


def _moved_data(small_real, tmp_path):
    """The run's slices in another place under the same folder name, as on the machine it is joined on."""
    moved = tmp_path / "here" / small_real.name
    shutil.copytree(small_real, moved)
    return moved


def test_a_run_packed_in_small_fp16_pieces_is_rebuilt_with_the_same_answers(tiny_run, small_real, tmp_path):
    pieces = tmp_path / "pieces"
    pack_run(tiny_run, pieces, max_mib=5, log=lambda s: None)  # a first pack, in more pieces than the second
    paths = pack_run(tiny_run, pieces, max_mib=8, log=lambda s: None)
    assert sorted(pieces.glob("weights-*.pt")) == sorted(paths)
    assert len(paths) >= 6  # ResNet50 in FP16 is about 47 MB
    assert all(p.stat().st_size <= 8 * 2**20 for p in paths)
    assert sum(p.stat().st_size for p in paths) < 0.55 * (tiny_run / "model.pt").stat().st_size
    moved = _moved_data(small_real, tmp_path)
    run = tmp_path / "joined"
    join_run(pieces, run, moved, log=lambda s: None)
    assert str(moved) in (run / "split.csv").read_text() and str(small_real) + "/" not in (run / "split.csv").read_text()
    x = _val_slices(run)
    p0, d0, c0 = _outputs(tiny_run, x)
    p1, d1, c1 = _outputs(run, x)
    assert np.abs(p0 - p1).max() < 0.01
    assert np.allclose(d0, d1, rtol=0.03)  # the scope detector fitted again on the same split
    assert np.abs(c0 - c1).max() < 0.01


def test_frozen_stages_travel_only_as_their_statistics_and_come_from_the_start(tiny_run, small_real, tmp_path):
    run = tmp_path / "frozen-run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    config.update(weights=str(tiny_run / "model.pt"), freeze_epochs=3, epochs=3, tune_layers=["layer2", "layer3"])
    (run / "config.json").write_text(json.dumps(config))
    assert frozen_stages(config) == ("conv1", "bn1", "layer1", "layer4")
    full = sum(p.stat().st_size for p in pack_run(tiny_run, tmp_path / "all", log=lambda s: None))
    pieces = tmp_path / "pieces"
    part = sum(p.stat().st_size for p in pack_run(run, pieces, log=lambda s: None))
    assert part < 0.5 * full  # layer4 alone is 15 of ResNet50's 23.5 M weights
    moved = _moved_data(small_real, tmp_path)
    with pytest.raises(InputError, match="--start"):
        join_run(pieces, tmp_path / "no-start", moved, log=lambda s: None)
    joined = tmp_path / "joined"
    join_run(pieces, joined, moved, start=str(tiny_run / "model.pt"), log=lambda s: None)
    x = _val_slices(joined)
    assert np.abs(_outputs(tiny_run, x)[0] - _outputs(joined, x)[0]).max() < 0.01


def test_a_split_whose_slices_are_not_in_data_is_a_clear_error(tiny_run, tmp_path):
    pieces = tmp_path / "pieces"
    pack_run(tiny_run, pieces, log=lambda s: None)
    with pytest.raises(InputError, match="not inside a folder named"):
        join_run(pieces, tmp_path / "joined", tmp_path / "elsewhere", log=lambda s: None)
