"""The losses of the stone map (needs torch): dense where the stone is known, multiple-instance where not.

- :func:`map_targets`: a mask on the input grid -> one target per map cell. Cell ``o`` is centred on
  input pixel ``stride * o`` (see :mod:`edgekidney.model.network`), so it takes the mask's maximum
  over the ``stride`` pixels centred there, not over the block that starts there.
- :func:`dense_map_loss`: binary cross-entropy per cell, stones up-weighted (``pos_weight``: a stone
  covers a few of 1,024 cells), on the slices whose map is known: masked Stone slices, placed-calculus
  twins, and every slice of another class (no stone anywhere).
- :func:`not_class_loss`: -log(1 - p(class)) per slice, for a slice known only not to be that class (an
  erased-stone twin: which of the other classes it would show is not known).
- :func:`mil_map_loss`: the map's maximum must be low on every slice without a stone (and high on a
  Stone slice, where it is used: see its docstring for why training does not, from scratch).
"""

from __future__ import annotations


def map_targets(masks, cells: int, stride: int, threshold: float = 0.1):
    """(N, S, S) masks in 0..1 -> (N, cells, cells) float targets in {0, 1}."""
    import torch
    import torch.nn.functional as F

    half = stride // 2
    padded = F.pad(masks.unsqueeze(1), (half, stride - half, half, stride - half))
    pooled = F.max_pool2d(padded, kernel_size=stride, stride=stride, ceil_mode=True)[:, 0]
    # pixels past the last cell's centre + half a stride belong to the last cell (the map has no more)
    rows = torch.cat([pooled[:, : cells - 1], pooled[:, cells - 1 :].amax(dim=1, keepdim=True)], dim=1)
    out = torch.cat([rows[:, :, : cells - 1], rows[:, :, cells - 1 :].amax(dim=2, keepdim=True)], dim=2)
    return (out > threshold).to(masks.dtype)


def dense_map_loss(map_logits, targets, known, pos_weight: float = 10.0):
    """Mean per-cell BCE over the slices whose target is known (``known`` (N,) bool); 0 when none is."""
    import torch
    import torch.nn.functional as F

    if not bool(known.any()):
        return map_logits.sum() * 0.0
    z, t = map_logits[known].float(), targets[known].float()
    return F.binary_cross_entropy_with_logits(z, t, pos_weight=torch.tensor(pos_weight, device=z.device))


def mil_map_loss(map_logits, is_stone, only=None):
    """BCE of the map's maximum against the slice label (stone or not), over the slices ``only`` selects.

    On a slice without a stone it is hard-negative mining: the highest cell, wherever it is, is pushed
    down. On a Stone slice nobody outlined it pushes up whatever cell is highest, which teaches the
    right place only once the map already finds it (trained from scratch it taught the spine), so the
    training loop uses it on the slices without a stone.
    """
    import torch.nn.functional as F

    peak = map_logits.flatten(1).amax(dim=1).float()
    target = is_stone.float()
    if only is not None:
        if not bool(only.any()):
            return map_logits.sum() * 0.0
        peak, target = peak[only], target[only]
    return F.binary_cross_entropy_with_logits(peak, target)


def not_class_loss(logits, cls: int):
    """(N, C) logits -> (N,) ``-log(1 - softmax(logits)[:, cls])``, computed stably in log space."""
    import torch

    others = [c for c in range(logits.shape[1]) if c != cls]
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, others], dim=1)
