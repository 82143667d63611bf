"""The streamed source feeding the library's own training step (the teacher's cross-entropy step of
kdjax.train.steps): the batch dict is what the step takes, and a run stopped mid-epoch and resumed from its step
count alone ends in the state of an uninterrupted run, bit for bit."""
import jax
import numpy as np
import optax
import pytest

import streamed_inputs as fab
from kdjax.augment.transforms import normalize
from kdjax.data import epochs
from kdjax.data.streamed import DeviceIterator, StreamedDataset, host_iterator, prepare_dataset
from kdjax.parallel import make_mesh
from kdjax.train.steps import make_ce_step
from tiny_models import TinyCNN

SIZE = 16


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    base = tmp_path_factory.mktemp("streamed_training")
    fab.write_tars(base / "manual", fab.make_images(seed=3))
    manifest = prepare_dataset("imagenet", base / "manual", base / "data", classes=fab.classes(),
                               records_per_shard=16, workers=1, progress_every=0)
    return StreamedDataset.open(manifest.root, image_size=SIZE)


def test_training_resumed_mid_epoch_matches_an_uninterrupted_run(streamed):
    mesh = make_mesh()
    model = TinyCNN(streamed.num_classes, SIZE)
    tx = optax.sgd(0.05, momentum=0.9)
    # the host did RandomResizedCrop + flip: the device only normalises
    step_fn = make_ce_step(model, tx, lambda key, images: normalize(images, streamed.mean, streamed.std))
    variables = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
    initial = {"params": variables["params"], "batch_stats": variables["batch_stats"],
               "opt_state": tx.init(variables["params"]), "step": 0}
    step_key = jax.random.key(1)
    step = jax.jit(lambda state, batch, s: step_fn(state, None, batch, jax.random.fold_in(step_key, s)))
    plan = epochs.make_plan(streamed.num_train, 8, mesh.size)   # 3 full steps + a short one of 6 per epoch
    steps = streamed.train_steps(plan, 2, seed=7)

    def run(state, start, stop):
        batches = DeviceIterator(host_iterator(steps, start=start, threads=2), mesh)
        losses = []
        for s in range(start, stop):
            state, metrics = step(state, next(batches), s)
            losses.append(float(metrics["loss"]))
        return state, losses

    total = 2 * plan.steps_per_epoch
    uninterrupted, losses = run(initial, 0, total)
    stopped, first_losses = run(initial, 0, 5)           # stops inside the second epoch
    resumed, last_losses = run(stopped, 5, total)        # a checkpoint holds the state and its step count
    assert first_losses + last_losses == losses
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(uninterrupted))
    assert np.all(np.isfinite(losses)) and int(uninterrupted["step"]) == total
    # and the resumed run did train on other data than a restart from step 0 would have
    restarted, _ = run(stopped, 0, total - 5)
    assert not np.array_equal(jax.device_get(restarted["params"]["fc"]["kernel"]),
                              jax.device_get(uninterrupted["params"]["fc"]["kernel"]))
