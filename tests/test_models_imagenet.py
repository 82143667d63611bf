"""The ImageNet zoo (resnet18/34/50_imagenet, mobilenetv1_imagenet) against torchvision and the reference
MobileNetV1, without torch.

fixtures/make_imagenet_parity.py wrote, with torch, the eval-mode logits and (projected) features of each model
on weights that ``imagenet_parity_common`` derives from the entry names; here the same weights are regenerated,
imported through the ``.pth`` path (``torch_to_variables``, so torchvision's key names are checked too) and run.
64 px with 10 classes in the default suite; torchvision's full models at 224 px (1000 classes) behind ``slow``.
"""
import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from kdjax import models
from kdjax.checkpoint import CheckpointMismatch, torch_names, torch_to_variables
from kdjax.models import layers

sys.path.insert(0, str(FIXTURES))
import imagenet_parity_common as common  # noqa: E402

EXPECTED = np.load(FIXTURES / "imagenet_parity.npz")
SHAPES = json.loads((FIXTURES / "imagenet_state_dict_shapes.json").read_text())
KDJAX_NAMES = {"resnet18": "resnet18_imagenet", "resnet34": "resnet34_imagenet", "resnet50": "resnet50_imagenet",
               "mobilenetv1": "mobilenetv1_imagenet"}
# torchvision's documented parameter counts (1000 classes); mdistiller's MobileNetV1
PARAM_COUNTS = {"resnet18_imagenet": 11_689_512, "resnet34_imagenet": 21_797_672, "resnet50_imagenet": 25_557_032,
                "mobilenetv1_imagenet": 4_231_976}


def parse_case(case):
    arch, classes, size = case.split("_")
    return KDJAX_NAMES[arch], int(classes[1:]), int(size[1:])


@functools.lru_cache(maxsize=None)
def imported(case):
    """(model, variables) of ``case`` with the fixture's weights, through the PyTorch import."""
    arch, classes, size = parse_case(case)
    state_dict = common.state_dict(SHAPES[case])
    variables = torch_to_variables(state_dict, arch, classes, size, source=case)
    return models.create(arch, classes, size), variables


def check_case(case):
    model, variables = imported(case)
    _, _, size = parse_case(case)
    n = int(EXPECTED[f"{case}/logits"].shape[0])
    x = jnp.asarray(common.inputs(case, n, size).transpose(0, 2, 3, 1))  # NCHW -> NHWC
    run = jax.jit(lambda v, x, preact: model.apply(v, x, features=True, preact=preact), static_argnums=2)
    for preact, prefix in ((False, "feat"), (True, "preact_feat")):
        feats, logits = run(variables, x, preact)
        want = EXPECTED[f"{case}/logits"]
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(logits, np.float64), want, rtol=0, atol=1e-4 * scale)
        names = sorted(k for k in EXPECTED.files if k.startswith(f"{case}/{prefix}") and k.endswith("_shape"))
        assert len(feats) == len(names)
        for i, f in enumerate(feats):
            f = np.asarray(f, np.float64)
            nchw = f.transpose(0, 3, 1, 2) if f.ndim == 4 else f
            assert list(nchw.shape) == list(EXPECTED[f"{case}/{prefix}{i}_shape"]), (case, prefix, i)
            want = EXPECTED[f"{case}/{prefix}{i}"]
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(common.project(case, f"{prefix}{i}", nchw), want, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"{case} {prefix}{i}")


@pytest.mark.parametrize("case", ["resnet18_c10_s64", "mobilenetv1_c10_s64"])
def test_small_models_match_the_reference(case):
    check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet18_c1000_s224", "resnet34_c1000_s224", "resnet50_c1000_s224",
                                  "mobilenetv1_c1000_s224"])
def test_full_models_match_the_reference_at_224(case):
    check_case(case)


def test_a_wrong_weight_is_caught():
    """The comparison can fail: one changed BN statistic moves the logits past the tolerance."""
    case = "resnet18_c10_s64"
    state_dict = common.state_dict(SHAPES[case])
    state_dict["layer3.1.bn2.running_mean"] = state_dict["layer3.1.bn2.running_mean"] + 1.0
    variables = torch_to_variables(state_dict, "resnet18_imagenet", 10, 64)
    model, _ = imported(case)
    x = jnp.asarray(common.inputs(case, 2, 64).transpose(0, 2, 3, 1))
    logits = np.asarray(jax.jit(model.apply)(variables, x), np.float64)
    want = EXPECTED[f"{case}/logits"]
    assert np.abs(logits - want).max() > 1e-2 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("arch", sorted(PARAM_COUNTS))
def test_parameter_counts_are_torchvisions(arch):
    variables = torch_names.abstract_variables(models.create(arch, 1000, 224), 64)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"])) == PARAM_COUNTS[arch]
    # and the reference's own state_dict, as the fixture script saw it, has as many trainable values
    case = [c for c in SHAPES if parse_case(c)[0] == arch and parse_case(c)[1] == 1000][0]
    trainable = [s for k, s in SHAPES[case] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(int(np.prod(s)) for s in trainable) == PARAM_COUNTS[arch]


@pytest.mark.parametrize("arch", sorted(PARAM_COUNTS))
def test_feature_mask_leaves_out_the_classifier_only(arch):
    variables = torch_names.abstract_variables(models.create(arch, 10, 64), 64)
    mask = models.feature_mask(arch, variables["params"])
    assert not any(jax.tree.leaves(mask["fc"]))
    assert all(m for name, sub in mask.items() if name != "fc" for m in jax.tree.leaves(sub))


def test_names_do_not_collide_with_the_cifar_resnets():
    cifar = models.create("ResNet18", 10, 32)
    imagenet = models.create("resnet18_imagenet", 10, 32)
    assert type(cifar).__name__ != type(imagenet).__name__
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        models.create("resnet18", 10)


def test_cifar_resnet18_checkpoint_is_refused_in_one_line():
    """A CIFAR ResNet18 state_dict (3x3 stem, ``linear``) into the ImageNet one: the first bad key is named."""
    case = "resnet18_c10_s64"
    state_dict = common.state_dict(SHAPES[case])
    state_dict["conv1.weight"] = np.zeros((64, 3, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatch, match=r"conv1\.weight.*shape \(64, 3, 3, 3\)") as e:
        torch_to_variables(state_dict, "resnet18_imagenet", 10, 64)
    assert "\n" not in str(e.value)
    state_dict = common.state_dict(SHAPES[case])
    state_dict["linear.weight"] = state_dict.pop("fc.weight")
    with pytest.raises(CheckpointMismatch, match=r"linear\.weight.*no counterpart"):
        torch_to_variables(state_dict, "resnet18_imagenet", 10, 64)


def test_bfloat16_forward_is_close_to_float32():
    case = "resnet18_c10_s64"
    model, variables = imported(case)
    x = jnp.asarray(common.inputs(case, 2, 64).transpose(0, 2, 3, 1))
    ref = jax.jit(model.apply)(variables, x)
    bf16 = models.create("resnet18_imagenet", 10, 64, dtype=jnp.bfloat16)
    feats, logits = jax.jit(lambda v, x: bf16.apply(v, x, features=True))(variables, x)
    assert logits.dtype == jnp.float32 and all(f.dtype == jnp.bfloat16 for f in feats)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(logits) - np.asarray(ref)).max())
    assert 0 < err < 0.05 * scale, err


@pytest.mark.parametrize("arch", sorted(PARAM_COUNTS))
def test_every_batchnorm_takes_bn_groups(arch):
    """clone(bn_groups=2) reaches every BatchNorm (traced, not compiled); the numbers are checked below."""
    model = models.create(arch, 10, 32).clone(bn_groups=2)
    variables = torch_names.abstract_variables(model, 32)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
            seen.append(context.module.groups)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert len(seen) == len(jax.tree.leaves(variables["batch_stats"])) // 2 and set(seen) == {2}


@pytest.mark.parametrize("arch", ["mobilenetv1_imagenet", pytest.param("resnet18_imagenet", marks=pytest.mark.slow)])
def test_train_mode_statistics_and_bn_groups(arch):
    """Train mode moves the running statistics as PyTorch (momentum 0.1, unbiased variance), and the student's
    forward on x and x' in one batch (bn_groups=2) is the original's two train-mode passes."""
    model = models.create(arch, 10, 16)
    x1, x2 = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
    variables = model.init(jax.random.key(1), x1)
    train = jax.jit(lambda m, v, x: m.apply(v, x, train=True, mutable=["batch_stats"]), static_argnums=0)
    l1, s1 = train(model, variables, x1)
    l2, s2 = train(model, {**variables, **s1}, x2)
    lg, sg = train(model.clone(bn_groups=2), variables, jnp.concatenate([x1, x2]))
    # the stem's BN after one step: 0.9 * (0, 1) + 0.1 * (batch mean, unbiased batch variance)
    stem = "model_0" if arch.startswith("mobilenet") else "conv1"
    stem_bn = "model_0_1" if arch.startswith("mobilenet") else "bn1"
    kernel = variables["params"][stem + ("_0" if arch.startswith("mobilenet") else "")]["kernel"]
    stride, pad = (2, 1) if arch.startswith("mobilenet") else (2, 3)
    conv = jax.lax.conv_general_dilated(x1, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    count = conv.size // conv.shape[-1]
    np.testing.assert_allclose(s1["batch_stats"][stem_bn]["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(s1["batch_stats"][stem_bn]["var"],
                               0.9 + 0.1 * conv.var(axis=(0, 1, 2)) * count / (count - 1), rtol=1e-4, atol=1e-6)
    # float32 rounding only: the last maps are 1x1, so a BN's batch variance rests on 4 values per channel
    np.testing.assert_allclose(lg, jnp.concatenate([l1, l2]), rtol=1e-3, atol=1e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), sg, s2)
