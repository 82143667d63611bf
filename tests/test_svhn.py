"""The SVHN source: the official .mat layout (X [32, 32, 3, N], y in 1..10 with 10 = digit 0) read into a Dataset."""
import numpy as np
import pytest
import scipy.io

import kdjax.data as kd
from kdjax.data import archives, svhn


def _write_mat(path, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = rng.integers(0, 10, n)
    digits[:2] = (0, 9)
    scipy.io.savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None]})
    return images, digits


@pytest.fixture
def svhn_dir(tmp_path, monkeypatch):
    expected = {}
    for split, n, seed in (("train", 12, 0), ("test", 5, 1)):
        path = tmp_path / svhn.SVHN_FILES[split].filename
        expected[split] = _write_mat(path, n, seed)
        # the fabricated file stands in for the official one: its md5 replaces the published one
        monkeypatch.setitem(svhn.SVHN_FILES, split, archives.Archive(path.name, archives.file_md5(path), "x"))
    return tmp_path, expected


def test_svhn_images_and_labels(svhn_dir):
    folder, expected = svhn_dir
    data = kd.load("svhn", data_dir=folder, manual_dir=folder)
    assert (data.num_classes, data.image_size, data.mean, data.std) == (10, 32, (0.5,) * 3, (0.5,) * 3)
    for split in ("train", "test"):
        np.testing.assert_array_equal(data.images(split), expected[split][0])
        np.testing.assert_array_equal(data.labels(split), expected[split][1])
    assert data.train_labels[0] == 0   # 10 in the file is the digit 0


def test_svhn_resize(svhn_dir):
    folder, _ = svhn_dir
    assert kd.load("svhn", data_dir=folder, manual_dir=folder, image_size=16).train_images.shape == (12, 16, 16, 3)


def test_svhn_missing_and_damaged_files(tmp_path, svhn_dir):
    folder, _ = svhn_dir
    with pytest.raises(kd.DataNotFoundError, match=r"train_32x32\.mat does not exist"):
        kd.load("svhn", data_dir=tmp_path / "empty", manual_dir=tmp_path / "empty")
    with pytest.raises(kd.ChecksumError, match=r"test_32x32\.mat has md5"):
        (folder / "test_32x32.mat").write_bytes(b"not a mat file")
        kd.load("svhn", data_dir=folder, manual_dir=folder)
    with pytest.raises(ValueError, match=r"test_32x32\.mat is not a readable MATLAB file") as info:
        svhn.load_svhn(data_dir=folder, manual_dir=folder, verify=False)
    assert "\n" not in str(info.value)


def test_svhn_wrong_layout_is_refused(tmp_path):
    scipy.io.savemat(tmp_path / "x.mat", {"X": np.zeros((3, 32, 32, 4), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(ValueError, match=r"expected uint8 \[32, 32, 3, N\]"):
        svhn.read_svhn_mat(tmp_path / "x.mat")
