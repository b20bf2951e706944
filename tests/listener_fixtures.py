"""Helpers for the listener tests: a tiny ONNX model made without torch, synthetic CT series, free ports,
and a small in-process PACS that records what it receives."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CT_VOLUMES = REPO.parent / "shared" / "data" / "ct-volumes"


def wait_for(cond, timeout: float = 15.0, step: float = 0.05):
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def echo_ok(port: int) -> bool:
    """A C-ECHO to the listener on ``port`` (AE EDGEKIDNEY) succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.connection_timeout = 1
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGEKIDNEY")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(out_dir: Path, size: int = 32) -> Path:
    """ONNX: global average pool -> linear (3 -> 2 logits), with an edgekidney sidecar. Milliseconds per slice."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.sidecar import ModelCard

    w = numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, -0.5], [0.2, 0.8]], np.float32), "W")
    b = numpy_helper.from_array(np.array([0.0, 0.1], np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tiny.onnx"
    onnx.save(model, path)
    ModelCard(["Normal", "Stone"], "Stone", Preprocessing(image_size=size)).save(path)
    return path


def write_series(out: Path, n: int, size: int = 64, seed: int = 1) -> tuple[str, str, list[Path]]:
    """``n`` slices of a synthetic 3-D phantom as one axial series with geometry (one stone), patient
    SYNTH-S<seed>; returns (study, series, files in acquisition order)."""
    from edgekidney.data.synthetic_series import SeriesSynthConfig
    from edgekidney.data.synthetic_series import write_series as synth_series

    truth = synth_series(out, SeriesSynthConfig(slices=n, size=size, seed=seed, patient=seed, shuffle_names=False))
    return truth.study_uid, truth.series_uid, sorted(Path(out).glob("*.dcm"))


def jpeg2000_series(out: Path, fill_study_series: bool = True) -> list[Path]:
    """The shared JPEG 2000 series, with SOP Class/Instance UID restored from the file meta.

    Its de-identification blanked (0008,0016) and (0008,0018) in the dataset; every scanner sends them, and
    storescu needs them to pick a presentation context. It also blanked the Study and Series Instance UIDs:
    ``fill_study_series`` gives them fixed values (as a scanner would send); without it they stay blank, to
    test filing under substitute keys. Pixel data stay JPEG 2000 as they are."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    study = generate_uid(entropy_srcs=["listener-test", "jpeg2000", "study"])
    series = generate_uid(entropy_srcs=["listener-test", "jpeg2000", "series"])

    src = CT_VOLUMES / "abdomen-jpeg2000-series"
    if not src.is_dir():
        import pytest

        pytest.skip(f"shared JPEG 2000 series not found at {src}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in sorted(src.iterdir()):
        ds = dcmread(p)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        if fill_study_series:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(out / p.name, enforce_file_format=True)
        files.append(out / p.name)
    return files


class Pacs:
    """An in-process Storage SCP that accepts anything and records (SOP Instance UID, dataset) per C-STORE."""

    def __init__(self, port: int = 0, ae_title: str = "PACS", answer_after_s: float = 0.0) -> None:
        self.port, self.ae_title, self.answer_after_s = port, ae_title, answer_after_s
        self.received: list = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.server = None

    def start(self) -> "Pacs":
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self.lock:
                self.received.append(ds)
            self.arrived.set()
            time.sleep(self.answer_after_s)  # a slow PACS: stored, Success not yet sent
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]
        return self

    def uids(self) -> list[str]:
        with self.lock:
            return [str(d.SOPInstanceUID) for d in self.received]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def send(port: int, files: list[Path], calling: str = "SCANNER", called: str = "EDGEKIDNEY") -> list[int]:
    """C-STORE ``files`` in one association (pynetdicom SCU); the status of each (-1: no response)."""
    from pydicom import dcmread
    from pynetdicom import AE

    dss = [dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    for cls, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in dss}):
        ae.add_requested_context(cls, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [-2] * len(files)
    out = []
    for d in dss:
        st = assoc.send_c_store(d)
        out.append(int(st.Status) if "Status" in st else -1)
    assoc.release()
    return out
