"""The two-stage distillers (ab, ft, fsp) against the official PyTorch code, and their registry and shape checks.

tests/fixtures/distillers/{ab,ft,fsp}.npz were written by tests/fixtures/make_distiller_fixtures.py from the
official distiller_zoo/{AB,FT,FSP}.py and models/util.py (Connector, ConvReg, Paraphraser, Translator) in float64;
the heads' PyTorch weights are stored and loaded here into the flax params (OIHW -> HWIO; a transposed conv's
[C_in, C_out, kh, kw] -> [kh, kw, C_in, C_out]). Tolerances and the "far" checks are those of
tests/test_distiller_fixtures.py: a wrong margin, weight, reduction, sign or layout lands far outside them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import distillers
from kdjax.distillers import heads as heads_lib
from kdjax.distillers import two_stage
from kdjax.distillers.interface import match_spatial
from test_distiller_fixtures import (assert_far, assert_grad, assert_same_tree, assert_value, conv_kernel, load,
                                     maps, nchw, nhwc)

KEY = jax.random.PRNGKey(0)


def convt_kernel(w):
    """PyTorch ConvTranspose2d weight [I, O, kh, kw] -> kdjax [kh, kw, I, O]."""
    return jnp.asarray(np.transpose(w, (2, 3, 0, 1)))


def conv_weight(kernel):
    """flax HWIO -> PyTorch Conv2d [O, I, kh, kw]."""
    return np.transpose(np.asarray(kernel), (3, 2, 0, 1))


def convt_weight(kernel):
    return np.transpose(np.asarray(kernel), (2, 3, 0, 1))


def with_ends(feats, pooled_dim=3):
    """``[stem, *maps, pooled]``: a feature list whose f[1:-1] are ``maps``."""
    b = feats[0].shape[0]
    return [jnp.zeros((b, 2, 2, 1), jnp.float32), *feats, jnp.zeros((b, pooled_dim), jnp.float32)]


def with_pooled(feats, pooled_dim=3):
    """``[*maps, pooled]``: a feature list whose f[:-1] are ``maps``."""
    return [*feats, jnp.zeros((feats[0].shape[0], pooled_dim), jnp.float32)]


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


# ----------------------------------------------------------------------------------------------------------------
# AB


def ab_heads(d):
    """The official connectors' weights as ``init_stage_heads`` params: connectors.<j> belongs to f[j + 1]."""
    out = {}
    for j, identity in enumerate(d["out_connected"]):
        if identity:
            continue
        p = f"in_connectors_{j}_"
        w = d[p + "conv_weight"]
        # the ConvReg that doubles the map's size is the transposed conv, weight [I, O, 4, 4]
        transposed = d[f"in_ft{j}"].shape[2] == 2 * d[f"in_fs{j}"].shape[2]
        kernel = convt_kernel(w) if transposed else conv_kernel(w)
        out[f"connector_{j + 1}"] = {
            "conv": {"kernel": kernel, "bias": jnp.asarray(d[p + "conv_bias"])},
            "bn": {"scale": jnp.asarray(d[p + "bn_weight"]), "bias": jnp.asarray(d[p + "bn_bias"])}}
    return out


def test_ab_init_stage_matches_official():
    d = load("ab")
    fs, ft = maps(d, "fs"), maps(d, "ft")
    feats_t = with_ends(ft)
    ab = distillers.create("ab")
    assert float(d["hp_margin"]) == ab.margin == 1.0
    heads = ab_heads(d)
    assert sorted(heads) == ["connector_2", "connector_3", "connector_4"]  # f[1] passes through the identity
    assert_same_tree(heads, jax.eval_shape(ab.init_stage_heads, KEY, abstract(with_ends(fs)), abstract(feats_t)))
    kinds = [heads_lib.conv_reg_kind(s.shape, t.shape) for s, t in zip(fs[1:], ft[1:])]
    assert kinds == ["conv3x3_s2", "convT4x4_s2", "conv_valid"]

    def loss_fn(prm, xs):
        return ab.init_stage_loss(prm, with_ends(xs), feats_t)

    def variants(prm, xs):
        g_s = ab.connect(prm, with_ends(xs), feats_t)
        b, n = xs[0].shape[0], len(xs)
        layers = [two_stage.ab_layer_loss(s, t) for s, t in zip(g_s, ft)]
        return dict(
            per_layer=jnp.stack([2.0 ** (i - n + 1) * v / b / 1000 * 3 for i, v in enumerate(layers)]),
            margin_half=distillers.create("ab", margin=0.5).init_stage_loss(prm, with_ends(xs), feats_t),
            no_scale=sum(2.0 ** (i - n + 1) * v / b for i, v in enumerate(layers)),  # without / 1000 * 3
            equal_weights=sum(v / b / 1000 * 3 for v in layers),  # without 2^(i-n+1)
            reversed_weights=sum(2.0 ** (-i) * v / b / 1000 * 3 for i, v in enumerate(layers)),
            teacher_sign=two_stage.ab_loss(g_s, [-t for t in ft]),  # boundaries of the other sign
            per_element_mean=sum(2.0 ** (i - n + 1) * v / s.size * 3 / 1000
                                 for i, (v, s) in enumerate(zip(layers, g_s))),
            eval_bn=two_stage.ab_loss(  # connectors' BatchNorm on (initial) running statistics
                [xs[0]] + [heads_lib.ConvReg(s.shape, t.shape, use_relu=False).apply(
                    {"params": prm[f"connector_{i + 2}"],
                     "batch_stats": {"bn": {"mean": jnp.zeros(t.shape[-1]), "var": jnp.ones(t.shape[-1])}}},
                    s, train=False) for i, (s, t) in enumerate(zip(xs[1:], ft[1:]))], ft))

    run = jax.jit(lambda prm, xs: (jax.value_and_grad(loss_fn, argnums=(0, 1))(prm, xs), variants(prm, xs)))
    (loss, (g_p, g_x)), var = run(heads, fs)
    assert_value(loss, d["loss"])
    np.testing.assert_allclose(var["per_layer"], d["out_layer_losses"], rtol=2e-5)
    for i, g in enumerate(g_x):
        assert_grad(nchw(g), d[f"grad_fs{i}"], f"d/d f_s[{i + 1}]")
    for j in (1, 2, 3):
        g, p = g_p[f"connector_{j + 1}"], f"grad_connectors_{j}_"
        to_torch = convt_weight if j == 2 else conv_weight
        assert_grad(to_torch(g["conv"]["kernel"]), d[p + "conv_weight"], f"d/d connector {j} conv weight")
        # a bias before train-mode BatchNorm has no effect: 0 up to rounding on both sides
        assert_grad(g["conv"]["bias"], d[p + "conv_bias"], f"d/d connector {j} conv bias",
                    scale=np.max(np.abs(d[p + "bn_bias"])))
        assert_grad(g["bn"]["scale"], d[p + "bn_weight"], f"d/d connector {j} bn weight")
        assert_grad(g["bn"]["bias"], d[p + "bn_bias"], f"d/d connector {j} bn bias")
    for name in ("margin_half", "no_scale", "equal_weights", "reversed_weights", "teacher_sign", "per_element_mean",
                 "eval_bn"):
        assert_far(var[name], d["loss"])


# ----------------------------------------------------------------------------------------------------------------
# FT


def paraphraser_params(d):
    p = "in_paraphraser_"
    out = {f"encoder_{i}": {"kernel": conv_kernel(d[f"{p}encoder_{i}_weight"]),
                            "bias": jnp.asarray(d[f"{p}encoder_{i}_bias"])} for i in (0, 3, 6)}
    out.update({f"decoder_{i}": {"kernel": convt_kernel(d[f"{p}decoder_{i}_weight"]),
                                 "bias": jnp.asarray(d[f"{p}decoder_{i}_bias"])} for i in (0, 3, 6)})
    return {"paraphraser": out}


def translator_params(d):
    p = "in_translator_"
    out = {}
    for i in (0, 3, 6):
        out[f"encoder_{i}"] = {"kernel": conv_kernel(d[f"{p}encoder_{i}_weight"]),
                               "bias": jnp.asarray(d[f"{p}encoder_{i}_bias"])}
        out[f"encoder_{i + 1}"] = {"scale": jnp.asarray(d[f"{p}encoder_{i + 1}_weight"]),
                                   "bias": jnp.asarray(d[f"{p}encoder_{i + 1}_bias"])}
    return {"translator": out}


def ft_lists(d):
    f_s, f_t = jnp.asarray(nhwc(d["in_f_s"])), jnp.asarray(nhwc(d["in_f_t"]))
    b = f_s.shape[0]
    return [f_s, jnp.zeros((b, 3))], [f_t, jnp.zeros((b, 5))]


def test_ft_init_stage_matches_official():
    d = load("ft")
    ft = distillers.create("ft")
    assert float(d["hp_k"]) == ft.ft_k == 0.5
    _, feats_t = ft_lists(d)
    heads = paraphraser_params(d)
    assert_same_tree(heads, jax.eval_shape(ft.init_stage_heads, KEY, None, abstract(feats_t)))

    def reconstruct(prm):
        return ft.paraphraser(feats_t).apply({"params": prm["paraphraser"]}, feats_t[-2])[1]

    def flipped(prm, f):  # a transposed conv applied without the spatial flip
        p = jax.tree.map(lambda a: a, prm)
        p["paraphraser"][f"decoder_{f}"]["kernel"] = prm["paraphraser"][f"decoder_{f}"]["kernel"][::-1, ::-1]
        return reconstruct(p)

    def swapped_io(prm):  # decoder_0 (4 -> 4 channels) with its kernel's in/out axes exchanged
        p = jax.tree.map(lambda a: a, prm)
        p["paraphraser"]["decoder_0"]["kernel"] = jnp.swapaxes(prm["paraphraser"]["decoder_0"]["kernel"], 2, 3)
        return reconstruct(p)

    def run(prm):
        loss, g = jax.value_and_grad(lambda q: ft.init_stage_loss(q, None, feats_t))(prm)
        return loss, g, reconstruct(prm), [flipped(prm, 3), flipped(prm, 6), swapped_io(prm)]

    loss, g, rec, wrong = jax.jit(run)(heads)
    assert_value(loss, d["init_loss"])
    want = d["out_reconstruction"]
    np.testing.assert_allclose(nchw(rec), want, rtol=1e-5, atol=1e-6)
    for i in (0, 3, 6):
        for part, to_torch in (("encoder", conv_weight), ("decoder", convt_weight)):
            gi = g["paraphraser"][f"{part}_{i}"]
            assert_grad(to_torch(gi["kernel"]), d[f"grad_paraphraser_{part}_{i}_weight"], f"d/d {part}.{i} weight")
            assert_grad(gi["bias"], d[f"grad_paraphraser_{part}_{i}_bias"], f"d/d {part}.{i} bias")
    # A fresh paraphraser's reconstruction is small next to f_t, so the MSE hardly sees a wrong decoder layout; its
    # output does.
    for w in wrong:
        assert np.max(np.abs(nchw(w) - want)) > 100 * 1e-5 * np.max(np.abs(want))


def test_ft_kd_stage_matches_official():
    d = load("ft")
    ft = distillers.create("ft")
    feats_s, feats_t = ft_lists(d)
    trained = paraphraser_params(d)
    params0, state = ft.init(KEY, feats_s, feats_t, init_heads=trained)
    params = translator_params(d)
    assert_same_tree(params, params0)
    assert sorted(params0) == ["translator"] and sorted(state) == ["batch_stats", "paraphraser"]
    for a, b in zip(jax.tree.leaves(state["paraphraser"]), jax.tree.leaves(trained["paraphraser"])):
        np.testing.assert_array_equal(a, b)  # the init stage's paraphraser, fixed in the non-trainable state

    def fn(prm, st, x):
        return ft.loss(prm, st, [x, feats_s[1]], feats_t, train=True)

    def run(prm, st, x):
        (loss, new_state), grads = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(prm, st, x)
        factor_t = ft.paraphraser(feats_t).apply({"params": st["paraphraser"]}, feats_t[0], is_factor=True)
        eval_bn = ft.loss(prm, st, [x, feats_s[1]], feats_t, train=False)[0]
        return loss, new_state, grads, factor_t, eval_bn

    loss, new_state, (g_p, g_st, g_x), factor_t, eval_bn = jax.jit(run)(params, state, feats_s[0])
    assert_value(loss, d["loss"])
    np.testing.assert_allclose(nchw(factor_t), d["out_factor_t"], rtol=1e-5, atol=1e-6)
    assert_grad(nchw(g_x), d["grad_f_s"], "d/d f_s")
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_st))  # nothing reaches the paraphraser
    for i in (0, 3, 6):
        g, p = g_p["translator"], "grad_translator_"
        assert_grad(conv_weight(g[f"encoder_{i}"]["kernel"]), d[f"{p}encoder_{i}_weight"], f"d/d encoder.{i} weight")
        assert_grad(g[f"encoder_{i}"]["bias"], d[f"{p}encoder_{i}_bias"], f"d/d encoder.{i} bias",
                    scale=np.max(np.abs(d[f"{p}encoder_{i + 1}_bias"])))  # before train-mode BatchNorm: ~0
        assert_grad(g[f"encoder_{i + 1}"]["scale"], d[f"{p}encoder_{i + 1}_weight"], f"d/d encoder.{i + 1} weight")
        assert_grad(g[f"encoder_{i + 1}"]["bias"], d[f"{p}encoder_{i + 1}_bias"], f"d/d encoder.{i + 1} bias")
        stats = new_state["batch_stats"]["translator"][f"encoder_{i + 1}"]
        np.testing.assert_allclose(stats["mean"], d[f"out_translator_encoder_{i + 1}_running_mean"], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(stats["var"], d[f"out_translator_encoder_{i + 1}_running_var"], rtol=1e-5,
                                   atol=1e-6)
    assert_far(eval_bn, d["loss"])  # the translator's BatchNorm must run in train mode, as the original's


def test_factor_transfer_matches_official():
    """The bare criterion on a pair whose teacher side is pooled (the KD-stage fixture pools the student's)."""
    d = load("ft")
    x, y = jnp.asarray(nhwc(d["in_pure_s"])), jnp.asarray(nhwc(d["in_pure_t"]))
    f = two_stage.factor_transfer_loss

    def run(a):
        loss, g = jax.value_and_grad(lambda q: f(q, y))(a)
        unnormalised = jnp.mean(jnp.abs(jnp.mean(a ** 2, -1).reshape(a.shape[0], -1)
                                        - jnp.mean(match_spatial(a, y)[1] ** 2, -1).reshape(a.shape[0], -1)))
        return loss, g, [f(a, y, p2=2.0), f(a, y, p1=1.0), unnormalised]

    loss, g, wrong = jax.jit(run)(x)
    assert_value(loss, d["pure_loss"])
    assert_grad(nchw(g), d["grad_pure_s"], "d/d f_s")
    for w in wrong:
        assert_far(w, d["pure_loss"])


# ----------------------------------------------------------------------------------------------------------------
# FSP


def test_fsp_init_stage_matches_official():
    d = load("fsp")
    fs, ft = maps(d, "fs"), maps(d, "ft")
    fsp = distillers.create("fsp")
    feats_t = with_pooled(ft)
    assert fsp.init_stage_heads(KEY, with_pooled(fs), feats_t) == {}

    def positions_summed(xs):  # FSP matrices summed over positions instead of averaged
        total = 0.0
        for i in range(len(xs) - 1):
            g = [two_stage.fsp_matrix(a[i], a[i + 1]) * min(a[i].shape[1], a[i + 1].shape[1]) ** 2 for a in (xs, ft)]
            total = total + jnp.mean((g[0] - g[1]) ** 2)
        return total

    def run(xs):
        loss, g = jax.value_and_grad(lambda q: fsp.init_stage_loss({}, with_pooled(q), feats_t))(xs)
        pairs = [jnp.mean((two_stage.fsp_matrix(xs[i], xs[i + 1]) - two_stage.fsp_matrix(ft[i], ft[i + 1])) ** 2)
                 for i in range(len(xs) - 1)]
        sums = [jnp.sum((two_stage.fsp_matrix(xs[i], xs[i + 1]) - two_stage.fsp_matrix(ft[i], ft[i + 1])) ** 2)
                for i in range(len(xs) - 1)]
        return loss, g, [sum(pairs[:1]), sum(pairs) / len(pairs), sum(sums), positions_summed(xs),
                         two_stage.fsp_loss(xs, [ft[0], -ft[1], *ft[2:]])]  # a sign error in one layer

    loss, grads, wrong = jax.jit(run)(fs)
    assert_value(loss, d["loss"])
    for i, g in enumerate(grads):
        assert_grad(nchw(g), d[f"grad_fs{i}"], f"d/d f_s[{i}]")
    for w in wrong:
        assert_far(w, d["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Shape checks, registry, defaults, heads' init, make_extra


def shapes(*nhwc_shapes, b=2, pooled=8):
    return [jax.ShapeDtypeStruct((b, *s), jnp.float32) for s in nhwc_shapes] + [
        jax.ShapeDtypeStruct((b, pooled), jnp.float32)]


def one_line_error(fn, *args, match):
    with pytest.raises(ValueError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_fsp_with_unequal_channels_fails_in_one_line_naming_the_fix():
    fsp = distillers.create("fsp")
    s = shapes((8, 8, 16), (8, 8, 16), (4, 4, 32))
    t = shapes((8, 8, 16), (8, 8, 32), (4, 4, 64))
    msg = one_line_error(fsp.check_shapes, s, t, match="fsp needs equal student and teacher channels")
    assert "[16, 16, 32]" in msg and "[16, 32, 64]" in msg and "pair models of equal widths" in msg
    one_line_error(fsp.init_stage_heads, KEY, s, t, match="fsp needs equal")
    one_line_error(fsp.check_shapes, s, shapes((8, 8, 16), (4, 4, 32)), match="the same length.*pair models")
    fsp.check_shapes(s, shapes((16, 16, 16), (8, 8, 16), (8, 8, 32)))  # sizes may differ, channels may not
    distillers.create("ab").check_shapes(s, t)  # AB's connectors adapt channels
    distillers.create("hint").check_shapes(s, t)  # the default check accepts anything


def test_ab_and_ft_shape_checks():
    ab = distillers.create("ab")
    one_line_error(ab.check_shapes, shapes((8, 8, 4), (4, 4, 8)), shapes((8, 8, 4), (6, 6, 8)),
                   match="ab cannot connect the student's feature 1.*use another distiller")
    one_line_error(ab.check_shapes, shapes((8, 8, 4), (4, 4, 8)), shapes((8, 8, 4), (4, 4, 8), (2, 2, 8)),
                   match="ab needs student and teacher feature lists of the same length")
    ft = distillers.create("ft")
    one_line_error(ft.check_shapes, shapes((8, 8, 4)), [jax.ShapeDtypeStruct((2, 8), jnp.float32)] * 2,
                   match="ft uses teacher feature 0 as an NHWC map")
    one_line_error(distillers.create("ft", ft_k=0.1).check_shapes, shapes((8, 8, 4)), shapes((4, 4, 8)),
                   match="0 channels; use a larger distill.ft_k")


def test_zoo_pairs_for_fsp():
    from kdjax import models

    def feature_shapes(name):
        return models.abstract_feature_shapes(name, num_classes=10, image_size=8, batch=2)

    fsp = distillers.create("fsp")
    fsp.check_shapes(feature_shapes("resnet8x4"), feature_shapes("resnet32x4"))  # the original's pair
    one_line_error(fsp.check_shapes, feature_shapes("resnet8"), feature_shapes("resnet32x4"), match="fsp needs equal")


def test_registry_aliases_and_flags():
    assert distillers.canonical("abound") == "ab" and distillers.canonical("factor") == "ft"
    assert distillers.create("abound") == distillers.create("ab") and distillers.create("abound").name == "ab"
    assert distillers.create("factor", ft_k=0.25).ft_k == 0.25 and distillers.create("factor").name == "ft"
    assert distillers.init_stage_names() == ["ab", "fsp", "ft"]
    assert "ft" in distillers.feature_names()
    assert "ab" not in distillers.feature_names() and "fsp" not in distillers.feature_names()
    ab, ft, fsp = (distillers.create(n) for n in ("ab", "ft", "fsp"))
    assert not distillers.has_feature_term(ab) and not distillers.has_feature_term(fsp)
    assert distillers.has_feature_term(ft)
    assert (ab.init_stage, ab.init_trains_student, ab.preact, ab.stage_term) == (True, True, True, False)
    assert (ft.init_stage, ft.init_trains_student, ft.preact, ft.stage_term) == (True, False, False, True)
    assert (fsp.init_stage, fsp.init_trains_student, fsp.preact, fsp.stage_term) == (True, True, False, False)
    for name in ("kd", "hint", "crd", "dkd"):
        d = distillers.create(name)
        assert not d.init_stage and not d.preact and d.stage_term
    # the defaults: beta of run_cifar_distill.sh, option.py's --init_epochs, ABLoss's margin, Paraphraser's k
    assert (ab.beta, ft.beta, fsp.beta) == (1.0, 200.0, 50.0)
    assert ab.init_epochs == ft.init_epochs == fsp.init_epochs == 30
    assert ab.init_lr is ft.init_lr is fsp.init_lr is None
    assert ab.margin == 1.0 and ft.ft_k == 0.5
    assert ab.default_weights("identity") == dict(gamma=1.0, alpha=0.0, beta=1.0)
    with pytest.raises(ValueError, match="init_epochs must be an integer >= 0"):
        distillers.create("fsp", init_epochs=-1)
    with pytest.raises(ValueError, match="init_lr must be > 0"):
        distillers.create("ab", init_lr=0.0)
    with pytest.raises(ValueError, match="has no init stage"):
        distillers.create("hint").init_stage_heads(KEY, [], [])


def test_init_stage_learning_rate_rule():
    ft = distillers.create("ft")
    for student in ("resnet8", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_40_2"):
        assert ft.init_stage_lr(student, 0.05) == 0.01
    for student in ("vgg8", "MobileNetV2", "ShuffleV1", "ResNet50", "wrn_28_10"):
        assert ft.init_stage_lr(student, 0.05) == 0.05
    assert distillers.create("ft", init_lr=0.3).init_stage_lr("resnet8", 0.05) == 0.3
    assert distillers.create("ab").init_stage_lr("resnet8", 0.05) == 0.05
    assert distillers.create("fsp", init_lr=0.2).init_stage_lr("vgg8", 0.05) == 0.2
    assert distillers.create("kd").init_stage_lr("resnet8", 0.05) == 0.05


def test_heads_use_torch_default_init():
    """U(+-1/sqrt(fan_in)), with PyTorch's fan_in of a transposed conv (C_out * k * k); BatchNorm at (1, 0)."""
    ft = distillers.create("ft")
    feats_s, feats_t = shapes((4, 4, 16)), shapes((4, 4, 32))
    para = ft.init_stage_heads(jax.random.PRNGKey(3), None, feats_t)["paraphraser"]
    fans = {"encoder_0": 32 * 9, "encoder_3": 32 * 9, "encoder_6": 16 * 9,  # conv: C_in * 9
            "decoder_0": 16 * 9, "decoder_3": 32 * 9, "decoder_6": 32 * 9}  # transposed: C_out * 9
    for name, fan_in in fans.items():
        bound = 1.0 / np.sqrt(fan_in)
        k = np.abs(np.asarray(para[name]["kernel"]))
        assert bound * 0.97 < k.max() <= bound, name
        assert np.abs(np.asarray(para[name]["bias"])).max() <= bound, name
    params, state = ft.init(jax.random.PRNGKey(4), feats_s, feats_t)
    tr = params["translator"]
    assert tr["encoder_0"]["kernel"].shape == (3, 3, 16, 16) and tr["encoder_6"]["kernel"].shape == (3, 3, 16, 16)
    assert np.abs(np.asarray(tr["encoder_0"]["kernel"])).max() <= 1.0 / np.sqrt(16 * 9)
    for i in (1, 4, 7):
        np.testing.assert_array_equal(tr[f"encoder_{i}"]["scale"], 1.0)
        np.testing.assert_array_equal(tr[f"encoder_{i}"]["bias"], 0.0)
        np.testing.assert_array_equal(state["batch_stats"]["translator"][f"encoder_{i}"]["var"], 1.0)
    ab_heads_ = distillers.create("ab").init_stage_heads(jax.random.PRNGKey(5), shapes((8, 8, 4), (8, 8, 8)),
                                                         shapes((8, 8, 4), (4, 4, 16)))
    assert sorted(ab_heads_) == ["connector_1"] and sorted(ab_heads_["connector_1"]) == ["bn", "conv"]
    assert np.abs(np.asarray(ab_heads_["connector_1"]["conv"]["kernel"])).max() <= 1.0 / np.sqrt(8 * 9)


def test_make_extra_with_init_heads():
    tx = optax.sgd(0.1, momentum=0.9)
    feats_s, feats_t = shapes((8, 8, 4), (4, 4, 8)), shapes((8, 8, 4), (4, 4, 16))
    assert distillers.make_extra(distillers.create("ab"), tx, KEY, feats_s, feats_t) == {}
    assert distillers.make_extra(distillers.create("fsp"), tx, KEY, feats_s, feats_t, init_heads={}) == {}
    ft = distillers.create("ft")
    trained = jax.tree.map(lambda a: a + 1.0, ft.init_stage_heads(jax.random.PRNGKey(7), None, feats_t))
    extra = distillers.make_extra(ft, tx, KEY, feats_s, feats_t, init_heads=trained)
    assert sorted(extra["params"]) == ["translator"]  # the paraphraser is not trained in the KD stage
    for a, b in zip(jax.tree.leaves(extra["state"]["paraphraser"]), jax.tree.leaves(trained["paraphraser"])):
        np.testing.assert_array_equal(a, b)
    n_params = sum(a.size for a in jax.tree.leaves(extra["params"]))
    assert sum(a.size for a in jax.tree.leaves(extra["opt_state"])) == n_params  # momentum over the translator only
    fresh = distillers.make_extra(ft, tx, KEY, feats_s, feats_t)  # no init stage ran: a fresh paraphraser
    assert_same_tree(fresh["state"], extra["state"])
    with pytest.raises(ValueError, match="init_heads must be the init stage's"):
        distillers.make_extra(ft, tx, KEY, feats_s, shapes((8, 8, 4), (4, 4, 8)), init_heads=trained)
    with pytest.raises(ValueError, match="'hint' has no init stage"):
        distillers.make_extra(distillers.create("hint", hint_layer=1), tx, KEY, feats_s, feats_t,
                              init_heads=trained)
