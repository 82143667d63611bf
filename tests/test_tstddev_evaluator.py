"""The T. stddev evaluator (kdjax.tstddev.evaluator).

The reference below is the original procedure written out step by step: a Python loop over epochs and batches
(short last batch kept), the teacher applied per batch on x and on x', the entries grouped ten at a time into
group means, the unbiased std across groups averaged over classes, the mean entropy of every row. It shares only
the key derivations with the evaluator, which vmaps, scans, pads and masks instead.
"""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment, models
from kdjax import data as kdata
from kdjax.data import epochs as epochs_lib
from kdjax.tstddev import evaluator as te
from kdjax.augment import transforms
from kdjax.checkpoint import save_model
from kdjax.parallel import make_mesh

TINY = "tstd_tiny"
NUM_CLASSES = 5
IMAGE_SIZE = 8
NUM_TRAIN = 100   # batch 16: 6 full steps and a short batch of 4 per epoch
BATCH = 16
EPOCHS = 3        # 21 steps, 42 entries -> 4 groups


class _Tiny(nn.Module):
    """conv 3x3 (stride 2) - BatchNorm - ReLU - flatten - dense: a tiny model with eval-mode BN whose outputs vary
    even on noise images (no global pooling to average the noise away)."""
    num_classes: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), strides=2, dtype=self.dtype)(x.astype(self.dtype))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


models.register(TINY, lambda num_classes, image_size=32, dtype=jnp.float32: _Tiny(num_classes, dtype))


def _variables(seed: int, image_size: int, num_classes: int, name: str = TINY):
    """Random weights with non-trivial BatchNorm statistics (so that eval mode matters) and logits large enough
    for probabilities far from uniform."""
    model = models.create(name, num_classes, image_size)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))
    leaves, treedef = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]]
    stats = [jax.random.uniform(k, a.shape, minval=0.5, maxval=2.0) if "var" in p else 0.3 * jax.random.normal(
        k, a.shape) for k, a, p in zip(keys, leaves, paths)]
    return {"params": jax.tree.map(lambda a: 3.0 * a, variables["params"]),
            "batch_stats": jax.tree.unflatten(treedef, stats)}


@pytest.fixture(scope="module")
def setup():
    dataset = kdata.load("synthetic", image_size=IMAGE_SIZE, num_train=NUM_TRAIN, num_test=4,
                         num_classes=NUM_CLASSES)
    model = models.create(TINY, NUM_CLASSES, IMAGE_SIZE)
    return {"dataset": dataset, "model": model, "teacher_vars": _variables(0, IMAGE_SIZE, NUM_CLASSES),
            "student_vars": _variables(1, IMAGE_SIZE, NUM_CLASSES),
            "data": kdata.DeviceDataset.create(dataset, make_mesh())}


def _schemes(dataset, names):
    return [augment.create(n, dataset_stats=dataset, n_pick=BATCH, criterion="entropy") for n in names]


def _evaluator(setup, names):
    ds = setup["dataset"]
    # Made by hand rather than by make_plan (which would avoid masked slots here): 2 steps per forward, chunks of
    # 4 slots, so each epoch's second chunk has 2 real steps and 2 masked slots, then the short batch.
    plan = te.Plan(epochs_lib.make_plan(ds.num_train, BATCH, last_batch="pad"), EPOCHS, steps_per_forward=2, slots=4)
    second = plan.segments()[1]
    assert (second.first_step, second.steps, second.slots) == (4, 2, 4)
    return te.Evaluator(setup["model"], _schemes(ds, names), NUM_CLASSES, plan, ds.mean, ds.std,
                        transforms.default_pad(IMAGE_SIZE), student=setup["model"])


def _run(setup, evaluator, seed=0):
    return evaluator.run(setup["teacher_vars"], setup["data"], student_vars=setup["student_vars"], seed=seed)


def reference(setup, name, seed=0):
    """The original procedure, batch by batch (docs/fidelity.md, "T. stddev"): returns (tstddev, mean_entropy, groups)."""
    ds, model = setup["dataset"], setup["model"]
    tv, sv = setup["teacher_vars"], setup["student_vars"]
    scheme = _schemes(ds, [name])[0]
    keys = te.run_keys(seed)
    pad = transforms.default_pad(IMAGE_SIZE)

    def probs(x):
        return jax.nn.softmax(model.apply(tv, x, train=False), axis=-1)

    score_fn = {"teacher": lambda pool: (augment.entropy(model.apply(tv, pool, train=False)), None),
                "student": lambda pool: (augment.entropy(model.apply(sv, pool, train=False)), None),
                None: None}[scheme.scorer]

    @jax.jit  # one batch at a time (compiled once per batch size), the teacher on x and on x'
    def one_step(base_key, aug_key, images, labels):
        x = transforms.normalize(transforms.base_train_transform(base_key, images, pad), ds.mean, ds.std)
        x_aug, _ = scheme(aug_key, x, labels, score_fn)
        return probs(x), probs(x_aug)

    prob_list, group_means, entropies = [], [], []

    def add(p):
        p = np.asarray(p, np.float64)
        prob_list.append(p)
        # 0 log 0 = 0 (a probability that underflowed to zero; the original's formula gives NaN there)
        entropies.append(-(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1))
        if len(prob_list) >= 10:
            group_means.append(np.concatenate(prob_list).mean(axis=0))
            prob_list.clear()

    step = 0
    for epoch in range(EPOCHS):
        perm = np.asarray(te.epoch_permutation(keys["perm"], epoch, ds.num_train))
        for start in range(0, ds.num_train, BATCH):  # drop_last False: the short batch too
            idx = perm[start:start + BATCH]
            p, p_aug = one_step(te.base_step_key(keys["base"], step), te.scheme_step_key(keys["aug"], name, step),
                                jnp.asarray(ds.train_images[idx]), jnp.asarray(ds.train_labels[idx]))
            add(p)
            add(p_aug)
            step += 1
    means = np.stack(group_means)
    return means.std(axis=0, ddof=1).mean(), np.concatenate(entropies).mean(), len(group_means)


ALL_NAMES = ["identity", "mixup", "cutmix_pick_t", "cutmix_pick_s"]


@pytest.fixture(scope="module")
def shared(setup):
    return _evaluator(setup, ALL_NAMES)


@pytest.fixture(scope="module")
def together(setup, shared):
    return _run(setup, shared)


# --------------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("num_train, epochs, groups, short", [(50000, 10, 1564, 16), (100000, 10, 3126, 32)])
def test_plan_keeps_the_original_grouping(num_train, epochs, groups, short):
    plan = te.make_plan(num_train, 64, epochs, steps_per_dispatch=200, steps_per_forward=8)
    assert plan.short_batch == short
    assert plan.steps_per_epoch == math.ceil(num_train / 64)
    assert plan.expected_groups() == groups == te.expected_groups(num_train, 64, epochs)
    assert plan.slots % plan.steps_per_forward == 0


@pytest.mark.parametrize("num_train, batch, spd, spf", [(781 * 64 + 16, 64, 200, 8), (100, 16, 4, 2),
                                                        (1000, 7, 13, 5), (64, 64, 10, 8), (10, 64, 10, 8)])
def test_chunks_cover_every_full_step_once(num_train, batch, spd, spf):
    plan = te.make_plan(num_train, batch, 1, steps_per_dispatch=spd, steps_per_forward=spf)
    covered = []
    chunks = [seg for seg in plan.segments() if seg.kind == "full"]
    for seg in chunks:
        assert 1 <= seg.steps <= plan.slots == seg.slots
        covered += range(seg.first_step, seg.first_step + seg.steps)
    assert covered == list(range(num_train // batch))
    # the balanced chunk length wastes fewer than one forward block per chunk
    waste = len(chunks) * plan.slots - plan.full_steps
    assert waste < len(chunks) * plan.steps_per_forward or plan.full_steps == 0


def test_plan_avoids_masked_slots_when_it_can():
    plan = te.make_plan(640, 64, 1, steps_per_dispatch=200, steps_per_forward=8)
    assert (plan.steps_per_forward, plan.slots, len(plan.segments())) == (5, 10, 1)


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        te.make_plan(100, 0, 1)
    with pytest.raises(ValueError, match="steps_per_forward"):
        te.make_plan(100, 16, 1, steps_per_forward=0)


# ------------------------------------------------------------------------------------------- evaluator


@pytest.mark.parametrize("name", ALL_NAMES)
def test_matches_the_original_procedure(setup, together, name):
    want_std, want_entropy, want_groups = reference(setup, name)
    got = together["results"][name]
    assert got["groups"] == want_groups == te.expected_groups(NUM_TRAIN, BATCH, EPOCHS) == 4
    np.testing.assert_allclose(got["tstddev"], want_std, rtol=1e-6)
    np.testing.assert_allclose(got["mean_entropy"], want_entropy, rtol=1e-6)
    assert np.isfinite(got["tstddev_se"]) and got["tstddev_se"] > 0


def test_shared_program_equals_single_scheme_runs(setup, together):
    for name in ("cutmix_pick_t",):
        alone = _run(setup, _evaluator(setup, [name]))["results"][name]
        for field in ("tstddev", "tstddev_se", "mean_entropy"):
            np.testing.assert_allclose(together["results"][name][field], alone[field], rtol=1e-6, err_msg=field)
        assert together["results"][name]["groups"] == alone["groups"]


def test_teacher_rows_and_free_forwards(together):
    # x (16) + mixup x' (16) + CutMixPick(T) pool (32, reused for the picked) + CutMixPick(S) picked (16);
    # identity reuses t(x).
    assert together["teacher_rows_per_step"] == 16 + 16 + 32 + 16
    assert together["student_rows_per_step"] == 32
    # short batch of 4: x, mixup, the CutMixPick(T) pool of 8 and the 8 picked by CutMixPick(S) (min(16, 2 * 4))
    per_epoch = 6 * 80 + (4 + 4 + 8 + 8)
    assert together["teacher_rows"] == EPOCHS * per_epoch


def test_seed_is_a_runtime_argument(setup, shared, together):
    other = _run(setup, shared, seed=1)["results"]
    assert all(other[n]["tstddev"] != together["results"][n]["tstddev"] for n in ALL_NAMES)
    again = _run(setup, shared, seed=0)["results"]
    assert all(again[n] == together["results"][n] for n in ALL_NAMES)


def results_on_eight_devices(names: str, num_test: int) -> dict:
    """The evaluator's results on a mesh of 8 fake CPU devices, in a subprocess (the device count is fixed when JAX
    starts): the setup of this module's tiny case, with the schemes ``names`` (a Python expression there)."""
    import subprocess
    import sys

    from helpers import launch_env

    script = f"""
import json, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
import jax
jax.config.update("jax_disable_most_optimizations", True)
import test_tstddev_evaluator as T
import test_tstddev_teacher_metrics as M
from kdjax import data as kdata, models
from kdjax.parallel import make_mesh
ds = kdata.load("synthetic", image_size=T.IMAGE_SIZE, num_train=T.NUM_TRAIN, num_test={num_test},
                num_classes=T.NUM_CLASSES)
setup = dict(dataset=ds, model=models.create(T.TINY, T.NUM_CLASSES, T.IMAGE_SIZE),
             teacher_vars=T._variables(0, T.IMAGE_SIZE, T.NUM_CLASSES),
             student_vars=T._variables(1, T.IMAGE_SIZE, T.NUM_CLASSES),
             data=kdata.DeviceDataset.create(ds, make_mesh()))
print("RESULT", jax.device_count(), json.dumps(T._run(setup, T._evaluator(setup, {names}))["results"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=launch_env(devices=8), capture_output=True,
                          text=True, timeout=600)
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    _, count, payload = line[0].split(" ", 2)
    assert int(count) == 8
    return json.loads(payload)


@pytest.mark.slow
def test_eight_devices_give_the_same_values(setup, together):
    """A mesh of 8 (fake CPU) devices, with a short batch of 4 rows that does not divide over them."""
    payload = results_on_eight_devices("T.ALL_NAMES", num_test=8)
    for name, got in payload.items():
        for field in ("tstddev", "tstddev_se", "mean_entropy"):
            np.testing.assert_allclose(got[field], together["results"][name][field], rtol=1e-5, err_msg=field)
