"""Where the activation map looks: its peak on the calculi of synthetic phantoms (issue 13, item 5).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekidney.data.synthetic import synth_phantom, synth_slice


def test_phantom_says_where_its_calculi_are_and_synth_slice_is_its_image():
    for seed in range(12):
        stone = seed % 3 != 0
        ph = synth_phantom(np.random.default_rng(seed), 256, stone)
        assert np.array_equal(ph.hu, synth_slice(np.random.default_rng(seed), 256, stone))  # one implementation
        if not stone:
            assert ph.calculi == () and np.array_equal(ph.without_calculi, ph.hu)
            continue
        assert 1 <= len(ph.calculi) <= 3
        yy, xx = np.mgrid[0:256, 0:256]
        near = np.zeros((256, 256), bool)
        for c in ph.calculi:
            r, col = int(round(c.row)), int(round(c.col))
            assert ph.hu[r, col] > 300  # the centre is calcified (400-1200 HU plus noise) ...
            assert -60 < ph.without_calculi[r, col] < 220  # ... and lies in a kidney (cortex 150, sinus 30 HU)
            assert 2.0 <= c.radius <= 6.7  # 0.8-2 % of the slice, the other axis 0.7-1.3 times that
            near |= np.hypot(yy - c.row, xx - c.col) <= c.radius + 0.5
        changed = ph.hu != ph.without_calculi
        assert changed.any() and not (changed & ~near).any()  # same anatomy and noise everywhere else


def test_cam_cells_sit_on_the_centres_of_their_receptive_fields():
    """ResNet50's layer4 cell ``o`` is centred on input pixel ``32 o`` (each strided layer centres output
    ``o`` on input ``s o - p + (k - 1) / 2``), and the exported map has the cell's value exactly there.

    An image resize of the 8x8 map (``align_corners=False``) puts cell ``o`` at ``32 o + 15.5``: half a
    cell down and to the right of where the network looked, which this test rejects."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models import resnet50

    from edgekidney.model.heads import STRIDE, build_headed_model, cam_upsampling, cam_weights, layer4_cells
    from edgekidney.model.train import forward_parts

    torch.manual_seed(0)
    net = resnet50(num_classes=2).eval()
    for branch in ("conv2", "downsample"):  # the main path and the shortcut of each strided block
        scale, offset = 1.0, 0.0
        for layer in [net.conv1, net.maxpool] + [getattr(s[0], branch) for s in (net.layer2, net.layer3, net.layer4)]:
            layer = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
            k, s, p = (v if isinstance(v, int) else v[0] for v in (layer.kernel_size, layer.stride, layer.padding))
            offset += scale * (s * 0 - p + (k - 1) / 2)  # input position of output 0 ...
            scale *= s  # ... and of each step along the output
        assert (scale, offset) == (STRIDE, 0.0), branch

    up = cam_upsampling(3, 96)
    one_hot = np.zeros((3, 3), np.float32)
    one_hot[1, 2] = 1.0
    m = up @ one_hot @ up.T
    assert np.unravel_index(m.argmax(), m.shape) == (32, 64) and m[32, 64] == 1.0
    assert np.allclose(up.sum(axis=1), 1.0) and np.all(np.diff(up[:, 0]) <= 0)  # weights, held at the ends

    size = 96
    headed = build_headed_model(net, positive=1, image_size=size, scope=None)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        _, cam = headed(x)
        a, _, _ = forward_parts(net, x)
    w = torch.from_numpy(cam_weights(net.fc.weight.detach().numpy(), 1)).view(1, -1, 1, 1)
    coarse = (a * w).sum(dim=1).numpy()
    assert coarse.shape[1:] == (layer4_cells(size),) * 2 == (3, 3)
    np.testing.assert_allclose(cam.numpy()[:, ::STRIDE, ::STRIDE], coarse, rtol=1e-4, atol=1e-5)
    halfway = (coarse[:, 0, 0] + coarse[:, 0, 1]) / 2  # between two cells: linear in between
    np.testing.assert_allclose(cam.numpy()[:, 0, STRIDE // 2], halfway, rtol=1e-4, atol=1e-5)

