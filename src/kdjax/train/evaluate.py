"""Jitted evaluation over a device-resident test set: mean cross-entropy, top-1 and top-5 (one dispatch on
accelerators, one per batch on CPU: ``kdjax.parallel.steps_per_dispatch``).

The last batch is padded (indices clipped) and masked, so every batch has the same shape and nothing is dropped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import parallel
from kdjax.augment import transforms


def make_evaluator(model, mean, std, batch_size: int, num_examples: int):
    """``evaluate(variables, data) -> {'test_loss', 'top1', 'top5'}`` (host floats) over the test split of a
    ``kdjax.data.DeviceDataset``; ``batch_size`` must be a multiple of the device count."""
    num_batches = -(-num_examples // batch_size)

    def batch_sums(variables, data, b):
        """Summed cross-entropy, top-1 and top-5 hits of test batch ``b`` (padding masked out)."""
        idx = b * batch_size + jnp.arange(batch_size)
        mask = (idx < num_examples).astype(jnp.float32)
        images, y = data.gather("test", jnp.minimum(idx, num_examples - 1))
        logits = model.apply(variables, transforms.normalize(images, mean, std), train=False)
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hit1 = (topk[:, 0] == y).astype(jnp.float32)
        hit5 = jnp.any(topk == y[:, None], axis=-1).astype(jnp.float32)
        return jnp.stack([jnp.sum(ce * mask), jnp.sum(hit1 * mask), jnp.sum(hit5 * mask)])

    @jax.jit
    def all_batches(variables, data):  # the whole test set in one dispatch
        add = lambda total, b: (total + batch_sums(variables, data, b), None)  # noqa: E731
        return jax.lax.scan(add, jnp.zeros(3, jnp.float32), jnp.arange(num_batches))[0]

    one_batch = jax.jit(batch_sums)

    def evaluate(variables, data):
        if parallel.steps_per_dispatch(num_batches) == 1:
            sums = sum(np.asarray(one_batch(variables, data, b), np.float64) for b in range(num_batches))
        else:
            sums = np.asarray(jax.device_get(all_batches(variables, data)), np.float64)
        ce, top1, top5 = sums / num_examples
        return {"test_loss": float(ce), "top1": float(top1), "top5": float(top5)}

    return evaluate


def eval_batch_size(requested: int, num_devices: int) -> int:
    """The requested size rounded up to a multiple of the device count."""
    return -(-requested // num_devices) * num_devices
