"""kdjax.train.recipe: the paper's optimiser and its per-epoch step decay."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.train import recipe


def test_step_decay_schedule_is_per_epoch_with_strict_milestones():
    schedule = recipe.step_decay_schedule(0.05, steps_per_epoch=3, decay_epochs=(2, 4), decay_rate=0.1)
    lrs = [float(schedule(c)) for c in range(15)]
    # epochs 1-2 (counts 0-5) at 0.05, epochs 3-4 at 0.005, from epoch 5 on 0.0005
    np.testing.assert_allclose(lrs, [0.05] * 6 + [0.005] * 6 + [0.0005] * 3, rtol=1e-6)


def test_paper_milestones_and_epoch_factor():
    assert recipe.scaled_decay_epochs((150, 180, 210), 4) == (600, 720, 840)
    schedule = recipe.step_decay_schedule(0.05, 782, (150, 180, 210))
    assert float(schedule(150 * 782 - 1)) == pytest.approx(0.05)  # last step of epoch 150
    assert float(schedule(150 * 782)) == pytest.approx(0.005)     # first step of epoch 151


def test_default_lr_rule_and_explicit_value_wins():
    assert recipe.default_lr("resnet20", None) == 0.05
    assert recipe.default_lr("ShuffleV2", None) == 0.01
    assert recipe.default_lr("MobileNetV2", 0.2) == 0.2


def test_optimizer_matches_pytorch_sgd():
    """PyTorch SGD: d = g + wd p; buf = d (first step) then m buf + d; p -= lr buf; lr from the schedule."""
    A = np.array([[2.0, 0.3], [0.3, 1.0]], np.float32)
    tx, schedule = recipe.make_optimizer(0.1, steps_per_epoch=2, decay_epochs=(1,), momentum=0.9, weight_decay=0.01)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    ref_p, buf = np.array([1.0, -2.0]), None
    for count in range(5):
        g = A @ np.asarray(p)
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
        d = A @ ref_p + 0.01 * ref_p
        buf = d if buf is None else 0.9 * buf + d
        ref_p = ref_p - (0.1 if count < 2 else 0.01) * buf
        np.testing.assert_allclose(np.asarray(p), ref_p, rtol=1e-5)


def test_schedule_is_bit_identical_to_the_per_epoch_rule():
    """optax's piecewise schedule gives, in float32, exactly what the per-epoch rule base_lr * rate ** passed
    gives (passed = milestones with epoch > m), at every boundary of the paper's milestones."""
    milestones = jnp.asarray((150, 180, 210), jnp.int32)
    for base_lr in (0.05, 0.01, 0.1):
        schedule = recipe.step_decay_schedule(base_lr, 23, (150, 180, 210))
        for count in (0, 150 * 23 - 1, 150 * 23, 180 * 23 - 1, 180 * 23, 210 * 23 - 1, 210 * 23, 240 * 23):
            passed = jnp.sum(jnp.int32(count) // 23 + 1 > milestones)
            want = np.float32(base_lr * 0.1 ** passed)
            assert np.float32(schedule(jnp.int32(count))).tobytes() == want.tobytes(), (base_lr, count)


def _optim(**fields):
    from kdjax.configs import fields as config_fields
    optim = config_fields.optim_config()
    for key, value in fields.items():
        optim[key] = value
    return optim


@pytest.mark.parametrize("epochs, factor, want", [(240, 1, (150, 180, 210)), (240, 4, (600, 720, 840)),
                                                  (10, 1, (6, 8, 9)), (2, 1, (1, 2, 2)), (1, 1, (1, 1, 1))])
def test_milestones_are_fractions_of_the_run_by_default(epochs, factor, want):
    assert recipe.decay_milestones(_optim(), epochs, factor) == want


def test_absolute_milestones_and_the_error_for_both():
    assert recipe.decay_milestones(_optim(decay_epochs=(150, 180, 210)), 10, 2) == (300, 360, 420)
    assert recipe.decay_milestones(_optim(decay_fractions=(0.5,)), 10, 1) == (5,)
    with pytest.raises(ValueError, match="either optim.decay_fractions .* or optim.decay_epochs"):
        recipe.decay_milestones(_optim(decay_epochs=(5,), decay_fractions=(0.5,)), 10, 1)


def test_a_shortened_run_anneals():
    schedule = recipe.step_decay_schedule(0.05, 4, recipe.decay_milestones(_optim(), 10, 1))
    lrs = [float(schedule(epoch * 4)) for epoch in range(10)]  # first step of each epoch
    np.testing.assert_allclose(lrs, [0.05] * 6 + [0.005] * 2 + [0.0005] + [0.00005], rtol=1e-6)


def test_a_milestone_given_twice_decays_twice():
    schedule = recipe.step_decay_schedule(0.1, 5, (2, 2, 3))
    np.testing.assert_allclose([float(schedule(e * 5)) for e in range(4)], [0.1, 0.1, 0.001, 0.0001], rtol=1e-6)


def test_the_training_spec_resolves_the_run_fields_and_the_recipe_follows_it():
    from helpers import load_config
    config = load_config("teacher", "model=MobileNetV2,epochs=10,epoch_factor=2,batch_size=16,eval_every=3")
    spec = recipe.training_spec(config, "MobileNetV2")
    assert (spec.model, spec.epochs, spec.base_lr, spec.decay_epochs) == ("MobileNetV2", 20, 0.01, (13, 15, 18))
    assert spec.bookkeeping == recipe.Bookkeeping(eval_every=3, checkpoint_every=10, keep_checkpoints=2,
                                                  eval_batch_size=500, checkpoint_every_steps=None)
    made = recipe.make_recipe(spec, num_train=100, num_devices=1)  # 6 batches of 16 and one of 4
    assert (made.epochs, made.plan.steps_per_epoch, made.base_lr, made.decay_epochs) == (20, 7, 0.01, (13, 15, 18))
    np.testing.assert_allclose([float(made.schedule(7 * e)) for e in (12, 13, 15, 18)], [0.01, 0.001, 1e-4, 1e-5],
                               rtol=1e-6)


def test_init_state_is_the_models_own_init_in_one_program():
    """The whole fresh state is one program (the optimiser's zeros inside it), with the very parameters and
    statistics of the model's init alone."""
    import jax
    import tiny_models  # noqa: F401  (registers tiny_cnn)
    from kdjax import models
    model = models.create("tiny_cnn", 10, 8, jnp.float32)
    key = jax.random.key(3)
    tx = optax.sgd(0.1, momentum=0.9)
    state = recipe.init_state(model, tx, key, 8)
    alone = jax.jit(lambda k: model.init(k, jnp.zeros((2, 8, 8, 3), jnp.float32), train=False))(key)
    got = jax.tree.leaves((state["params"], state["batch_stats"]))
    want = jax.tree.leaves((alone["params"], alone["batch_stats"]))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert all(not np.any(m) for m in jax.tree.leaves(state["opt_state"])) and int(state["step"]) == 0
