"""The exported network: ResNet50 logits plus two heads computed in the graph (needs torch).

- ``scope_distance`` (N,): the smallest Mahalanobis distance of the pooled layer4 features to a class
  mean, fitted on the training split (:mod:`edgekidney.scope`). In the graph: the differences to the
  class means, one MatMul with the (D, 256) principal axes, squares weighted by the inverse
  variances, the rest of the squared norm weighted by the residual variance, a sum and a min.
- ``cam`` (N, S, S): for a model with a stone map (``resnet50-stonemap``, :mod:`edgekidney.model.network`)
  the map itself: the probability that each stride-8 cell holds a stone, each cell put on its
  receptive field's centre (input pixel ``8 * cell``) and interpolated between cells. For a plain
  ResNet50, the class activation map (Zhou et al. 2016). With global average pooling and one
  linear layer, the positive class's logit against the mean of the others is the mean over layer4's grid
  of ``sum_k w_k A_k(x, y)`` (plus the bias term) with ``w = W_pos - mean(W_others)``; that map is upsampled
  bilinearly to the input grid with each cell at the centre of its receptive field, input pixel
  ``32 * cell`` (:func:`cam_upsampling`), not at the centre of a 32-pixel block as an image resize would
  put it: that was half a cell (15.5 px) down and to the right of where the network looked. No
  gradients: it runs in ONNX Runtime, INT8 and TensorRT alike.

Both heads stay in FP32 when the model is quantized (see :func:`edgekidney.optimize.graph.head_nodes`).
"""

from __future__ import annotations

import numpy as np

OUTPUTS = ("logits", "scope_distance", "cam")
STRIDE = 32  # input pixels per layer4 cell in ResNet50


def layer4_cells(image_size: int) -> int:
    """Side of ResNet50's layer4 grid for a square input (each stride-2 stage rounds up)."""
    return -(-image_size // STRIDE)


def cam_upsampling(cells: int, size: int, stride: int = STRIDE) -> np.ndarray:
    """(size, cells) linear-interpolation weights from layer4 cells to input pixels, along one axis.

    ResNet50's strided layers (7x7/2 pad 3, 3x3/2 pad 1 max pool, 3x3/2 pad 1 and 1x1/2 in layers 2-4)
    each centre output ``o`` on input ``2 o``, so layer4 cell ``o`` is centred on input pixel ``stride * o``.
    Pixel ``p`` takes the value at cell coordinate ``p / stride``, held at the first and last cell
    beyond their centres. ``rows @ map @ cols.T`` upsamples a map: two MatMuls in the graph.
    """
    u = np.clip(np.arange(size, dtype=np.float64) / stride, 0, cells - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, cells - 1)
    frac = u - lo
    m = np.zeros((size, cells), dtype=np.float64)
    np.add.at(m, (np.arange(size), lo), 1 - frac)
    np.add.at(m, (np.arange(size), hi), frac)
    return m.astype(np.float32)


def cam_weights(fc_weight: np.ndarray, positive: int) -> np.ndarray:
    """(classes, D) classifier weights -> (D,) weights of the positive class against the rest."""
    w = np.asarray(fc_weight, dtype=np.float32)
    others = np.delete(w, positive, axis=0)
    return w[positive] - others.mean(axis=0)


def build_headed_model(model, positive: int, image_size: int, scope: dict | None):
    """Wrap a torchvision ResNet50 so that it returns (logits, scope_distance, cam) or (logits, cam)."""
    import torch

    from edgekidney.model.network import ARCH_STONE_MAP, MAP_STRIDE, arch_of, forward_parts, map_cells

    stone_map = arch_of(model) == ARCH_STONE_MAP

    class Headed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            w = cam_weights(model.fc.weight.detach().cpu().numpy(), positive)
            self.register_buffer("cam_w", torch.from_numpy(w).view(1, -1, 1, 1))
            up = (cam_upsampling(map_cells(image_size), image_size, MAP_STRIDE) if stone_map
                  else cam_upsampling(layer4_cells(image_size), image_size))
            self.register_buffer("cam_up", torch.from_numpy(up))
            self.has_scope = scope is not None
            if self.has_scope:
                for name in ("means", "basis", "inv_var", "res_inv_var"):
                    self.register_buffer(name, torch.as_tensor(np.asarray(scope[name]), dtype=torch.float32))

        def forward(self, x):
            a, pooled, logits, map_logits = forward_parts(self.net, x)
            if stone_map:
                cam = torch.sigmoid(map_logits)  # (N, cells, cells): P(stone) per stride-8 cell
            else:
                cam = (a * self.cam_w).sum(dim=1)  # (N, cells, cells)
            cam = self.cam_up @ cam @ self.cam_up.T  # (N, S, S): each cell on its receptive field's centre
            if not self.has_scope:
                return logits, cam
            diff = pooled.unsqueeze(1) - self.means.unsqueeze(0)  # (N, C, D)
            proj = diff @ self.basis  # (N, C, k)
            p2 = (proj * proj).sum(dim=2)
            inside = (proj * proj * self.inv_var).sum(dim=2)
            rest = torch.clamp((diff * diff).sum(dim=2) - p2, min=0.0) * self.res_inv_var
            dist = (inside + rest).amin(dim=1) / self.means.shape[1]
            return logits, dist, cam

    return Headed().eval()


def output_names(has_scope: bool) -> list[str]:
    return ["logits", "scope_distance", "cam"] if has_scope else ["logits", "cam"]
