"""kdjax.augment.switch: the KD step of the seven model-free schemes as one program, bit-equal to each scheme's
own."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models
from kdjax import augment
from kdjax.augment import switch as augment_switch
from kdjax.train import steps

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
CLASSES, BATCH, SIZE = 5, 8, 8
STATS = augment.DatasetStats(MEAN, STD, SIZE, CLASSES)


def _create(**options):
    return lambda name: augment.create(name, dataset_stats=STATS, **{"n_pick": BATCH, **options})


def _setup():
    student, teacher = tiny_models.TinyCNN(CLASSES, SIZE), tiny_models.TinyCNN(CLASSES, SIZE)
    x0 = jnp.zeros((2, SIZE, SIZE, 3))
    svars, tvars = student.init(jax.random.key(1), x0), teacher.init(jax.random.key(2), x0)
    tx = optax.sgd(0.1, momentum=0.9)
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.zeros((), jnp.int32), "extra": {}}
    images = jax.random.randint(jax.random.key(3), (3, BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.key(4), (3, BATCH), 0, CLASSES)
    return student, teacher, tvars, tx, state, images, labels


def _three_steps(step):
    """Three steps in one scan, as ``loop.fit`` runs them, jitted: ``run(state, tvars, images, labels, step_data)``
    (the run's ``step_data`` joins every batch)."""
    def run(state, tvars, images, labels, step_data):
        def body(state, i):
            batch = {"images": images[i], "labels": labels[i], **step_data}
            return step(state, tvars, batch, jax.random.fold_in(jax.random.key(9), i))
        return jax.lax.scan(body, state, jnp.arange(3))
    return jax.jit(run)


def _assert_bit_equal(a, b):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("weights, with_teacher, names", [
    # plain KD: the scheme's aux is not read
    (steps.KDWeights(), True, augment_switch.SWITCHABLE),
    # the mixed CE on x' reads the label targets the switch returns
    (steps.KDWeights(lw_mix=(1.0, 0.5, 1.0)), True, ("flip", "mixup", "cutmix")),
    # labels only: CE on x' with the mixed targets
    (steps.KDWeights(), False, ("identity", "mixup", "cutmix")),
], ids=["kd", "mixed_ce", "no_teacher"])
def test_switched_step_equals_each_schemes_own_step(weights, with_teacher, names):
    student, teacher, tvars, tx, state, images, labels = _setup()
    teacher = teacher if with_teacher else None
    tvars = tvars if with_teacher else None
    create = _create()
    prepare = lambda k, x: augment.normalize(x, MEAN, STD)  # noqa: E731
    # one compiled program for all of them: the switch of the first scheme, told each scheme's index
    first = augment_switch.make_switch(create, names[0])
    shared = _three_steps(steps.make_kd_step(student, teacher, tx, prepare, first, weights, CLASSES))
    switched = {}
    for name in names:
        switch = augment_switch.make_switch(create, name)
        assert switch.name == name and [s.name for s in switch.schemes] == list(augment_switch.SWITCHABLE)
        switched[name] = shared(state, tvars, images, labels, {"scheme": np.int32(switch.index)})
    for name in names:
        own = _three_steps(steps.make_kd_step(student, teacher, tx, prepare, create(name), weights, CLASSES))
        _assert_bit_equal(switched[name], own(state, tvars, images, labels, {}))
    # the schemes differ: the test would see a wrong branch
    firsts = {name: np.asarray(jax.tree.leaves(switched[name][0]["params"])[0]) for name in names}
    assert len({v.tobytes() for v in firsts.values()}) == len(names)


def test_one_program_serves_every_switchable_scheme():
    """The lowered program of the step is the same text for every scheme of the switch (what the persistent
    compilation cache keys on), and differs from a scheme's own program."""
    student, teacher, tvars, tx, state, images, labels = _setup()
    create = _create()

    def text(scheme, step_data):
        step = steps.make_kd_step(student, teacher, tx, lambda k, x: augment.normalize(x, MEAN, STD), scheme,
                                  steps.KDWeights(), CLASSES)
        batch = {"images": images[0], "labels": labels[0], **step_data}
        return jax.jit(step).lower(state, tvars, batch, jax.random.key(0)).as_text()

    texts = {name: text(augment_switch.make_switch(create, name), {"scheme": np.int32(i)})
             for i, name in enumerate(augment_switch.SWITCHABLE) if name in ("flip", "autoaugment", "cutmix")}
    assert len(set(texts.values())) == 1
    assert text(create("flip"), {}) != texts["flip"]


def test_which_schemes_switch():
    """The seven schemes no model scores; the CutMixPick schemes keep their own programs."""
    assert augment_switch.SWITCHABLE == ("identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix")
    create = _create()
    assert augment_switch.make_switch(create, "cutmix_pick_s") is None
    assert augment_switch.make_switch(create, "cutmix_pick_t") is None
    assert augment_switch.make_switch(create, "cutmix").index == 6


@pytest.mark.parametrize("backend, expected", [("cpu", "switch"), ("gpu", "own")])
def test_a_run_asked_to_switch_shares_the_program_on_cpu_only(monkeypatch, backend, expected):
    """scheme_switch=true: the run's setup holds the switch and gives its index as step data on XLA:CPU; on an
    accelerator it keeps the scheme's own program (kdjax.parallel.switches_schemes)."""
    from helpers import load_config
    from kdjax import data, parallel
    from kdjax.train import kd
    config = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,dataset=synthetic,image_size=8,aug=mixup,"
                                    "scheme_switch=true")
    spec = kd.DistillSpec.from_config(config, kd.KDMethod.from_config(config))
    dataset = data.load("synthetic", image_size=8, num_train=16, num_test=8)
    monkeypatch.setattr(parallel.jax, "default_backend", lambda: backend)
    setup = kd.KDSetup.create(spec, dataset, with_teacher=True)
    if expected == "switch":
        assert isinstance(setup.scheme, augment_switch.SchemeSwitch) and setup.scheme.name == "mixup"
        assert setup.step_data == {"scheme": augment_switch.SWITCHABLE.index("mixup")}
    else:
        assert isinstance(setup.scheme, augment.Scheme) and setup.scheme.name == "mixup" and setup.step_data == {}


def test_a_run_started_without_the_switch_resumes_and_counts_as_finished_with_it(tmp_path):
    """A sweep begun before scheme_switch existed (its runs record no such field) resumes with it: the field gives
    the same values, so a workdir's run neither refuses the resumption nor reruns when finished."""
    import json
    from helpers import load_config
    from kdjax import workdir as workdir_lib
    before = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,aug=flip")
    workdir_lib.claim(str(tmp_path), before)
    recorded = json.loads((tmp_path / workdir_lib.RUN_CONFIG).read_text())
    del recorded["scheme_switch"]  # as the previous release wrote it
    (tmp_path / workdir_lib.RUN_CONFIG).write_text(json.dumps(recorded))
    now = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,aug=flip,scheme_switch=true")
    workdir_lib.claim(str(tmp_path), now)  # no "different config" refusal
    (tmp_path / "results.json").write_text(json.dumps({"task": "distill", "test_loss": 0.5}))
    assert workdir_lib.finished_results(str(tmp_path), now)["test_loss"] == 0.5
    other = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,aug=mixup,scheme_switch=true")
    with pytest.raises(ValueError, match="aug"):  # a field that changes the run still does
        workdir_lib.claim(str(tmp_path), other)
