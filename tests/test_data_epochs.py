"""kdjax.data.epochs: the one epoch plan of training and T. stddev, its segments and its gathers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as kdata
from kdjax.data import epochs
from kdjax.parallel import make_mesh


def test_plan_short_batch_and_divisibility():
    plan = epochs.make_plan(50000, 64, 1)
    assert (plan.full_steps, plan.short_batch, plan.steps_per_epoch) == (781, 16, 782)
    assert epochs.chunk_length(plan.full_steps, 100) == 71
    assert epochs.make_plan(50000, 64, 1, last_batch="drop").steps_per_epoch == 781
    assert epochs.make_plan(100, 8, 8).short_batch == 0  # 4 left over do not divide over 8 devices: dropped
    with pytest.raises(ValueError, match="does not divide over 8 devices"):
        epochs.make_plan(1000, 60, 8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        epochs.make_plan(10, 64, 1)


def test_pad_rule_keeps_every_short_batch():
    plan = epochs.make_plan(100, 8, 8, last_batch="pad")
    assert (plan.full_steps, plan.short_batch) == (12, 4)
    assert epochs.make_plan(10, 64, 1, last_batch="pad").short_batch == 10  # T. stddev: even a lone short batch
    with pytest.raises(ValueError, match="last_batch"):
        epochs.make_plan(100, 8, 1, last_batch="pad_it")


@pytest.mark.parametrize("masked_tail", [False, True])
def test_segments_cover_every_step_of_the_epoch_once(masked_tail):
    plan = epochs.make_plan(100, 7, 1)
    segs = epochs.segments(plan, 4, masked_tail)
    covered = [s.first_step + i for s in segs for i in range(s.steps)]
    assert covered == list(range(plan.steps_per_epoch))
    assert [s.kind for s in segs] == ["full"] * 4 + ["short"]
    assert segs[-2].steps == 2 and segs[-2].slots == (4 if masked_tail else 2)
    assert segs[-1].rows == 2


def test_chunk_length_prefers_divisors():
    assert epochs.chunk_length(781, 100) == 71
    assert epochs.chunk_length(97, 10) == 10  # prime: no useful divisor, so the requested length
    assert epochs.chunk_length(5, 100) == 5


def test_gather_rows_pads_an_indivisible_batch_and_equals_numpy_indexing():
    dataset = kdata.load("synthetic", image_size=4, num_train=37, num_test=8, num_classes=3)
    data = kdata.DeviceDataset.create(dataset, make_mesh())
    perm = np.asarray(epochs.epoch_permutation(jax.random.key(0), 2, dataset.num_train))
    assert sorted(perm.tolist()) == list(range(37))
    for rows in (5, 8):
        idx = epochs.batch_indices(jnp.asarray(perm), 3, rows)
        images, labels = jax.jit(epochs.gather_rows)(data, idx)
        np.testing.assert_array_equal(np.asarray(images), dataset.train_images[perm[3:3 + rows]])
        np.testing.assert_array_equal(np.asarray(labels), dataset.train_labels[perm[3:3 + rows]])
