import numpy as np
import pytest
from PIL import Image

from edgekidney.data.preprocess import Preprocessing, pad_to_square, preprocess, preprocess_batch, resize, window_hu


def test_window_maps_abdomen_window_to_unit_range():
    hu = np.array([-1000, -160, 40, 240, 1500], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu, 40, 400), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(256, 224), (512, 224), (256, 64), (50, 128)])
def test_resize_matches_pillow_bilinear_with_antialiasing(n_in, n_out):
    a = np.random.default_rng(0).random((n_in, n_in)).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, "F").resize((n_out, n_out), Image.BILINEAR))
    np.testing.assert_allclose(resize(a, n_out), ref, atol=1e-5)


def test_pad_to_square_centres_on_air():
    img = np.ones((20, 40), dtype=np.float32)
    sq = pad_to_square(img)
    assert sq.shape == (40, 40)
    assert sq[:10].sum() == 0 and sq[30:].sum() == 0 and sq[10:30].min() == 1


def test_preprocess_normalizes_each_channel_with_stored_mean_and_std():
    cfg = Preprocessing(image_size=32)
    out = preprocess(np.full((64, 64), 0.5, dtype=np.float32), cfg)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    expected = (0.5 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(out[:, 5, 5], expected, atol=1e-6)


def test_preprocess_batch_stacks_and_handles_empty():
    cfg = Preprocessing(image_size=32)
    assert preprocess_batch([np.zeros((40, 40)), np.ones((40, 50))], cfg).shape == (2, 3, 32, 32)
    assert preprocess_batch([], cfg).shape == (0, 3, 32, 32)


def test_preprocessing_round_trips_through_json_dict():
    cfg = Preprocessing(image_size=96, window_center=50, window_width=350, png16_hu_offset=1024)
    assert Preprocessing.from_dict(cfg.to_dict()) == cfg


def test_preprocessing_rejects_nonsense():
    with pytest.raises(ValueError):
        Preprocessing(image_size=16)
    with pytest.raises(ValueError):
        Preprocessing(window_width=0)
    with pytest.raises(ValueError):
        preprocess(np.zeros((3, 40, 40)), Preprocessing(image_size=32))
