"""End to end on real CT slices at a small size: train -> checkpoint -> ONNX -> evaluate -> infer."""

import csv
import hashlib
import json
import urllib.error

import numpy as np
import onnx
import pytest

from edgekidney.errors import InputError
from edgekidney.model.evaluate import evaluate, labelled_set, open_predictor, predict_probabilities
from edgekidney.runtime.predict import Classifier
from edgekidney.sidecar import load_card, sha256_of


def test_run_directory_holds_checkpoint_manifest_metrics_and_history(tiny_run):
    for name in ("model.pt", "split.csv", "metrics.json", "history.csv", "config.json"):
        assert (tiny_run / name).exists(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["weights"].startswith("none")
    val = metrics["val"]
    assert val["n"] == metrics["n_val"] == 16 and sum(map(sum, val["confusion_matrix"])) == 16
    assert val["sensitivity"] >= 0.95  # the stored threshold was chosen for that target on validation data
    rows = list(csv.DictReader(open(tiny_run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    splits = {r["split"] for r in csv.DictReader(open(tiny_run / "split.csv"))}
    assert splits == {"train", "val"}


def test_onnx_export_is_valid_dynamic_and_matches_pytorch(tiny_onnx, tiny_run):
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inp = proto.graph.input[0]
    assert inp.name == "input" and proto.graph.output[0].name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    card = load_card(tiny_onnx)
    assert card.classes == ["Normal", "Stone"] and card.positive_class == "Stone" and card.precision == "fp32"
    assert card.sha256 == sha256_of(tiny_onnx) and card.parent_sha256 == sha256_of(tiny_run / "model.pt")
    assert card.extra["parity"]["max_abs_logit_diff"] <= 1e-3
    assert (tiny_onnx.with_suffix(".json")).exists()


def test_checkpoint_and_onnx_evaluate_to_the_same_numbers(tiny_onnx, tiny_run):
    manifest = tiny_run / "split.csv"
    torch_res = evaluate(tiny_run, manifest, split="val")
    onnx_res = evaluate(tiny_onnx, manifest, split="val")
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert onnx_res["at_model_threshold"][key] == pytest.approx(torch_res["at_model_threshold"][key], abs=1e-9)
    # and the probabilities themselves agree
    card = load_card(tiny_onnx)
    ls = labelled_set(manifest, card, "val")
    p_onnx, scope_onnx = predict_probabilities(open_predictor(tiny_onnx), ls.samples)
    p_torch, scope_torch = predict_probabilities(open_predictor(tiny_run), ls.samples)
    assert np.max(np.abs(p_onnx - p_torch)) < 1e-4
    assert scope_onnx is not None and np.array_equal(scope_onnx, scope_torch)  # same scope answers too


def test_evaluate_stores_threshold_for_target_sensitivity(tiny_onnx, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    (tmp_path / "m.json").write_text(tiny_onnx.with_suffix(".json").read_text())
    res = evaluate(model, tiny_onnx.parent.parent / "x.csv" if False else _manifest_of(tiny_onnx), split="val",
                   target_sensitivity=1.0, store_threshold=True)
    # every stone slice in scope is kept; one out of scope counts as missed, and evaluate says so
    reach = res["reachable_sensitivity"]
    assert res["at_target_threshold"]["sensitivity"] == pytest.approx(reach)
    assert (reach < 1.0) == any("out of reach" in w for w in res["warnings"])
    assert load_card(model).threshold == pytest.approx(res["threshold_for_target"])


def _manifest_of(onnx_path):
    from pathlib import Path

    return Path(load_card(onnx_path).extra["source_checkpoint"]).parent / "split.csv"


def test_folder_with_classes_the_model_does_not_know_is_refused(tiny_onnx, real_data):
    with pytest.raises(InputError, match="Cyst, Tumor are unknown to the model"):
        labelled_set(real_data, load_card(tiny_onnx))


def test_classifier_batches_files_and_keeps_going_past_bad_ones(tiny_onnx, small_real, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    files = sorted((small_real / "Stone").iterdir())[:5] + [bad]
    with Classifier(tiny_onnx) as clf:
        preds, failures = clf.predict_files(files, batch_size=2, keep_going=True)
        with pytest.raises(InputError, match="bad.png"):
            clf.predict_files(files, batch_size=2)
        one = clf.predict_files(files[:1], batch_size=1)[0][0]
    assert len(preds) == 5 and [f.path for f in failures] == [str(bad)]
    assert preds[0].probability == pytest.approx(one.probability, abs=1e-5)  # batch size does not matter
    assert all(p.label in ("Normal", "Stone") and 0 <= p.probability <= 1 for p in preds)


def test_local_weights_file_with_checksum_and_frozen_backbone(tmp_path, small_real):
    torch = pytest.importorskip("torch")
    from torchvision.models import resnet50

    from edgekidney.data.dataset import SplitConfig
    from edgekidney.model.train import TrainConfig, build_model, train

    torch.manual_seed(3)
    weights = tmp_path / "resnet50-local.pth"
    state = resnet50().state_dict()
    torch.save(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    model, source = build_model(2, str(weights), digest)
    assert digest in source
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    with pytest.raises(InputError, match="sha256 is"):
        build_model(2, str(weights), "0" * 64)
    metrics = train(TrainConfig(data=small_real, out=tmp_path / "run", weights=str(weights), weights_sha256=digest,
                                image_size=48, epochs=2, freeze_epochs=1, batch_size=16,
                                split=SplitConfig(val_fraction=0.34, block_size=8)), log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [r["frozen"] for r in rows] == ["1", "0"]
    assert metrics["weights"] == source


def test_a_stone_map_run_as_weights_carries_its_map_and_classifier(tmp_path):
    """Fine-tuning a stone-map run again continues it: the map, its link and (same classes) the classifier
    come along with the backbone, instead of a new map from random weights."""
    torch = pytest.importorskip("torch")
    from edgekidney.model.network import ARCH_STONE_MAP
    from edgekidney.model.train import build_model

    torch.manual_seed(5)
    first, _ = build_model(4, "none", arch=ARCH_STONE_MAP, positive=2)
    with torch.no_grad():
        first.map_weight.fill_(0.37)
    saved = tmp_path / "model.pt"
    torch.save({"format": 1, "arch": ARCH_STONE_MAP, "state_dict": first.state_dict()}, saved)

    again, source = build_model(4, str(saved), arch=ARCH_STONE_MAP, positive=2)
    assert source.endswith("with its stone map and classifier")
    mine, theirs = again.state_dict(), first.state_dict()
    for key in ("stone_map.fuse.0.weight", "stone_map.out.bias", "map_weight", "net.fc.weight",
                "net.layer2.0.conv1.weight"):
        assert torch.equal(mine[key], theirs[key]), key

    other, source = build_model(3, str(saved), arch=ARCH_STONE_MAP, positive=1)  # other classes: a new classifier
    assert source.endswith("with its stone map")
    assert torch.equal(other.state_dict()["stone_map.out.weight"], theirs["stone_map.out.weight"])
    assert other.state_dict()["net.fc.weight"].shape[0] == 3

    plain = tmp_path / "resnet50.pth"  # a plain ResNet50 state dict carries the backbone only
    torch.save(first.net.state_dict(), plain)
    fresh, source = build_model(4, str(plain), arch=ARCH_STONE_MAP, positive=2)
    assert "with its" not in source
    assert not torch.equal(fresh.state_dict()["stone_map.out.weight"], theirs["stone_map.out.weight"])


def test_weights_file_that_is_not_resnet50_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from edgekidney.model.train import build_model

    bad = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="not a ResNet50 state dict"):
        build_model(2, str(bad))
    (tmp_path / "t.pth").write_text("text")
    with pytest.raises(InputError, match="not a PyTorch weights file"):
        build_model(2, str(tmp_path / "t.pth"))


def test_imagenet_weights_offline_says_to_pass_a_local_file(monkeypatch):
    pytest.importorskip("torch")
    from torchvision.models import ResNet50_Weights

    from edgekidney.model.train import build_model

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", offline)
    with pytest.raises(InputError, match="pass --weights PATH") as exc:
        build_model(2, "imagenet")
    assert "\n" not in str(exc.value)
