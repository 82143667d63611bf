"""CIFAR ResNets, ResNet18/50 and WRNs: structure against the original's state_dicts and parameter counts,
initialisation, feature lists, grouped BatchNorm and bfloat16 compute."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from kdjax import models
from kdjax.checkpoint import torch_names
from kdjax.models import resnet, resnetv2, wrn

ARCHS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
         "resnet32x4", "ResNet18", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
PARAM_COUNTS = json.loads((FIXTURES / "param_counts.json").read_text())
STATE_DICT_KEYS = json.loads((FIXTURES / "state_dict_keys.json").read_text())


@functools.lru_cache(maxsize=None)
def abstract(arch, num_classes, image_size):
    return torch_names.abstract_variables(models.create(arch, num_classes, image_size), image_size)


def n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_state_dict(arch, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in STATE_DICT_KEYS[arch]}


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_match_original(arch):
    for num_classes, size in ((10, 32), (100, 32), (200, 64)):
        got = n_params(abstract(arch, num_classes, size)["params"])
        assert got == PARAM_COUNTS[arch][str(num_classes)], (arch, num_classes)


def wrn_param_formula(depth, k, num_classes):
    """Closed form of a pre-activation WRN's trainable parameters (BN = 2 per channel, convs bias-free)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 9 * 3 * 16
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + (c_in * c_out if c_in != c_out else 0)
        total += (n - 1) * (4 * c_out + 18 * c_out * c_out)
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


def test_wrn_28_10_count_follows_the_formula_that_fits_the_fixture_wrns():
    for arch in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"):
        depth, k = map(int, arch.split("_")[1:])
        assert wrn_param_formula(depth, k, 100) == PARAM_COUNTS[arch]["100"]
    assert n_params(abstract("wrn_28_10", 100, 32)["params"]) == wrn_param_formula(28, 10, 100)


@pytest.mark.parametrize("arch", ARCHS)
def test_original_state_dict_converts(arch):
    sd = random_state_dict(arch)
    variables = torch_names.convert_state_dict(sd, abstract(arch, 100, 32), arch)
    # every tensor of the original lands somewhere, and the kept ones are exactly the model's variables
    kept = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert n_params(variables) == sum(sd[k].size for k in kept)
    # spot-check values: a conv kernel, a BN running statistic and the classifier, through the layout change
    conv_key = next(k for k in kept if k.endswith("conv1.weight") and k != "conv1.weight")
    col, path = torch_names.flax_location(conv_key, 4)
    np.testing.assert_array_equal(functools.reduce(dict.__getitem__, path, variables[col]),
                                  sd[conv_key].transpose(2, 3, 1, 0))
    bn_key = next(k for k in kept if k.endswith("running_var"))
    col, path = torch_names.flax_location(bn_key, 1)
    np.testing.assert_array_equal(functools.reduce(dict.__getitem__, path, variables[col]), sd[bn_key])
    head = "linear" if arch.startswith("ResNet") else "fc"
    np.testing.assert_array_equal(variables["params"][head]["kernel"], sd[f"{head}.weight"].T)


@pytest.mark.parametrize("arch", ["resnet8x4", "ResNet50", "wrn_16_2"])
def test_conversion_rejects_wrong_shape_and_missing_key(arch):
    sd = random_state_dict(arch)
    bad_shape = dict(sd)
    key = next(k for k in sd if k.endswith("downsample.0.weight") or k.endswith("shortcut.0.weight")
               or k.endswith("convShortcut.weight"))
    bad_shape[key] = sd[key][:, :-1]
    with pytest.raises(torch_names.CheckpointMismatch, match="shape"):
        torch_names.convert_state_dict(bad_shape, abstract(arch, 100, 32), arch)
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(torch_names.CheckpointMismatch, match="lacks"):
        torch_names.convert_state_dict(missing, abstract(arch, 100, 32), arch)
    with pytest.raises(torch_names.CheckpointMismatch):  # a 10-class checkpoint for a 100-class model
        torch_names.convert_state_dict(sd, abstract(arch, 10, 32), arch)


def flat_with_paths(tree):
    return {"/".join(str(getattr(p, "key", p)) for p in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_conv_kernels_kaiming_fan_out(params):
    """Each sizeable conv kernel: std = sqrt(2 / (kh kw C_out)) within 6 %, and an untruncated tail (|w| > 2.5 sigma
    occurs; a truncated normal would cut at 2 sigma)."""
    checked = 0
    for name, w in flat_with_paths(params).items():
        if w.ndim != 4 or w.size < 2000:
            continue
        sigma = np.sqrt(2.0 / (w.shape[0] * w.shape[1] * w.shape[3]))
        assert abs(w.mean()) < 4 * sigma / np.sqrt(w.size), name
        assert abs(w.std() / sigma - 1) < 0.06, (name, w.std(), sigma)
        assert np.abs(w).max() > 2.5 * sigma, name
        checked += 1
    assert checked >= 3


def check_batchnorm_init(variables):
    for name, v in flat_with_paths(variables["params"]).items():
        if v.ndim == 1 and name.endswith("scale"):
            np.testing.assert_array_equal(v, 1.0, err_msg=name)
        elif v.ndim == 1 and name.endswith("bias") and not name.startswith(("fc/", "linear/")):
            np.testing.assert_array_equal(v, 0.0, err_msg=name)
    for name, v in flat_with_paths(variables["batch_stats"]).items():
        np.testing.assert_array_equal(v, 1.0 if name.endswith("var") else 0.0, err_msg=name)


def check_torch_default_linear_weight(kernel):
    bound = 1.0 / np.sqrt(kernel.shape[0])
    assert np.abs(kernel).max() <= bound
    # uniform on +-bound: std = bound / sqrt(3), and the draws reach close to both ends
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.05
    assert kernel.max() > 0.95 * bound and kernel.min() < -0.95 * bound


@pytest.mark.parametrize("arch,head", [("resnet8x4", "fc"), ("wrn_16_2", "fc")])
def test_initialisation_follows_the_original(arch, head):
    model = models.create(arch, 100, 32)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(1))
    check_conv_kernels_kaiming_fan_out(variables["params"])
    check_batchnorm_init(variables)
    kernel = np.asarray(variables["params"][head]["kernel"])
    check_torch_default_linear_weight(kernel)
    bias = np.asarray(variables["params"][head]["bias"])
    if arch.startswith("wrn"):
        np.testing.assert_array_equal(bias, 0.0)  # the original zeroes the WRN classifier bias
    else:
        bound = 1.0 / np.sqrt(kernel.shape[0])
        assert np.abs(bias).max() <= bound and bias.std() > 0.4 * bound / np.sqrt(3)


def test_resnetv2_initialisation():
    """The Bottleneck (with its projection shortcut) and the ``linear`` head of ResNet18/50; a whole ResNet18
    would cost ~10 s of compilation for the same helpers."""
    block = resnetv2.Bottleneck(64, stride=2)
    variables = jax.jit(lambda k: block.init(k, jnp.zeros((1, 8, 8, 128)), train=False))(jax.random.key(2))
    assert set(variables["params"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut_0", "shortcut_1"}
    check_conv_kernels_kaiming_fan_out(variables["params"])
    check_batchnorm_init(variables)
    head = resnet.torch_linear(100, 2048, jnp.float32, "linear")
    params = head.init(jax.random.key(3), jnp.zeros((1, 2048)))["params"]
    check_torch_default_linear_weight(np.asarray(params["kernel"]))
    bound = 1.0 / np.sqrt(2048)
    assert np.abs(params["bias"]).max() <= bound and np.asarray(params["bias"]).std() > 0.4 * bound / np.sqrt(3)


@pytest.mark.parametrize("arch,size,shapes", [
    ("resnet8", 32, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    ("resnet8x4", 64, [(64, 64, 32), (64, 64, 64), (32, 32, 128), (16, 16, 256), (256,)]),
    ("wrn_16_1", 32, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    ("wrn_40_2", 64, [(64, 64, 16), (64, 64, 32), (32, 32, 64), (16, 16, 128), (128,)]),
    ("ResNet18", 32, [(32, 32, 64), (32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (512,)]),
    ("ResNet50", 64, [(64, 64, 64), (64, 64, 256), (32, 32, 512), (16, 16, 1024), (8, 8, 2048), (2048,)]),
])
def test_feature_lists(arch, size, shapes):
    model = models.create(arch, 100, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    feats, logits = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), abstract(arch, 100, size), x)
    assert [f.shape[1:] for f in feats] == shapes
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32


def test_bad_depths_are_rejected():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        jax.eval_shape(resnet.CifarResNet(9, (16, 16, 32, 64), 10).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        jax.eval_shape(wrn.WideResNet(15, 1, 10).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.fixture(scope="module")
def resnet8_trained_like():
    """resnet8 with random weights and non-trivial BN statistics and affine parameters (so that BN modes and groups
    matter), drawn with NumPy on the abstract shapes: compiling ``init`` would cost more than the tests."""
    model = models.create("resnet8", 10, 16)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if len(leaf.shape) == 4:  # conv HWIO, He-normal on fan_out
            return rng.normal(0, np.sqrt(2 / (np.prod(leaf.shape[:2]) * leaf.shape[3])), leaf.shape)
        if len(leaf.shape) == 2:
            return rng.uniform(-1, 1, leaf.shape) / np.sqrt(leaf.shape[0])
        positive = getattr(path[-1], "key", "") in ("scale", "var")
        return positive + 0.2 * rng.uniform(-1, 1, leaf.shape)

    variables = jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(draw(p, l), jnp.float32),
                                                 abstract("resnet8", 10, 16))
    return model, variables


def test_bn_groups_two_equals_two_sequential_train_forwards(resnet8_trained_like):
    model, variables = resnet8_trained_like
    x1, x2 = jax.random.normal(jax.random.key(2), (2, 3, 16, 16, 3))
    params = {"params": variables["params"]}

    def train_forward(m):  # jitted: op-by-op dispatch of a whole network is slow on CPU
        return jax.jit(lambda s, x: m.apply({**params, "batch_stats": s}, x, train=True, mutable=["batch_stats"]))

    single = train_forward(model)
    l1, s1 = single(variables["batch_stats"], x1)
    l2, s2 = single(s1["batch_stats"], x2)
    lg, sg = train_forward(model.clone(bn_groups=2))(variables["batch_stats"], jnp.concatenate([x1, x2]))
    assert np.abs(np.asarray(s2["batch_stats"]["bn1"]["mean"] - variables["batch_stats"]["bn1"]["mean"])).min() > 0
    np.testing.assert_allclose(lg, jnp.concatenate([l1, l2]), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sg, s2)


def test_bfloat16_forward_is_close_to_float32(resnet8_trained_like):
    model, variables = resnet8_trained_like
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
    _, ref = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, x)
    bf16 = models.create("resnet8", 10, 16, dtype=jnp.bfloat16)
    feats, logits = jax.jit(lambda v, x: bf16.apply(v, x, features=True))(variables, x)
    assert logits.dtype == jnp.float32 and all(f.dtype == jnp.bfloat16 for f in feats)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(logits) - np.asarray(ref)).max())
    assert err < 0.05 * scale, err
    assert err > 0  # the computation did run in reduced precision
