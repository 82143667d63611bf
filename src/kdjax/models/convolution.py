"""A convolution whose weight gradient reads its input from memory, for XLA:CPU.

XLA:CPU (jaxlib 0.10.2) runs a convolution's weight gradient as a forward convolution whose "batch" is the input
channels and whose "features" are the images, so the input is first transposed from NHWC to [C, H, W, N]. The
fusion pass merges that transpose with the recomputation of the BatchNorm/ReLU/residual chain that produced the
input, although the input is in memory already (the forward convolution read it): each element of the transpose
then recomputes the chain from up to 16 tensors, reading each at a stride of one image. Measured on the student
pass of resnet20 at batch 128 (one core, bench/conv_grad.py), those fusions took 12-30 ms each where the same
transpose of a tensor in memory takes 1-4 ms.

``conv_general_dilated`` here is ``lax.conv_general_dilated`` with a custom VJP: the forward, the input gradient
and the weight gradient are XLA's own (the same convolutions, so the same numbers), but the weight gradient reads
its input through ``materialize``, which the fusion pass cannot see through. An optimization barrier would say
the same but is removed before fusion on XLA:CPU; a conditional is not.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def materialize(v):
    """``v`` unchanged, computed into a buffer of its own: a conditional whose predicate (the first element's bit
    pattern OR 1, never zero) always selects the identity branch, but is data that XLA cannot fold, and whose other
    branch (zeros) differs, so the simplifier keeps the conditional and no fusion crosses it."""
    bits = lax.bitcast_convert_type(v.reshape(-1)[0], _UNSIGNED[v.dtype.itemsize])
    return lax.cond((bits | 1) != 0, lambda a: a, jnp.zeros_like, v)


def _convolve(lhs, rhs, options):
    return lax.conv_general_dilated(lhs, rhs, **dict(options))


def weight_gradient(lhs, rhs, g, options):
    """dL/d(rhs) of ``_convolve(lhs, rhs)`` given the output gradient ``g``: XLA's own, from a materialised lhs."""
    lhs = materialize(lhs)
    return jax.vjp(lambda r: _convolve(lhs, r, options), rhs)[1](g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs, rhs, options):
    return _convolve(lhs, rhs, options)


def _conv_fwd(lhs, rhs, options):
    return _convolve(lhs, rhs, options), (lhs, rhs)


def _conv_bwd(options, residuals, g):
    lhs, rhs = residuals
    (d_lhs,) = jax.vjp(lambda a: _convolve(a, rhs, options), lhs)[1](g)  # XLA's input gradient, unchanged
    return d_lhs, weight_gradient(lhs, rhs, g, options)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _hashable(value):
    """Nested lists (flax passes padding as a list of pairs) as tuples: the options are a static argument."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``lax.conv_general_dilated`` (same arguments, same results) with the weight gradient above: what
    flax.linen.Conv takes as its ``conv_general_dilated`` attribute."""
    options = (("window_strides", _hashable(window_strides)), ("padding", _hashable(padding)),
               ("lhs_dilation", _hashable(lhs_dilation)), ("rhs_dilation", _hashable(rhs_dilation)),
               ("dimension_numbers", dimension_numbers), ("feature_group_count", feature_group_count),
               ("batch_group_count", batch_group_count), ("precision", precision),
               ("preferred_element_type", preferred_element_type))
    return _conv(lhs, rhs, options)
