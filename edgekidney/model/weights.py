"""Network weights: ImageNet from torchvision, a local file for air-gapped sites, a released model, or none
(needs torch).

``build_model`` makes torchvision's ResNet50 with the classes' final layer, loads the weights asked for
(checked by sha256 when one is given) and, for ``arch="resnet50-stonemap"``, adds the stone map
(:mod:`edgekidney.model.network`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from edgekidney.errors import DependencyError, InputError
from edgekidney.model.from_graph import FOLDED_FLAG, graph_file, state_from_graph
from edgekidney.model.network import ARCH_PLAIN, build_network
from edgekidney.released import RELEASED
from edgekidney.sidecar import sha256_of

IMAGENET_HINT = ("pass --weights PATH to a local torchvision ResNet50 state dict "
                 f"(resnet50-11ad3fa6.pth, IMAGENET1K_V2), a released model (--weights {RELEASED}) "
                 "or --weights none")


def require_torch():
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        raise DependencyError("training needs PyTorch: pip install 'edgekidney[train]'") from None
    return torch


def build_model(num_classes: int, weights: str = "none", weights_sha256: str | None = None,
                arch: str = ARCH_PLAIN, positive: int = 0):
    """torchvision ResNet50 with its final layer replaced (and the stone map for ``arch="resnet50-stonemap"``).

    Returns (model, description of the weights).
    """
    source = ""
    # a local file is read (and its sha256 checked) once: its ResNet50 goes into the backbone, and from a
    # stone-map checkpoint the map, the link and the classifier come along; a released model (by name or
    # folder) or an exported graph is read back from its FP16/FP32 form (model/from_graph.py)
    graph = None if weights in ("imagenet", "none") else graph_file(weights)
    if graph is not None:
        state, digest = read_graph_weights(graph, weights_sha256)
        weights = str(graph)
    else:
        state, digest = (None, "") if weights in ("imagenet", "none") else read_weights_file(Path(weights),
                                                                                          weights_sha256)

    def resnet(n: int):
        nonlocal source
        model, source = _resnet50(n, weights, state, digest)
        return model

    network = build_network(num_classes, positive, arch, resnet)
    if arch != ARCH_PLAIN and state is not None:
        carried = carry_heads(network, state)
        if carried:
            source += f", with its {' and '.join(carried)}"
    if graph is not None:
        setattr(network, FOLDED_FLAG, True)  # its BatchNorms need statistics before they train
    return network, source


def read_graph_weights(graph: Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The state dict of the network an exported graph holds, and the graph's sha256 (checked when given)."""
    if not graph.is_file():
        raise InputError(f"{graph}: no such model file")
    digest = checked_sha256(graph, expected_sha256)
    return state_from_graph(graph), digest


def checked_sha256(path: Path, expected_sha256: str | None) -> str:
    """The file's sha256; a one-line error when it is not the one expected."""
    digest = sha256_of(path)
    if expected_sha256 and digest.lower() != expected_sha256.lower().strip():
        raise InputError(f"{path}: sha256 is {digest}, expected {expected_sha256}")
    return digest


def carry_heads(network, state: dict) -> list[str]:
    """Load what an edgekidney stone-map checkpoint's ``state`` adds to ResNet50 (the map and its link, and
    the classifier when the classes match) into ``network``; returns what was loaded.

    Fine-tuning a stone-map run again (``--weights RUN/model.pt``) then continues where that run stopped
    instead of teaching a new map from random weights. A plain ResNet50 state dict carries nothing here.
    """
    own = network.state_dict()
    fits = {k: v for k, v in state.items()  # not the map gate: it is fitted after training (model/gate.py)
            if k in own and tuple(v.shape) == tuple(own[k].shape) and not k.startswith("net.") and k != "map_gate"}
    fc = {k: v for k, v in state.items() if k.startswith("net.fc.") and k in own and v.shape == own[k].shape}
    carried = []
    if any(k.startswith("stone_map.") for k in fits):
        network.load_state_dict(fits, strict=False)
        carried.append("stone map")
        if len(fc) == 2:
            network.load_state_dict(fc, strict=False)
            carried.append("classifier")
    return carried


def _resnet50(num_classes: int, weights: str, state: dict | None, digest: str):
    """``state``: the state dict of the local file ``weights`` (read by :func:`read_weights_file`), else None."""
    torch = require_torch()
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(ResNet50_Weights.IMAGENET1K_V2))
        source = "torchvision ResNet50_Weights.IMAGENET1K_V2"
    elif weights == "none":
        source = "none (random initialisation)"
    else:
        _load_backbone(model, backbone_of(state), weights)
        source = f"{weights} (sha256 {digest})"
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model, source


def _imagenet_state_dict(enum):
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub prints 'Downloading: "https://..."'
            return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, SSL errors
        reason = " ".join(str(exc).split())[:120]
        raise InputError(f"cannot download ImageNet weights ({reason}); {IMAGENET_HINT}") from None


def load_weights_file(path: Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The ResNet50 state dict of a local file (a state dict, or a checkpoint holding one), its sha256
    verified when one is given."""
    state, digest = read_weights_file(path, expected_sha256)
    return backbone_of(state), digest


def read_weights_file(path: Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The whole state dict of a local file (DDP's ``module.`` prefix removed) and the file's sha256."""
    torch = require_torch()
    if not path.exists():
        raise InputError(f"{path}: no such weights file; {IMAGENET_HINT}")
    digest = checked_sha256(path, expected_sha256)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a PyTorch weights file ({' '.join(str(exc).split())[:120]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise InputError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}, digest


def backbone_of(state: dict) -> dict:
    """The ResNet50 in a state dict: all of a plain one, the ``net.`` part of an edgekidney stone-map checkpoint."""
    if any(k.startswith("net.") for k in state):
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    return state


def _load_backbone(model, state: dict, where: str) -> None:
    """Load every backbone tensor; the classifier (fc) is replaced anyway."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in own if not k.startswith("fc.") and k not in backbone]
    bad = [k for k, v in backbone.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or bad or not backbone:
        detail = f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else (
            f"shape mismatch at {bad[0]}" if bad else "no tensors")
        raise InputError(f"{where}: not a ResNet50 state dict ({detail})")
    model.load_state_dict(backbone, strict=False)


def resolve_device(device: str):
    torch = require_torch()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to PyTorch; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)
