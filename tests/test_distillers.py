"""The feature distillers and kdjax.losses against NumPy restatements of the original formulas (float64); the
registry (names, aliases), the default weights of every distiller, and the interface every feature distiller keeps
(gradients, jit, state structure, real feature shapes)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distillers, losses
from kdjax.distillers import crd as crd_lib
from kdjax.distillers import heads

B = 5
RTOL = 2e-5


def rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def feature_lists(rng, b=B):
    """Student and teacher lists [f0, f1, f2, f3, pooled]; sizes differ so that AT/VID pool in both directions."""
    fs = [rand(rng, b, 8, 8, 3), rand(rng, b, 8, 8, 4), rand(rng, b, 4, 4, 6), rand(rng, b, 2, 2, 8), rand(rng, b, 8)]
    ft = [rand(rng, b, 8, 8, 5), rand(rng, b, 4, 4, 6), rand(rng, b, 8, 8, 7), rand(rng, b, 2, 2, 10),
          rand(rng, b, 10)]
    return fs, ft


def jitted(d, train=True):
    """``d.loss`` compiled as one program (one compile is far cheaper on CPU than op-by-op dispatch)."""
    step = jax.jit(lambda p, s, f_s, f_t, kw: d.loss(p, s, f_s, f_t, train=train, **kw))
    return lambda p, s, f_s, f_t, **kw: step(p, s, f_s, f_t, kw)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------------------------------------------------------
# NumPy references


def np_normalize(x, axis):
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=axis, keepdims=True)), 1e-12)


def np_adaptive_pool(x, out):
    b, h, w, c = x.shape
    y = np.zeros((b, out, out, c))
    for i in range(out):
        h0, h1 = int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out))
        for j in range(out):
            w0, w1 = int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out))
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


def np_match(s, t):
    if s.shape[1] > t.shape[1]:
        return np_adaptive_pool(s, t.shape[1]), t
    if s.shape[1] < t.shape[1]:
        return s, np_adaptive_pool(t, s.shape[1])
    return s, t


def np_at(fs, ft):
    total = 0.0
    for s, t in zip(fs[1:-1], ft[1:-1]):
        s, t = np_match(s, t)
        a_s = np_normalize((s ** 2).mean(-1).reshape(len(s), -1), 1)
        a_t = np_normalize((t ** 2).mean(-1).reshape(len(t), -1), 1)
        total += np.mean((a_s - a_t) ** 2)
    return total


def np_sp(s, t):
    b = len(s)
    g_s = np_normalize(s.reshape(b, -1) @ s.reshape(b, -1).T, 1)
    g_t = np_normalize(t.reshape(b, -1) @ t.reshape(b, -1).T, 1)
    return np.sum((g_t - g_s) ** 2) / b ** 2


def np_pkt(s, t, eps=1e-7):
    def kern(f):
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ks, kt = kern(s), kern(t)
    return np.mean(kt * np.log((kt + eps) / (ks + eps)))


def np_rkd(s, t):
    def dist(e):
        b = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / d[d > 0].mean()

    def angle(e):
        b = len(e)
        a = np.zeros((b, b, b))
        for j in range(b):
            for k in range(b):
                for l in range(b):
                    u, v = e[k] - e[j], e[l] - e[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    a[j, k, l] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return a

    def sl1(x, y):
        d = np.abs(x - y)
        return np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))

    return 25 * sl1(dist(s), dist(t)) + 50 * sl1(angle(s), angle(t))


def np_vid(params, fs, ft):
    total = 0.0
    for i, (s, t) in enumerate(zip(fs[1:-1], ft[1:-1]), start=1):
        p = params[f"regressor_{i}"]
        s, t = np_match(s, t)
        h = np.maximum(s @ p["conv_0"]["kernel"][0, 0], 0)
        h = np.maximum(h @ p["conv_2"]["kernel"][0, 0], 0)
        mean = h @ p["conv_4"]["kernel"][0, 0]
        var = np.log1p(np.exp(p["log_scale"])) + 1e-5
        total += np.mean(0.5 * ((mean - t) ** 2 / var + np.log(var)))
    return total


def np_conv(x, w, stride, pad):
    """PyTorch Conv2d on NHWC with an HWIO kernel."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            y += x[:, a:a + stride * ho:stride, b:b + stride * wo:stride] @ w[a, b]
    return y


def np_conv_transpose(x, w, stride=2, pad=1):
    """PyTorch ConvTranspose2d by its definition (each input pixel scatters a kernel-sized patch), w [kh,kw,in,out]."""
    n, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    full = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, w.shape[3]))
    for i in range(h):
        for j in range(wd):
            full[:, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum("nc,abco->nabo", x[:, i, j], w)
    return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad]


def np_bn_train(x, scale, bias):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    y = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    n = x.size // x.shape[-1]
    return y, 0.1 * mean, 0.9 + 0.1 * var * n / (n - 1)


def np_crd_call(p, mem_s, mem_t, z, f_s, f_t, ind, idx, n_data, T=0.07, momentum=0.5):
    """One call of the original CRDLoss + ContrastMemory; returns loss, Z pair, updated banks."""
    def embed(q, f):
        v = f @ q["linear"]["kernel"] + q["linear"]["bias"]
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    v_s, v_t = embed(p["embed_s"], f_s), embed(p["embed_t"], f_t)
    out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], v_s) / T)
    out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], v_t) / T)
    z = [out_s.mean() * n_data if z[0] < 0 else z[0], out_t.mean() * n_data if z[1] < 0 else z[1]]

    def nce(x):
        m_pn = (x.shape[1] - 1) / n_data
        return -(np.log(x[:, 0] / (x[:, 0] + m_pn + 1e-7)).sum()
                 + np.log(m_pn / (x[:, 1:] + m_pn + 1e-7)).sum()) / len(x)

    loss = nce(out_s / z[0]) + nce(out_t / z[1])

    def update(mem, v):
        mem = mem.copy()
        rows = momentum * mem[ind] + (1 - momentum) * v
        mem[ind] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return mem

    return loss, z, update(mem_s, v_s), update(mem_t, v_t)


# ---------------------------------------------------------------------------------------------------------------
# Registry and weights


def test_registry_names_and_errors():
    assert distillers.names() == ["ab", "at", "cc", "crd", "dist", "dkd", "fsp", "ft", "hint", "kd", "kdsvd", "mlkd",
                                  "nkd", "nst", "pkt", "reviewkd", "rkd", "sp", "vid", "wttm"]
    assert distillers.logit_names() == ["dist", "dkd", "mlkd", "nkd", "wttm"]
    assert "kd" not in distillers.feature_names() and "dkd" not in distillers.feature_names()
    with pytest.raises(ValueError, match="valid distillers: ab, at, cc, crd, dist, dkd, fsp, ft, hint"):
        distillers.create("fitnet")
    with pytest.raises(ValueError, match="valid options: .*nce_k"):
        distillers.create("crd", nce_kk=5)
    d = distillers.create("crd", nce_k=7, beta=None)  # None means "the method's default"
    assert (d.nce_k, d.beta, d.feat_dim, d.nce_t, d.nce_m) == (7, 0.8, 128, 0.07, 0.5)
    assert distillers.create("crd").nce_k == 16384
    assert d == distillers.create("crd", nce_k=7) and hash(d) == hash(distillers.create("crd", nce_k=7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.beta = 1.0


def test_aliases_give_the_canonical_distiller():
    """The original's --distill spellings: an alias creates the canonical class (whose name the results record)."""
    for alias, name in (("correlation", "cc"), ("attention", "at"), ("similarity", "sp"), ("abound", "ab"),
                        ("factor", "ft")):
        assert distillers.canonical(alias) == name
        assert distillers.create(alias) == distillers.create(name) and distillers.create(alias).name == name
    assert distillers.create("attention", p=4.0).p == 4.0
    with pytest.raises(ValueError, match="aliases: abound \\(ab\\), attention \\(at\\), correlation \\(cc\\), "
                                         "factor \\(ft\\), similarity"):
        distillers.canonical("corelation")


def test_logit_distillers_options():
    dkd = distillers.create("dkd")
    assert (dkd.dkd_alpha, dkd.dkd_beta, dkd.warmup) == (1.0, 8.0, 20)
    assert dkd.replaces_kl and not dkd.uses_features and dkd.needs_teacher
    assert distillers.create("dkd", dkd_beta=2.0, warmup=0) == distillers.create("dkd", dkd_beta=2.0, warmup=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        distillers.create("dkd", warmup=-1)
    with pytest.raises(ValueError, match="no '\\+KD' variant"):
        distillers.create("dist", with_kd=True)
    dist = distillers.create("dist")
    assert (dist.dist_beta, dist.dist_gamma) == (1.0, 1.0)
    assert not distillers.create("kd").needs_teacher and distillers.create("nst").needs_teacher
    distillers.check_logit_stand(None)
    distillers.check_logit_stand(dkd)
    for name in ("dist", "crd", "at"):
        with pytest.raises(ValueError, match=f"standardises the logits of kd and dkd, not distiller={name}"):
            distillers.check_logit_stand(distillers.create(name))


def test_default_weights():
    betas = dict(kd=0.0, crd=0.8, hint=100.0, at=1000.0, sp=3000.0, pkt=30000.0, rkd=1.0, vid=1.0, nst=50.0,
                 kdsvd=1.0, cc=0.02, ft=200.0, reviewkd=1.0)
    assert sorted(betas) == sorted(distillers.feature_names() + ["kd"])
    for name, beta in betas.items():
        d = distillers.create(name)
        assert d.beta == beta
        ident = d.default_weights("identity")
        if name == "kd":
            assert ident == dict(gamma=0.1, alpha=0.9, beta=0.0)
        else:
            assert ident == dict(gamma=1.0, alpha=0.0, beta=beta)
        assert d.default_weights("cutmix_pick_t") == dict(gamma=0.1, alpha=0.9, beta=beta)
    crd_kd = distillers.create("crd", with_kd=True)
    assert crd_kd.default_weights("identity") == dict(gamma=1.0, alpha=1.0, beta=0.8)
    assert crd_kd.default_weights("mixup") == dict(gamma=0.1, alpha=0.9, beta=0.8)
    w = distillers.resolve_weights(distillers.create("crd"), "identity", alpha=1, beta=None)
    assert w == dict(gamma=1.0, alpha=1.0, beta=0.8)
    # logit distillers: the official CE and loss weights whatever the scheme; LS: weight 9 on the logit block
    for aug in ("identity", "cutmix_pick_t"):
        assert distillers.create("dkd").default_weights(aug) == dict(gamma=1.0, alpha=1.0, beta=0.0)
        assert distillers.create("dist").default_weights(aug) == dict(gamma=1.0, alpha=2.0, beta=0.0)
        assert distillers.create("dkd").default_weights(aug, logit_stand=True) == dict(gamma=1.0, alpha=9.0,
                                                                                        beta=0.0)
        assert distillers.create("kd").default_weights(aug, logit_stand=True) == dict(gamma=0.1, alpha=9.0,
                                                                                       beta=0.0)
    assert distillers.resolve_weights(distillers.create("kd"), "cutmix", alpha=3.0, logit_stand=True) == dict(
        gamma=0.1, alpha=3.0, beta=0.0)


# ---------------------------------------------------------------------------------------------------------------
# kdjax.losses


def test_losses_vs_numpy():
    rng = np.random.default_rng(0)
    s, t = rand(rng, 6, 7) * 3, rand(rng, 6, 7) * 3
    t[0, 0] = 200.0  # a teacher row whose other probabilities underflow at T=1: must stay finite
    y = rng.integers(0, 7, 6)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(s), jnp.asarray(y)),
                               -log_softmax(s64)[np.arange(6), y].mean(), rtol=RTOL)
    for T in (4.0, 1.0):
        lp, lq = log_softmax(t64 / T), log_softmax(s64 / T)
        ref = np.sum(np.exp(lp) * (lp - lq)) / 6 * T * T
        np.testing.assert_allclose(losses.kd_kl(jnp.asarray(s), jnp.asarray(t), T), ref, rtol=RTOL)
        np.testing.assert_allclose(losses.kd_kl_per_sample(jnp.asarray(s), jnp.asarray(t), T),
                                   np.sum(np.exp(lp) * (lp - lq), axis=1), rtol=RTOL, atol=1e-7)
    lp = log_softmax(s64)
    np.testing.assert_allclose(losses.entropy(jnp.asarray(s)), -(np.exp(lp) * lp).sum(1), rtol=RTOL, atol=1e-6)
    assert np.isfinite(float(losses.kd_kl(jnp.asarray(s), jnp.asarray(t), 1.0)))
    # teacher logits are a constant target
    g = jax.grad(losses.kd_kl, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.abs(g[0]).sum() > 0 and np.all(np.asarray(g[1]) == 0)


# ---------------------------------------------------------------------------------------------------------------
# Parameter-free distillers


def run(name, fs, ft, **options):
    d = distillers.create(name, **options)
    params, state = d.init(jax.random.PRNGKey(0), fs, ft)
    loss, _ = jitted(d)(params, state, fs, ft)
    return d, params, float(loss)


def test_at_sp_pkt_rkd_vs_numpy():
    rng = np.random.default_rng(1)
    fs, ft = feature_lists(rng)
    fs64, ft64 = f64(fs), f64(ft)
    np.testing.assert_allclose(run("at", fs, ft)[2], np_at(fs64, ft64), rtol=RTOL)
    np.testing.assert_allclose(run("sp", fs, ft)[2], np_sp(fs64[-2], ft64[-2]), rtol=RTOL)
    np.testing.assert_allclose(run("pkt", fs, ft)[2], np_pkt(fs64[-1], ft64[-1]), rtol=RTOL)
    np.testing.assert_allclose(run("rkd", fs, ft)[2], np_rkd(fs64[-1], ft64[-1]), rtol=RTOL)
    # a non-default weight of the RKD terms reaches the loss
    w_only_d = run("rkd", fs, ft, w_a=0.0)[2]
    assert 0 < w_only_d < run("rkd", fs, ft)[2]


def test_vid_vs_numpy():
    rng = np.random.default_rng(2)
    fs, ft = feature_lists(rng)
    d, params, loss = run("vid", fs, ft)
    assert sorted(params) == ["regressor_1", "regressor_2", "regressor_3"]
    p1 = params["regressor_1"]
    # hidden width = teacher channels; initial predicted variance 5
    assert p1["conv_0"]["kernel"].shape == (1, 1, 4, 6) and p1["conv_4"]["kernel"].shape == (1, 1, 6, 6)
    np.testing.assert_allclose(jax.nn.softplus(p1["log_scale"]) + 1e-5, 5.0, rtol=1e-6)
    # a log_scale away from its initial value, so the variance term is exercised with different channels
    params = jax.tree.map(lambda a: a, params)
    params["regressor_2"]["log_scale"] = jnp.linspace(-1.0, 2.0, 7)
    loss, _ = jitted(d)(params, {}, fs, ft)
    np.testing.assert_allclose(float(loss), np_vid(f64(params), f64(fs), f64(ft)), rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# FitNet


@pytest.mark.parametrize("layer,kind", [(1, "conv3x3_s2"), (2, "convT4x4_s2"), (3, "conv_valid"), (0, "conv_valid")])
def test_hint_vs_numpy(layer, kind):
    rng = np.random.default_rng(3)
    fs, ft = feature_lists(rng)
    fs[0] = rand(rng, B, 8, 8, 3)
    ft[0] = rand(rng, B, 6, 6, 5)  # 8 -> 6: a valid 3x3 conv
    d = distillers.create("hint", hint_layer=layer)
    params, state = d.init(jax.random.PRNGKey(4), fs, ft)
    assert heads.conv_reg_kind(fs[layer].shape, ft[layer].shape) == kind
    # BN affine away from 1/0 so that it is checked
    p = params["conv_reg"]
    p["bn"]["scale"] = jnp.linspace(0.5, 1.5, ft[layer].shape[-1])
    p["bn"]["bias"] = jnp.linspace(-0.2, 0.3, ft[layer].shape[-1])
    loss, new_state = jitted(d)(params, state, fs, ft)
    q = f64(p)
    x = f64(fs[layer])
    w, bias = q["conv"]["kernel"], q["conv"]["bias"]
    if kind == "conv3x3_s2":
        z = np_conv(x, w, 2, 1)
    elif kind == "convT4x4_s2":
        z = np_conv_transpose(x, w)
    else:
        z = np_conv(x, w, 1, 0)
    y, run_mean, run_var = np_bn_train(z + bias, q["bn"]["scale"], q["bn"]["bias"])
    ref = np.mean((np.maximum(y, 0) - f64(ft[layer])) ** 2)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)
    stats = new_state["batch_stats"]["conv_reg"]["bn"]
    np.testing.assert_allclose(stats["mean"], run_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], run_var, rtol=1e-4, atol=1e-6)
    # eval mode normalises with the running statistics and leaves them alone
    loss_eval, same = jitted(d, train=False)(params, new_state, fs, ft)
    z_eval = (z + bias - run_mean) / np.sqrt(run_var + 1e-5) * q["bn"]["scale"] + q["bn"]["bias"]
    np.testing.assert_allclose(float(loss_eval), np.mean((np.maximum(z_eval, 0) - f64(ft[layer])) ** 2), rtol=RTOL)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, new_state)))


def test_hint_init_matches_pytorch_defaults_and_rejects_bad_sizes():
    rng = np.random.default_rng(5)
    fs = [rand(rng, 2, 16, 16, 64), rand(rng, 2, 8, 8, 32), rand(rng, 2, 8)]
    ft = [rand(rng, 2, 32, 32, 16), rand(rng, 2, 16, 16, 16), rand(rng, 2, 8)]
    params, _ = distillers.create("hint", hint_layer=1).init(jax.random.PRNGKey(0), fs, ft)
    k = np.asarray(params["conv_reg"]["conv"]["kernel"])  # ConvTranspose2d(32 -> 16): bound 1/sqrt(16 * 16)
    assert k.shape == (4, 4, 32, 16) and 0.8 / 16 < np.abs(k).max() <= 1 / 16
    params, _ = distillers.create("hint", hint_layer=0).init(jax.random.PRNGKey(0), ft, fs)
    k = np.asarray(params["conv_reg"]["conv"]["kernel"])  # Conv2d 3x3 s2 (16 -> 64): bound 1/sqrt(16 * 9)
    assert k.shape == (3, 3, 16, 64) and 0.8 / 12 < np.abs(k).max() <= 1 / 12
    with pytest.raises(ValueError, match="choose another hint_layer"):
        distillers.create("hint", hint_layer=0).init(jax.random.PRNGKey(0), [rand(rng, 2, 4, 4, 3), fs[-1]],
                                                     [rand(rng, 2, 16, 16, 3), ft[-1]])
    with pytest.raises(ValueError, match="hint_layer=7"):
        distillers.create("hint", hint_layer=7).init(jax.random.PRNGKey(0), fs, ft)


# ---------------------------------------------------------------------------------------------------------------
# CRD


def crd_setup(num_train=40, num_classes=4, nce_k=23, feat_dim=6, seed=6):
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(num_train) % num_classes)
    fs, ft = [rand(rng, B, 9)], [rand(rng, B, 11)]
    d = distillers.create("crd", nce_k=nce_k, feat_dim=feat_dim)
    params, state = d.init(jax.random.PRNGKey(7), fs, ft, num_train=num_train, train_labels=train_labels)
    return rng, d, params, state, fs, ft, train_labels


# N = 40: with (K + 1) * D >= N the scores are one matmul with the bank, otherwise gathered rows (16 * 2 < 40)
@pytest.mark.parametrize("feat_dim,nce_k", [(6, 23), (2, 15)])
def test_crd_vs_numpy_two_calls(feat_dim, nce_k):
    rng, d, params, state, fs, ft, train_labels = crd_setup(feat_dim=feat_dim, nce_k=nce_k)
    n = len(train_labels)
    stdv = 1 / np.sqrt(feat_dim / 3)
    assert state["memory_s"].shape == (n, feat_dim) and np.abs(state["memory_s"]).max() <= stdv
    assert np.abs(state["memory_t"]).max() > 0.8 * stdv
    assert float(state["z_s"]) < 0 and float(state["z_t"]) < 0
    p64 = f64(params)
    mem_s, mem_t, z = f64(state["memory_s"]), f64(state["memory_t"]), [-1.0, -1.0]
    step = jitted(d)
    for call in range(2):
        ind = rng.choice(n, B, replace=False)
        key = jax.random.PRNGKey(10 + call)
        f_s = [fs[0] * (1 + call)]  # the second batch has other features: Z must not be recomputed
        labels = jnp.asarray(train_labels[ind])
        loss, state = step(params, state, f_s, ft, labels=labels, indices=jnp.asarray(ind), key=key)
        idx = np.asarray(crd_lib.contrast_indices(key, labels, jnp.asarray(ind), state, d.nce_k))
        assert idx.shape == (B, 1 + d.nce_k) and np.all(idx[:, 0] == ind)
        ref_loss, z_new, mem_s, mem_t = np_crd_call(p64, mem_s, mem_t, z, f64(f_s[0]), f64(ft[0]), ind, idx, n)
        if call == 1:
            assert z_new == z  # fixed at the first call
        z = z_new
        assert np.isfinite(ref_loss) and np.all(np.isfinite(mem_s)) and np.all(np.isfinite(mem_t))
        np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL)
        np.testing.assert_allclose([float(state["z_s"]), float(state["z_t"])], z, rtol=RTOL)
        np.testing.assert_allclose(state["memory_s"], mem_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["memory_t"], mem_t, rtol=1e-5, atol=1e-6)
    # the updated rows are unit vectors; the others are untouched
    touched = np.linalg.norm(np.asarray(state["memory_s"]), axis=1)
    np.testing.assert_allclose(touched[ind], 1.0, rtol=1e-5)


def test_crd_negatives_never_of_the_anchor_class():
    # 50 samples, class sizes 5..20, K larger than the smallest candidate set: drawn with replacement
    train_labels = np.repeat(np.arange(4), [5, 10, 15, 20])
    train_labels = np.random.default_rng(8).permutation(train_labels)
    order, start, count = (jnp.asarray(a) for a in crd_lib.class_tables(train_labels, 50))
    anchors = jnp.asarray(np.tile(np.arange(4), 8))  # 32 anchors, 8 of each class
    draw = jax.jit(lambda k: crd_lib.sample_negatives(k, anchors, order, start, count, 64))
    counts = np.zeros((4, 50))
    for i in range(40):
        neg = np.asarray(draw(jax.random.PRNGKey(i)))
        assert neg.shape == (32, 64) and neg.min() >= 0 and neg.max() < 50
        assert not np.any(train_labels[neg] == np.asarray(anchors)[:, None])
        for c in range(4):
            counts[c] += np.bincount(neg[np.asarray(anchors) == c].ravel(), minlength=50)
    for c in range(4):
        others = train_labels != c
        assert np.all(counts[c][~others] == 0) and np.all(counts[c][others] > 0)  # every candidate is reachable
        # uniform over the candidates: each count ~ Binomial; allow 5 standard deviations
        expected = counts[c].sum() / others.sum()
        assert np.abs(counts[c][others] - expected).max() < 5 * np.sqrt(expected)


def test_crd_errors():
    rng, d, params, state, fs, ft, train_labels = crd_setup()
    with pytest.raises(ValueError, match="needs labels, indices"):
        d.loss(params, state, fs, ft)
    with pytest.raises(ValueError, match="needs num_train and train_labels"):
        d.init(jax.random.PRNGKey(0), fs, ft)
    with pytest.raises(ValueError, match="num_train=41"):
        d.init(jax.random.PRNGKey(0), fs, ft, num_train=41, train_labels=train_labels)
    with pytest.raises(ValueError, match="at least two classes"):
        d.init(jax.random.PRNGKey(0), fs, ft, num_train=3, train_labels=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="nce_m"):
        distillers.create("crd", nce_m=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Gradients, jit and state structure for every distiller


def all_setups():
    rng = np.random.default_rng(9)
    fs, ft = feature_lists(rng)
    ft_same = [rand(rng, *f.shape) for f in fs]  # KD-SVD compares layers of equal channel counts
    train_labels = np.arange(30) % 3
    out = []
    for name in ["kd"] + distillers.feature_names():
        d = distillers.create(name, **({"nce_k": 12, "feat_dim": 8} if name == "crd" else {}))
        t = ft_same if name == "kdsvd" else ft
        params, state = d.init(jax.random.PRNGKey(1), fs, t, num_train=30, train_labels=train_labels)
        kw = dict(labels=jnp.asarray(train_labels[:B]), indices=jnp.arange(B), key=jax.random.PRNGKey(2))
        out.append((name, d, params, state, fs, t, kw))
    return out


def test_gradients_reach_only_student_and_heads():
    for name, d, params, state, fs, ft, kw in all_setups():
        def f(p, f_s, f_t):
            return d.loss(p, state, f_s, f_t, **kw)[0]

        g_p, g_s, g_t = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, [jnp.asarray(a) for a in fs],
                                                       [jnp.asarray(a) for a in ft])
        assert all(np.all(np.asarray(g) == 0) for g in g_t), name  # the teacher is a constant
        if name == "kd":
            continue
        assert sum(float(jnp.abs(g).sum()) for g in g_s) > 0, name
        for path, leaf in jax.tree_util.tree_leaves_with_path(g_p):
            assert float(jnp.abs(leaf).sum()) > 0, (name, jax.tree_util.keystr(path))


def test_jit_and_state_structure_are_stable():
    """The step carries state through lax.scan: structure, shapes and dtypes must be preserved by ``loss``."""
    for name, d, params, state, fs, ft, kw in all_setups():
        loss, new_state = jitted(d)(params, state, fs, ft, **kw)
        assert np.isfinite(float(loss)), name
        assert (jax.tree.structure(new_state) == jax.tree.structure(state)), name
        same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, new_state, state)
        assert all(jax.tree.leaves(same)), name
        # params and state are plain pytrees of arrays (orbax-checkpointable as they are)
        for leaf in jax.tree.leaves((params, state)):
            assert isinstance(leaf, jax.Array), name


@pytest.mark.slow  # ~40 s over the zoo; the preact and parity tests check feature lists by default
def test_real_feature_lists_from_the_zoo():
    """Shapes from model.apply(..., features=True) of a real pair (resnet32x4 -> ShuffleV2), via eval_shape."""
    from kdjax import models

    def feature_shapes(name):
        return models.abstract_feature_shapes(name, num_classes=10, image_size=8, batch=4)

    pairs = {name: ("resnet32x4", "ShuffleV2") for name in ["kd"] + distillers.feature_names()}
    pairs["kdsvd"] = ("resnet14", "resnet8")  # KD-SVD needs equal channels per layer (its original pairs)
    rng = np.random.default_rng(10)
    labels = np.arange(20) % 10
    for name, (teacher, student) in pairs.items():
        shapes_t, shapes_s = feature_shapes(teacher), feature_shapes(student)
        fs = [rand(rng, *s.shape) for s in shapes_s]
        ft = [rand(rng, *s.shape) for s in shapes_t]
        if name == "kdsvd":  # non-negative maps, as after a ReLU, so that the singular vectors are well separated
            fs, ft = [np.abs(f) for f in fs], [np.abs(f) for f in ft]
        d = distillers.create(name, **({"nce_k": 16} if name == "crd" else {}))
        params, state = d.init(jax.random.PRNGKey(0), shapes_s, shapes_t, num_train=20, train_labels=labels)
        loss, _ = jitted(d)(params, state, fs, ft, labels=jnp.asarray(labels[:4]), indices=jnp.arange(4),
                            key=jax.random.PRNGKey(1))
        assert np.isfinite(float(loss)) and (name == "kd" or float(loss) != 0.0), name
