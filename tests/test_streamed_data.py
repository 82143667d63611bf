"""Preparation of ImageNet-format inputs into record shards (tars, ImageFolder tree, bad inputs, resume after a
kill, corrupt shards) and the streamed source over them (coverage, process shares, mid-epoch resumption)."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from conftest import REPO

import streamed_inputs as fab
from kdjax.data import epochs
from kdjax.data.streamed import (CorruptShardError, DeviceIterator, InputError, NotPreparedError, ProcessShare,
                                 StreamedDataset, host_iterator, prepare_dataset, records,
                                 transforms)
from kdjax.data.streamed import prepare as prepare_lib

PER_SHARD = 8   # 30 train images -> 4 shards, 10 test images -> 2 shards
SIZE = 32       # output size of the transforms in these tests


@pytest.fixture(scope="module")
def images():
    return fab.make_images()


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared")
    fab.write_tars(base / "manual", images)
    # two worker processes: the pool path (the ImageFolder test below writes the same shards in-process)
    return prepare_dataset("imagenet", base / "manual", base / "data", classes=fab.classes(),
                           records_per_shard=PER_SHARD, workers=2, progress_every=0)


def _read_all(manifest, split):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in manifest.paths(split):
        reader = ArrayRecordReader(str(path))
        out += [records.decode_record(r) for r in reader.read_all()]
        reader.close()
    return out


def test_records_are_the_archive_images_in_imagefolder_order(prepared, images):
    assert prepared.classes == fab.classes()
    for split in ("train", "test"):
        expected = fab.imagefolder_order(images, split)
        stored = _read_all(prepared, split)
        assert prepared.count(split) == len(expected) == len(stored)
        assert [(data, label, index) for data, label, index in stored] == \
            [(data, label, i) for i, (data, label) in enumerate(expected)]
    assert [s.file for s in prepared.shards["train"]] == [records.shard_name("train", k, 4) for k in range(4)]
    saved = json.loads((prepared.root / records.MANIFEST).read_text())
    assert saved["counts"] == {"train": 30, "test": 10}
    last = saved["shards"]["test"][1]
    assert last["sha256"] == records.file_sha256(prepared.root / last["file"])


def test_image_folder_tree_in_one_process_gives_the_same_shards(prepared, images, tmp_path):
    fab.write_image_folder(tmp_path / "manual", images)
    manifest = prepare_dataset("imagenet", tmp_path / "manual", tmp_path / "data", classes=fab.classes(),
                       records_per_shard=PER_SHARD, workers=1, progress_every=0)
    assert manifest.shards == prepared.shards   # same bytes, labels and indices -> same digests


def test_imagenet100_classes_are_the_originals():
    classes = prepare_lib.dataset_classes("imagenet100")
    assert list(classes) == sorted(classes) and len(set(classes)) == 100
    assert set(classes) <= set(prepare_lib.dataset_classes("imagenet"))
    assert classes[:2] == ("n01537544", "n01592084") and classes[-1] == "n13040303"
    assert len(prepare_lib.dataset_classes("imagenet")) == 1000


# --- bad inputs: one line naming the problem, nothing prepared

def _refused(manual, tmp_path, match):
    with pytest.raises(InputError, match=match) as info:
        prepare_dataset("imagenet", manual, tmp_path / "data", classes=fab.classes(), records_per_shard=PER_SHARD,
                        workers=1)
    assert "\n" not in str(info.value)
    assert not (prepare_lib.dataset_root(tmp_path / "data", "imagenet") / records.MANIFEST).exists()


def test_truncated_train_archive_is_refused(images, tmp_path):
    manual = fab.write_tars(tmp_path / "manual", images)
    path = manual / "ILSVRC2012_img_train.tar"
    os.truncate(path, path.stat().st_size // 2)
    _refused(manual, tmp_path, r"ILSVRC2012_img_train\.tar is truncated")


def test_archive_cut_at_a_member_boundary_is_refused(images, tmp_path):
    manual = fab.write_tars(tmp_path / "manual", images)
    path = manual / "ILSVRC2012_img_val.tar"
    with tarfile.open(path) as tar:
        end = tar.getmembers()[-1].offset   # header of the last member: the file ends cleanly before it
    os.truncate(path, end)
    _refused(manual, tmp_path, r"ILSVRC2012_img_val\.tar is truncated after")


def test_missing_class_is_refused(images, tmp_path):
    missing = fab.classes()[3]
    manual = fab.write_tars(tmp_path / "manual", images, skip_class=missing)
    _refused(manual, tmp_path, rf"ILSVRC2012_img_train\.tar has no {missing}\.tar")


def test_missing_val_archive_is_refused(images, tmp_path):
    manual = fab.write_tars(tmp_path / "manual", images)
    (manual / "ILSVRC2012_img_val.tar").unlink()
    _refused(manual, tmp_path, r"ILSVRC2012_img_val\.tar")


def test_unreadable_image_is_refused_by_name(images, tmp_path):
    wnid = fab.classes()[2]
    name = sorted(images["train"][wnid])[1]
    broken = {**images, "train": {**images["train"], wnid: {**images["train"][wnid]}}}
    broken["train"][wnid][name] = images["train"][wnid][name][:200]   # a JPEG cut short
    manual = fab.write_tars(tmp_path / "manual", broken)
    _refused(manual, tmp_path, rf"{wnid}\.tar:{name} cannot be decoded")


def test_image_folder_missing_class_is_refused(images, tmp_path):
    manual = fab.write_image_folder(tmp_path / "manual", images)
    for f in (manual / "val" / fab.classes()[0]).iterdir():
        f.unlink()
    _refused(manual, tmp_path, rf"val has no image in {fab.classes()[0]}/")


def test_no_inputs_is_refused(tmp_path):
    _refused(tmp_path, tmp_path, r"has neither ILSVRC2012_img_train\.tar")


# --- resumption and corruption

def _copy_manual(images, tmp_path):
    return fab.write_tars(tmp_path / "manual", images)


def test_rerun_after_partial_state_rewrites_only_what_is_missing(prepared, images, tmp_path):
    manual = _copy_manual(images, tmp_path)
    args = dict(classes=fab.classes(), records_per_shard=PER_SHARD, workers=1, progress_every=0)
    first = prepare_dataset("imagenet", manual, tmp_path / "data", **args)
    root = first.root
    # the state a kill leaves: no manifest, a shard without marker, a half-written temporary file, a shard whose
    # content no longer matches its marker
    (root / records.MANIFEST).unlink()
    shards = [s.file for s in first.shards["train"]]
    prepare_lib.marker_path(root, shards[1]).unlink()
    (root / (shards[2] + ".tmp")).write_bytes(b"partial")
    (root / shards[2]).unlink()
    prepare_lib.marker_path(root, shards[2]).unlink()
    with open(root / shards[3], "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff\xff")
    untouched = (root / shards[0]).stat().st_mtime_ns
    again = prepare_dataset("imagenet", manual, tmp_path / "data", **args)
    assert again.shards == first.shards == prepared.shards
    assert (root / shards[0]).stat().st_mtime_ns == untouched
    records.verify_shards(again)


def test_prepare_killed_midway_resumes(images, tmp_path):
    manual = _copy_manual(images, tmp_path)
    data = tmp_path / "data"
    command = [sys.executable, "-m", "kdjax.data.streamed", "--dataset=imagenet", f"--manual_dir={manual}",
               f"--data_dir={data}", "--workers=1", "--records_per_shard=1", f"--classes={','.join(fab.classes())}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = prepare_lib.dataset_root(data, "imagenet")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(root.glob("*.done"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(root.glob("*.done")))
    assert not (root / records.MANIFEST).exists() or proc.returncode == 0
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "30 train / 10 test images" in result.stdout
    manifest = records.open_manifest(root)
    assert manifest.count("train") == 30 and len(manifest.shards["train"]) == 30
    expected = fab.imagefolder_order(images, "train")
    assert [(d, lab) for d, lab, _ in _read_all(manifest, "train")] == expected
    print(f"killed with {done_before} of 40 shards done")


def test_other_inputs_into_a_partial_dataset_are_refused(images, tmp_path):
    manual = _copy_manual(images, tmp_path)
    prepare_dataset("imagenet", manual, tmp_path / "data", classes=fab.classes(), records_per_shard=PER_SHARD,
                    workers=1)
    with pytest.raises(InputError, match="prepared from other inputs"):
        prepare_dataset("imagenet", manual, tmp_path / "data", classes=fab.classes(), records_per_shard=4, workers=1)


def test_corrupt_shard_is_detected_before_use(prepared, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(prepared.root, root)
    StreamedDataset.open(root)   # intact
    shard = root / prepared.shards["test"][1].file
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0x01
    shard.write_bytes(bytes(content))
    with pytest.raises(CorruptShardError, match=rf"{shard.name} has sha256 .* the shard is corrupt"):
        StreamedDataset.open(root)
    shard.unlink()
    with pytest.raises(CorruptShardError, match=rf"{shard.name} is missing"):
        StreamedDataset.open(root)


def test_unchanged_shards_are_not_hashed_again_and_a_damaged_one_still_is(prepared, tmp_path):
    """verify='changed': a second launch checks the shards by size, mtime and ctime alone; a shard damaged in place
    and given back its old size and mtime differs in ctime, is hashed again and refused; 'always' hashes all."""
    import os
    import shutil
    import time

    from kdjax.data.streamed import records

    assert records.verify_shards(records.read_manifest(prepared.root)) == []  # prepare_data recorded its digests
    root = tmp_path / "copy"
    shutil.copytree(prepared.root, root)
    files = [s.file for split in records.SPLITS for s in prepared.shards[split]]
    manifest = records.read_manifest(root)
    assert sorted(records.verify_shards(manifest)) == sorted(files)   # a copy (new ctimes): every shard
    assert records.verify_shards(manifest) == []                      # then none
    assert sorted(records.verify_shards(manifest, mode="always")) == sorted(files)
    shard = root / files[1]
    before = shard.stat()
    time.sleep(0.01)  # a ctime on a coarse clock must still move
    content = bytearray(shard.read_bytes())
    content[len(content) // 3] ^= 0x01
    shard.write_bytes(bytes(content))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    with pytest.raises(CorruptShardError, match=rf"{shard.name} has sha256 .* the shard is corrupt"):
        StreamedDataset.open(root, verify="changed")
    with pytest.raises(ValueError, match="verify must be one of changed, always"):
        records.verify_shards(manifest, mode="sometimes")


def test_unprepared_folder_is_one_line(tmp_path):
    with pytest.raises(NotPreparedError, match="holds no prepared dataset"):
        StreamedDataset.open(tmp_path)


# --- the streamed source

@pytest.fixture(scope="module")
def dataset(prepared):
    return StreamedDataset.open(prepared.root, image_size=SIZE)


def _batches(steps, start=0, count=None, **kw):
    it = host_iterator(steps, start=start, threads=2, **kw)
    return [next(it) for _ in range(count if count is not None else len(steps) - start)]


def test_an_epoch_covers_every_example_once_with_its_label(dataset, images):
    plan = epochs.make_plan(dataset.num_train, 8, 1)      # 3 full batches of 8, a short batch of 6
    batches = _batches(dataset.train_steps(plan, 2, seed=5, share=ProcessShare()))
    assert [b["images"].shape[0] for b in batches] == [8, 8, 8, 6] * 2
    labels = np.array([label for _, label in fab.imagefolder_order(images, "train")])
    for epoch in range(2):
        seen = np.concatenate([b["indices"] for b in batches[4 * epoch:4 * epoch + 4]])
        assert sorted(seen.tolist()) == list(range(30))
        np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches[4 * epoch:4 * epoch + 4]]),
                                      labels[seen])
    assert not np.array_equal(batches[0]["indices"], batches[4]["indices"])   # a fresh order per epoch
    b = batches[0]
    assert b["images"].dtype == np.uint8 and b["images"].shape[1:] == (SIZE, SIZE, 3)
    assert b["labels"].dtype == np.int32 and b["indices"].dtype == np.int32


def test_images_are_the_train_transform_of_their_record(dataset, images):
    plan = epochs.make_plan(dataset.num_train, 8, 1)
    batch = _batches(dataset.train_steps(plan, 2, seed=5, share=ProcessShare()), start=5, count=1)[0]
    jpegs = [data for data, _ in fab.imagefolder_order(images, "train")]
    for image, index in zip(batch["images"], batch["indices"]):
        expected = transforms.train_transform(jpegs[index], transforms.example_rng(5, 1, index), SIZE)
        np.testing.assert_array_equal(image, expected)


def test_process_shares_assemble_the_single_process_batch(dataset):
    plan = epochs.make_plan(dataset.num_train, 8, 2)
    whole = _batches(dataset.train_steps(plan, 1, seed=1, share=ProcessShare(0, 1)))
    parts = [_batches(dataset.train_steps(plan, 1, seed=1, share=ProcessShare(p, 2))) for p in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


def test_resume_mid_epoch_from_the_iterator_state(dataset):
    plan = epochs.make_plan(dataset.num_train, 8, 1)
    steps = dataset.train_steps(plan, 3, seed=2, share=ProcessShare())
    it = host_iterator(steps, threads=2)
    for _ in range(6):   # into the second epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    restored = host_iterator(steps, threads=2)
    restored.set_state(json.loads(json.dumps(state)))   # the state survives a round trip through a checkpoint
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    from_start = host_iterator(steps, start=6, threads=2)
    np.testing.assert_array_equal(next(from_start)["images"], expected[0]["images"])


@pytest.mark.slow   # grain's worker processes start in about 10 s each here
def test_resume_with_worker_processes(dataset):
    plan = epochs.make_plan(dataset.num_train, 8, 1)
    steps = dataset.train_steps(plan, 2, seed=2, share=ProcessShare())
    it = host_iterator(steps, threads=1, workers=2)
    reference = _batches(steps, count=5)
    for want in reference[:3]:
        np.testing.assert_array_equal(next(it)["indices"], want["indices"])
    state = it.get_state()
    restored = host_iterator(steps, threads=1, workers=2)
    restored.set_state(state)
    for want in reference[3:]:
        np.testing.assert_array_equal(next(restored)["images"], want["images"])
    from_step = host_iterator(steps, start=4, threads=1, workers=2)
    np.testing.assert_array_equal(next(from_step)["images"], reference[4]["images"])


def test_evaluation_covers_every_test_image_once_over_processes(dataset, images):
    expected = fab.imagefolder_order(images, "test")
    seen = []
    for p in range(2):
        for batch in dataset.eval_steps(4, share=ProcessShare(p, 2)):
            assert batch["images"].shape == (2, SIZE, SIZE, 3)
            for image, label, index, keep in zip(batch["images"], batch["labels"], batch["indices"], batch["mask"]):
                if keep:
                    seen.append(int(index))
                    assert label == expected[index][1]
                    np.testing.assert_array_equal(image, transforms.test_transform(expected[index][0], SIZE))
                else:
                    assert index == -1 and not image.any()
    assert sorted(seen) == list(range(10))


def test_device_iterator_gives_global_arrays_and_resumes(dataset):
    import jax

    from kdjax.parallel import make_mesh

    mesh = make_mesh()
    plan = epochs.make_plan(dataset.num_train, 8, mesh.size)
    steps = dataset.train_steps(plan, 1, seed=3)
    reference = _batches(steps)
    it = DeviceIterator(host_iterator(steps, threads=2), mesh, buffer=2)
    first = next(it)
    assert isinstance(first["images"], jax.Array) and first["images"].shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.asarray(first["images"]), reference[0]["images"])
    state = it.get_state()   # two batches are in flight; the state is that of the next one not consumed
    again = DeviceIterator(host_iterator(steps, threads=2), mesh)
    again.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(again)["indices"]), reference[1]["indices"])
    np.testing.assert_array_equal(np.asarray(next(it)["indices"]), reference[1]["indices"])
