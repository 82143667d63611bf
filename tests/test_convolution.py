"""kdjax.models.convolution: the convolution whose weight gradient reads a materialised input equals
lax.conv_general_dilated in its forward and both gradients, and the zoo uses it exactly when the policy says so."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from kdjax import models, parallel
from kdjax.models import convolution

NHWC = ("NHWC", "HWIO", "NHWC")


def assert_close(got, want, rtol):
    """Elementwise, relative to the largest magnitude of ``want``: the same XLA convolutions run on both sides,
    but in another fusion context XLA may sum in another order, so float rounding is allowed."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * float(np.max(np.abs(want))))


def forward_and_gradients(conv, x, w, g, **options):
    y, vjp = jax.vjp(lambda a, b: conv(a, b, dimension_numbers=NHWC, **options), x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_forward_and_both_gradients_equal_lax(size, kernel, stride):
    rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
    pad = kernel // 2
    options = dict(window_strides=(stride, stride), padding=[(pad, pad), (pad, pad)])
    x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)), jnp.float32)
    out = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, dimension_numbers=NHWC, **options))
    g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    want = jax.jit(lambda x, w, g: forward_and_gradients(lax.conv_general_dilated, x, w, g, **options))(x, w, g)
    got = jax.jit(lambda x, w, g: forward_and_gradients(convolution.conv_general_dilated, x, w, g, **options))(
        x, w, g)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, rtol=1e-6)


def test_grouped_and_bfloat16_convolutions_equal_lax():
    rng = np.random.default_rng(1)
    for dtype, groups, rtol in ((jnp.float32, 2, 1e-6), (jnp.bfloat16, 1, 1e-2)):
        x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), dtype)
        w = jnp.asarray(rng.normal(size=(3, 3, 4 // groups, 6)), dtype)
        g = jnp.asarray(rng.normal(size=(2, 6, 6, 6)), dtype)
        options = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), feature_group_count=groups)
        want = forward_and_gradients(lax.conv_general_dilated, x, w, g, **options)
        got = forward_and_gradients(convolution.conv_general_dilated, x, w, g, **options)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype
            assert_close(a, b, rtol)


def test_materialize_returns_every_bit_unchanged():
    values = np.array([0.0, -0.0, 1.5, -np.inf, np.inf, np.nan, 1e-45, -3.4e38], np.float32)
    for v in (values, -values, values[::-1]):  # each special value once in first place: the predicate's input
        got = np.asarray(jax.jit(convolution.materialize)(jnp.asarray(v)))
        assert got.tobytes() == v.tobytes()
    halves = jnp.asarray(values).astype(jnp.bfloat16)
    assert np.asarray(jax.jit(convolution.materialize)(halves)).tobytes() == np.asarray(halves).tobytes()


def student_pass(monkeypatch, forced):
    """resnet8's train-mode loss and gradients, traced with the policy forced on or off, and whether the traced
    program went through the custom VJP."""
    monkeypatch.setenv(parallel.CONV_GRAD_ENV, forced)
    model = models.create("resnet8", 10, 16)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=4))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    uses_custom = "custom_vjp_call" in str(jax.make_jaxpr(loss)(variables["params"]))
    if uses_custom:  # the weight gradients' inputs go through materialize's conditional
        assert " cond[" in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    return jax.jit(jax.value_and_grad(loss))(variables["params"]), uses_custom


def test_policy_switches_the_zoo_and_keeps_its_gradients(monkeypatch):
    (loss_off, grads_off), custom_off = student_pass(monkeypatch, "0")
    (loss_on, grads_on), custom_on = student_pass(monkeypatch, "1")
    assert not custom_off and custom_on
    assert_close(loss_on, loss_off, rtol=1e-6)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), grads_on, grads_off)


def test_policy_defaults_to_xla_cpu_only(monkeypatch):
    monkeypatch.delenv(parallel.CONV_GRAD_ENV, raising=False)
    assert parallel.materialize_weight_gradient_inputs() == (jax.default_backend() == "cpu")
