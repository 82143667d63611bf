"""The host ImageNet transforms against torchvision's on the same JPEG bytes and the same parameters (fixture written
by tests/fixtures/make_imagenet_transform_fixture.py), and the crop-parameter distribution's invariants."""
import math

import numpy as np
import pytest
from conftest import FIXTURES

from kdjax.data.streamed import transforms

# Same decoder and resampler (Pillow) as torchvision's PIL path: equal when the Pillow builds agree (the fixture's
# was 13.0.0, as this venv's); a different libjpeg or Pillow resampler moves pixels by a few levels at most.
MAX_LEVEL_DIFF = 3
MEAN_LEVEL_DIFF = 0.5


@pytest.fixture(scope="module")
def torchvision_ref():
    return dict(np.load(FIXTURES / "imagenet_transforms_torchvision.npz"))


def _jpeg(ref, i):
    return ref[f"jpeg_{i}"].tobytes()


def _close(ours, theirs):
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= MAX_LEVEL_DIFF and diff.mean() <= MEAN_LEVEL_DIFF, (diff.max(), diff.mean())
    return diff


def test_resized_crop_matches_torchvision(torchvision_ref):
    diffs = []
    for (i, top, left, h, w), expected in zip(torchvision_ref["crops"], torchvision_ref["crop_out"]):
        image = transforms.decode_rgb(_jpeg(torchvision_ref, i))
        ours = transforms.resized_crop(image, int(top), int(left), int(h), int(w), 32)
        assert ours.dtype == np.uint8 and ours.shape == (32, 32, 3)
        diffs.append(_close(ours, expected).max())
    print("max level difference per crop:", diffs)


def test_resize_center_crop_matches_torchvision(torchvision_ref):
    for i, expected in enumerate(torchvision_ref["center_out"]):
        _close(transforms.test_transform(_jpeg(torchvision_ref, i), size=32, resize=40), expected)


def test_a_wrong_crop_is_detected(torchvision_ref):
    # the comparison can fail: the crop shifted by one pixel is not torchvision's
    i, top, left, h, w = (int(v) for v in torchvision_ref["crops"][1])
    image = transforms.decode_rgb(_jpeg(torchvision_ref, i))
    shifted = transforms.resized_crop(image, top + 1, left + 1, h, w, 32)
    assert np.abs(shifted.astype(int) - torchvision_ref["crop_out"][1].astype(int)).mean() > MEAN_LEVEL_DIFF


def test_fallback_crop_is_torchvisions(torchvision_ref):
    rng = np.random.default_rng(0)
    for height, width, *expected in torchvision_ref["fallback"].tolist():
        assert list(transforms.random_resized_crop_params(rng, height, width, scale=(2.0, 3.0))) == expected


def test_resize_shape_and_center_box_follow_torchvision():
    assert transforms.resized_shape(375, 500) == (256, 341)   # int(256 * 500 / 375) = 341
    assert transforms.resized_shape(500, 375) == (341, 256)
    assert transforms.resized_shape(300, 300) == (256, 256)
    assert transforms.center_crop_box(256, 341) == (16, 58)   # round(117 / 2) = 58 (half to even)


def test_random_resized_crop_params_distribution(torchvision_ref):
    """Our draws and torchvision's (fixture: 20000 draws on a 375x500 image) agree in the mean and spread of the
    area share and the log aspect ratio, to a few standard errors."""
    rng = np.random.default_rng(1)
    height, width = 375, 500
    draws = np.array([transforms.random_resized_crop_params(rng, height, width) for _ in range(20000)])
    top, left, h, w = draws.T
    assert (top >= 0).all() and (top <= height - h).all() and (left >= 0).all() and (left <= width - w).all()
    share, log_ratio = h * w / (height * width), np.log(w / h)
    ours = np.array([share.mean(), share.std(), log_ratio.mean(), log_ratio.std()])
    theirs = torchvision_ref["rrc_stats"]
    standard_error = theirs[[1, 1, 3, 3]] / math.sqrt(len(draws)) * np.array([1, 0.8, 1, 0.8])
    assert np.all(np.abs(ours - theirs) < 5 * standard_error), (ours, theirs)
    assert 0.075 < share.min() < 0.09 and share.max() <= 1.0


def test_train_transform_is_a_function_of_the_example_rng(torchvision_ref):
    data = _jpeg(torchvision_ref, 0)
    a = transforms.train_transform(data, transforms.example_rng(3, 1, 42), 32)
    b = transforms.train_transform(data, transforms.example_rng(3, 1, 42), 32)
    c = transforms.train_transform(data, transforms.example_rng(3, 2, 42), 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_transform_is_crop_then_flip(torchvision_ref):
    data = _jpeg(torchvision_ref, 2)
    for index in range(6):
        rng = transforms.example_rng(0, 0, index)
        out = transforms.train_transform(data, rng, 32)
        replay = transforms.example_rng(0, 0, index)
        image = transforms.decode_rgb(data)
        crop = transforms.resized_crop(image, *transforms.random_resized_crop_params(replay, image.height,
                                                                                     image.width), 32)
        flipped = replay.random() < 0.5
        np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
