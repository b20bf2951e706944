"""``edgekidney infer --server URL``: classify slices on an inference server over the Open Inference Protocol.

Two kinds of server, one client (tritonclient's HTTP client, binary tensors):

- ``edgekidney serve``: its model takes encoded files (input ``image``, BYTES), so the files are sent as
  they are and the server decodes, preprocesses and decides (out of scope included) -- as ``/v1``.
- Triton (a repository from ``edgekidney export-triton``): the model takes preprocessed FP32 tensors, so
  the files are decoded and preprocessed here with the sidecar's parameters (the one preprocessing),
  the server runs the network, and the decision (threshold, out of scope) is made here with
  :func:`edgekidney.runtime.predict.decide_outputs`. The sidecar comes from the model's configuration
  (``parameters.edgekidney_sidecar``, written by export-triton) or from ``--sidecar``.

Either way the answers are :class:`edgekidney.runtime.predict.Prediction` rows, as ``edgekidney infer`` prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekidney.data.decode import load_slice
from edgekidney.errors import DependencyError, EdgeKidneyError, InputError, ModelError
from edgekidney.metrics import decide
from edgekidney.runtime.predict import Failure, Prediction, decide_outputs
from edgekidney.data.preprocess import preprocess_batch_with_geometry
from edgekidney.sidecar import ModelCard, load_card

IMAGE_INPUT = "image"
SIDECAR_PARAMETER = "edgekidney_sidecar"


def _client_module():
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise DependencyError("infer --server needs tritonclient: pip install 'edgekidney[triton]'") from None
    return httpclient


def split_url(url: str) -> tuple[str, bool]:
    """``http://host:port`` -> ("host:port", ssl)."""
    ssl = url.startswith("https://")
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.rstrip("/"), ssl


@dataclass
class RemoteModel:
    url: str
    name: str
    mode: str  # "bytes" (edgekidney serve) | "tensor" (Triton and any OIP server with an FP32 input)
    input_name: str
    outputs: list[str]
    classes: list[str]
    positive_class: str
    threshold: float
    card: ModelCard | None = None  # tensor mode: preprocessing and the decision rule


class RemoteClassifier:
    def __init__(self, url: str, model_name: str = "edgekidney", sidecar: str | Path | None = None,
                 send: str = "auto", threshold: float | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0) -> None:
        http = _client_module()
        self._http = http
        from tritonclient.utils import InferenceServerException

        self._error = InferenceServerException
        host, ssl = split_url(url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = http.InferenceServerClient(host, ssl=ssl, network_timeout=timeout_s,
                                                 connection_timeout=min(timeout_s, 30.0))
        try:
            if not self.client.is_model_ready(model_name, headers=self.headers):
                raise InputError(f"{url}: model {model_name!r} is not ready (or not there)")
            meta = self.client.get_model_metadata(model_name, headers=self.headers)
        except self._error as exc:
            raise InputError(f"{url}: {exc.message()}") from None
        except (OSError, ConnectionError) as exc:
            raise InputError(f"{url}: cannot connect ({exc})") from None
        self.model = self._describe(url, model_name, meta, sidecar, send, threshold)

    def _describe(self, url, name, meta, sidecar, send, threshold) -> RemoteModel:
        inputs = {i["name"]: i for i in meta.get("inputs", [])}
        outputs = [o["name"] for o in meta.get("outputs", [])]
        takes_bytes = IMAGE_INPUT in inputs and inputs[IMAGE_INPUT]["datatype"] == "BYTES"
        if send not in ("auto", "bytes", "tensor"):
            raise InputError(f"--send {send!r}: auto | bytes | tensor")
        if send == "bytes" and not takes_bytes:
            raise InputError(f"{url}: model {name!r} takes no encoded images (input {IMAGE_INPUT!r}); use --send tensor")
        if takes_bytes and send != "tensor":
            params = meta.get("parameters") or {}
            classes = list(params.get("classes") or [])
            positive = params.get("positive_class")
            if positive not in classes:
                raise ModelError(f"{url}: model metadata names no positive class among its classes")
            thr = float(params.get("threshold", 0.5)) if threshold is None else float(threshold)
            return RemoteModel(url, name, "bytes", IMAGE_INPUT, outputs, classes, positive, thr)
        card = load_card(sidecar, verify_hash=False) if sidecar else self._card_from_config(url, name)
        fp32 = [n for n, i in inputs.items() if i["datatype"] == "FP32"]
        input_name = card.input_name if card.input_name in inputs else (fp32[0] if len(fp32) == 1 else None)
        if input_name is None:
            raise ModelError(f"{url}: model {name!r} has no FP32 input named {card.input_name!r}")
        thr = card.threshold if threshold is None else float(threshold)
        return RemoteModel(url, name, "tensor", input_name, [o for o in outputs if o in card.outputs] or ["logits"],
                           list(card.classes), card.positive_class, thr, card)

    def _card_from_config(self, url: str, name: str) -> ModelCard:
        try:
            config = self.client.get_model_config(name, headers=self.headers)
        except self._error as exc:
            raise ModelError(f"{url}: no model configuration to read the sidecar from ({exc.message()}); "
                             "pass --sidecar MODEL.json") from None
        text = ((config.get("parameters") or {}).get(SIDECAR_PARAMETER) or {}).get("string_value")
        if not text:
            raise ModelError(f"{url}: model {name!r} carries no {SIDECAR_PARAMETER} parameter (not made by "
                             "edgekidney export-triton?); pass --sidecar MODEL.json")
        return ModelCard.from_dict(json.loads(text), where=f"{url} model {name} config")

    # -- inference -----------------------------------------------------------------------------
    def predict_files(self, paths: list[Path], batch_size: int = 8, keep_going: bool = False,
                      progress: Callable[[int], None] | None = None) -> tuple[list[Prediction], list[Failure]]:
        preds: list[Prediction] = []
        failures: list[Failure] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            try:
                preds.extend(self._batch(chunk))
            except EdgeKidneyError as exc:
                if not keep_going:
                    raise
                if len(chunk) == 1:
                    failures.append(Failure(str(chunk[0]), self._file_error(chunk[0], exc)))
                else:  # find the bad file(s): one at a time
                    for p in chunk:
                        try:
                            preds.extend(self._batch([p]))
                        except EdgeKidneyError as one:
                            failures.append(Failure(str(p), self._file_error(p, one)))
            if progress:
                progress(len(chunk))
        return preds, failures

    def _file_error(self, path, exc: EdgeKidneyError) -> str:
        """The server's reason for a one-file request, said of the file ("element 0" is that file)."""
        text, prefix = str(exc), f"{self.model.url}: "
        if not text.startswith(prefix):
            return text  # said here, of the file already
        reason = text.removeprefix(prefix)
        reason = reason.removeprefix("element 0: ").replace(": element 0: ", ": ")
        return f"{path}: {reason} (server {self.model.url})"

    def _batch(self, paths: list[Path]) -> list[Prediction]:
        return self._bytes(paths) if self.model.mode == "bytes" else self._tensor(paths)

    def _infer(self, inp, outputs: list[str]):
        http = self._http
        try:
            return self.client.infer(self.model.name, [inp], headers=dict(self.headers),  # infer() writes into it
                                     outputs=[http.InferRequestedOutput(o, binary_data=True) for o in outputs])
        except self._error as exc:
            raise InputError(f"{self.model.url}: {exc.message()}") from None

    def _bytes(self, paths: list[Path]) -> list[Prediction]:
        m = self.model
        data = []
        for p in paths:
            try:
                data.append(Path(p).read_bytes())
            except OSError as exc:
                raise InputError(f"{p}: {exc.strerror}") from None
        inp = self._http.InferInput(IMAGE_INPUT, [len(data)], "BYTES")
        inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=True)
        wanted = [o for o in ("probabilities", "label", "scope_distance") if o in m.outputs]
        res = self._infer(inp, wanted)
        probs = res.as_numpy("probabilities")
        labels = [x.decode() if isinstance(x, bytes) else str(x) for x in res.as_numpy("label")]
        dist = res.as_numpy("scope_distance") if "scope_distance" in wanted else None
        pos = m.classes.index(m.positive_class)
        out = []
        for i, p in enumerate(paths):
            prob = float(probs[i, pos])
            label = labels[i]
            if label != "out_of_scope":  # a --threshold here overrides the server's
                label = m.classes[int(decide(probs[i : i + 1], pos, m.threshold)[0])]
            out.append(Prediction(str(p), prob, label, m.threshold,
                                  in_scope=None if dist is None else labels[i] != "out_of_scope",
                                  scope_distance=None if dist is None else float(dist[i])))
        return out

    def _tensor(self, paths: list[Path]) -> list[Prediction]:
        m, card = self.model, self.model.card
        x, geometries = preprocess_batch_with_geometry([load_slice(p, card.preprocessing) for p in paths],
                                                       card.preprocessing)
        inp = self._http.InferInput(m.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        wanted = [o for o in ("logits", "scope_distance", "cam") if o in m.outputs]
        res = self._infer(inp, wanted)
        outs = {o: res.as_numpy(o) for o in wanted}
        return decide_outputs(card, m.threshold, outs, geometries, x=x).predictions(paths, card, m.threshold)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RemoteClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

