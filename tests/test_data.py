"""kdjax.data: the sources (digits, synthetic, CIFAR and Tiny ImageNet through TFDS), the registry, DeviceDataset."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import numpy as np
import pytest

import kdjax.data as kd
from kdjax.data import archives, core
from kdjax.data.device import choose_placement

from helpers import REPO

# ------------------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def digits32():
    return kd.load("digits")


def test_digits_shapes_and_dtypes(digits32, sklearn_digits):
    n = sklearn_digits.target.size
    assert digits32.name == "digits" and digits32.num_classes == 10 and digits32.image_size == 32
    assert digits32.train_images.dtype == np.uint8 and digits32.test_images.dtype == np.uint8
    assert digits32.train_labels.dtype == np.int32 and digits32.test_labels.dtype == np.int32
    assert digits32.train_images.shape[1:] == (32, 32, 3) and digits32.test_images.shape[1:] == (32, 32, 3)
    assert digits32.num_train + digits32.num_test == n
    # Grey digits replicated to 3 identical channels.
    np.testing.assert_array_equal(digits32.train_images[..., 0], digits32.train_images[..., 2])


def test_digits_split_is_stratified_80_20(digits32, sklearn_digits):
    per_class = np.bincount(sklearn_digits.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(digits32.test_labels, minlength=10), np.round(0.2 * per_class))
    np.testing.assert_array_equal(np.bincount(digits32.train_labels, minlength=10) +
                                  np.bincount(digits32.test_labels, minlength=10), per_class)


def test_digits_native_size_is_the_scaled_sklearn_images(sklearn_digits):
    ds = kd.load("digits", image_size=8)
    expected = np.clip(np.rint(sklearn_digits.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    train, test = core_split(sklearn_digits.target)
    np.testing.assert_array_equal(ds.train_images[..., 1], expected[train])
    np.testing.assert_array_equal(ds.test_images[..., 1], expected[test])
    np.testing.assert_array_equal(ds.test_labels, sklearn_digits.target[test])
    # The two splits are disjoint and cover the whole set.
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == sklearn_digits.target.size


def core_split(labels):
    from kdjax.data.digits import SPLIT_SEED, TEST_FRACTION, stratified_split

    return stratified_split(labels, TEST_FRACTION, SPLIT_SEED)


def test_digits_is_deterministic(digits32):
    again = kd.load("digits")
    for split in ("train", "test"):
        np.testing.assert_array_equal(again.images(split), digits32.images(split))
        np.testing.assert_array_equal(again.labels(split), digits32.labels(split))
    assert again.mean == digits32.mean and again.std == digits32.std


@pytest.mark.parametrize("size", [16, 64])
def test_digits_resize(size, digits32):
    ds = kd.load("digits", image_size=size)
    assert ds.image_size == size and ds.train_images.shape[1:] == (size, size, 3)
    np.testing.assert_array_equal(ds.train_labels, digits32.train_labels)
    # Resizing keeps the average brightness of each digit (to within interpolation error).
    brightness = ds.train_images.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(brightness, digits32.train_images.mean(axis=(1, 2, 3)), atol=6.0)


def test_digits_mean_std_are_those_of_the_train_split(digits32):
    pixels = digits32.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(digits32.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(digits32.std, pixels.std(axis=(0, 1, 2)), rtol=1e-8)
    # The test split has different statistics, so the train split is really the one used.
    assert abs(digits32.mean[0] - (digits32.test_images / 255.0).mean()) > 1e-6


def test_resize_keeps_constants_and_ramps_monotone():
    constant = np.full((2, 8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(kd.resize_images(constant, 20), np.full((2, 20, 20, 3), 77, np.uint8))
    ramp = np.broadcast_to(np.arange(0, 256, 32, dtype=np.uint8)[None, None, :, None], (1, 8, 8, 1))
    row = kd.resize_images(ramp, 32)[0, 16, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] <= 8 and row[-1] >= 216


def test_channel_stats_matches_numpy():
    images = np.random.default_rng(3).integers(0, 256, (50, 5, 7, 3), dtype=np.uint8)
    mean, std = kd.channel_stats(images, chunk=7)
    np.testing.assert_allclose(mean, (images / 255.0).mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, (images / 255.0).std(axis=(0, 1, 2)), rtol=1e-9)


# --------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_labels_and_stats():
    ds = kd.load("synthetic", image_size=12, num_classes=7, num_train=700, num_test=35, seed=4)
    assert ds.train_images.shape == (700, 12, 12, 3) and ds.test_images.shape == (35, 12, 12, 3)
    assert ds.num_classes == 7 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=7), np.full(7, 100))
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=7), np.full(7, 5))
    # The analytic moments of uniform bytes agree with the data.
    mean, std = kd.channel_stats(ds.train_images)
    np.testing.assert_allclose(mean, ds.mean, atol=5e-3)
    np.testing.assert_allclose(std, ds.std, atol=5e-3)


def test_synthetic_seed_determines_the_data():
    a, b = kd.load("synthetic", seed=1), kd.load("synthetic", seed=1)
    c = kd.load("synthetic", seed=2)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.image_size == 32 and a.num_classes == 10


def test_synthetic_bad_option():
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        kd.load("synthetic", num_classes=0)


# ---------------------------------------------------------------------------------------------------------- registry


@pytest.fixture
def private_registry(monkeypatch):
    monkeypatch.setattr(core, "_SOURCES", dict(core._SOURCES))


def test_names_lists_the_builtin_sources():
    assert {"cifar10", "cifar100", "tiny_imagenet", "digits", "synthetic"} <= set(kd.names())
    assert kd.names() == sorted(kd.names())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar1000'.*cifar100.*digits.*synthetic"):
        kd.load("cifar1000")


def test_bad_image_size():
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        kd.load("synthetic", image_size=0)


def test_register_source_and_load_it(private_registry, tmp_path):
    calls = {}

    def tiny_source(*, data_dir, manual_dir, image_size, scale=1):
        calls.update(data_dir=data_dir, manual_dir=manual_dir)
        size = image_size or 4
        images = np.full((6, size, size, 3), 10 * scale, np.uint8)
        labels = np.arange(6, dtype=np.int32) % 3
        return kd.Dataset("tiny", 3, size, (0.1,) * 3, (0.2,) * 3, images, labels, images[:2], labels[:2])

    kd.register_source("my_tiny", tiny_source)
    assert "my_tiny" in kd.names()
    ds = kd.load("my_tiny", data_dir=tmp_path, scale=2)
    assert ds.train_images.shape == (6, 4, 4, 3) and ds.train_images[0, 0, 0, 0] == 20
    assert calls == {"data_dir": tmp_path, "manual_dir": tmp_path / "downloads" / "manual"}
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        kd.register_source("my_tiny", tiny_source)
    kd.register_source("my_tiny", tiny_source, overwrite=True)


def test_register_source_checks_what_the_source_returns(private_registry):
    def wrong_dtype(**_):
        images = np.zeros((2, 4, 4, 3), np.float32)
        return kd.Dataset("bad", 2, 4, (0.5,) * 3, (0.2,) * 3, images, np.zeros(2, np.int32), images,
                          np.zeros(2, np.int32))

    def label_out_of_range(**_):
        images = np.zeros((2, 4, 4, 3), np.uint8)
        return kd.Dataset("bad", 2, 4, (0.5,) * 3, (0.2,) * 3, images, np.array([0, 2], np.int32), images,
                          np.zeros(2, np.int32))

    kd.register_source("wrong_dtype", wrong_dtype)
    kd.register_source("label_out_of_range", label_out_of_range)
    with pytest.raises(TypeError, match="train_images must be a uint8 numpy array"):
        kd.load("wrong_dtype")
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 2\)"):
        kd.load("label_out_of_range")


def test_default_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("KDJAX_DATA_DIR", str(tmp_path))
    assert core.resolve_dirs() == (tmp_path, tmp_path / "downloads" / "manual")
    monkeypatch.delenv("KDJAX_DATA_DIR")
    assert kd.default_data_dir() == core.pathlib.Path("~/tensorflow_datasets").expanduser()


# --------------------------------------------------------------------------------------------------- CIFAR via TFDS


def _add_bytes(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_fake_cifar(path, name, rng, num_train, num_test):
    """A python-version CIFAR archive with the official internal layout; returns the expected splits."""
    layout = archives.CIFAR_LAYOUTS[name]
    num_classes = 100 if name == "cifar100" else 10
    expected = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, members, n in (("train", layout.train_members, num_train), ("test", layout.test_members, num_test)):
            images, labels = [], []
            for member in members:
                data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
                fine = [int(v) for v in rng.integers(0, num_classes, n)]
                batch = {b"data": data, layout.label_key: fine, b"filenames": [b"x.png"] * n}
                if name == "cifar100":
                    batch[b"coarse_labels"] = [v // 5 for v in fine]
                _add_bytes(tar, f"{layout.folder}/{member}", pickle.dumps(batch, protocol=2))
                images.append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
                labels += fine
            expected[split] = (np.concatenate(images), np.asarray(labels, np.int32))
        _add_bytes(tar, f"{layout.folder}/meta", pickle.dumps({b"fine_label_names": [b"c"] * num_classes}))
    return expected


def trust_archive(monkeypatch, name, path):
    """Make the fabricated file at ``path`` the expected archive of ``name`` (its md5 replaces the official one)."""
    official = archives.ARCHIVES[name]
    monkeypatch.setitem(archives.ARCHIVES, name, archives.Archive(official.filename, archives.file_md5(path),
                                                                  official.url))


@pytest.mark.parametrize("name,num_train,num_test", [("cifar100", 9, 5), ("cifar10", 2, 3)])
def test_cifar_prepared_from_the_archive(monkeypatch, tmp_path, name, num_train, num_test):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    archive = manual / archives.ARCHIVES[name].filename
    expected = write_fake_cifar(archive, name, np.random.default_rng(0), num_train, num_test)
    trust_archive(monkeypatch, name, archive)
    ds = kd.load(name, data_dir=tmp_path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(ds.images(split), expected[split][0])
        np.testing.assert_array_equal(ds.labels(split), expected[split][1])
    assert ds.num_classes == (100 if name == "cifar100" else 10) and ds.image_size == 32
    if name == "cifar100":
        assert ds.mean == (0.5071, 0.4867, 0.4408) and ds.std == (0.2675, 0.2565, 0.2761)
    else:
        assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    # The prepared copy is read from then on: the archive is no longer needed, and resizing works on it.
    archive.unlink()
    again = kd.load(name, data_dir=tmp_path, image_size=16)
    assert again.train_images.shape == (expected["train"][0].shape[0], 16, 16, 3)
    np.testing.assert_array_equal(again.test_labels, expected["test"][1])


def test_cifar_checksum_mismatch_is_a_clear_error(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / "cifar-100-python.tar.gz"
    write_fake_cifar(archive, "cifar100", np.random.default_rng(1), 2, 2)
    with pytest.raises(kd.ChecksumError, match=r"cifar-100-python\.tar\.gz has md5 [0-9a-f]{32}, expected "
                                                r"eb9058c3a382ffc7106e4002c42a8d85.*cs\.toronto\.edu"):
        kd.load("cifar100", data_dir=tmp_path / "data", manual_dir=manual)
    from kdjax.data.tfds_sources import KdjaxCifar100

    assert not KdjaxCifar100(data_dir=str(tmp_path / "data")).is_prepared()


def test_not_prepared_names_the_file_and_the_folder(tmp_path):
    data_dir = tmp_path / "x" / "y"
    message = (f"cifar100 is not prepared in {data_dir} and cannot be downloaded: put cifar-100-python.tar.gz "
               f"(from https://www.cs.toronto.edu/~kriz/cifar.html) into {data_dir}/downloads/manual and rerun")
    with pytest.raises(kd.DataNotFoundError) as error:
        kd.load("cifar100", data_dir=data_dir)
    assert str(error.value) == message
    with pytest.raises(kd.DataNotFoundError, match=r"put tiny-imagenet-200\.zip .* into .*elsewhere and rerun"):
        kd.load("tiny_imagenet", data_dir=data_dir, manual_dir=tmp_path / "elsewhere")


def test_tfds_path_reads_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    # The archive only has to exist: with TFDS mocked, preparation is a no-op and reading yields random examples.
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-100-python.tar.gz").write_bytes(b"")
    with tfds.testing.mock_data(num_examples=6):
        ds = kd.load("cifar100", data_dir=tmp_path)
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (6,) and ds.test_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 100
    assert ds.train_images.std() > 0  # random pixels, not a constant fill


# -------------------------------------------------------------------------------------------------- Tiny ImageNet


def _encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_fake_tiny_imagenet(path, rng):
    """A 2-class tiny-imagenet-200.zip with the official layout; returns the bytes of every image by member name."""
    from PIL import Image

    def picture(mode="RGB"):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        return Image.fromarray(pixels).convert(mode)

    files = {
        "train/n09999999/images/n09999999_0.JPEG": _encoded(picture(), "JPEG"),
        "train/n09999999/images/n09999999_1.JPEG": _encoded(picture("L"), "JPEG"),  # a greyscale one
        "train/n01111111/images/n01111111_0.JPEG": _encoded(picture(), "PNG"),
        "train/n01111111/images/n01111111_1.JPEG": _encoded(picture(), "PNG"),
        "train/n01111111/images/n01111111_2.JPEG": _encoded(picture(), "JPEG"),
        "val/images/val_0.JPEG": _encoded(picture(), "PNG"),
        "val/images/val_1.JPEG": _encoded(picture(), "JPEG"),
        "val/images/val_2.JPEG": _encoded(picture(), "PNG"),
        "test/images/test_0.JPEG": _encoded(picture(), "JPEG"),  # unlabelled: not used
    }
    text = {
        "wnids.txt": "n09999999\nn01111111\n",  # not sorted: labels follow the sorted order
        "words.txt": "n01111111\tone\nn09999999\tnine\n",
        "train/n01111111/n01111111_boxes.txt": "n01111111_0.JPEG\t0\t0\t10\t10\n",
        "val/val_annotations.txt": "val_0.JPEG\tn09999999\t0\t0\t5\t5\nval_1.JPEG\tn01111111\t1\t1\t6\t6\n"
                                   "val_2.JPEG\tn09999999\t2\t2\t7\t7\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in {**files, **{k: v.encode() for k, v in text.items()}}.items():
            zf.writestr(f"tiny-imagenet-200/{name}", payload)
    return files


def _decode(payload):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


def test_tiny_imagenet_prepared_from_the_zip(monkeypatch, tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    archive = manual / "tiny-imagenet-200.zip"
    files = write_fake_tiny_imagenet(archive, np.random.default_rng(0))
    trust_archive(monkeypatch, "tiny_imagenet", archive)
    ds = kd.load("tiny_imagenet", data_dir=tmp_path)
    assert ds.num_classes == 200 and ds.image_size == 64
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    train_members = sorted(m for m in files if m.startswith("train/"))  # the reader's order: sorted by path
    np.testing.assert_array_equal(ds.train_labels, [0 if "n01111111" in m else 1 for m in train_members])
    np.testing.assert_array_equal(ds.train_images, np.stack([_decode(files[m]) for m in train_members]))
    np.testing.assert_array_equal(ds.test_labels, [1, 0, 1])
    np.testing.assert_array_equal(ds.test_images, np.stack([_decode(files[f"val/images/val_{i}.JPEG"])
                                                            for i in range(3)]))
    small = kd.load("tiny_imagenet", data_dir=tmp_path, image_size=32)
    assert small.train_images.shape == (5, 32, 32, 3) and small.image_size == 32


def test_tiny_imagenet_checksum_mismatch(tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    write_fake_tiny_imagenet(archive, np.random.default_rng(1))
    with pytest.raises(kd.ChecksumError, match="expected 90528d7ca1a48142e341f4ef8d21d0de"):
        list(archives.iter_tiny_imagenet(archive, "train"))


def test_file_md5_matches_hashlib(tmp_path):
    import hashlib

    payload = np.random.default_rng(2).bytes(10_000)
    (tmp_path / "f").write_bytes(payload)
    assert archives.file_md5(tmp_path / "f") == hashlib.md5(payload).hexdigest()


# -------------------------------------------------------------------------------------------------- DeviceDataset


def test_choose_placement():
    assert choose_placement(100, None, "auto")[0] == "replicated"
    assert choose_placement(100, 1000, "auto", max_fraction=0.5)[0] == "replicated"
    layout, reason = choose_placement(600, 1000, "auto", max_fraction=0.5)
    assert layout == "sharded" and "exceeds" in reason
    assert choose_placement(1, None, "sharded")[0] == "sharded"


def test_device_dataset_rejects_bad_mesh_and_placement():
    import jax

    ds = kd.load("synthetic", num_train=8, num_test=8, image_size=4)
    wrong_axis = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="axis 'data'.*make_mesh"):
        kd.DeviceDataset.create(ds, wrong_axis)
    from kdjax.parallel import make_mesh

    with pytest.raises(ValueError, match="unknown placement 'copy'"):
        kd.DeviceDataset.create(ds, make_mesh(), placement="copy")


DEVICE_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from absl import logging
    import kdjax.data as kd
    from kdjax.parallel import make_mesh

    logging.set_verbosity(logging.INFO)
    jax.config.update("jax_disable_most_optimizations", True)
    mesh = make_mesh()
    # 203 and 37 examples: not multiples of 8, so the sharded layout is padded.
    ds = kd.load("synthetic", image_size=6, num_train=203, num_test=37, num_classes=11, seed=5)
    rng = np.random.default_rng(0)
    report = {"devices": len(jax.devices()), "axis_types": str(mesh.axis_types)}

    @jax.jit
    def gather(data, train_idx, test_idx):
        return data.gather("train", train_idx), data.gather("test", test_idx)

    for placement in ("auto", "replicated", "sharded"):
        data = kd.DeviceDataset.create(ds, mesh, placement=placement)
        ok = True
        for _ in range(2):
            train_idx = rng.integers(0, 203, 24).astype(np.int32)
            train_idx[:3] = [0, 202, 101]  # first, last and a middle row
            test_idx = rng.integers(0, 37, 16).astype(np.int32)
            put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
            (tr_im, tr_lb), (te_im, te_lb) = gather(data, put(train_idx), put(test_idx))
            ok &= np.array_equal(np.asarray(tr_im), ds.train_images[train_idx])
            ok &= np.array_equal(np.asarray(tr_lb), ds.train_labels[train_idx])
            ok &= np.array_equal(np.asarray(te_im), ds.test_images[test_idx])
            ok &= np.array_equal(np.asarray(te_lb), ds.test_labels[test_idx])
        eager_im, _ = data.gather("train", jnp.asarray(train_idx))
        ok &= np.array_equal(np.asarray(eager_im), ds.train_images[train_idx])
        report[placement] = {
            "layout": data.placement, "equal": bool(ok),
            "data_spec": list(data.train_images.sharding.spec), "data_shape": list(data.train_images.shape),
            "batch_spec": list(tr_im.sharding.spec), "num_train": data.num_train,
        }
    try:
        data.gather("train", jnp.arange(12))
    except ValueError as e:
        report["odd_batch_error"] = str(e)
    print("REPORT" + json.dumps(report))
""")


def test_device_dataset_on_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report["devices"] == 8 and "Auto" in report["axis_types"]
    # CPU devices report no memory statistics, so "auto" assumes the data fits and replicates it.
    assert report["auto"]["layout"] == "replicated"
    assert report["replicated"]["data_spec"] == []
    assert report["replicated"]["data_shape"] == [203, 6, 6, 3]
    assert report["sharded"]["data_spec"] == ["data"]
    assert report["sharded"]["data_shape"] == [208, 6, 6, 3] and report["sharded"]["num_train"] == 203
    for placement in ("auto", "replicated", "sharded"):
        assert report[placement]["equal"], placement
        assert report[placement]["batch_spec"] == ["data"]
    assert "global batch (12) must be a multiple of the 8 devices" in report["odd_batch_error"]
    assert "synthetic on 8 device(s): sharded" in result.stderr
    assert "synthetic on 8 device(s): replicated" in result.stderr


def test_make_mesh_is_1d_auto():
    import jax

    from kdjax.parallel import make_mesh

    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == len(jax.devices())
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match="at least one device"):
        make_mesh([])
