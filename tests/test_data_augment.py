"""TF augmentation ops against PIL / torchvision semantics."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from tcl_jax.data import augment as A  # noqa: E402

RNG = np.random.default_rng(0)
IMG = (RNG.beta(2, 5, size=(40, 50, 3)) * 200 + 20).astype(np.uint8)


def _tf(fn, m=9.0, sign=1.0):
    return fn(tf.constant(IMG, tf.float32), tf.constant(m), tf.constant(sign)).numpy()


def test_pointwise_ops_match_pil():
    pil = Image.fromarray(IMG)
    np.testing.assert_array_equal(_tf(A._equalize), np.asarray(ImageOps.equalize(pil)))
    assert np.abs(_tf(A._auto_contrast) - np.asarray(ImageOps.autocontrast(pil))).max() <= 1
    np.testing.assert_array_equal(_tf(A._invert), np.asarray(ImageOps.invert(pil)))
    # m=9: posterize to 4 - int(3.6) = 1 bit; solarize threshold 256 - int(230.4) = 26
    np.testing.assert_array_equal(_tf(A._posterize), np.asarray(ImageOps.posterize(pil, 1)))
    np.testing.assert_array_equal(_tf(A._solarize), np.asarray(ImageOps.solarize(pil, 26)))


def test_translate_and_erasing_shapes():
    out = _tf(A._translate_x, m=10.0, sign=1.0)  # shift by round(0.45 * 50) = 22 pixels
    np.testing.assert_array_equal(out[:, :28], IMG[:, 22:])
    np.testing.assert_array_equal(out[0, 28:], np.tile([124, 116, 104], (22, 1)))
    x = tf.zeros([64, 64, 3])
    erased = A.random_erasing(x, tf.constant([1, 2], tf.int64), 1.0).numpy()
    frac = (erased != 0).any(-1).mean()
    assert 0.02 * 0.9 <= frac <= 1 / 3 * 1.1
    np.testing.assert_array_equal(A.random_erasing(x, tf.constant([1, 2], tf.int64), 0.0), x)


def test_random_resized_crop_window_in_bounds_and_seeded():
    wins = [tuple(int(v) for v in A.random_resized_crop_window(
        tf.constant([0, i], tf.int64), 300, 500)) for i in range(50)]
    for t, l, h, w in wins:
        assert 0 <= t and t + h <= 300 and 0 <= l and l + w <= 500
        assert 0.08 * 0.9 <= h * w / (300 * 500) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert len(set(wins)) > 40
    again = tuple(int(v) for v in A.random_resized_crop_window(tf.constant([0, 3], tf.int64), 300, 500))
    assert again == wins[3]
