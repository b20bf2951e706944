"""The stone map: masks read and aligned, targets on the right cells, the map in the graph and its peak.

Fast tests (small inputs); the phantom training that checks the peak lands on the calculus is one
small run shared by the tests at the end of this file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekidney.cli import app

from edgekidney.data.masks import default_mask_folder, distance_to_mask, mask_path, mask_to_network, read_mask
from edgekidney.data.preprocess import Preprocessing, preprocess_with_geometry
from edgekidney.errors import InputError

runner = CliRunner()


def body_slice(h: int = 200, w: int = 160, dot=(120, 50)) -> np.ndarray:
    """An off-centre body (so the crop moves things) with one bright 2x2 dot."""
    img = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img[((yy - 110) / 70.0) ** 2 + ((xx - 70) / 55.0) ** 2 <= 1] = 0.45
    img[dot[0] : dot[0] + 2, dot[1] : dot[1] + 2] = 1.0
    return img


def test_a_mask_of_another_size_is_a_clear_error(tmp_path):
    Image.fromarray(np.zeros((100, 90), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(InputError, match=r"mask is 90x100 but its slice is 160x200") as exc:
        read_mask(tmp_path / "m.png", (200, 160))
    assert "\n" not in str(exc.value)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable mask"):
        read_mask(tmp_path / "bad.png", (200, 160))


def test_masks_are_found_beside_the_data_with_the_same_relative_path(tmp_path):
    data = tmp_path / "ct"
    (data / "Stone").mkdir(parents=True)
    assert default_mask_folder(data) is None
    (tmp_path / "ct-stones" / "Stone").mkdir(parents=True)
    assert default_mask_folder(data) == (tmp_path / "ct-stones").resolve()
    image = data / "Stone" / "Stone- (17).jpg"
    assert mask_path(tmp_path / "ct-stones", data, image) == tmp_path / "ct-stones" / "Stone" / "Stone- (17).png"


@pytest.mark.parametrize("size", [64, 128, 224])
def test_a_mask_follows_its_slice_through_crop_pad_and_resize(size):
    img = body_slice()
    mask = np.zeros(img.shape, bool)
    mask[120:122, 50:52] = True
    x, g = preprocess_with_geometry(img, Preprocessing(image_size=size))
    assert g.crop != (0, 200, 0, 160)  # the body crop moved the grid: alignment is not trivial
    on_grid = mask_to_network(mask, g)
    assert on_grid.shape == (size, size) and on_grid.max() > 0.2  # a 2x2 stone survives the resize
    bright = np.unravel_index(np.argmax(x[0]), x[0].shape)
    marked = np.unravel_index(np.argmax(on_grid), on_grid.shape)
    assert np.hypot(bright[0] - marked[0], bright[1] - marked[1]) <= 1.5
    # and back: the network position of the mask maps onto the dot on the slice
    back = g.to_input(*marked)
    assert distance_to_mask(back, mask) <= 1.5 * max(1.0, g.side / size)


def test_map_targets_put_a_stone_on_the_cell_centred_on_it():
    torch = pytest.importorskip("torch")
    from edgekidney.model.losses import map_targets

    def cell_of(row: int, col: int) -> tuple[int, int]:
        m = torch.zeros(1, 64, 64)
        m[0, row, col] = 1.0
        t = map_targets(m, 8, 8)[0]
        assert t.sum() == 1
        return tuple(int(v) for v in torch.nonzero(t)[0])

    # cell o is centred on input pixel 8 o and covers 8 o - 4 .. 8 o + 3
    assert cell_of(16, 16) == (2, 2)
    assert cell_of(12, 19) == (2, 2)
    assert cell_of(11, 20) == (1, 3)
    assert cell_of(0, 63) == (0, 7)


def test_dense_loss_reads_only_known_slices_and_mil_reads_the_peak():
    torch = pytest.importorskip("torch")
    from edgekidney.model.losses import dense_map_loss, mil_map_loss

    logits = torch.full((2, 4, 4), -5.0)
    logits[1, 2, 2] = 5.0
    targets = torch.zeros(2, 4, 4)
    targets[1, 2, 2] = 1.0
    good = dense_map_loss(logits, targets, torch.tensor([True, True]))
    wrong = dense_map_loss(logits, torch.roll(targets, 1, dims=2), torch.tensor([True, True]))
    assert good < 0.05 < wrong
    assert float(dense_map_loss(logits, torch.roll(targets, 1, dims=2), torch.tensor([True, False]))) < 0.05
    assert float(dense_map_loss(logits, targets, torch.tensor([False, False]))) == 0.0
    assert mil_map_loss(logits, torch.tensor([False, True])) < 0.05 < mil_map_loss(logits, torch.tensor([True, False]))


def test_geometric_augmentation_moves_the_mask_with_its_slice():
    torch = pytest.importorskip("torch")
    from edgekidney.model.feed import augment

    pre = Preprocessing(image_size=96)
    img = np.zeros((4, 96, 96), np.float32)
    masks = np.zeros((4, 96, 96), np.float32)
    for i, (r, c) in enumerate([(30, 30), (60, 40), (50, 70), (20, 75)]):
        img[i, 10:86, 10:86] = 0.4
        img[i, r : r + 3, c : c + 3] = 1.0
        masks[i, r : r + 3, c : c + 3] = 1.0
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    x = torch.from_numpy((img[:, None] - mean) / std)
    gen = torch.Generator().manual_seed(3)
    xa, ma = augment(x, pre, gen, frozenset({"geometry", "scale"}), masks=torch.from_numpy(masks))
    moved = 0
    for i in range(4):
        a = xa[i, 0].numpy()
        bright = np.unravel_index(np.argmax(a), a.shape)
        marked = np.unravel_index(np.argmax(ma[i].numpy()), a.shape)
        assert np.hypot(bright[0] - marked[0], bright[1] - marked[1]) <= 2.0
        moved += np.argmax(ma[i].numpy()) != np.argmax(masks[i])
    assert moved >= 3  # the augmentation did move them


def stone_body(size: int = 128, stone=(78, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A body with a vertebra (so kidney sites exist), grainy tissue and a 4x4 stone; and the stone's mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(5)
    body = ((yy - 64) / 40) ** 2 + ((xx - 64) / 55) ** 2 <= 1
    img = np.where(body, 0.5 + 0.02 * rng.standard_normal((size, size)), 0.0).astype(np.float32)
    img[80:92, 58:70] = 1.0  # vertebra
    mask = np.zeros((size, size), np.float32)
    mask[stone[0] : stone[0] + 4, stone[1] : stone[1] + 4] = 1.0
    img[mask > 0] = 1.0
    return img, mask


def test_an_erased_twin_loses_its_stone_and_nothing_else_and_the_stone_slice_gets_a_sham():
    from edgekidney.model.feed import erased_twins

    pre = Preprocessing(image_size=128)
    img, mask = stone_body()
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    x = (np.stack([img, img])[:, None] - mean) / std
    y = np.array([2, 0])  # a Stone slice (outlined) and a slice of another class
    masks = np.stack([mask, np.zeros_like(mask)])
    known = np.array([True, True])
    x2, y2, m2, k2 = erased_twins(x, y, masks, known, positive=2, negative=1, fraction=1.0, pre=pre,
                                  rng=np.random.default_rng(0))
    assert len(x2) == 3 and y2.tolist() == [2, 0, 1] and k2.tolist() == [True, True, True]
    assert not m2[2].any() and m2[0].any()  # the twin's map target is empty, the stone's is kept
    twin = x2[2, 0] * pre.std[0] + pre.mean[0]
    assert twin[mask > 0].max() < 0.65  # the stone is painted in tissue (0.5 +- grain)
    changed = np.abs(twin - img) > 1e-4
    assert changed[mask == 0].sum() <= 12 * 12 - 16  # only around the stone (grown by 2 px, edge blended over 2)
    near = np.zeros_like(changed)
    near[72:90, 34:52] = True
    assert not (changed & ~near).any()
    stone_slice = x2[0, 0] * pre.std[0] + pre.mean[0]
    sham = np.abs(stone_slice - img) > 1e-4
    around_stone = np.zeros_like(sham)
    around_stone[74:86, 36:48] = True
    assert sham.any() and not (sham & around_stone).any()  # painted elsewhere, the stone itself untouched
    assert np.allclose(stone_slice[mask > 0], 1.0, atol=1e-5)
    assert np.array_equal(x2[1], x[1])  # other classes are left alone


def test_only_real_stones_are_erased_not_the_calculi_placed_in_the_same_batch():
    """A Tumor slice's placed-calculus twin is a stone with an outline; erased, it would be a Tumor slice
    labelled Normal. Twins are made in the order that never does that."""
    from edgekidney.model.feed import add_twins

    pre = Preprocessing(image_size=128)
    img, mask = stone_body()
    tumor, _ = stone_body()
    tumor[mask > 0] = tumor[70:74, 90:94].mean()  # the same body without its stone
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    x = ((np.stack([img, tumor])[:, None] - mean) / std).astype(np.float32)
    y = np.array([2, 3])  # Stone (outlined), Tumor
    masks = np.stack([mask, np.zeros_like(mask)])
    for seed in range(5):
        _, y2, _, _ = add_twins(x, y, masks, np.array([True, True]), 2, pre, np.random.default_rng(seed),
                                calculus_fraction=1.0, erase_to=1, erase_fraction=1.0)
        assert y2[:2].tolist() == [2, 3] and (y2 == 1).sum() == 1  # one Normal: the erased real stone
        assert (y2[2:] == 2).sum() >= 1  # and the Tumor slice's calculus twin, a stone


def test_a_calculus_denser_than_the_window_stays_saturated_through_its_blur():
    """Twins drawn at 0.9-1.0 window units peak below the window's top once blurred (how the released model
    was trained); drawn above it (a calculus of 400 HU and more at W400/L40) they peak at the top, never past it."""
    from edgekidney.model.feed import calculus_twins

    pre = Preprocessing(image_size=128)
    img, mask = stone_body()
    img[mask > 0] = 0.5  # no stone of its own
    x = ((img[None, None] - np.asarray(pre.mean, np.float32)[None, :, None, None])
         / np.asarray(pre.std, np.float32)[None, :, None, None]).astype(np.float32)
    for seed in range(5):
        peaks = {}
        for value in ((0.9, 1.0), (2.0, 3.0)):
            x2, y2 = calculus_twins(x, np.array([0]), 2, 1.0, pre, np.random.default_rng(seed), value=value)
            assert y2.tolist() == [0, 2]
            twin = x2[1, 0] * pre.std[0] + pre.mean[0]
            peaks[value] = float(twin[np.abs(twin - img) > 1e-4].max())
        assert peaks[(0.9, 1.0)] < 0.999 and peaks[(2.0, 3.0)] == pytest.approx(1.0, abs=1e-5), peaks
    from edgekidney.model.feed import add_twins, parse_level  # what the training loop calls, with --calculus-level

    x2, y2, _, _ = add_twins(x, np.array([0]), np.zeros((1, 128, 128), np.float32), np.array([True]), 2, pre,
                             np.random.default_rng(0), calculus_fraction=1.0, calculus_level=parse_level("2,3"))
    twin = x2[1, 0] * pre.std[0] + pre.mean[0]
    assert y2.tolist() == [0, 2] and twin[np.abs(twin - img) > 1e-4].max() == pytest.approx(1.0, abs=1e-5)
    assert parse_level("0.9,1.0") == (0.9, 1.0)
    for bad in ("1.4", "3,1", "0,1", "1,9", "a,b"):
        with pytest.raises(InputError, match="^calculus level"):
            parse_level(bad)
    from edgekidney.bench.scope import place_in_windowed  # the benchmark's validation pairs draw the same way

    (faint,) = place_in_windowed(img, np.random.default_rng(0))
    (dense,) = place_in_windowed(img, np.random.default_rng(0), value=(2.0, 3.0))
    assert faint[np.abs(faint - img) > 1e-4].max() < 0.999 and dense.max() == 1.0
    assert (dense >= faint - 1e-6).all()  # the same site, size and blur, only denser


def test_erased_twins_are_labelled_normal_or_the_other_of_two_classes_or_not_made():
    from edgekidney.model.train import NOT_STONE, erase_class_index

    assert erase_class_index(["Cyst", "Normal", "Stone", "Tumor"], 2, "Normal") == 1
    assert erase_class_index(["cyst", "normal", "stone"], 2, "Normal") == 1
    assert erase_class_index(["no_stone", "stone"], 1, "Normal") == 0
    assert erase_class_index(["Cyst", "Stone", "Tumor"], 1, "Normal") is None  # which finding? unknown
    assert erase_class_index(["Cyst", "Stone", "Tumor"], 1, "not-stone") == NOT_STONE < 0  # no class's index


def test_a_not_stone_twin_is_taught_away_from_stone_and_to_no_other_class_in_particular():
    torch = pytest.importorskip("torch")
    from edgekidney.model.losses import not_class_loss

    z = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 9.0, 0.0], [-30.0, 30.0, -30.0, -30.0]], requires_grad=True)
    loss = not_class_loss(z, 2)
    p = torch.softmax(z.detach().double(), 1)
    torch.testing.assert_close(loss[:2].double(), -torch.log1p(-p[:2, 2]), rtol=1e-5, atol=0)
    assert 0 <= loss[2] < 1e-20 and torch.isfinite(loss).all()  # clearly not stone: nothing to learn, no overflow
    loss[:2].sum().backward()
    g = z.grad[:2]
    assert (g[:, 2] > 0).all() and (g[:, [0, 1, 3]] < 0).all()  # descent lowers stone, raises the others
    # ... in proportion to what they already have: Normal is not preferred over Cyst or Tumor
    torch.testing.assert_close((g[:, [0, 1, 3]] / g[:, [0, 1, 3]].sum(1, keepdim=True)).double(),
                               p[:2][:, [0, 1, 3]] / p[:2][:, [0, 1, 3]].sum(1, keepdim=True), rtol=1e-4, atol=0)


def small_stone_net():
    """(torch, a three-class stone-map network in eval mode, stone = class 1), seeded."""
    torch = pytest.importorskip("torch")
    from edgekidney.model.network import ARCH_STONE_MAP
    from edgekidney.model.weights import build_model

    torch.manual_seed(0)
    net, _ = build_model(3, "none", arch=ARCH_STONE_MAP, positive=1)
    return torch, net.eval()


def test_the_stone_logit_reads_the_map_peak():
    from edgekidney.model.network import MAP_STRIDE, forward_parts, map_cells

    torch, net = small_stone_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        _, pooled, logits, map_logits = forward_parts(net, x)
        plain = net.net.fc(pooled)
        assert map_logits.shape == (2, map_cells(64), map_cells(64)) == (2, 64 // MAP_STRIDE, 64 // MAP_STRIDE)
        peak = map_logits.flatten(1).amax(1)
        torch.testing.assert_close(logits[:, 1], plain[:, 1] + net.map_weight * peak)
        torch.testing.assert_close(logits[:, [0, 2]], plain[:, [0, 2]])  # only the stone logit reads the map


def test_the_map_gate_takes_the_stone_call_only_from_slices_whose_map_stays_below_it():
    from edgekidney.model.gate import map_gate_of, set_map_gate
    from edgekidney.model.network import GATE_SLOPE, forward_parts

    torch, net = small_stone_net()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        _, _, open_logits, map_logits = forward_parts(net, x)
        assert map_gate_of(net) is None  # off until training fits it: nothing changes
        peak = map_logits.flatten(1).amax(1)
        level = float(peak.median())
        set_map_gate(net, level)
        _, _, gated, _ = forward_parts(net, x)
    assert map_gate_of(net) == pytest.approx(level)
    short = torch.clamp(level - peak, min=0.0)
    torch.testing.assert_close(gated[:, 1], open_logits[:, 1] - GATE_SLOPE * short)
    torch.testing.assert_close(gated[:, [0, 2]], open_logits[:, [0, 2]])  # the other classes are untouched
    assert bool((short > 0).any()) and bool((short == 0).any())  # below the level: lowered; at or above: as it was


def test_the_gate_is_fitted_below_the_weakest_called_stone_and_keeps_every_stone_called():
    from edgekidney.model.gate import GATE_MARGIN, fit_map_gate
    from edgekidney.model.network import GATE_OFF

    p = np.array([0.9, 0.8, 0.3, 0.7, 0.9, 0.6])
    peak = np.array([-1.0, -2.5, -9.0, -6.0, -5.0, 0.0])
    is_stone = np.array([True, True, True, False, False, False])
    level = fit_map_gate(p, peak, is_stone, threshold=0.5)
    assert level == pytest.approx(-2.5 - GATE_MARGIN)  # the stone at p 0.3 is not called: it does not lower it
    assert not ((p >= 0.5) & is_stone & (peak < level)).any()
    assert ((p >= 0.5) & ~is_stone & (peak < level)).sum() == 2  # two look-alike calls the gate takes back
    assert fit_map_gate(p, peak, is_stone, threshold=0.95) == GATE_OFF  # no called stone: nothing to fit on


def test_a_checkpoint_from_before_the_gate_loads_with_it_off_and_a_run_carried_on_does_not_inherit_it(tmp_path):
    torch = pytest.importorskip("torch")
    from edgekidney.model.checkpoint import load_checkpoint, save_checkpoint
    from edgekidney.model.gate import map_gate_of, set_map_gate
    from edgekidney.model.network import ARCH_STONE_MAP, GATE_OFF
    from edgekidney.model.weights import build_model, carry_heads

    net, _ = build_model(3, "none", arch=ARCH_STONE_MAP, positive=1)
    save_checkpoint(tmp_path / "model.pt", net, ["a", "stone", "c"], "stone", Preprocessing(image_size=64), 0.5,
                    "none", {})
    ck = torch.load(tmp_path / "model.pt", weights_only=True)
    del ck["state_dict"]["map_gate"]  # as written before the gate existed
    torch.save(ck, tmp_path / "model.pt")
    model, _ = load_checkpoint(tmp_path)
    assert map_gate_of(model) is None and float(model.map_gate) == GATE_OFF
    set_map_gate(net, -3.0)
    fresh, _ = build_model(3, "none", arch=ARCH_STONE_MAP, positive=1)
    assert "stone map" in carry_heads(fresh, net.state_dict())
    assert map_gate_of(fresh) is None  # training starts ungated; the gate is fitted again at its end


# -- a small phantom model with masks: training, export, quantization ----------------------------------
@pytest.fixture(scope="module")
def phantom_map_model(tmp_path_factory):
    pytest.importorskip("torch")
    from edgekidney.data.synthetic import SynthConfig, generate
    from edgekidney.model.export import export_onnx
    from edgekidney.model.train import TrainConfig, train

    root = tmp_path_factory.mktemp("stone_map")
    generate(root / "data", SynthConfig(patients=8, slices_per_class=3, size=96, seed=0), masks=True)
    logs: list[str] = []
    metrics = train(TrainConfig(data=root / "data", out=root / "run", weights="none", epochs=1, freeze_epochs=0,
                                image_size=64, batch_size=8, seed=0, augment="geometry", threads=1, erase_fraction=0.5,
                                erase_class="not-stone", preprocessing=Preprocessing(image_size=64)), log=logs.append)
    export_onnx(root / "run", root / "model.onnx")
    return root, metrics, logs


def test_training_finds_the_masks_beside_the_data_and_records_the_map(phantom_map_model):
    root, metrics, logs = phantom_map_model
    assert any(line.startswith("data: stone masks from") and "data-stones" in line for line in logs), logs
    assert any("stone map: stride 8" in line and "have a mask" in line for line in logs), logs
    assert metrics["arch"] == "resnet50-stonemap"
    history = (root / "run" / "history.csv").read_text().splitlines()
    assert "val_located" in history[0] and "train_map_dense" in history[0]
    # the phantoms' outlined stones get erased twins, and validation scores them as negatives
    assert any("painted over, labelled not stone" in line for line in logs), logs
    assert "val_erased_called_stone" in history[0] and "val_auc_with_erased" in history[0]
    # the map gate was fitted at the end, on validation: no called validation stone lies below it
    gate = metrics["map_gate"]
    assert any(line.startswith("map gate:") for line in logs), logs
    assert gate["level"] is not None and gate["margin"] > 0 and 0 < gate["p"] < 1  # the phantoms' stones are called
    assert set(gate["uncalled_at_threshold"]) == set(json.loads((root / "run" / "metrics.json").read_text())
                                                         ["map_gate"]["uncalled_at_threshold"])
    side = json.loads((root / "model.json").read_text())
    assert side["extra"]["map"] == {"kind": "stone_map", "stride": 8, "output": "cam", "values": "P(stone) per cell"}
    assert side["extra"]["arch"] == "resnet50-stonemap" and side["extra"]["planes"] == ["axial"]


def test_refit_fits_a_finished_runs_gate_as_training_did_and_moves_its_scope_threshold(phantom_map_model, tmp_path):
    import shutil

    from edgekidney.model.refit import refit_run

    root, metrics, _ = phantom_map_model
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    r = runner.invoke(app, ["refit", str(run), "--threads", "1"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "metrics.json").read_text())
    assert again["map_gate"]["level"] == pytest.approx(metrics["map_gate"]["level"], abs=1e-3)
    assert again["val"]["threshold"] == pytest.approx(metrics["val"]["threshold"], abs=1e-4)
    assert again["scope"]["threshold"] == pytest.approx(metrics["scope"]["threshold"], rel=1e-4)
    r = runner.invoke(app, ["refit", str(run), "--threads", "1", "--scope-margin", "1.5", "--no-map-gate"])
    assert r.exit_code == 0, r.output
    wider = json.loads((run / "metrics.json").read_text())
    assert wider["scope"]["threshold"] == pytest.approx(1.5 * metrics["scope"]["threshold"], rel=1e-4)
    assert wider["map_gate"] == {"level": None}
    side = json.loads((root / "model.json").read_text())
    from edgekidney.model.checkpoint import load_checkpoint_card

    assert load_checkpoint_card(run).scope["threshold"] == pytest.approx(wider["scope"]["threshold"])
    assert side["scope"]["threshold"] == pytest.approx(metrics["scope"]["threshold"])  # the original is untouched
    with pytest.raises(InputError, match="no such manifest"):
        (run / "split.csv").unlink()
        refit_run(run, threads=1, log=lambda s: None)


def test_the_exported_map_is_a_probability_on_the_input_grid_and_its_peak_is_in_the_body(phantom_map_model, tmp_path):
    root, _, _ = phantom_map_model
    from edgekidney.data.decode import load_slice
    from edgekidney.runtime.predict import Classifier, expand_inputs

    files = expand_inputs([root / "data" / "Stone"])[:4]
    with Classifier(root / "model.onnx") as clf:
        x = np.stack([preprocess_with_geometry(load_slice(f, clf.preprocessing), clf.preprocessing)[0] for f in files])
        outs = clf.infer_outputs(x)
        preds, _ = clf.predict_files(files)
    assert outs["cam"].shape == (4, 64, 64) and outs["cam"].min() >= 0 and outs["cam"].max() <= 1
    for p, f in zip(preds, files):
        assert p.cam_peak is not None and p.cam is None  # the peak always, the map itself only when asked
        hu = load_slice(f, clf.preprocessing)
        r, c = p.cam_peak
        assert hu[r, c] > 0.05  # within the body, not the air around it


def test_quantized_children_keep_the_map_in_fp32(phantom_map_model, tmp_path):
    root, _, _ = phantom_map_model
    import onnx

    from edgekidney.optimize.graph import head_nodes

    model = onnx.load(str(root / "model.onnx"))
    heads = set(head_nodes(model))
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    head_convs = [n for n in convs if n.name in heads]
    assert len(head_convs) == 4  # lateral2, lateral3, fuse, out: the map's own convolutions
    assert len(convs) - len(head_convs) == 53  # ResNet50's convolutions stay the trunk
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1 and gemm[0].name not in heads  # the classifier is quantized as before
    logits_node = producer["logits"]
    assert logits_node.name in heads  # the link that adds the map's peak to the stone logit stays FP32


def test_an_int8_cpu_child_sums_what_the_heads_read_in_fp32(phantom_map_model, tmp_path):
    """The map reads layer2 and layer3, the scope distance layer4: each is a residual Add. Rounded to
    8 bits (ONNX Runtime's QLinearAdd), they moved the released model's map peak and scope distance
    enough to change most decisions; the child keeps them FP32 and reads them un-rounded."""
    root, _, _ = phantom_map_model
    import onnx

    from edgekidney.optimize.calibrate import make_calibration_set
    from edgekidney.optimize.graph import head_taps
    from edgekidney.optimize.quantize import Precision, QuantizeConfig, Target, quantize
    from edgekidney.sidecar import load_card

    parent = onnx.load(str(root / "model.onnx"))
    taps = head_taps(parent)
    by_name = {n.name: n for n in parent.graph.node}
    adds = [t for t in taps if by_name[t].op_type == "Add"]
    assert len(adds) == 3  # the outputs of layer2, layer3 (the map) and layer4 (the scope distance)
    assert sorted(by_name[t].op_type for t in taps if t not in adds) == ["ReduceMean", "Relu", "Relu", "Relu"]

    cal = make_calibration_set(root / "data", root / "model.onnx", tmp_path / "cal", n=8, seed=0)
    out = tmp_path / "int8.onnx"
    quantize(root / "model.onnx", out, QuantizeConfig(precision=Precision.int8, target=Target.cpu,
                                                      calibration=cal.folder), log=lambda s: None)
    child = onnx.load(str(out))
    readers = {}
    for n in child.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    kept = load_card(out).extra["quantization"]["head_taps_kept_fp32"]
    child_nodes = {n.name: n for n in child.graph.node}
    kept_adds = [child_nodes[k] for k in kept if child_nodes[k].op_type == "Add"]
    assert len(kept_adds) == 3
    for node in kept_adds:  # the sum stays FP32: no QuantizeLinear rounds it before the Relu the heads read
        assert readers[node.output[0]] == ["Relu"], node.name
    producer = {o: n for n in child.graph.node for o in n.output}
    int8_convs = [n for n in child.graph.node if n.op_type == "Conv" and producer.get(n.input[0]) is not None
                  and producer[n.input[0]].op_type == "DequantizeLinear"]
    assert len(int8_convs) == 53  # ResNet50's convolutions are still INT8; the map's four are not


# -- the SR says where: a circle around the map's peak on the peak slice ------------------------------
def test_sr_marks_the_stone_map_peak_on_the_peak_slice(tmp_path):
    pytest.importorskip("highdicom")
    import shutil
    import subprocess

    import highdicom as hd
    import pydicom

    from edgekidney.data.series import read_series
    from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series
    from edgekidney.study import analyze_series, write_sr

    from study_fixtures import Oracle

    truth = write_series(tmp_path / "s", SeriesSynthConfig(slices=20, size=96, stones=1, seed=5, patient=1))
    (series,), _ = read_series([tmp_path / "s"])
    res = analyze_series(Oracle(truth.kidney_boxes), series)
    assert res.decision == "stone" and res.peak is not None
    res.peak.cam_peak = [40, 61]  # (row, col) on the slice as displayed
    ds = pydicom.dcmread(write_sr(res, series, tmp_path / "sr"))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    region = roi.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
    ref = series.refs[res.peak.index]
    (scoord,) = [i for i in _walk_items(ds.ContentSequence) if i.ValueType == "SCOORD"]
    (image,) = scoord.ContentSequence  # SELECTED FROM the peak slice's instance
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ref.sop_instance_uid
    data = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
    row, col = series.transform.source_index(40, 61, ref.shape)
    assert data[0].tolist() == [col + 0.5, row + 0.5]  # centre as (column, row) on the stored grid
    assert data[1, 0] - data[0, 0] == pytest.approx(0.05 * max(ref.shape))
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(next((tmp_path / "sr").glob("*.dcm")))], capture_output=True, text=True)
        assert not [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")], out.stderr


def _walk_items(items):
    for item in items:
        yield item
        yield from _walk_items(item.get("ContentSequence", []))


def test_train_with_a_missing_mask_folder_is_one_line(tmp_path):
    pytest.importorskip("torch")
    import subprocess
    import sys

    data = tmp_path / "ct"
    for c in ("Normal", "Stone"):
        (data / c).mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "edgekidney.cli", "train", str(data), "--out", str(tmp_path / "run"),
                        "--weights", "none", "--stone-masks", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --stone-masks {tmp_path / 'nowhere'}: no such folder"]
    assert not (tmp_path / "run").exists()
