"""The downsampled-ImageNet source (``imagenet_resized``) on fabricated npz files in the authors' layout, and the
run's ``placement`` rule (docs/data.md, "Placement")."""
import io
import json
import zipfile

import numpy as np
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from kdjax import cli
from kdjax import data as kdata
from kdjax.data import placement
from helpers import load_config

SIZE = 8


def _npz(rng, n, labels=None) -> tuple[bytes, np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, n) if labels is None else np.asarray(labels)
    # the authors' row layout: the red plane, then green, then blue
    data = images.transpose(0, 3, 1, 2).reshape(n, -1)
    out = io.BytesIO()
    np.savez(out, data=data, labels=labels.tolist(), mean=data.mean(axis=0))
    return out.getvalue(), images, labels


def write_release(folder, seed=0, as_zip=True, skip=None):
    """Imagenet8_train_npz(.zip) with train_data_batch_1..10 (3 images each) and Imagenet8_val_npz with val_data."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files, train, val = {}, [], None
    for n in range(1, 11):
        blob, images, labels = _npz(rng, 3, labels=[1, 1000, n] if n == 1 else None)
        files[f"Imagenet{SIZE}_train_npz/train_data_batch_{n}.npz"] = blob
        train.append((images, labels))
    blob, images, labels = _npz(rng, 4)
    files[f"Imagenet{SIZE}_val_npz/val_data.npz"] = blob
    val = (images, labels)
    for name, blob in files.items():
        if skip and name.endswith(skip):
            continue
        top = name.split("/")[0]
        if as_zip:
            with zipfile.ZipFile(folder / f"{top}.zip", "a") as z:
                z.writestr(name, blob)
        else:
            (folder / top).mkdir(exist_ok=True)
            (folder / name).write_bytes(blob)
    return train, val


@pytest.mark.parametrize("as_zip", [True, False])
def test_the_release_reads_as_nhwc_images_with_zero_based_labels(tmp_path, as_zip):
    train, val = write_release(tmp_path / "manual", as_zip=as_zip)
    ds = kdata.load("imagenet_resized", manual_dir=tmp_path / "manual", data_dir=tmp_path, image_size=SIZE)
    assert (ds.num_classes, ds.image_size, ds.num_train, ds.num_test) == (1000, SIZE, 30, 4)
    np.testing.assert_array_equal(ds.train_images, np.concatenate([i for i, _ in train]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([lab for _, lab in train]) - 1)
    assert ds.train_labels[:3].tolist() == [0, 999, 0]
    np.testing.assert_array_equal(ds.test_images, val[0])
    assert ds.mean == (0.485, 0.456, 0.406)


def test_a_missing_batch_or_a_wrong_size_is_one_line(tmp_path):
    write_release(tmp_path / "manual", skip="train_data_batch_7.npz")
    with pytest.raises(kdata.DataNotFoundError, match="train_data_batch_7.npz is not in"):
        kdata.load("imagenet_resized", manual_dir=tmp_path / "manual", data_dir=tmp_path, image_size=SIZE)
    with pytest.raises(ValueError, match="comes in 8, 16, 32, 64 px"):
        kdata.load("imagenet_resized", manual_dir=tmp_path / "manual", data_dir=tmp_path, image_size=24)


def _config(**fields):
    config = load_config("teacher")
    for k, v in fields.items():
        config[k] = v
    return config


def test_placement_rule():
    assert placement.check_placement(_config(dataset="imagenet_resized")) == "device"
    assert placement.check_placement(_config(dataset="imagenet100")) == "streamed"
    assert placement.check_placement(_config(dataset="imagenet", placement="streamed")) == "streamed"
    with pytest.raises(ValueError, match="placement=device: imagenet is read from prepared JPEG records"):
        placement.check_placement(_config(dataset="imagenet", placement="device"))
    with pytest.raises(ValueError, match="placement=streamed: only the prepared record datasets"):
        placement.check_placement(_config(dataset="imagenet_resized", placement="streamed"))
    with pytest.raises(ValueError, match="placement must be auto, device or streamed"):
        placement.check_placement(_config(dataset="cifar100", placement="host"))
    # 64 px ImageNet (15.7 GB) over one device with 16 GiB free: refused with the figures; over 8 devices: placed
    nbytes = 1_281_167 * 64 * 64 * 3
    with pytest.raises(ValueError, match=r"14.7 GiB per device over 1 device\(s\): more than 50% of the 16.0 GiB free"):
        placement.check_fits(nbytes, 1, 16 * 2**30, "imagenet_resized")
    placement.check_fits(nbytes, 8, 16 * 2**30, "imagenet_resized")
    placement.check_fits(nbytes, 1, None)  # no memory statistics (CPU): assumed to fit


def test_a_teacher_trains_on_it_through_the_on_device_path(tmp_path, capsys):
    write_release(tmp_path / "manual")
    cli.main(["teacher", "--config.model=tiny_cnn", "--config.dataset=imagenet_resized", f"--config.image_size={SIZE}",
              f"--config.manual_dir={tmp_path / 'manual'}", f"--config.data_dir={tmp_path}", "--config.batch_size=10",
              "--config.epochs=1", "--config.eval_batch_size=4", f"--workdir={tmp_path / 'run'}"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "imagenet_resized" and np.isfinite(results["test_loss"])
    assert "replicated on 1 x cpu" in capsys.readouterr().out  # the on-device path
