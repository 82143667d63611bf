"""Imported PyTorch checkpoints reproduce the original models: eval-mode logits and every ``is_feat`` feature.

``fixtures/<arch>_c100_s32_io.npz`` holds an input and the original PyTorch model's outputs for the checkpoint
beside it (NCHW maps; compared in NHWC). Tolerance: 1e-4 x max(1, max |logit|) in float32, for features too.

The slow test runs the same comparison over a directory of files made from the original code for the whole zoo
(``KDJAX_PARITY_DIR``: ``<arch>_<classes>_<size>.pth`` + ``.npz`` with ``input_nchw``, ``logits``, ``feat<i>``).
There a feature map's tolerance also scales with its own largest value: the deep maps of ResNet50, resnet110,
vgg19 and wrn_28_10 reach 10-30 while the logits stay near 1, and PyTorch's own float32 result differs from its
float64 result there by up to 2.5e-4 x max(1, max |logit|) -- rounding that no float32 port can avoid. Logits keep
the strict tolerance.

The same files hold the original's ``forward(x, is_feat=True, preact=True)`` features as ``preact_feat<i>`` (see
make_parity_files.py); they are compared with ``preact=True`` under the same rule, logits against the same
``logits`` (preact changes the feature list only). The committed fixtures also hold ``train_preact.<key>``: the
original's BatchNorm running statistics after one train-mode preact forward (WRN's preact calls three BNs a
second time, which updates their statistics again); kdjax's must match them to 1e-4 x max(1, max |statistic|).
"""
import os
import pathlib
import re

import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.checkpoint import import_torch, torch_names
from conftest import FIXTURES


def has_preact(io_npz) -> bool:
    with np.load(io_npz) as ref:
        return "preact_feat0" in ref.files


def compare_with_original(pth, io_npz, arch, num_classes, image_size, feature_scale="logits", tol=1e-4,
                          preact=False):
    """(largest relative error, index of the first feature beyond ``tol`` or None, {output: relative error}).

    Errors are max |kdjax - original| / max(1, max |logit|); with ``feature_scale='own'`` a feature's divisor also
    includes its own max |value|. ``preact=True`` compares kdjax's preact features with ``preact_feat<i>``."""
    ref = np.load(io_npz)
    prefix = "preact_feat" if preact else "feat"
    variables = import_torch(pth, arch, num_classes, image_size)
    model = models.create(arch, num_classes, image_size)
    x = np.transpose(ref["input_nchw"], (0, 2, 3, 1))
    asked = {"preact": True} if preact else {}
    feats, logits = jax.jit(lambda v, x: model.apply(v, x, train=False, features=True, **asked))(variables, x)
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    n_feats = len([k for k in ref.files if re.fullmatch(prefix + r"\d+", k)])
    assert len(feats) == n_feats, f"{arch}: {len(feats)} features, the original returns {n_feats}"
    errors = {}
    first_bad = None
    for i in range(n_feats):
        want = ref[f"{prefix}{i}"]
        want = np.transpose(want, (0, 2, 3, 1)) if want.ndim == 4 else want
        got = np.asarray(feats[i])
        assert got.shape == want.shape, f"{arch}: feature {i} has shape {got.shape}, the original {want.shape}"
        own = float(np.abs(want).max()) if feature_scale == "own" else 0.0
        errors[f"{prefix}{i}"] = float(np.abs(got - want).max()) / max(scale, own)
        if first_bad is None and errors[f"{prefix}{i}"] > tol:
            first_bad = i
    errors["logits"] = float(np.abs(np.asarray(logits) - ref["logits"]).max()) / scale
    return max(errors.values()), first_bad, errors


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_imported_teacher_matches_original(arch, fmt):
    pth = FIXTURES / f"{arch}_c100_s32{'_legacy' if fmt == 'legacy' else ''}.pth"
    worst, first_bad, errors = compare_with_original(pth, FIXTURES / f"{arch}_c100_s32_io.npz", arch, 100, 32)
    assert first_bad is None and worst <= 1e-4, f"{arch} ({fmt}): relative errors {errors}"


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_imported_teacher_preact_features_match_original(arch):
    io_npz = FIXTURES / f"{arch}_c100_s32_io.npz"
    assert has_preact(io_npz), "the io fixture lacks preact_feat<i>: make_parity_files.py --io-fixtures"
    worst, first_bad, errors = compare_with_original(FIXTURES / f"{arch}_c100_s32.pth", io_npz, arch, 100, 32,
                                                     preact=True)
    assert first_bad is None and worst <= 1e-4, f"{arch} preact: relative errors {errors}"


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_train_mode_preact_updates_running_stats_as_original(arch):
    ref = np.load(FIXTURES / f"{arch}_c100_s32_io.npz")
    variables = import_torch(FIXTURES / f"{arch}_c100_s32.pth", arch, 100, 32)
    model = models.create(arch, 100, 32)
    x = np.transpose(ref["input_nchw"], (0, 2, 3, 1))
    _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, features=True, preact=True,
                                                  mutable=["batch_stats"]))(variables, x)
    keys = [k for k in ref.files if k.startswith("train_preact.")]
    assert len(keys) == len(jax.tree.leaves(variables["batch_stats"])), "one array per running mean and var"
    errors = {}
    for key in keys:
        collection, path = torch_names.flax_location(key[len("train_preact."):], 1)
        got = updated[collection]
        for name in path:
            got = got[name]
        want = ref[key]
        errors[key] = float(np.abs(np.asarray(got) - want).max()) / max(1.0, float(np.abs(want).max()))
    assert max(errors.values()) <= 1e-4, f"{arch}: running statistics off: {errors}"


def _parity_cases():
    root = os.environ.get("KDJAX_PARITY_DIR")
    if not root:
        return []
    cases = []
    for pth in sorted(pathlib.Path(root).glob("*.pth")):
        m = re.fullmatch(r"(.+)_(\d+)_(\d+)", pth.stem)
        if m and pth.with_suffix(".npz").exists():
            cases.append(pytest.param(pth, m.group(1), int(m.group(2)), int(m.group(3)), id=pth.stem))
    return cases


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDJAX_PARITY_DIR"), reason="set KDJAX_PARITY_DIR to a directory of "
                    "<arch>_<classes>_<size>.pth/.npz files made with the original code")
@pytest.mark.parametrize("pth,arch,num_classes,image_size", _parity_cases())
def test_zoo_matches_original(pth, arch, num_classes, image_size):
    worst, first_bad, errors = compare_with_original(pth, pth.with_suffix(".npz"), arch, num_classes, image_size,
                                                     feature_scale="own")
    assert first_bad is None and worst <= 1e-4, (f"{arch} {num_classes} classes {image_size}px: first feature "
                                                 f"off is feat{first_bad}; relative errors {errors}")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDJAX_PARITY_DIR"), reason="set KDJAX_PARITY_DIR to a directory of "
                    "<arch>_<classes>_<size>.pth/.npz files made with the original code")
@pytest.mark.parametrize("pth,arch,num_classes,image_size", _parity_cases())
def test_zoo_preact_matches_original(pth, arch, num_classes, image_size):
    if not has_preact(pth.with_suffix(".npz")):
        pytest.skip("made without preact features (an older make_parity_files.py)")
    worst, first_bad, errors = compare_with_original(pth, pth.with_suffix(".npz"), arch, num_classes, image_size,
                                                     feature_scale="own", preact=True)
    print(f"{pth.stem} preact: worst relative error {worst:.2e}")
    assert first_bad is None and worst <= 1e-4, (f"{arch} {num_classes} classes {image_size}px preact: first "
                                                 f"feature off is preact_feat{first_bad}; relative errors {errors}")
