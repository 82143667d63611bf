"""VGG, MobileNetV2 and ShuffleNet V1/V2: structure against the original's state_dict and parameter counts, the
original's initialisers, feature lists, shuffle/split/concat semantics against NumPy NCHW references, the bn_groups
contract and bf16."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.checkpoint import torch_names
from kdjax.models.shufflenet import BasicBlockV2, BottleneckV1, DownBlockV2, channel_shuffle

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
# (classes, image size) of the fixture's counts: CIFAR-10/100 at 32x32, Tiny ImageNet at 64x64.
COUNT_SETTINGS = [(10, 32), (100, 32), (200, 64)]


@pytest.fixture(scope="module")
def param_counts():
    return json.loads((FIXTURES / "param_counts.json").read_text())


@pytest.fixture(scope="module")
def torch_keys():
    return json.loads((FIXTURES / "state_dict_keys.json").read_text())


def _n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_match_the_original(arch, param_counts):
    for num_classes, size in COUNT_SETTINGS:
        variables = torch_names.abstract_variables(models.create(arch, num_classes, size), size)
        assert _n_params(variables["params"]) == param_counts[arch][str(num_classes)], (num_classes, size)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_accepts_the_original_state_dict_and_rejects_a_wrong_shape(arch, torch_keys):
    rng = np.random.default_rng(0)
    state = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in torch_keys[arch]}
    abstract = torch_names.abstract_variables(models.create(arch, 100, 32), 32)
    converted = torch_names.convert_state_dict(state, abstract, arch)
    # Every torch tensor lands, in flax layout, at its named place (spot-check the last conv-like 4-D weight).
    key4d = [k for k, s in torch_keys[arch] if len(s) == 4][-1]
    _, path = torch_names.flax_location(key4d, 4)
    leaf = converted["params"]
    for part in path:
        leaf = leaf[part]
    np.testing.assert_array_equal(leaf, np.transpose(state[key4d], (2, 3, 1, 0)))
    # A depthwise kernel with the full input width (groups forgotten), or any conv with a wrong input width when
    # the architecture has no depthwise conv, must be refused.
    bad = dict(state)
    depthwise = [k for k, s in torch_keys[arch] if len(s) == 4 and s[1] == 1 and s[0] > 1]
    key = depthwise[0] if depthwise else key4d
    shape = list(state[key].shape)
    shape[1] = shape[0] if depthwise else shape[1] + 1
    bad[key] = np.zeros(shape, np.float32)
    with pytest.raises(torch_names.CheckpointMismatch, match="shape"):
        torch_names.convert_state_dict(bad, abstract, arch)


_INITIALISED = {}


def _init(arch):
    """(model, variables) at 10 classes, 32x32, seed 0; cached because a full init costs seconds on CPU."""
    if arch not in _INITIALISED:
        model = models.create(arch, 10, 32)
        _INITIALISED[arch] = model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    return _INITIALISED[arch]


def _assert_std(values, expected, rel):
    std = float(np.std(np.asarray(values)))
    assert abs(std / expected - 1) < rel, (std, expected)


def test_vgg8_init_statistics():
    _, variables = _init("vgg8")
    p = variables["params"]
    # He-normal(fan_out), untruncated: N(0, 2 / (3*3*C_out)); 2.4M samples give a ~0.1% standard error.
    _assert_std(p["block4_0"]["kernel"], np.sqrt(2 / (9 * 512)), 0.01)
    _assert_std(p["block0_0"]["kernel"], np.sqrt(2 / (9 * 64)), 0.15)
    assert float(np.max(np.abs(p["block4_0"]["kernel"]))) > 4.5 * np.sqrt(2 / (9 * 512))  # not truncated at 2 sd
    np.testing.assert_array_equal(p["block2_0"]["bias"], 0)
    _assert_std(p["classifier"]["kernel"], 0.01, 0.06)  # 5120 samples: ~1% standard error
    np.testing.assert_array_equal(p["classifier"]["bias"], 0)
    np.testing.assert_array_equal(p["block1_1"]["scale"], 1)
    np.testing.assert_array_equal(variables["batch_stats"]["block1_1"]["var"], 1)


def test_mobilenetv2_init_statistics():
    _, variables = _init("MobileNetV2")
    p = variables["params"]
    _assert_std(p["conv2_0"]["kernel"], np.sqrt(2 / 1280), 0.01)
    # Depthwise 3x3 over 480 channels: fan_out = 3*3*480 (the original's k*k*out_channels), 4320 samples.
    _assert_std(p["blocks_5_1"]["conv_3"]["kernel"], np.sqrt(2 / (9 * 480)), 0.05)
    assert p["blocks_5_1"]["conv_3"]["kernel"].shape == (3, 3, 1, 480)
    _assert_std(p["classifier_0"]["kernel"], 0.01, 0.06)
    np.testing.assert_array_equal(p["classifier_0"]["bias"], 0)


def test_shufflev2_uses_pytorch_default_init():
    _, variables = _init("ShuffleV2")
    p = variables["params"]
    for kernel, fan_in in [(p["conv2"]["kernel"], 464), (p["layer2_3"]["conv2"]["kernel"], 9),
                           (p["linear"]["kernel"], 1024)]:
        bound = 1 / np.sqrt(fan_in)
        assert float(np.max(np.abs(kernel))) <= bound
        _assert_std(kernel, bound / np.sqrt(3), 0.05)  # U(-b, b) has sd b / sqrt(3)
    bias = np.asarray(p["linear"]["bias"])
    assert np.all(np.abs(bias) <= 1 / np.sqrt(1024)) and np.std(bias) > 0.3 / np.sqrt(1024)


FEATURE_SHAPES = {  # (image size) -> shapes without the batch axis, from the original's forward
    ("vgg8", 32): [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)],
    ("vgg13", 64): [(64, 64, 64), (32, 32, 128), (16, 16, 256), (8, 8, 512), (4, 4, 512), (512,)],
    ("MobileNetV2", 32): [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160), (1280,)],
    ("MobileNetV2", 64): [(32, 32, 16), (32, 32, 12), (16, 16, 16), (8, 8, 48), (4, 4, 160), (1280,)],
    ("ShuffleV1", 32): [(32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960), (960,)],
    ("ShuffleV2", 32): [(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464), (1024,)],
    ("ShuffleV2", 64): [(64, 64, 24), (32, 32, 116), (16, 16, 232), (8, 8, 464), (1024,)],
}


@pytest.mark.parametrize("arch,size", sorted(FEATURE_SHAPES))
def test_feature_lists(arch, size):
    model, batch = models.create(arch, 7, size), 2
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = torch_names.abstract_variables(model, size)
    feats, logits = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
    assert [f.shape[1:] for f in feats] == FEATURE_SHAPES[(arch, size)]
    assert logits.shape == (batch, 7) and logits.dtype == jnp.float32


def test_vgg_extra_pool_follows_the_runtime_height():
    # A 32x32-built teacher run on 64x64 inputs pools after block 3 as the original (it checks the input's H).
    model = models.create("vgg8", 5, 32)
    variables = torch_names.abstract_variables(model, 32)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    feats, _ = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
    assert feats[3].shape[1:3] == (8, 8) and feats[4].shape[1:3] == (4, 4)


def test_mobilenetv2_rejects_an_image_size_the_original_refuses():
    with pytest.raises(ValueError, match="divisible by 32"):
        models.create("MobileNetV2", 10, 48)


def _shuffle_nchw_reference(x_nchw, groups):
    n, c, h, w = x_nchw.shape
    return x_nchw.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


@pytest.mark.parametrize("channels,groups", [(6, 2), (12, 3), (464, 2), (240, 3)])
def test_channel_shuffle_matches_pytorch_nchw_semantics(channels, groups):
    x = np.random.default_rng(1).standard_normal((2, 3, 5, channels)).astype(np.float32)  # NHWC
    want = _shuffle_nchw_reference(x.transpose(0, 3, 1, 2), groups).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(channel_shuffle(jnp.asarray(x), groups)), want)


def test_grouped_conv_kernel_layout_matches_torch_groups():
    # Torch OIHW (out, in/g, 1, 1) with g=3: output o reads input group o // (out/g). Converted to HWIO it must
    # drive flax's feature_group_count the same way.
    rng = np.random.default_rng(2)
    cin, cout, g = 12, 6, 3
    w = rng.standard_normal((cout, cin // g, 1, 1)).astype(np.float32)
    x = rng.standard_normal((1, 2, 2, cin)).astype(np.float32)
    conv = nn.Conv(cout, (1, 1), feature_group_count=g, use_bias=False)
    got = conv.apply({"params": {"kernel": torch_names.to_flax_layout(w)}}, x)
    want = np.zeros((1, 2, 2, cout), np.float32)
    for o in range(cout):
        grp = o // (cout // g)
        want[..., o] = x[..., grp * (cin // g):(grp + 1) * (cin // g)] @ w[o, :, 0, 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _zero_kernel(params, module):
    params = jax.tree.map(lambda a: a, params)
    params[module]["kernel"] = jnp.zeros_like(params[module]["kernel"])
    return params


def test_shufflev2_basic_block_passes_the_first_half_and_shuffles():
    # With the branch's last conv zeroed the branch outputs relu(BN(0)) = 0 (beta = 0), so the block is
    # shuffle(concat[x1, 0]): the first half lands on the even channels, as the original's cat([x1, out]).
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 8)), jnp.float32)
    block = BasicBlockV2()
    variables = block.init(jax.random.key(0), x, train=False)
    variables = {**variables, "params": _zero_kernel(variables["params"], "conv3")}
    out = np.asarray(block.apply(variables, x, train=False))
    np.testing.assert_array_equal(out[..., 0::2], np.asarray(x[..., :4]))
    np.testing.assert_array_equal(out[..., 1::2], 0)


def test_shufflev2_down_block_concatenates_left_then_right():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 6)), jnp.float32)
    block = DownBlockV2(out_channels=8)
    variables = block.init(jax.random.key(0), x, train=False)
    variables = {**variables, "params": _zero_kernel(variables["params"], "conv5")}  # right branch -> 0
    out = np.asarray(block.apply(variables, x, train=False))
    assert out.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(out[..., 1::2], 0)
    assert np.all(np.abs(out[..., 0::2]).sum(axis=(0, 1, 2)) > 0)


def _avg_pool_3x3_s2_count_pad(x):
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c), x.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum(axis=(1, 2)) / 9.0
    return out


def test_shufflev1_down_block_appends_a_zero_padded_average_pool():
    x = np.abs(np.random.default_rng(5).standard_normal((2, 6, 6, 24))).astype(np.float32)
    block = BottleneckV1(out_channels=216, stride=2, groups=3)
    variables = block.init(jax.random.key(0), jnp.asarray(x), train=False)
    variables = {**variables, "params": _zero_kernel(variables["params"], "conv3")}
    out = np.asarray(block.apply(variables, jnp.asarray(x), train=False))
    assert out.shape == (2, 3, 3, 240)
    np.testing.assert_array_equal(out[..., :216], 0)  # [branch, shortcut] order
    np.testing.assert_allclose(out[..., 216:], _avg_pool_3x3_s2_count_pad(x), rtol=1e-6, atol=1e-6)


def test_bn_groups_2_equals_two_train_forwards_vgg8():
    rng = np.random.default_rng(6)
    x1, x2 = (jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32) for _ in range(2))
    single, variables = _init("vgg8")
    paired = single.clone(bn_groups=2)
    params, stats = variables["params"], variables["batch_stats"]

    def train_forward(model):
        return jax.jit(lambda s, x: model.apply({"params": params, "batch_stats": s}, x, train=True,
                                                mutable=["batch_stats"]))

    step = train_forward(single)
    la, upd = step(stats, x1)
    lb, upd = step(upd["batch_stats"], x2)
    lab, upd2 = train_forward(paired)(stats, jnp.concatenate([x1, x2]))
    np.testing.assert_allclose(np.asarray(lab), np.concatenate([la, lb]), rtol=1e-4, atol=1e-5)
    want, got = _flat(upd["batch_stats"]), _flat(upd2["batch_stats"])
    assert sorted(want) == sorted(got)
    for path, value in want.items():
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=1e-4, atol=1e-6, err_msg=path)
    # The statistics did move (the comparison is not between two untouched initial states).
    assert float(jnp.abs(upd["batch_stats"]["block0_1"]["var"] - 1).min()) > 1e-2


@pytest.mark.parametrize("arch", ["ShuffleV2", "vgg8"])
def test_bfloat16_forward_is_close_to_float32(arch):
    x = jnp.asarray(np.random.default_rng(7).standard_normal((4, 32, 32, 3)), jnp.float32)
    f32, variables = _init(arch)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    # Inference BatchNorm: train-mode BN on a 4-image batch normalises channels whose spread is far below their
    # mean at initialisation, which magnifies bf16 rounding in deep nets regardless of the implementation.
    want = jax.jit(lambda v, x: f32.apply(v, x))(variables, x)
    feats, got = jax.jit(lambda v, x: bf16.apply(v, x, features=True))(variables, x)
    assert got.dtype == jnp.float32 and feats[1].dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 0.03, err
