"""Jitted evaluation over a device-resident test set: mean cross-entropy, top-1 and top-5 (one dispatch on
accelerators, one per batch on CPU: ``kdjax.parallel.steps_per_dispatch``); over a streamed test set, one dispatch
per batch of the host pipeline.

The last batch is padded (indices clipped, or zero images from the host) and masked, so every batch has the same
shape and nothing is dropped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import models, parallel
from kdjax.augment import transforms
from kdjax.data.placement import is_streamed, place


def masked_sums(model, variables, images, y, mask, mean, std):
    """Summed cross-entropy, top-1 and top-5 hits of one batch of uint8 images over the rows where ``mask`` is 1."""
    logits = model.apply(variables, transforms.normalize(images, mean, std), train=False)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = (topk[:, 0] == y).astype(jnp.float32)
    hit5 = jnp.any(topk == y[:, None], axis=-1).astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * mask), jnp.sum(hit1 * mask), jnp.sum(hit5 * mask)])


def make_evaluator(model, mean, std, batch_size: int, num_examples: int, mesh=None):
    """``evaluate(variables, data) -> {'test_loss', 'top1', 'top5'}`` (host floats) over the test split of a
    ``kdjax.data.DeviceDataset``, or of a streamed dataset (``make_streamed_evaluator``, on ``mesh``: default all
    devices); ``batch_size`` must be a multiple of the device count."""
    num_batches = -(-num_examples // batch_size)
    streamed = make_streamed_evaluator(model, mean, std, batch_size, num_examples, mesh)

    def batch_sums(variables, data, b):
        """Summed cross-entropy, top-1 and top-5 hits of test batch ``b`` (padding masked out)."""
        idx = b * batch_size + jnp.arange(batch_size)
        mask = (idx < num_examples).astype(jnp.float32)
        images, y = data.gather("test", jnp.minimum(idx, num_examples - 1))
        return masked_sums(model, variables, images, y, mask, mean, std)

    @jax.jit
    def all_batches(variables, data):  # the whole test set in one dispatch
        add = lambda total, b: (total + batch_sums(variables, data, b), None)  # noqa: E731
        return jax.lax.scan(add, jnp.zeros(3, jnp.float32), jnp.arange(num_batches))[0]

    one_batch = jax.jit(batch_sums)

    def evaluate(variables, data):
        if is_streamed(data):
            return streamed(variables, data)
        if parallel.steps_per_dispatch(num_batches) == 1:
            sums = sum(np.asarray(one_batch(variables, data, b), np.float64) for b in range(num_batches))
        else:
            sums = np.asarray(jax.device_get(all_batches(variables, data)), np.float64)
        ce, top1, top5 = sums / num_examples
        return {"test_loss": float(ce), "top1": float(top1), "top5": float(top5)}

    return evaluate


def make_streamed_evaluator(model, mean, std, batch_size: int, num_examples: int, mesh=None, threads: int = 16):
    """``evaluate(variables, data)`` over the test split of a ``kdjax.data.streamed.StreamedDataset``: its
    ``eval_steps`` batches (Resize + CenterCrop on the host, the last batch padded and masked; each process reads
    its share) prefetched to the devices, one dispatch per batch, sums over the whole global batch."""
    one_batch = jax.jit(lambda variables, b: masked_sums(model, variables, b["images"], b["labels"],
                                                         b["mask"].astype(jnp.float32), mean, std))

    def evaluate(variables, data):
        from kdjax.data.streamed import DeviceIterator, host_iterator

        if data.num_test != num_examples:
            raise ValueError(f"the evaluator is for {num_examples} test images, the dataset has {data.num_test}")
        batches = DeviceIterator(host_iterator(data.eval_steps(batch_size), threads=threads),
                                 mesh if mesh is not None else parallel.make_mesh())
        sums = jax.device_get([one_batch(variables, batch) for batch in batches])
        ce, top1, top5 = np.sum(np.asarray(sums, np.float64), axis=0) / num_examples
        return {"test_loss": float(ce), "top1": float(top1), "top5": float(top5)}

    return evaluate


def eval_batch_size(requested: int, num_devices: int) -> int:
    """The requested size rounded up to a multiple of the device count."""
    return -(-requested // num_devices) * num_devices


def evaluate_model(model_name: str, variables, dataset, dtype, requested_batch_size: int, mesh=None) -> dict:
    """``{'test_loss', 'top1', 'top5'}`` of zoo model ``model_name`` with ``variables`` on ``dataset``'s test split
    (in memory or streamed), computed in ``dtype``: what ``kdjax evaluate`` reports, and the archive import's
    evaluated top-1."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    model = models.create(model_name, dataset.num_classes, dataset.image_size, dtype)
    evaluate = make_evaluator(model, dataset.mean, dataset.std, eval_batch_size(requested_batch_size, mesh.size),
                              dataset.num_test, mesh)
    return evaluate(variables, place(dataset, mesh))
