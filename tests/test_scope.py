"""A model that says when it does not apply: body crop, out-of-scope detector, confidence, activation maps."""

import json

import numpy as np
import pytest

from edgekidney.model.confidence import bootstrap, calibration, confounder_table
from edgekidney.data.decode import load_slice
from edgekidney.data.preprocess import Preprocessing, body_box, preprocess_with_geometry
from edgekidney.scope import choose_threshold, energy, fit_scope, separation_auc


# -- body crop ---------------------------------------------------------------------------------------
def phantom_hu(size=256, body=(128, 120, 70, 95), table_row=230):
    """Air, an elliptic body of noisy soft tissue centred at (row, col) with radii (ry, rx), a thin table."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx, ry, rx = body
    hu = np.full((size, size), -1000.0, np.float32)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    hu[inside] = 40.0 + np.random.default_rng(0).normal(0, 15, int(inside.sum()))  # tissue with CT noise
    hu[table_row : table_row + 2, 10 : size - 10] = 300.0  # the scanner table: thin and wide
    return hu


def test_body_crop_on_a_dicom_keeps_the_body_and_drops_the_table(tmp_path):
    from edgekidney.data.synthetic import write_ct_dicom

    path = tmp_path / "slice.dcm"
    write_ct_dicom(path, phantom_hu(), 0, 1, "1.2.3", "1.2.3.4")
    pre = Preprocessing(image_size=64)
    gray = load_slice(path, pre)
    (top, bottom, left, right), found, fraction = body_box(gray, pre)
    assert found and 0.25 < fraction < 0.45
    # the ellipse spans rows 58..198 and columns 25..215; the margin is 4 % of that
    assert 45 <= top <= 58 and 198 <= bottom <= 210 and 15 <= left <= 25 and 215 <= right <= 225
    assert bottom < 230  # the table (rows 230-231) is cut off


def test_body_crop_on_real_jpegs_shrinks_to_the_patient(real_data):
    pre = Preprocessing(image_size=64)
    for name in ("Stone/Stone- (17).jpg", "Normal/Normal- (5).jpg", "Cyst/Cyst- (50).jpg"):
        gray = load_slice(real_data / name, pre)
        (top, bottom, left, right), found, fraction = body_box(gray, pre)
        assert found and 0.1 < fraction < 0.8, name
        box = gray[top:bottom, left:right]
        outside = gray.copy()
        outside[top:bottom, left:right] = 0
        assert (bottom - top) * (right - left) < gray.size  # it did crop
        assert (gray > 0.05).sum() > 0 and (box > 0.05).sum() / (gray > 0.05).sum() > 0.9, name


def test_geometry_maps_network_positions_back_to_the_slice():
    pre = Preprocessing(image_size=64)
    gray = (phantom_hu(body=(150, 100, 60, 50)) + 1000) / 1400
    gray = np.clip(gray.astype(np.float32), 0, 1)
    _, geo = preprocess_with_geometry(gray, pre)
    for row, col in [(150.0, 100.0), (120.0, 80.0)]:
        back = geo.to_input(*geo.to_network(row, col))
        assert np.allclose(back, (row, col), atol=1e-6)
    grid = np.zeros((64, 64), np.float32)
    r, c = geo.to_network(150, 100)
    grid[int(round(r)), int(round(c))] = 1.0
    on_slice = geo.map_to_input(grid)
    assert on_slice.shape == gray.shape
    peak = np.unravel_index(on_slice.argmax(), on_slice.shape)
    assert abs(peak[0] - 150) <= 3 and abs(peak[1] - 100) <= 3


def test_blank_image_has_no_body():
    pre = Preprocessing(image_size=64)
    for img in (np.zeros((128, 128), np.float32), np.full((128, 128), 0.01, np.float32),
                np.full((128, 128), 0.5, np.float32)):  # a flat gray page fills the frame but is no anatomy
        _, geo = preprocess_with_geometry(img, pre)
        assert not geo.body_found and geo.crop == (0, 128, 0, 128)


def test_old_sidecars_keep_their_preprocessing():
    old = Preprocessing.from_dict({"image_size": 128})  # written before the body crop existed
    assert old.body_crop is False and old.body_level is None
    assert Preprocessing().body_crop is True and Preprocessing().body_level == 0.5


# -- out-of-scope detector ---------------------------------------------------------------------------
def test_mahalanobis_matches_the_textbook_formula_and_flags_far_points():
    rng = np.random.default_rng(0)
    dim, n = 12, 400
    y = rng.integers(0, 3, n)
    means = rng.normal(0, 3, (3, dim))
    f = means[y] + rng.normal(0, 1, (n, dim)) @ np.diag(np.linspace(0.5, 2, dim))
    sm = fit_scope(f, y, shrinkage=0.1)
    resid = f - np.stack([f[y == c].mean(0) for c in range(3)])[y]
    cov = resid.T @ resid / n
    cov = 0.9 * cov + 0.1 * np.trace(cov) / dim * np.eye(dim)
    probe = rng.normal(0, 3, (5, dim))
    inv = np.linalg.inv(cov)
    cls_means = np.stack([f[y == c].mean(0) for c in range(3)])
    expected = np.min([[(p - m) @ inv @ (p - m) for m in cls_means] for p in probe], axis=1) / dim
    np.testing.assert_allclose(sm.distance(probe), expected, rtol=1e-4)
    val = means[y[:100]] + rng.normal(0, 1, (100, dim)) @ np.diag(np.linspace(0.5, 2, dim))
    thr = choose_threshold(sm.distance(val), 0.99, 1.0)
    far = means[0] + rng.normal(0, 1, (50, dim)) * 6
    assert np.mean(sm.distance(val) <= thr) >= 0.98 and np.mean(sm.distance(far) > thr) == 1.0
    assert separation_auc(sm.distance(val), sm.distance(far)) > 0.99
    low = fit_scope(f, y, shrinkage=0.1, rank=4)  # four axes and one variance for the other eight
    assert low.basis.shape == (dim, 4) and low.res_inv_var > 0
    thr_low = choose_threshold(low.distance(val), 0.99, 1.0)
    assert np.mean(low.distance(far) > thr_low) == 1.0


def test_energy_is_lower_for_confident_logits():
    e = energy(np.array([[10.0, 0.0], [0.1, 0.0]]))
    assert e[0] < e[1]


def test_exported_model_carries_scope_and_cam_outputs(tiny_onnx):
    from edgekidney.sidecar import load_card

    card = load_card(tiny_onnx)
    assert card.outputs == ["logits", "scope_distance", "cam"]
    assert card.scope["method"] == "mahalanobis" and card.scope_threshold > 0
    parity = card.extra["parity"]["max_rel_diff_heads"]
    assert set(parity) == {"scope_distance", "cam"} and max(parity.values()) < 1e-3


def test_cam_is_the_logit_margin_spread_over_the_image(tiny_onnx, tiny_run, small_real):
    """On the layer4 cells' receptive-field centres (every 32nd input pixel from 0) the CAM is the map
    before upsampling, whose mean is exactly the stone logit - mean of the others - bias term."""
    from edgekidney.runtime.predict import Classifier
    from edgekidney.data.preprocess import preprocess_batch
    from edgekidney.model.train import load_checkpoint

    model, card = load_checkpoint(tiny_run)
    if card.extra.get("arch") == "resnet50-stonemap":  # the product's default: its map is the stone map
        import torch

        from edgekidney.model.network import MAP_STRIDE, forward_parts

        pre = card.preprocessing
        x = preprocess_batch([load_slice(p, pre) for p in sorted((small_real / "Stone").iterdir())[:4]], pre)
        with Classifier(tiny_onnx) as clf:
            cam = clf.infer_outputs(x)["cam"]
        with torch.inference_mode():
            _, _, logits, map_logits = forward_parts(model, torch.from_numpy(x))
        # on the cells' centres (every 8th input pixel from 0) the output is P(stone) of that cell
        np.testing.assert_allclose(cam[:, ::MAP_STRIDE, ::MAP_STRIDE], torch.sigmoid(map_logits).numpy(),
                                   rtol=1e-4, atol=1e-5)
        # and the stone logit is the classifier's plus w times the map's peak logit
        plain = model.net.fc(forward_parts(model, torch.from_numpy(x))[1]).detach().numpy()
        pos = card.positive_index
        peak = map_logits.flatten(1).amax(1).numpy()
        np.testing.assert_allclose(logits.numpy()[:, pos], plain[:, pos] + float(model.map_weight) * peak,
                                   rtol=1e-4, atol=1e-4)
        return
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    pos = card.positive_index
    bias_margin = b[pos] - np.delete(b, pos).mean()
    pre = card.preprocessing
    x = preprocess_batch([load_slice(p, pre) for p in sorted((small_real / "Stone").iterdir())[:4]], pre)
    with Classifier(tiny_onnx) as clf:
        outs = clf.infer_outputs(x)
    logits = outs["logits"]
    margin = logits[:, pos] - np.delete(logits, pos, axis=1).mean(1)
    cells = outs["cam"][:, ::32, ::32]
    assert cells.shape[1:] == (2, 2)  # layer4 of a 64 px input
    np.testing.assert_allclose(cells.mean(axis=(1, 2)), margin - bias_margin, rtol=1e-4, atol=1e-5)


def test_the_graphs_distance_is_scope_py_numpy_distance_that_set_the_threshold(tiny_onnx, tiny_run, small_real,
                                                                              tmp_path):
    """The threshold in the sidecar was chosen on :meth:`ScopeModel.distance` (numpy, float64) of the
    checkpoint's pooled features; the product compares it with the ONNX graph's ``scope_distance``
    (float32). The two must be one distance: on training, validation and out-of-distribution slices."""
    import torch

    from phantoms import write_head_ct
    from edgekidney.data.preprocess import preprocess_batch
    from edgekidney.model.network import forward_parts
    from edgekidney.model.train import load_checkpoint
    from edgekidney.runtime.predict import Classifier
    from edgekidney.scope import ScopeModel
    from edgekidney.sidecar import load_card

    ck = torch.load(tiny_run / "model.pt", map_location="cpu", weights_only=True)
    arrays = {k: np.asarray(ck["scope"][k], dtype=np.float64) for k in ("means", "basis", "inv_var", "res_inv_var")}
    detector = ScopeModel(arrays["means"], arrays["basis"], arrays["inv_var"], float(arrays["res_inv_var"][0]),
                          ck["scope"]["shrinkage"])
    model, card = load_checkpoint(tiny_run)
    pre = card.preprocessing
    files = [small_real / "Stone" / "Stone- (2).jpg", small_real / "Normal" / "Normal- (5).jpg",  # training
             small_real / "Stone" / "Stone- (383).jpg", small_real / "Normal" / "Normal- (384).jpg",  # validation
             write_head_ct(tmp_path / "head.dcm")]  # far from both
    x = preprocess_batch([load_slice(f, pre) for f in files], pre)
    with torch.no_grad():
        pooled = forward_parts(model, torch.from_numpy(x))[1].double().numpy()
    expected = detector.distance(pooled)
    with Classifier(tiny_onnx) as clf:
        graph = clf.infer_outputs(x)["scope_distance"]
    thr = load_card(tiny_onnx).scope_threshold
    assert thr == pytest.approx(ck["scope"]["threshold"])  # the sidecar carries the checkpoint's threshold
    np.testing.assert_allclose(graph, expected, rtol=2e-3, atol=1e-3 * thr)
    assert np.array_equal(graph <= thr, expected <= thr)  # the same decisions
    assert expected[0] < 0.01 * thr and expected[-1] > thr  # and both kinds of decision occur


def test_scope_of_lets_the_distance_decide_and_the_missing_body_refuse():
    """The decision itself, on chosen distances: at the threshold in scope, above it out, NaN out, no
    detector (no threshold or no distances) gives None; a slice without a body is out whatever its distance."""
    from types import SimpleNamespace

    from edgekidney.runtime.predict import decide_outputs, scope_of

    card = SimpleNamespace(scope_threshold=2.0, preprocessing=SimpleNamespace(body_crop=True),
                           classes=["Normal", "Stone"], positive_index=1)
    body, none = SimpleNamespace(body_found=True), SimpleNamespace(body_found=False)
    d = np.array([0.5, 2.0, 2.0000001, np.nan, np.inf, 0.1])
    inside, reasons = scope_of(card, d, [body] * 5 + [none])
    assert inside.tolist() == [True, True, False, False, False, False]
    assert reasons[:2] == [None, None]
    assert reasons[2] == "unlike the training slices (feature distance 2 > 2)"
    assert reasons[3].startswith("unlike the training slices (feature distance nan")
    assert reasons[5] == "no patient outline (or no anatomy, one flat value) found in the image"
    assert scope_of(SimpleNamespace(scope_threshold=None), d, [body] * 6) == (None, [None] * 6)
    assert scope_of(card, None, [body] * 6) == (None, [None] * 6)
    no_crop = SimpleNamespace(**{**vars(card), "preprocessing": SimpleNamespace(body_crop=False)})
    assert scope_of(no_crop, np.array([0.5]), [none])[0].tolist() == [True]  # no body crop: no outline rule
    logits = np.array([[0.0, 3.0]] * 3, np.float32)  # every slice a confident stone ...
    r = decide_outputs(card, 0.5, {"logits": logits, "scope_distance": np.array([1.0, 3.0, 1.0])}, [body, body, none])
    assert r.labels == ["Stone", "out_of_scope", "out_of_scope"]  # ... but only the first is judged
    assert r.in_scope.tolist() == [True, False, False] and r.distances.tolist() == [1.0, 3.0, 1.0]
    plain = decide_outputs(card, 0.5, {"logits": logits}, [body, body, none])  # a model without the head
    assert plain.labels == ["Stone"] * 3 and plain.in_scope is None and plain.reasons == [None] * 3


def test_blank_and_out_of_scope_slices_are_never_called_stone(tiny_onnx, small_real):
    from edgekidney.runtime.predict import Classifier

    with Classifier(tiny_onnx) as clf:
        preds = clf.predict_slices([np.zeros((128, 128), np.float32), load_slice(
            next((small_real / "Stone").iterdir()), clf.preprocessing)], ["blank", "stone"])
    assert preds[0].label == "out_of_scope" and preds[0].in_scope is False
    assert "no patient outline" in preds[0].scope_reason
    assert preds[1].scope_threshold == pytest.approx(clf.card.scope_threshold)


def test_out_of_scope_counts_as_a_missed_stone():
    from edgekidney.metrics import classification_report

    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]])
    rep = classification_report(y, probs, ["Normal", "Stone"], 1, 0.5, in_scope=np.array([True, False, True, False]))
    assert rep["sensitivity"] == 0.5 and rep["specificity"] == 1.0 and rep["out_of_scope"] == 2
    assert rep["confusion_columns"] == ["Normal", "Stone", "out_of_scope"]
    assert rep["confusion_matrix"] == [[1, 0, 1], [0, 1, 1]]


# -- confidence ----------------------------------------------------------------------------------------
def _labelled(n, rng):
    y = np.repeat([0, 1, 2], n)  # Normal, Stone, Cyst
    score = np.where(y == 1, rng.beta(3, 2, y.size), rng.beta(2, 3, y.size))
    pred = np.where(score >= 0.5, 1, np.where(y == 1, 0, y))  # a stone below the threshold is called Normal
    return y, pred, score


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 300):
        y, pred, score = _labelled(n, rng)
        iv = bootstrap(y, pred, score, ["Normal", "Stone", "Cyst"], 1, n_resamples=1000, seed=1)
        sens = np.mean(pred[y == 1] == 1)
        cyst = np.mean(pred[y == 2] == 1)
        assert iv["sensitivity"][0] <= sens <= iv["sensitivity"][1]
        assert iv["called_stone_rate"]["Cyst"][0] <= cyst <= iv["called_stone_rate"]["Cyst"][1]
        assert iv["auc"][0] < iv["auc"][1] <= 1
        widths.append(iv["sensitivity"][1] - iv["sensitivity"][0])
    assert widths[1] < widths[0] / 2
    again = bootstrap(y, pred, score, ["Normal", "Stone", "Cyst"], 1, n_resamples=1000, seed=1)
    assert again == iv  # seeded


def test_calibration_error_is_small_for_calibrated_and_large_for_overconfident_scores():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert calibration(y, p)["ece"] < 0.02
    assert calibration(y, np.where(p > 0.5, 0.99, 0.01))["ece"] > 0.2


def test_confounder_table_counts_stone_calls_per_class():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 3, 1, 1, 2])  # 3 = out of scope
    rows = {r["class"]: r for r in confounder_table(y, pred, ["Normal", "Stone", "Cyst"], 1)}
    assert rows["Cyst"]["called_stone"] == 2 and rows["Cyst"]["rate"] == pytest.approx(2 / 3)
    assert rows["Stone"]["out_of_scope"] == 1 and rows["Stone"]["is_positive"]


def test_evaluate_reports_confounders_intervals_and_plots(tiny_onnx, tiny_run, tmp_path):
    from edgekidney.model.evaluate import evaluate

    r = evaluate(tiny_onnx, tiny_run / "split.csv", split="val", bootstrap_resamples=200, plot_dir=tmp_path)
    assert {c["class"] for c in r["confounders"]} == {"Normal", "Stone"}
    assert r["intervals"]["n_resamples"] == 200 and len(r["intervals"]["sensitivity"]) == 2
    assert 0 <= r["calibration"]["ece"] <= 1 and r["scope"]["detector"] == "mahalanobis"
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "reliability.png").stat().st_size > 1000
    json.dumps(r)  # all of it is JSON


def test_infer_writes_cam_overlays(tiny_onnx, small_real, tmp_path):
    from typer.testing import CliRunner

    from edgekidney.cli import app

    out = tmp_path / "cams"
    r = CliRunner().invoke(app, ["infer", str(tiny_onnx), str(small_real / "Stone"), "--cam", str(out), "--cam-all",
                                 "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("*.png"))
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(pngs) == len(preds) and all(len(p["cam_peak"]) == 2 for p in preds)
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.mode == "RGB" and im.size == (256, 256)


# -- calculus insertion ---------------------------------------------------------------------------------
def test_calculus_lands_beside_the_spine_and_only_brightens():
    from edgekidney.data.calculus import CalculusSpec, draw_calculus, kidney_sites

    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.where(((yy - 64) / 40) ** 2 + ((xx - 64) / 55) ** 2 <= 1, 0.5, 0.0).astype(np.float32)
    img[80:92, 58:70] = 1.0  # vertebra: bone, posterior midline
    sites = kidney_sites(img, np.random.default_rng(0), 20)
    assert len(sites) == 20
    for r, c in sites:  # body 110 px wide, 80 px high; spine at (86, 64)
        assert 0.08 * 110 - 1 <= abs(c - 64) <= 0.30 * 110 + 1 and abs(r - 86) <= 0.2 * 80 + 1, (r, c)
    out = draw_calculus(img, CalculusSpec(diameter_px=5, value=1.0, blur_px=0.5, row=sites[0][0], col=sites[0][1]))
    assert out[sites[0]] > 0.9 and np.all(out >= img) and np.count_nonzero(out - img > 0.01) < np.pi * 5 ** 2  # the blurred edge reaches ~2 px
