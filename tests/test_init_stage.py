"""The init stage of ab, ft and fsp (kdjax.train.init_stage): what one step trains and leaves alone, against an
independent SGD step on the same loss; the KD stage starts from the stage's result with a fresh optimiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from kdjax import distillers, models
from kdjax.train import init_stage, recipe as recipe_lib, steps

SIZE, BATCH = 8, 8
# wrn_16_1: its final BatchNorm lies outside the original's feature modules (get_feat_modules), so the stage
# must leave its parameters and statistics alone, as well as the classifier's.
MODEL = "wrn_16_1"


# ab's connectors are the identity between maps of equal shape: a wider teacher gives it heads to train
TEACHER = {"ab": "wrn_16_2"}


def _setup(name):
    student = models.create(MODEL, 10, SIZE, jnp.float32)
    teacher = models.create(TEACHER.get(name, MODEL), 10, SIZE, jnp.float32)
    x = jnp.zeros((2, SIZE, SIZE, 3))
    s_vars = student.init(jax.random.key(0), x, train=False)
    t_vars = teacher.init(jax.random.key(1), x, train=False)
    distiller = distillers.create(name)
    feats_s = models.feature_shapes(student, s_vars, BATCH, SIZE, distiller.preact)
    feats_t = models.feature_shapes(teacher, t_vars, BATCH, SIZE, distiller.preact)
    heads = distiller.init_stage_heads(jax.random.key(2), feats_s, feats_t)
    config = load_config("distill", f"student={MODEL},teacher={MODEL},batch_size={BATCH},image_size={SIZE}")
    recipe = recipe_lib.make_recipe(recipe_lib.training_spec(config, MODEL), 64, 1)
    stage = init_stage.make_init_recipe(recipe, distiller, MODEL, s_vars["params"], heads)
    state = init_stage.init_stage_state(stage.tx, s_vars, heads)
    prepare = steps.make_prepare(jnp.full((3,), 0.5), jnp.full((3,), 0.25), 1)
    step = jax.jit(init_stage.make_init_step(student, MODEL, teacher, stage.tx, prepare, distiller))
    images = jax.random.randint(jax.random.key(3), (BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    batch = {"images": images, "labels": jnp.arange(BATCH) % 10, "indices": jnp.arange(BATCH)}
    return dict(student=student, teacher=teacher, s_vars=s_vars, t_vars=t_vars, distiller=distiller,
                stage=stage, state=state, step=step, batch=batch, prepare=prepare, config=config)


def _reference_grads(s, key):
    """d(init-stage loss)/d(student params, heads), written out apart from the stage's step."""
    d, preact = s["distiller"], ({"preact": True} if s["distiller"].preact else {})
    x = s["prepare"](jax.random.split(key)[0], s["batch"]["images"])
    feats_t, _ = s["teacher"].apply(s["t_vars"], x, train=False, features=True, **preact)

    def loss(params, heads):
        (feats_s, _), _ = s["student"].apply({"params": params, "batch_stats": s["s_vars"]["batch_stats"]}, x,
                                             train=True, features=True, mutable=["batch_stats"], **preact)
        return d.init_stage_loss(heads, feats_s if d.init_trains_student else None, feats_t)
    return jax.grad(loss, argnums=(0, 1))(s["s_vars"]["params"], s["state"]["extra"]["params"])


def _leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.parametrize("name", ["ab", "fsp", "ft"])
def test_one_init_step_trains_exactly_what_the_original_trains(name):
    s = _setup(name)
    key = jax.random.key(7)
    new, metrics = s["step"](s["state"], s["t_vars"], s["batch"], key)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    d, lr, wd = s["distiller"], s["stage"].base_lr, float(s["config"].optim.weight_decay)
    g_params, g_heads = _reference_grads(s, key)
    old_p, new_p = s["s_vars"]["params"], new["params"]
    mask = models.feature_mask(MODEL, old_p)
    assert set(old_p) - {k for k in old_p if all(_leaves(mask[k]))} >= {"fc", "bn1"}  # outside the features

    # the first SGD step with momentum is p - lr * (g + wd * p): on the trained leaves only
    for m, p, q, g in zip(_leaves(mask), _leaves(old_p), _leaves(new_p), _leaves(g_params)):
        if m and d.init_trains_student:
            np.testing.assert_allclose(q, p - lr * (g + wd * p), rtol=2e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(q, p)  # not even weight decay reaches them
    for p, q, g in zip(_leaves(s["state"]["extra"]["params"]), _leaves(new["extra"]["params"]), _leaves(g_heads)):
        np.testing.assert_allclose(q, p - lr * (g + wd * p), rtol=2e-5, atol=1e-7)
    assert len(_leaves(g_heads)) == (0 if name == "fsp" else len(_leaves(new["extra"]["params"]))) and \
        (name == "fsp" or any(not np.array_equal(p, q) for p, q in zip(_leaves(s["state"]["extra"]["params"]),
                                                                      _leaves(new["extra"]["params"]))))

    # BatchNorm statistics move in the feature modules only (the original's train-mode modules), never for ft
    stats_mask = models.feature_mask(MODEL, s["s_vars"]["batch_stats"])
    for m, a, b in zip(_leaves(stats_mask), _leaves(s["s_vars"]["batch_stats"]), _leaves(new["batch_stats"])):
        if m and d.init_trains_student:
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)


def test_the_original_learning_rate_rule_of_the_init_stage():
    student_lr = 0.05
    assert distillers.create("ft").init_stage_lr("resnet8", student_lr) == 0.01  # pretrain.py's FT rule
    assert distillers.create("ft").init_stage_lr("wrn_16_2", student_lr) == 0.01
    assert distillers.create("ft").init_stage_lr("vgg8", student_lr) == student_lr
    assert distillers.create("ab").init_stage_lr("resnet8", student_lr) == student_lr
    assert distillers.create("fsp").init_stage_lr("MobileNetV2", 0.01) == 0.01
    assert distillers.create("ab", init_lr=0.2).init_stage_lr("resnet8", student_lr) == 0.2


def test_last_epoch_train_loss_weights_each_chunk_by_its_steps(tmp_path):
    import json
    rows = [{"step": 4, "epoch": 1, "loss": 9.0}, {"step": 10, "epoch": 2, "loss": 2.0},
            {"step": 10, "epoch": 2, "test_loss": 1.0, "top1": 0.5}, {"step": 12, "epoch": 2, "loss": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert init_stage.last_epoch_train_loss(str(tmp_path), 2) == pytest.approx((2.0 * 6 + 5.0 * 2) / 8)
    assert init_stage.last_epoch_train_loss(str(tmp_path), 1) == pytest.approx(9.0)
    assert np.isnan(init_stage.last_epoch_train_loss(str(tmp_path / "none"), 1))
