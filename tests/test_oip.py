"""The Open Inference Protocol on ``edgekidney serve``, with tritonclient as the client.

One live server (a real ``edgekidney serve`` process on loopback) for the tiny trained model, which has
all three outputs (logits, scope distance, activation map). tritonclient's HTTP client talks to it in
JSON and in the binary tensor extension; every probability is compared with ``edgekidney infer``'s
code path (:class:`Classifier` on the same files). The codec also gets unit tests of its own.
"""

from __future__ import annotations

import base64
import json
import time
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgekidney.runtime.predict import Classifier  # noqa: E402
from edgekidney.data.preprocess import preprocess_batch_with_geometry  # noqa: E402
from edgekidney.server.oip_codec import OipError, parse_infer_request, serialize_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import LiveServer  # noqa: E402

KEY = "oip-key-77"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict:
    """A fresh dict each call: tritonclient's infer() writes Inference-Header-Content-Length into the
    headers dict it is given, which would then go with the next (JSON) request."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def slices(small_real) -> list[Path]:
    """Six real slices: three Normal, three Stone (JPEG files as stored)."""
    return sorted((small_real / "Normal").glob("*.jpg"))[:3] + sorted((small_real / "Stone").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def local(tiny_onnx, slices):
    """What ``edgekidney infer`` says about the slices: its own code path, in this process."""
    with Classifier(tiny_onnx) as clf:
        preds, failures = clf.predict_files(slices, batch_size=8)
        assert not failures
        from edgekidney.data.decode import load_slice

        x, _ = preprocess_batch_with_geometry([load_slice(p, clf.preprocessing) for p in slices], clf.preprocessing)
        probs = clf.probabilities(x)
        yield {"preds": preds, "x": x, "probs": probs, "card": clf.card}


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    with LiveServer(tiny_onnx, tmp_path_factory.mktemp("oip-log") / "server.log", "--max-images", "8",
                    "--max-body-mb", "2", "--max-wait-ms", "20", env={"EDGEKIDNEY_API_KEY": KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


# -- health and metadata ---------------------------------------------------------------------------
def test_health_and_metadata_as_the_protocol_says(client, server, local):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("edgekidney") and client.is_model_ready("edgekidney", "1")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata(headers=auth())
    assert meta["name"] == "edgekidney" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    m = client.get_model_metadata("edgekidney", headers=auth())
    assert m["name"] == "edgekidney" and m["versions"] == ["1"] and m["platform"] == "onnxruntime_onnx"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in m["inputs"]} == {
        "image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, 64, 64])}
    outs = {o["name"]: (o["datatype"], o["shape"]) for o in m["outputs"]}
    assert outs["probabilities"] == ("FP32", [-1, 2]) and outs["label"] == ("BYTES", [-1])
    assert outs["logits"] == ("FP32", [-1, 2]) and outs["scope_distance"] == ("FP32", [-1]) and "cam" in outs
    assert m["parameters"]["classes"] == ["Normal", "Stone"]
    assert m["parameters"]["sha256"] == local["card"].sha256
    # the raw protocol bodies
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/v2/models/edgekidney/ready").json() == {"name": "edgekidney", "ready": True}


def test_metadata_and_infer_need_the_key_and_errors_have_the_protocol_shape(server, client):
    r = httpx.get(server.url + "/v2/models/edgekidney")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/edgekidney/infer", json={"inputs": []})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    r = httpx.get(server.url + "/v2/models/nope", headers=auth())
    assert r.status_code == 404 and "nope" in r.json()["error"]
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("edgekidney", "2", headers=auth())
    assert exc.value.status() == "404" and "version" in exc.value.message()


# -- inference: the same numbers as edgekidney infer ---------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensors_give_infer_probabilities(client, local, binary):
    x = local["x"]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label", "logits")]
    res = client.infer("edgekidney", [inp], outputs=outs, headers=auth())
    probs = res.as_numpy("probabilities")
    assert probs.shape == (6, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, local["probs"], atol=1e-4)
    expected = np.array([p.probability for p in local["preds"]])
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-4)
    labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")]
    # raw tensors: no body-outline check, the feature-distance check still applies
    assert labels == [p.label for p in local["preds"]]
    assert res.as_numpy("scope_distance") is None  # only what was asked for
    raw = res.get_response()
    assert all(("data" in o) != binary for o in raw["outputs"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_give_infer_decisions(client, local, slices, binary):
    data = np.array([p.read_bytes() for p in slices], dtype=np.object_)
    inp = httpclient.InferInput("image", [len(slices)], "BYTES")
    if binary:
        inp.set_data_from_numpy(data, binary_data=True)
        res = client.infer("edgekidney", [inp], headers=auth())  # no outputs named: all of them, binary
    else:  # JSON carries BYTES as text: base64
        inp.set_data_from_numpy(np.array([base64.b64encode(b).decode() for b in data], dtype=np.object_),
                                binary_data=False)
        res = client.infer("edgekidney", [inp], headers=auth(),
                           outputs=[httpclient.InferRequestedOutput(n, binary_data=False)
                                    for n in ("probabilities", "label", "scope_distance", "cam")])
    preds = local["preds"]
    probs = res.as_numpy("probabilities")
    np.testing.assert_allclose(probs[:, 1], [p.probability for p in preds], atol=1e-4)
    labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")]
    assert labels == [p.label for p in preds]
    np.testing.assert_allclose(res.as_numpy("scope_distance"), [p.scope_distance for p in preds], rtol=1e-4)
    assert res.as_numpy("cam").shape[0] == len(slices)
    assert res.as_numpy("logits") is None if not binary else res.as_numpy("logits").shape == (6, 2)


def test_out_of_scope_from_a_blank_image_is_a_label(client, local):
    """A slice without a patient (uniform gray) is out of scope when sent as an image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (96, 96), 30).save(buf, format="PNG")
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([buf.getvalue()], dtype=np.object_))
    res = client.infer("edgekidney", [inp], headers=auth())
    assert res.as_numpy("label")[0] == b"out_of_scope"


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory) -> Path:
    from phantoms import write_head_ct

    return write_head_ct(tmp_path_factory.mktemp("head") / "head.dcm")


def test_a_head_ct_slice_is_out_of_scope_by_feature_distance_on_v1_and_v2(server, client, local, head_ct, small_real):
    """A slice with a patient outline (so not the no-body rule) but far from the kidney slices the model was
    trained on: /v1 and /v2 both answer out_of_scope, because its feature distance is over the sidecar's
    threshold; a training slice in the same request stays in scope with its class label."""
    thr = local["card"].scope_threshold
    train_slice = small_real / "Stone" / "Stone- (3).jpg"  # a training slice of the tiny run
    files = [("head.dcm", head_ct.read_bytes(), "application/dicom"),
             ("train.jpg", train_slice.read_bytes(), "image/jpeg")]
    r = httpx.post(server.url + "/v1/predict", headers=AUTH, timeout=60,
                   files=[("file", f) for f in files])
    assert r.status_code == 200, r.text
    head, train = r.json()
    assert head["scope_distance"] > thr, f"precondition: the head slice must lie beyond {thr} ({head})"
    assert head["label"] == "out_of_scope" and head["in_scope"] is False and head["scope_threshold"] == thr
    assert head["scope_reason"].startswith("unlike the training slices (feature distance")
    assert train["in_scope"] is True and train["scope_distance"] < thr and train["scope_reason"] is None
    assert train["label"] in ("Normal", "Stone")

    inp = httpclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array([head_ct.read_bytes(), train_slice.read_bytes()], dtype=np.object_))
    res = client.infer("edgekidney", [inp], headers=auth())
    assert [v.decode() for v in res.as_numpy("label")] == ["out_of_scope", train["label"]]
    np.testing.assert_allclose(res.as_numpy("scope_distance"), [head["scope_distance"], train["scope_distance"]],
                               rtol=1e-4)
    # raw tensors: no slice to look for a patient in, the distance alone decides
    from edgekidney.data.decode import load_slice

    card = local["card"]
    x, geo = preprocess_batch_with_geometry([load_slice(head_ct, card.preprocessing)], card.preprocessing)
    assert geo[0].body_found  # the head has an outline: only the distance can refuse it
    t = httpclient.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    res = client.infer("edgekidney", [t], headers=auth())
    assert res.as_numpy("label")[0] == b"out_of_scope" and res.as_numpy("scope_distance")[0] > thr


# -- bad requests: 4xx with {"error": ...}, the server keeps serving -----------------------------------
def bad_requests(x: np.ndarray):
    hdr = lambda d: json.dumps(d).encode()  # noqa: E731
    ok_head = hdr({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                               "parameters": {"binary_data_size": x[:1].nbytes}}]})
    return [
        ("not json", b"{nope", {}, 400),
        ("no inputs", hdr({"inputs": []}), {}, 400),
        ("unknown input", hdr({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}), {}, 400),
        ("wrong shape", hdr({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                         "data": [0.0] * 3072}]}), {}, 400),
        ("data count", hdr({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                        "data": [0.0, 1.0]}]}), {}, 400),
        ("fp16", hdr({"inputs": [{"name": "input", "shape": [1], "datatype": "FP16", "data": [1]}]}), {}, 400),
        ("binary cut short", ok_head + x[:1].tobytes()[:100], {"Inference-Header-Content-Length": str(len(ok_head))}, 400),
        ("header length too big", ok_head, {"Inference-Header-Content-Length": "999999"}, 400),
        ("nan", hdr({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                 "data": [float("nan")] * 12288}]}), {}, 400),
        ("garbage image", hdr({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "data": [base64.b64encode(b"not an image at all").decode()]}]}), {}, 422),
        ("not base64", hdr({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}), {}, 400),
        ("too many images", hdr({"inputs": [{"name": "image", "shape": [9], "datatype": "BYTES",
                                             "data": ["AAAA"] * 9}]}), {}, 413),
        ("unknown output", hdr({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                            "data": [0.0] * 12288}], "outputs": [{"name": "nope"}]}), {}, 400),
        ("too large", bytes(3 * 1024 * 1024), {}, 413),
    ]


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, client, local):
    x = local["x"]
    for label, body, headers, status in bad_requests(x):
        r = httpx.post(server.url + "/v2/models/edgekidney/infer", content=body,
                       headers={**AUTH, "Content-Type": "application/json", **headers}, timeout=30)
        assert r.status_code == status, f"{label}: {r.status_code} {r.text}"
        assert set(r.json()) == {"error"} and r.json()["error"], label
        assert "Traceback" not in r.text
    inp = httpclient.InferInput("input", [1, 3, 64, 64], "FP32")
    inp.set_data_from_numpy(x[:1])
    res = client.infer("edgekidney", [inp], headers=auth())
    np.testing.assert_allclose(res.as_numpy("probabilities"), local["probs"][:1], atol=1e-4)


def test_v1_and_v2_share_the_micro_batcher(server, local, slices):
    """Concurrent /v2 requests join one inference batch (the server reports the batch size)."""
    import asyncio

    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 0}}],
                       "parameters": {"binary_data_output": True}})

    def body(p: Path) -> tuple[bytes, dict]:
        blob = serialize_bytes([p.read_bytes()])
        h = head.replace('"binary_data_size": 0', f'"binary_data_size": {len(blob)}').encode()
        return h + blob, {"Inference-Header-Content-Length": str(len(h)), **AUTH}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            reqs = [body(slices[i % len(slices)]) for i in range(12)]
            return await asyncio.gather(*[c.post("/v2/models/edgekidney/infer", content=b, headers=h)
                                          for b, h in reqs])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 12
    sizes = [int(r.headers["x-edgekidney-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    for i, r in enumerate(responses):
        res = httpclient.InferResult.from_response_body(
            r.content, header_length=int(r.headers["inference-header-content-length"]))
        assert res.as_numpy("probabilities")[0, 1] == pytest.approx(local["preds"][i % 6].probability, abs=1e-4)


# -- the codec alone ------------------------------------------------------------------------------------
def test_codec_reads_binary_and_json_tensors_alike():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    head = json.dumps({"inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}},
                                  {"name": "image", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 + 3 + 4 + 0}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "logits"}]}).encode()
    body = head + x.tobytes() + struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    req = parse_infer_request(body, str(len(head)))
    np.testing.assert_array_equal(req.inputs[0].data, x)
    assert req.inputs[1].data == [b"abc", b""]
    assert req.outputs == ["label", "logits"] and req.binary_outputs == {"label"}
    js = parse_infer_request(json.dumps({"inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32",
                                                     "data": x.tolist()}]}).encode(), None)
    np.testing.assert_array_equal(js.inputs[0].data, x)
    for bad_body, hl in [(body + b"x", str(len(head))), (body[:-2], str(len(head))), (body, "abc")]:
        with pytest.raises(OipError):
            parse_infer_request(bad_body, hl)


# -- edgekidney infer --server: the same table as a local infer -----------------------------------------
@pytest.mark.parametrize("send", ["bytes", "tensor"])
def test_infer_server_gives_local_infer_results(server, tiny_onnx, slices, local, tmp_path, send):
    """``bytes``: the server decodes; ``tensor``: preprocessed here with the sidecar read from the server's
    model configuration (as from a Triton repository made by export-triton), decided here."""
    from typer.testing import CliRunner

    from edgekidney.cli import app

    out = tmp_path / "remote.json"
    args = ["infer", str(slices[0]), *[str(p) for p in slices[1:]], "--server", server.url, "--send", send,
            "--json", str(out), "--batch-size", "4"]
    r = CliRunner().invoke(app, args, env={"EDGEKIDNEY_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["predictions"]
    assert [row["path"] for row in rows] == [str(p) for p in slices]
    for row, ref in zip(rows, local["preds"]):
        assert row["probability"] == pytest.approx(ref.probability, abs=1e-4)
        assert row["label"] == ref.label and row["in_scope"] == ref.in_scope
        assert row["scope_distance"] == pytest.approx(ref.scope_distance, rel=1e-4)


def test_infer_server_says_what_is_wrong_in_one_line(server, slices):
    from typer.testing import CliRunner

    from edgekidney.cli import app

    r = CliRunner().invoke(app, ["infer", str(slices[0]), "--server", server.url, "--model-name", "other"],
                           env={"EDGEKIDNEY_API_KEY": KEY})
    assert r.exit_code == 1 and "'other' is not ready" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["infer", str(slices[0]), "--server", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output



def test_infer_server_keep_going_names_the_file_the_server_refused(server, slices, tmp_path):
    """The server calls each image of a request "element K"; a skipped file is said by its own path."""
    from typer.testing import CliRunner

    from edgekidney.cli import app

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["infer", str(slices[0]), str(bad), "--server", server.url, "--send", "bytes",
                                 "--keep-going", "--json", str(out), "--batch-size", "4"],
                           env={"EDGEKIDNEY_API_KEY": KEY})
    assert r.exit_code == 1 and "error: 1 of 2 file(s) could not be classified" in r.output, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("skipped:")]
    assert line.startswith(f"skipped: {bad}: ") and "element 0" not in line and line.endswith(f"(server {server.url})")
    (failure,) = json.loads(out.read_text())["failures"]
    assert failure["path"] == str(bad) and failure["error"] == line.removeprefix("skipped: ")


def test_v2_shares_admission_and_deadline_with_v1(tiny_onnx, slices, tmp_path):
    """Overload is an answer on /v2 too (docs/architecture.md rule 9): one --max-queue for both APIs,
    503 + Retry-After beyond it, 504 past the deadline, in the protocol's error shape."""
    import asyncio

    data = slices[0].read_bytes()
    blob = serialize_bytes([data])
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    with LiveServer(tiny_onnx, tmp_path / "overload.log", "--simulate-latency-ms", "1500", "--max-batch", "1",
                    "--max-queue", "2", "--request-timeout", "2.5") as srv:

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=10.0) as c:
                v1 = [c.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}) for _ in range(3)]
                v2 = [c.post("/v2/models/edgekidney/infer", content=head + blob,
                             headers={"Inference-Header-Content-Length": str(len(head))}) for _ in range(3)]
                return await asyncio.gather(*v1, *v2)

        answers = asyncio.run(burst())
        codes = sorted(r.status_code for r in answers)
        assert codes.count(503) == 4 and codes.count(200) == 1 and codes.count(504) == 1, codes
        refused_v2 = [r for r in answers[3:] if r.status_code == 503]
        assert refused_v2  # two admitted of six: at least one /v2 request is among the refused
        for r in answers[3:]:
            if r.status_code != 200:
                assert set(r.json()) == {"error"}
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "--max-queue" in r.json()["error"]
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200  # overload is not death

        def slow_body():  # a sender that stalls mid-body: its fault, so 408, not the overloaded server's 504
            yield (head + blob)[:50]
            time.sleep(3.0)
            yield (head + blob)[50:]

        slow = httpx.post(srv.url + "/v2/models/edgekidney/infer", content=slow_body(), timeout=10.0,
                          headers={"Inference-Header-Content-Length": str(len(head))})
        assert slow.status_code == 408 and slow.json()["error"].startswith("request body not received within 2.5 s")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 5_000])
def test_json_nested_beyond_the_parser_is_a_400_not_a_500(body):
    from edgekidney.server.oip_codec import OipError, parse_infer_request

    with pytest.raises(OipError) as e:
        parse_infer_request(body, None)
    assert e.value.status == 400 and "nested too deeply" in e.value.reason
