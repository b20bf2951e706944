"""The exported network: ResNet50 logits plus two heads computed in the graph (needs torch).

- ``scope_distance`` (N,): the smallest Mahalanobis distance of the pooled layer4 features to a class
  mean, fitted on the training split (:mod:`edgekidney.scope`). In the graph: the differences to the
  class means, one MatMul with the (D, 256) principal axes, squares weighted by the inverse
  variances, the rest of the squared norm weighted by the residual variance, a sum and a min.
- ``cam`` (N, S, S): the class activation map (Zhou et al. 2016). With global average pooling and one
  linear layer, the positive class's logit against the mean of the others is the spatial mean of
  ``sum_k w_k A_k(x, y)`` with ``w = W_pos - mean(W_others)``; that map over layer4's A is upsampled
  bilinearly to the input grid. No gradients: it runs in ONNX Runtime, INT8 and TensorRT alike.

Both heads stay in FP32 when the model is quantized (see :func:`edgekidney.optimize.graph.head_nodes`).
"""

from __future__ import annotations

import numpy as np

OUTPUTS = ("logits", "scope_distance", "cam")


def cam_weights(fc_weight: np.ndarray, positive: int) -> np.ndarray:
    """(classes, D) classifier weights -> (D,) weights of the positive class against the rest."""
    w = np.asarray(fc_weight, dtype=np.float32)
    others = np.delete(w, positive, axis=0)
    return w[positive] - others.mean(axis=0)


def build_headed_model(model, positive: int, image_size: int, scope: dict | None):
    """Wrap a torchvision ResNet50 so that it returns (logits, scope_distance, cam) or (logits, cam)."""
    import torch
    import torch.nn.functional as F

    from edgekidney.model.train import forward_parts

    class Headed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            w = cam_weights(model.fc.weight.detach().cpu().numpy(), positive)
            self.register_buffer("cam_w", torch.from_numpy(w).view(1, -1, 1, 1))
            self.has_scope = scope is not None
            if self.has_scope:
                for name in ("means", "basis", "inv_var", "res_inv_var"):
                    self.register_buffer(name, torch.as_tensor(np.asarray(scope[name]), dtype=torch.float32))

        def forward(self, x):
            a, pooled, logits = forward_parts(self.net, x)
            cam = (a * self.cam_w).sum(dim=1, keepdim=True)
            cam = F.interpolate(cam, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
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
