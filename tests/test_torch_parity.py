"""Imported PyTorch checkpoints reproduce the original models: eval-mode logits and every ``is_feat`` feature.

``fixtures/<arch>_c100_s32_io.npz`` holds an input and the original PyTorch model's outputs for the checkpoint
beside it (NCHW maps; compared in NHWC). Tolerance: 1e-4 x max(1, max |logit|) in float32, for features too.

The slow test runs the same comparison over a directory of files made from the original code for the whole zoo
(``KDJAX_PARITY_DIR``: ``<arch>_<classes>_<size>.pth`` + ``.npz`` with ``input_nchw``, ``logits``, ``feat<i>``).
There a feature map's tolerance also scales with its own largest value: the deep maps of ResNet50, resnet110,
vgg19 and wrn_28_10 reach 10-30 while the logits stay near 1, and PyTorch's own float32 result differs from its
float64 result there by up to 2.5e-4 x max(1, max |logit|) -- rounding that no float32 port can avoid. Logits keep
the strict tolerance.
"""
import os
import pathlib
import re

import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.checkpoint import import_torch
from conftest import FIXTURES


def compare_with_original(pth, io_npz, arch, num_classes, image_size, feature_scale="logits", tol=1e-4):
    """(largest relative error, index of the first feature beyond ``tol`` or None, {output: relative error}).

    Errors are max |kdjax - original| / max(1, max |logit|); with ``feature_scale='own'`` a feature's divisor also
    includes its own max |value|."""
    ref = np.load(io_npz)
    variables = import_torch(pth, arch, num_classes, image_size)
    model = models.create(arch, num_classes, image_size)
    x = np.transpose(ref["input_nchw"], (0, 2, 3, 1))
    feats, logits = jax.jit(lambda v, x: model.apply(v, x, train=False, features=True))(variables, x)
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    n_feats = len([k for k in ref.files if re.fullmatch(r"feat\d+", k)])
    assert len(feats) == n_feats, f"{arch}: {len(feats)} features, the original returns {n_feats}"
    errors = {}
    first_bad = None
    for i in range(n_feats):
        want = ref[f"feat{i}"]
        want = np.transpose(want, (0, 2, 3, 1)) if want.ndim == 4 else want
        got = np.asarray(feats[i])
        assert got.shape == want.shape, f"{arch}: feature {i} has shape {got.shape}, the original {want.shape}"
        own = float(np.abs(want).max()) if feature_scale == "own" else 0.0
        errors[f"feat{i}"] = float(np.abs(got - want).max()) / max(scale, own)
        if first_bad is None and errors[f"feat{i}"] > tol:
            first_bad = i
    errors["logits"] = float(np.abs(np.asarray(logits) - ref["logits"]).max()) / scale
    return max(errors.values()), first_bad, errors


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_imported_teacher_matches_original(arch, fmt):
    pth = FIXTURES / f"{arch}_c100_s32{'_legacy' if fmt == 'legacy' else ''}.pth"
    worst, first_bad, errors = compare_with_original(pth, FIXTURES / f"{arch}_c100_s32_io.npz", arch, 100, 32)
    assert first_bad is None and worst <= 1e-4, f"{arch} ({fmt}): relative errors {errors}"


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
