"""The original's ``preact=True`` features and its feature modules (``get_feat_modules``), without torch.

Parity of the preact values with the original itself is in tests/test_torch_parity.py (committed fixtures for
resnet8 and wrn_16_1, the slow zoo test for the rest). Here: preact leaves the default outputs, the logits and the
variables alone and changes exactly the features that a ReLU follows; ``models.feature_mask`` selects as many
parameters and BN statistics as the original's ``get_feat_modules()`` holds (fixtures/feature_module_counts.json,
made by fixtures/make_feature_module_counts.py), shapes only (``eval_shape``: no compile).
"""
import functools
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from kdjax import models
from kdjax.checkpoint import import_torch, torch_names
from kdjax.models import layers, registry

FEATURE_COUNTS = json.loads((FIXTURES / "feature_module_counts.json").read_text())
# One architecture per family: preact must keep the variables and every output's shape.
FAMILIES = ["resnet8", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


def n_values(tree, mask=None):
    leaves = jax.tree.leaves(tree)
    keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
    return sum(int(np.prod(leaf.shape)) for leaf, k in zip(leaves, keep) if k)


@functools.lru_cache(maxsize=None)
def abstract(arch):
    return torch_names.abstract_variables(models.create(arch, 100, 32), 32)


# ------------------------------------------------------------------------------------------------- preact


@functools.lru_cache(maxsize=None)
def imported_outputs(arch):
    """Eval-mode (default, preact=False, preact=True) outputs of the committed checkpoint on its io input."""
    variables = import_torch(FIXTURES / f"{arch}_c100_s32.pth", arch, 100, 32)
    model = models.create(arch, 100, 32)
    x = np.transpose(np.load(FIXTURES / f"{arch}_c100_s32_io.npz")["input_nchw"], (0, 2, 3, 1))
    run = jax.jit(lambda v, x, preact: model.apply(v, x, features=True, preact=preact), static_argnums=2)
    default = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, x)
    return default, run(variables, x, False), run(variables, x, True)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_preact_changes_only_the_features_a_relu_follows(arch):
    (feats, logits), (off_feats, off_logits), (pre_feats, pre_logits) = imported_outputs(arch)
    np.testing.assert_array_equal(off_logits, logits)
    np.testing.assert_array_equal(pre_logits, logits)
    assert len(pre_feats) == len(off_feats) == len(feats) == 5
    for plain, off, pre in zip(feats, off_feats, pre_feats):
        np.testing.assert_array_equal(off, plain)
        assert pre.shape == plain.shape
    # the stem output (no ReLU follows it in WRN; it is already post-ReLU in ResNet) and the pooled vector stay
    for i in (0, 4):
        np.testing.assert_array_equal(pre_feats[i], feats[i])
    for i in (1, 2, 3):
        assert float(jnp.min(pre_feats[i])) < 0, f"{arch}: preact feat{i} has no negative entry"
        assert not np.array_equal(pre_feats[i], feats[i])
    if arch == "resnet8":  # f_i = relu(last block's sum)
        for i in (1, 2, 3):
            np.testing.assert_array_equal(jax.nn.relu(pre_feats[i]), feats[i])
    else:  # f3 goes through bn1-ReLU to the pooled vector: the preact f3 is that BN's output
        np.testing.assert_allclose(jnp.mean(jax.nn.relu(pre_feats[3]), axis=(1, 2)), feats[4], rtol=1e-6, atol=1e-6)
        assert float(jnp.min(feats[1])) < 0  # WRN's f1 is a residual sum, not a ReLU output


@pytest.mark.parametrize("arch", FAMILIES)
def test_preact_keeps_variables_and_output_shapes(arch):
    model = models.create(arch, 10, 32)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def init(preact):
        return jax.eval_shape(lambda k, x: model.init(k, x, train=False, features=True, preact=preact),
                              jax.random.key(0), x)

    variables, with_preact = init(False), init(True)
    assert jax.tree.map(lambda a: a.shape, with_preact) == jax.tree.map(lambda a: a.shape, variables)
    for train in (False, True):
        def apply(preact):
            out = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, features=True, preact=preact,
                                                          mutable=["batch_stats"] if train else False), variables, x)
            return out[0] if train else out
        assert jax.tree.map(lambda a: a.shape, apply(True)) == jax.tree.map(lambda a: a.shape, apply(False))


def test_repeated_batchnorm_updates_follow_two_separate_forwards_per_group():
    """updates=2 with groups=2 over concat[x, x'] = updates=2 on x, then updates=2 on x' (two preact forwards)."""
    x = jax.random.normal(jax.random.key(1), (8, 3, 3, 4))
    bn = layers.BatchNorm(groups=2)
    variables = bn.init(jax.random.key(0), x, train=True)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.full((4,), 0.3), "var": jnp.full((4,), 2.0)}}
    _, grouped = bn.apply(variables, x, train=True, updates=2, mutable=["batch_stats"])
    single = layers.BatchNorm()
    stats = variables["batch_stats"]
    for part in (x[:4], x[4:]):
        _, upd = single.apply({"params": variables["params"], "batch_stats": stats}, part, train=True, updates=2,
                              mutable=["batch_stats"])
        stats = upd["batch_stats"]
    for key in ("mean", "var"):
        np.testing.assert_allclose(grouped["batch_stats"][key], stats[key], rtol=1e-6)
    # and updates=2 is the update applied twice to the same batch statistics
    _, once = single.apply(variables, x[:4], train=True, mutable=["batch_stats"])
    _, twice = single.apply(variables, x[:4], train=True, updates=2, mutable=["batch_stats"])
    old = variables["batch_stats"]["mean"]
    np.testing.assert_allclose(twice["batch_stats"]["mean"], 1.9 * once["batch_stats"]["mean"] - 0.9 * old, rtol=1e-5)


def test_tiny_cnn_preact_gives_its_map_before_the_relu():
    import tiny_models  # noqa: F401  (registers tiny_cnn)
    model = models.create("tiny_cnn", 5, 8)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    (h, pooled), logits = model.apply(variables, x, features=True)
    (pre, pre_pooled), pre_logits = model.apply(variables, x, features=True, preact=True)
    np.testing.assert_array_equal(jax.nn.relu(pre), h)
    assert float(pre.min()) < 0
    np.testing.assert_array_equal(pre_pooled, pooled)
    np.testing.assert_array_equal(pre_logits, logits)


# ------------------------------------------------------------------------------------------- feature mask


def test_feature_counts_cover_the_zoo():
    # the ImageNet models have no get_feat_modules() in the original (tests/test_models_imagenet.py checks them)
    zoo = [n for n in models.names() if type(models.create(n, 10)).__module__.startswith("kdjax.models.")
           and not n.endswith("_imagenet")]
    assert sorted(FEATURE_COUNTS) == zoo


@pytest.mark.parametrize("arch", sorted(FEATURE_COUNTS))
def test_feature_mask_selects_the_originals_feature_modules(arch):
    variables = abstract(arch)
    want = FEATURE_COUNTS[arch]
    assert n_values(variables["params"]) == want["total_params"]
    for collection in ("params", "batch_stats"):
        mask = models.feature_mask(arch, variables[collection])
        assert jax.tree.structure(mask) == jax.tree.structure(variables[collection])
        assert all(type(m) is bool for m in jax.tree.leaves(mask))
        assert n_values(variables[collection], mask) == want[collection], (arch, collection)


def test_feature_mask_keeps_the_tree_type_and_refuses_a_full_variables_dict():
    params = abstract("wrn_16_1")["params"]
    frozen = flax.core.freeze(params)
    mask = models.feature_mask("wrn_16_1", frozen)
    assert isinstance(mask, flax.core.FrozenDict) and jax.tree.structure(mask) == jax.tree.structure(frozen)
    assert not any(jax.tree.leaves(mask["bn1"])) and not any(jax.tree.leaves(mask["fc"]))
    assert all(jax.tree.leaves(mask["block3"]))
    with pytest.raises(ValueError, match="non-feature modules"):
        models.feature_mask("wrn_16_1", dict(abstract("wrn_16_1")))


class _Net(nn.Module):
    """conv + Dense classifier named ``head_name``; declares nothing unless a subclass does."""

    num_classes: int
    head_name: str = "fc"

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x)).mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name=self.head_name)(h)
        return ([h], logits) if features else logits


class _DeclaredNet(_Net):
    non_feature_modules = ("head",)


@pytest.fixture
def registered():
    added = []

    def register(name, constructor):
        added.append(name)
        models.register(name, constructor)

    yield register
    for name in added:
        registry._CONSTRUCTORS.pop(name)


def test_registered_models_default_to_fc_or_declare_their_own(registered):
    x = jnp.zeros((1, 8, 8, 3))
    registered("_test_fc", lambda num_classes, image_size, dtype: _Net(num_classes))
    registered("_test_head", lambda num_classes, image_size, dtype: _Net(num_classes, "head"))
    registered("_test_declared", lambda num_classes, image_size, dtype: _DeclaredNet(num_classes, "head"))
    for name in ("_test_fc", "_test_declared"):
        params = models.create(name, 3).init(jax.random.key(0), x)["params"]
        head = "fc" if name == "_test_fc" else "head"
        assert models.feature_mask(name, params) == {"conv": {"kernel": True, "bias": True},
                                                     head: {"kernel": False, "bias": False}}
    assert models.non_feature_modules("_test_fc") == ("fc",)
    params = models.create("_test_head", 3).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="declare 'non_feature_modules'"):  # would train its classifier
        models.feature_mask("_test_head", params)


def test_tiny_cnn_feature_mask_is_all_but_its_classifier():
    import tiny_models  # noqa: F401  (registers tiny_cnn)
    variables = models.create("tiny_cnn", 5, 8).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    mask = models.feature_mask("tiny_cnn", variables["params"])
    assert {k: all(jax.tree.leaves(v)) for k, v in mask.items()} == {"conv1": True, "bn1": True, "conv2": True,
                                                                     "bn2": True, "fc": False}
    assert all(jax.tree.leaves(models.feature_mask("tiny_cnn", variables["batch_stats"])))
