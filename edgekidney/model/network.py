"""The network: torchvision ResNet50 and the stone-map head it is trained with (needs torch).

``StoneNet`` is ResNet50 plus a **stone map**: a small top-down fusion of layer2 (stride 8, 512
channels) and layer3 (stride 16, 1024 channels, upsampled to layer2's grid): two 1x1 lateral
convolutions, a 3x3 convolution with GroupNorm and leaky ReLU, a 1x1 convolution to one logit per cell.
Cell ``o`` of the stride-8 grid is centred on input pixel ``8 o`` (every strided layer of ResNet50
centres output ``o`` on input ``2 o``), so on a 256 px input the map has 32 x 32 cells 8 px apart: a
3 mm calculus covers one cell instead of a fraction of a 32-pixel layer4 cell.

The slice decision reads the map: the stone class's logit gets ``map_weight * max(map logits)`` added
(a multiple-instance link: a slice holds a stone where some cell does), and, once training has fitted
it (:mod:`edgekidney.model.gate`), a **map gate**: ``GATE_SLOPE * relu(map_gate - peak)`` taken off
again, so that a slice whose map finds no stone cannot be called stone by its look alone. The classifier over the
pooled layer4 features still sees the whole slice (and tells Cyst, Tumor and Normal apart); the
pooled features also feed the out-of-scope distance. See docs/architecture.md rule 11 and "The stone map".

Plain ResNet50 checkpoints (``arch: resnet50``, from before the map) load as they were and keep the
class activation map of layer4 as their ``cam`` output.
"""

from __future__ import annotations

import math

ARCH_PLAIN = "resnet50"
ARCH_STONE_MAP = "resnet50-stonemap"
MAP_STRIDE = 8
MAP_PRIOR = 0.01  # initial probability of a cell being stone: the map starts quiet (focal-loss prior)
GATE_OFF = -1.0e4  # the map gate's value while training and in checkpoints from before it: no effect
GATE_SLOPE = 10.0  # stone logits taken off per map logit the peak falls short of the gate


def _torch():
    import torch

    return torch


def make_stone_map_head(width: int = 128):
    """layer2 (512 ch, stride 8) + layer3 (1024 ch, stride 16) -> one logit per stride-8 cell."""
    torch = _torch()
    nn = torch.nn
    import torch.nn.functional as F

    class StoneMapHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lateral2 = nn.Conv2d(512, width, 1)
            self.lateral3 = nn.Conv2d(1024, width, 1)
            # GroupNorm: the same in training and evaluation, whatever the batch; leaky: a map pushed down
            # everywhere by the negatives cannot die flat (seen with BatchNorm + ReLU: the peak fell on
            # cell (0, 0) of every slice while the classifier kept learning)
            self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(16, width),
                                      nn.LeakyReLU(0.1, inplace=True))
            self.out = nn.Conv2d(width, 1, 1)
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.constant_(self.out.bias, -math.log((1 - MAP_PRIOR) / MAP_PRIOR))

        def forward(self, f2, f3):
            top = F.interpolate(self.lateral3(f3), size=f2.shape[-2:], mode="nearest")
            return self.out(self.fuse(self.lateral2(f2) + top))[:, 0]  # (N, h, w) logits

    return StoneMapHead()


def make_stone_net(resnet, positive: int):
    """A torchvision ResNet50 (its ``fc`` already sized to the classes) with the stone map and its link."""
    torch = _torch()
    nn = torch.nn

    class StoneNet(nn.Module):
        arch = ARCH_STONE_MAP

        def __init__(self) -> None:
            super().__init__()
            self.net = resnet
            self.stone_map = make_stone_map_head()
            self.map_weight = nn.Parameter(torch.tensor(1.0))
            onehot = torch.zeros(resnet.fc.out_features)
            onehot[positive] = 1.0
            self.register_buffer("positive_onehot", onehot)
            self.register_buffer("map_gate", torch.tensor(GATE_OFF))  # a map-logit level (model/gate.py)

        @property
        def fc(self):
            return self.net.fc

        def parts(self, x):
            """-> (layer4 maps, pooled features, logits, map logits (N, h, w) on the stride-8 grid)."""
            m = self.net
            f1 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
            f2 = m.layer2(f1)
            f3 = m.layer3(f2)
            a = m.layer4(f3)
            pooled = a.mean(dim=(2, 3))
            map_logits = self.stone_map(f2, f3)
            # the link reads the peak but does not train the map: the cross-entropy of every Stone slice
            # would push up whatever cell is highest, right or wrong (it made the spine the "stone")
            peak = map_logits.flatten(1).amax(dim=1).detach()
            link = self.map_weight * peak - GATE_SLOPE * torch.relu(self.map_gate - peak)
            logits = m.fc(pooled) + self.positive_onehot * link.unsqueeze(1)
            return a, pooled, logits, map_logits

        def forward(self, x, with_map: bool = False):
            """Logits, or (logits, map logits) with ``with_map`` (what the training loop asks through DDP)."""
            _, _, logits, map_logits = self.parts(x)
            return (logits, map_logits) if with_map else logits

    return StoneNet()


def arch_of(model) -> str:
    return getattr(model, "arch", ARCH_PLAIN)


def forward_parts(model, x):
    """(layer4 maps, pooled features, logits, map logits or None): what the heads and losses are built on."""
    if arch_of(model) == ARCH_STONE_MAP:
        return model.parts(x)
    m = model
    a = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    pooled = a.mean(dim=(2, 3))
    return a, pooled, m.fc(pooled), None


def predict_outputs(model, x, device, batch_size: int = 64) -> dict:
    """Eval-mode outputs of a batch of inputs: pooled features (N, 2048), logits, and with a stone map its
    peak cell (N, 2) and peak logit (N,)."""
    import numpy as np

    torch = _torch()
    model.eval()
    feats, logits, peaks, tops = [], [], [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            _, f, z, m = forward_parts(model, torch.from_numpy(x[i : i + batch_size]).to(device))
            feats.append(f.float().cpu().numpy())
            logits.append(z.float().cpu().numpy())
            if m is not None:
                flat = m.flatten(1).argmax(dim=1).cpu().numpy()
                peaks.append(np.stack([flat // m.shape[2], flat % m.shape[2]], axis=1).astype(np.float32))
                tops.append(m.flatten(1).amax(dim=1).float().cpu().numpy())
    out = {"features": np.concatenate(feats), "logits": np.concatenate(logits)}
    if peaks:
        out["peak_cell"], out["peak_logit"] = np.concatenate(peaks), np.concatenate(tops)
    return out


def map_cells(image_size: int, stride: int = MAP_STRIDE) -> int:
    """Side of the map's grid for a square input (each stride-2 stage rounds up)."""
    return -(-image_size // stride)


def build_network(num_classes: int, positive: int, arch: str, resnet_factory) -> object:
    """``resnet_factory(num_classes)`` -> ResNet50; wrapped with the stone map for ``ARCH_STONE_MAP``."""
    resnet = resnet_factory(num_classes)
    if arch == ARCH_STONE_MAP:
        return make_stone_net(resnet, positive)
    if arch != ARCH_PLAIN:
        raise ValueError(f"unknown architecture {arch!r}")
    return resnet
