import re
from collections import Counter, defaultdict

import pytest

from edgekidney.data.dataset import (SplitConfig, discover, parse_classes, positive_class_index, read_manifest,
                                     split_dataset, write_manifest)
from edgekidney.data.synthetic import SynthConfig, generate
from edgekidney.errors import InputError


def number(path):
    return int(re.findall(r"\d+", path.stem)[-1])


def test_real_data_split_holds_out_blocks_321_to_400_and_drops_duplicates(real_data):
    ds = split_dataset(discover(real_data, ["Normal", "Stone"]), SplitConfig())
    assert ds.duplicates_dropped == 6  # byte-identical Stone slices
    assert len({s.sha256 for s in ds.samples}) == len(ds.samples)
    for s in ds.samples:
        assert s.split == ("val" if number(s.path) >= 321 else "train"), s.path
    assert Counter((s.class_name, s.split) for s in ds.samples)[("Normal", "val")] == 80


def test_groups_never_span_two_splits(real_data):
    ds = split_dataset(discover(real_data, ["Normal", "Stone"]), SplitConfig(val_fraction=0.3, block_size=7))
    splits = defaultdict(set)
    for s in ds.samples:
        splits[s.group].add(s.split)
    assert all(len(v) == 1 for v in splits.values())


def test_dicom_patients_are_split_as_a_whole_across_classes(tmp_path):
    generate(tmp_path, SynthConfig(patients=10, slices_per_class=2, size=64))
    ds = split_dataset(discover(tmp_path), SplitConfig(val_fraction=0.3))
    by_patient = defaultdict(set)
    for s in ds.samples:
        assert s.group.startswith("patient:")
        by_patient[s.group].add(s.split)
    assert len(by_patient) == 10 and all(len(v) == 1 for v in by_patient.values())
    assert sum("val" in v for v in by_patient.values()) == 3
    # the manifest names no patient: groups are hashed
    write_manifest(ds.samples, tmp_path / "split.csv")
    assert "SYNTH-" not in (tmp_path / "split.csv").read_text()


def test_split_is_deterministic_and_manifest_round_trips(tmp_path, small_real):
    a = split_dataset(discover(small_real), SplitConfig(block_size=8, val_fraction=0.34))
    b = split_dataset(discover(small_real), SplitConfig(block_size=8, val_fraction=0.34))
    assert [(s.path, s.split) for s in a.samples] == [(s.path, s.split) for s in b.samples]
    write_manifest(a.samples, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert [(s.sha256, s.split, s.label) for s in back] == [(s.sha256, s.split, s.label) for s in a.samples]


def test_classes_option_picks_and_orders(real_data):
    ds = discover(real_data, parse_classes("Stone,Normal"))
    assert ds.classes == ["Stone", "Normal"] and positive_class_index(ds.classes) == 0
    assert positive_class_index(["Normal", "Cyst"], "Cyst") == 1
    with pytest.raises(InputError, match="positive class"):
        positive_class_index(["Normal", "Stone"], "Tumor")


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "Stone").mkdir() or p, "at least two class folders"),
    (lambda p: [(p / c).mkdir() for c in ("Normal", "Stone")] and p, "holds no .png"),
])
def test_bad_dataset_folders(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        discover(make(tmp_path))


def test_unknown_class_name_is_reported(real_data):
    with pytest.raises(InputError, match="no class folder named Kidney"):
        discover(real_data, ["Normal", "Kidney"])


def test_duplicate_class_in_option():
    with pytest.raises(InputError, match="twice"):
        parse_classes("Normal,Normal")
