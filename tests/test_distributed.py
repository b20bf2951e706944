"""DDP training: 2 processes on the CPU (gloo), one short epoch on real slices.

Both ranks train (each reports the slices it saw), only rank 0 writes the run (one checkpoint, nothing
left by rank 1), and the validation metrics are those of the gathered validation: every validation
slice, in order, as the saved model classifies them in this process.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")


def test_two_processes_train_one_run(small_real, tmp_path):
    import tempfile
    from pathlib import Path

    from edgekidney.data.dataset import SplitConfig, read_manifest
    from edgekidney.model.distributed import launch
    from edgekidney.metrics import roc_auc, softmax
    from edgekidney.model.train import TrainConfig, TorchPredictor

    before = set(Path(tempfile.gettempdir()).glob("edgekidney-rank*"))
    out = tmp_path / "run"
    cfg = TrainConfig(data=small_real, out=out, weights="none", image_size=64, epochs=1, batch_size=8,
                      device="cpu", threads=1, augment="none", split=SplitConfig(val_fraction=0.34, block_size=8))
    metrics = launch(cfg, 2)
    d = metrics["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    per_rank = d["train_slices_last_epoch_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] > 0
    assert sum(per_rank) == metrics["n_train"] // 2 * 2  # disjoint halves of the epoch
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["model.pt"]
    assert set(Path(tempfile.gettempdir()).glob("edgekidney-rank*")) == before  # rank 1's folder is gone
    # the epoch's validation AUC (gathered over both ranks) is that of every validation slice
    val = [s for s in read_manifest(out / "split.csv") if s.split == "val"]
    assert len(val) == metrics["n_val"] > 0
    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import preprocess_batch

    pred = TorchPredictor(out / "model.pt")
    x = preprocess_batch([load_slice(s.path, pred.card.preprocessing) for s in val], pred.card.preprocessing)
    probs = softmax(pred.infer_outputs(x)["logits"])
    y = np.array([s.label for s in val]) == pred.card.positive_index
    auc = roc_auc(y, probs[:, pred.card.positive_index])
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    assert float(rows[0]["val_auc"]) == pytest.approx(auc, abs=1e-6)
    assert metrics["val"]["auc"] == pytest.approx(auc, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["distributed"]["world_size"] == 2
