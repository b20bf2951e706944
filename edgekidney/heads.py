"""The exported network: ResNet50 logits plus two heads computed in the graph (needs torch).

- ``scope_distance`` (N,): the smallest Mahalanobis distance of the pooled layer4 features to a class
  mean, fitted on the training split (:mod:`edgekidney.scope`). In the graph it is one MatMul with the
  whitening matrix, a subtraction of the whitened class means, squares, a sum and a min.
- ``cam`` (N, S, S): the class activation map (Zhou et al. 2016). With global average pooling and one
  linear layer, the positive class's logit against the mean of the others is the spatial mean of
  ``sum_k w_k A_k(x, y)`` with ``w = W_pos - mean(W_others)``; that map over layer4's A is upsampled
  bilinearly to the input grid. No gradients: it runs in ONNX Runtime, INT8 and TensorRT alike.

Both heads stay in FP32 when the model is quantized (see :func:`edgekidney.graph.head_nodes`).
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

    from .train import forward_parts

    class Headed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            w = cam_weights(model.fc.weight.detach().cpu().numpy(), positive)
            self.register_buffer("cam_w", torch.from_numpy(w).view(1, -1, 1, 1))
            self.has_scope = scope is not None
            if self.has_scope:
                self.register_buffer("whitening", torch.as_tensor(np.asarray(scope["whitening"]), dtype=torch.float32))
                self.register_buffer("centers", torch.as_tensor(np.asarray(scope["centers"]), dtype=torch.float32))

        def forward(self, x):
            a, pooled, logits = forward_parts(self.net, x)
            cam = (a * self.cam_w).sum(dim=1, keepdim=True)
            cam = F.interpolate(cam, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
            if not self.has_scope:
                return logits, cam
            z = pooled @ self.whitening
            dist = ((z.unsqueeze(1) - self.centers.unsqueeze(0)) ** 2).sum(dim=2).amin(dim=1)
            return logits, dist, cam

    return Headed().eval()


def output_names(has_scope: bool) -> list[str]:
    return ["logits", "scope_distance", "cam"] if has_scope else ["logits", "cam"]
