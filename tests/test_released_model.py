"""The released model: its files are the ones its card names, and it answers as measured.

Runs on the shipped CPU form through the CLI, as a user would: the checksums against
``SHA256SUMS`` and the model card, the sidecars' lineage, a whole example series, and (where the
public slices it was validated on are present) a few validation slices whose answers the card reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekidney.cli import app

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "models" / "kidney-stone-ct-v3"
SHARED = REPO.parent / "shared" / "data"
DATA = Path(os.environ.get("EDGEKIDNEY_DATA") or SHARED / "ct-kidney-axial")
runner = CliRunner()

pytestmark = pytest.mark.skipif(not (RELEASE / "SHA256SUMS").exists(), reason="no released model in this checkout")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_checksums_match_the_files_and_the_card():
    sums = dict(reversed(line.split()) for line in (RELEASE / "SHA256SUMS").read_text().splitlines() if line.strip())
    # an INT8 form ships only where it passed its agreement gates, else FP16 serves that target (the card says which)
    assert "model-fp16.onnx" in sums and set(sums) <= {"model-int8cpu.onnx", "model-int8trt.onnx", "model-fp16.onnx"}
    card = (RELEASE / "MODEL_CARD.md").read_text()
    total = 0
    for name, digest in sums.items():
        assert sha256(RELEASE / name) == digest, name
        assert f"`{digest}`" in card, f"the card does not name {name}'s sha256"
        side = json.loads((RELEASE / name).with_suffix(".json").read_text())
        assert side["sha256"] == digest  # the sidecar describes this very file
        total += (RELEASE / name).stat().st_size
    forms = {name: json.loads((RELEASE / name).with_suffix(".json").read_text()) for name in sums}
    gpu = forms["model-fp16.onnx"]
    assert gpu["precision"] == "fp16" and gpu["parent_sha256"] in card
    assert len({f["parent_sha256"] for f in forms.values()} - {""}) == 1  # every form made from the same FP32 parent
    if "model-int8cpu.onnx" in forms:
        cpu = forms["model-int8cpu.onnx"]
        assert cpu["precision"] == "int8" and cpu["extra"]["quantization"]["target"] == "cpu"
        # the INT8 form's scope threshold moved by the shift measured on calibration slices, not validation ones
        assert cpu["scope"]["threshold"] > cpu["scope"]["parent_threshold"] == gpu["scope"]["threshold"]
    else:
        assert "`model-int8cpu.onnx`" in card and "Not shipped" in card  # the card says why
    for side in forms.values():
        assert side["extra"]["map"]["kind"] == "stone_map" and set(side["extra"]["planes"]) == {"axial", "coronal"}
        assert side["outputs"] == ["logits", "scope_distance", "cam"]
    assert total <= 80e6
    assert "not a medical device" in card.lower()


def test_the_release_is_found_by_name_and_by_folder():
    from edgekidney.released import RELEASED, form_file, resolve_model

    assert RELEASE.name == RELEASED
    cpu = RELEASE / ("model-int8cpu.onnx" if (RELEASE / "model-int8cpu.onnx").is_file() else "model-fp16.onnx")
    assert form_file(RELEASE) == cpu
    assert resolve_model(RELEASED) == cpu
    assert resolve_model(RELEASE) == cpu
    assert resolve_model(RELEASE, form="gpu") == RELEASE / "model-fp16.onnx"


def test_the_first_command_answers_every_example_series(tmp_path):
    if not (REPO / "examples").is_dir():
        pytest.skip("no examples/ in this checkout")
    pytest.importorskip("nibabel")
    pytest.importorskip("highdicom")
    out = tmp_path / "first"
    r = runner.invoke(app, ["study", "kidney-stone-ct-v3", str(REPO / "examples"), "--json", str(out / "study.json"),
                            "--sr-out", str(out / "sr"), "--sc-out", str(out / "sc")])
    assert r.exit_code == 0, r.output
    study = json.loads((out / "study.json").read_text())
    series = study["series"]
    assert len(series) == 2 and all(s["decision"] in ("stone", "no_stone", "not_assessable") for s in series)
    from edgekidney.released import form_file

    assert all(s["model"]["sha256"] == sha256(form_file(RELEASE)) for s in series)
    assert all(s["model"]["name"] == f"{RELEASE.name}/{form_file(RELEASE).name}" for s in series)  # the release
    assert all(sl["cam_peak"] is not None for s in series for sl in s["slices"])
    assert len(list((out / "sr").glob("*.dcm"))) == 1  # the one DICOM series gets its SR
    exam_lands_on_the_kidneys_foci(next(s for s in series if s["kind"] == "nifti"))


def exam_lands_on_the_kidneys_foci(nifti: dict) -> None:
    """The whole volume (pelvis to liver dome) against benchmarks/reference/abdomen-ct.json, as the card's
    exam table: the series is called stone on the slices of the left kidney's foci of 1,100-1,300 HU,
    every slice run that supports the call lies within the kidneys, and few slices elsewhere are called."""
    from edgekidney.bench.exam import hyperdense_foci, load_reference, score_exam
    from edgekidney.data.volume import read_nifti

    ref = load_reference(REPO / "benchmarks" / "reference" / "abdomen-ct.json")
    hu = np.stack(list(read_nifti(REPO / ref["volume"]).hu_slices()))
    foci = hyperdense_foci(hu, ref["kidneys"], **ref["foci_rules"])
    r = score_exam(nifti["slices"], foci, ref["kidneys"], hu.shape[1:])
    lo, hi = r["kidney_slices"]
    assert nifti["decision"] == "stone" and all(lo <= run["start"] <= run["end"] <= hi for run in nifti["supporting"])
    best = max(nifti["supporting"], key=lambda run: run["max_probability"])
    assert best["start"] <= nifti["peak"]["index"] <= best["end"]  # the slice shown is the call's evidence
    densest = max(r["foci_table"], key=lambda f: f["max_hu"])
    assert densest["kidney"] == "left" and densest["max_hu"] > 1200 and densest["found"], r["foci_table"]
    assert r["foci"] == 6 and r["foci_found"] >= 3, r["foci_table"]
    assert r["located"] >= 0.6 * r["called_stone"] and r["calls_outside_kidneys"] <= 3, r["calls"]


def test_validation_slices_answer_as_the_card_says():
    """Slices of the validation blocks (numbers above 320) of the public dataset, when present."""
    stones = [DATA / "Stone" / f"Stone- ({n}).jpg" for n in (330, 345, 360, 375, 390)]
    normals = [DATA / "Normal" / f"Normal- ({n}).jpg" for n in (330, 345, 360, 375, 390)]
    if not all(p.exists() for p in stones + normals):
        pytest.skip("the public CT kidney slices are not here (set EDGEKIDNEY_DATA)")
    from edgekidney.runtime.predict import Classifier

    from edgekidney.released import form_file

    with Classifier(form_file(RELEASE)) as clf:
        preds, failures = clf.predict_files(stones + normals)
    assert not failures
    called = [p.label == "Stone" for p in preds]
    assert sum(called[:5]) >= 4 and sum(called[5:]) <= 1, [(Path(p.path).name, p.label, round(p.probability, 3))
                                                            for p in preds]
    assert all(p.in_scope for p in preds)
