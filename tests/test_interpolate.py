"""A fine-tune mixed back with its start (edgekidney.model.interpolate): folding keeps the answers, and the
mix lies on the line between the two networks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgekidney.errors import InputError  # noqa: E402
from edgekidney.model.interpolate import folded_state, interpolate_run, mix  # noqa: E402


def _logits(run_or_model, x):
    from edgekidney.model.checkpoint import load_checkpoint

    model = load_checkpoint(run_or_model)[0] if not isinstance(run_or_model, torch.nn.Module) else run_or_model
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _val_slices(run, n=6):
    from edgekidney.data.arrays import load_arrays_with_geometry
    from edgekidney.data.dataset import read_manifest
    from edgekidney.model.checkpoint import load_checkpoint_card

    val = [s for s in read_manifest(run / "split.csv") if s.split == "val"][:n]
    return load_arrays_with_geometry(val, load_checkpoint_card(run).preprocessing)[0]


def _shifted(tiny_run, folder, seed):
    """The tiny run moved as a fine-tune moves it: every weight and every BatchNorm's statistics shifted."""
    run = folder / "run"
    shutil.copytree(tiny_run, run)
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k, v in ck["state_dict"].items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            ck["state_dict"][k] = v * (1.0 + 0.5 * torch.rand(v.shape, generator=g))
        else:
            ck["state_dict"][k] = v + 0.1 * v.std(unbiased=False).clamp_min(1e-3) * torch.randn(v.shape, generator=g)
    torch.save(ck, run / "model.pt")
    return run


@pytest.fixture(scope="module")
def fine_tune(tiny_run, tmp_path_factory):
    return _shifted(tiny_run, tmp_path_factory.mktemp("ft"), 0)


@pytest.fixture(scope="module")
def other_seed(tiny_run, tmp_path_factory):
    return _shifted(tiny_run, tmp_path_factory.mktemp("ft2"), 1)


def test_folding_the_batchnorms_keeps_every_answer(fine_tune):
    from edgekidney.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(fine_tune)
    bn = model.net.layer2[0].bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))  # a real BatchNorm to fold
    x = _val_slices(fine_tune)
    folded, _ = load_checkpoint(fine_tune)
    folded.load_state_dict(folded_state(model))
    assert torch.allclose(folded.net.layer2[0].bn1.running_mean, torch.zeros(bn.num_features))
    a, b = _logits(model, x), _logits(folded, x)
    assert np.abs(a - b).max() < 1e-3 * max(1.0, np.abs(a).max())


def test_the_mix_lies_between_the_start_and_the_fine_tune(tiny_run, tiny_onnx, fine_tune, tmp_path):
    from edgekidney.model.checkpoint import load_checkpoint
    from edgekidney.model.from_graph import state_from_graph

    x = _val_slices(fine_tune)
    ends = {}
    for alpha in (0.0, 1.0):
        out = interpolate_run(str(tiny_onnx), fine_tune, tmp_path / f"a{alpha}", alpha, log=lambda s: None)
        ends[alpha] = _logits(out.parent, x)
    assert np.abs(ends[0.0] - _logits(tiny_run, x)).max() < 1e-3 * max(1.0, np.abs(ends[0.0]).max())
    assert np.abs(ends[1.0] - _logits(fine_tune, x)).max() < 1e-3 * max(1.0, np.abs(ends[1.0]).max())
    assert np.abs(ends[0.0] - ends[1.0]).max() > 0.05  # the fine-tune answers differently

    half = interpolate_run(str(tiny_onnx), fine_tune, tmp_path / "half", 0.25, log=lambda s: None).parent
    start = state_from_graph(tiny_onnx)
    tuned = folded_state(load_checkpoint(fine_tune)[0])
    got = folded_state(load_checkpoint(half)[0])
    for k in ("net.layer3.1.conv2.weight", "net.layer3.1.bn2.bias", "net.fc.weight", "map_weight"):
        assert torch.allclose(got[k], 0.75 * start[k] + 0.25 * tuned[k], atol=1e-5), k
    assert json.loads((half / "interpolation.json").read_text())["alpha"] == 0.25
    assert (half / "split.csv").read_text() == (fine_tune / "split.csv").read_text()
    ck = torch.load(half / "model.pt", map_location="cpu", weights_only=True)
    assert ck["scope"]["means"].shape[-1] == 2048  # a scope detector fitted on the mixed network's features


def test_what_cannot_be_mixed_is_a_clear_error(tiny_onnx, fine_tune, tmp_path):
    with pytest.raises(InputError, match="alpha"):
        interpolate_run(str(tiny_onnx), fine_tune, tmp_path / "x", 1.5, log=lambda s: None)
    with pytest.raises(InputError, match="new folder"):
        interpolate_run(str(tiny_onnx), fine_tune, fine_tune, 0.5, log=lambda s: None)
    with pytest.raises(InputError, match="not a release"):
        interpolate_run(str(fine_tune / "model.pt"), fine_tune, tmp_path / "y", 0.5, log=lambda s: None)
    a = {"w": torch.zeros(2, 3)}
    with pytest.raises(InputError, match="same network"):
        mix(a, {"v": torch.zeros(2, 3)}, 0.5)
    with pytest.raises(InputError, match=r"\(2, 3\)"):
        mix(a, {"w": torch.zeros(3, 2)}, 0.5)


def test_several_fine_tunes_are_averaged_before_the_mix(tiny_onnx, fine_tune, other_seed, tmp_path):
    from edgekidney.model.checkpoint import load_checkpoint
    from edgekidney.model.from_graph import state_from_graph

    out = interpolate_run(str(tiny_onnx), [fine_tune, other_seed], tmp_path / "soup", 0.5, log=lambda s: None).parent
    start = state_from_graph(tiny_onnx)
    a, b = (folded_state(load_checkpoint(r)[0]) for r in (fine_tune, other_seed))
    got = folded_state(load_checkpoint(out)[0])
    for k in ("net.layer2.0.conv1.weight", "net.layer4.2.bn3.bias", "net.fc.weight", "map_weight"):
        assert not torch.equal(a[k], b[k]), k  # two different fine-tunes
        assert torch.allclose(got[k], 0.5 * start[k] + 0.25 * a[k] + 0.25 * b[k], rtol=1e-5, atol=1e-7), k
    how = json.loads((out / "interpolation.json").read_text())
    assert how["fine_tunes"] == [str(fine_tune), str(other_seed)] and how["alpha"] == 0.5


def test_fine_tunes_of_another_split_are_not_averaged(tiny_onnx, fine_tune, other_seed, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(other_seed, moved)
    lines = (moved / "split.csv").read_text().splitlines(keepends=True)
    (moved / "split.csv").write_text("".join(lines[:1] + lines[2:]))  # one slice fewer
    with pytest.raises(InputError, match="split.csv differs"):
        interpolate_run(str(tiny_onnx), [fine_tune, moved], tmp_path / "x", 0.5, log=lambda s: None)
    with pytest.raises(InputError, match="new folder"):
        interpolate_run(str(tiny_onnx), [fine_tune, other_seed], other_seed, 0.5, log=lambda s: None)
    with pytest.raises(InputError, match="named twice"):
        interpolate_run(str(tiny_onnx), [fine_tune, other_seed, fine_tune], tmp_path / "y", 0.5, log=lambda s: None)
