"""The nine augmentation schemes of the paper (docs/fidelity.md, "The nine schemes"), as pure jittable functions.

Each factory takes the dataset statistics and the resolved options and returns
``fn(key, images, labels, score_fn=None) -> (images_aug, aux)`` on normalised float NHWC batches.

Randomness: by default every random parameter is drawn once per batch, as the original does (one flip coin, one
crop offset, one AutoAugment sub-policy, one Cutout hole, one Mixup lambda, one CutMix lambda and box); with
``per_sample=True`` each image gets its own draw (a named extension, not the paper's setting). Permutations are
always one per batch.
"""
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from kdjax.augment import transforms
from kdjax.augment.registry import DatasetStats, Options, builtin


def _lead_shape(batch: int, per_sample: bool) -> Tuple[int, ...]:
    return (batch,) if per_sample else ()


def _per_image(values, ndim: int = 4):
    """Broadcast a scalar (per batch) or [N] (per sample) parameter against an [N, ...] batch."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def _box_mask(y1, y2, x1, x2, height: int, width: int) -> jnp.ndarray:
    """True inside the half-open box rows [y1, y2) x cols [x1, x2); [H, W] for scalar corners, [N, H, W] for
    per-image corners."""
    rows = jnp.arange(height, dtype=jnp.int32)[:, None]
    cols = jnp.arange(width, dtype=jnp.int32)[None, :]
    y1, y2, x1, x2 = (_per_image(v, 3) for v in (y1, y2, x1, x2))
    return (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)


def _centered_box(key, shape, height: int, width: int, cut_h, cut_w):
    """The original's box around a uniform centre: [c - cut//2, c + cut//2), clipped to the image."""
    key_y, key_x = jax.random.split(key)
    cy = jax.random.randint(key_y, shape, 0, height, dtype=jnp.int32)
    cx = jax.random.randint(key_x, shape, 0, width, dtype=jnp.int32)
    y1 = jnp.clip(cy - cut_h // 2, 0, height)
    y2 = jnp.clip(cy + cut_h // 2, 0, height)
    x1 = jnp.clip(cx - cut_w // 2, 0, width)
    x2 = jnp.clip(cx + cut_w // 2, 0, width)
    return y1, y2, x1, x2


def derangement(key, n: int) -> jnp.ndarray:
    """A uniformly random permutation of range(n) with no fixed point, by rejection as the original does it
    (resample ``randperm`` until no index maps to itself; about e = 2.7 draws on average).

    For n = 1 no derangement exists (the original would loop forever); the identity [0] is returned, so a
    one-image batch is mixed with itself.
    """
    if n <= 1:
        return jnp.arange(n, dtype=jnp.int32)
    identity = jnp.arange(n, dtype=jnp.int32)

    def has_fixed_point(state):
        return jnp.any(state[1] == identity)

    def redraw(state):
        k, _ = state
        k, sub = jax.random.split(k)
        return k, jax.random.permutation(sub, n).astype(jnp.int32)

    key, sub = jax.random.split(key)
    first = jax.random.permutation(sub, n).astype(jnp.int32)
    return jax.lax.while_loop(has_fixed_point, redraw, (key, first))[1]


def _keep_dtype(out, images):
    return out.astype(images.dtype)


# --------------------------------------------------------------------------------------------------- schemes


@builtin("identity", label="Identity")
def identity(stats: DatasetStats, opts: Options) -> Callable:
    """x' = x: the student sees the same batch twice."""
    def fn(key, images, labels, score_fn=None):
        del key, labels, score_fn
        return images, {}
    return fn


def _via_uint8(stats: DatasetStats, transform_uint8: Callable) -> Callable:
    """Wrap a uint8 transform in the original's round trip: de-normalise, *255, truncate to uint8, transform,
    /255, normalise (docs/fidelity.md, "Base pipeline")."""
    def fn(key, images, labels, score_fn=None):
        del labels, score_fn
        pixels = transforms.to_uint8_truncating(images, stats.mean, stats.std)
        out, aux = transform_uint8(key, pixels)
        return _keep_dtype(transforms.normalize(out, stats.mean, stats.std), images), aux
    return fn


@builtin("flip", label="Flip")
def flip(stats: DatasetStats, opts: Options) -> Callable:
    """RandomHorizontalFlip(0.5) through uint8: one coin for the batch (or one per image)."""
    def transform(key, pixels):
        coins = jax.random.bernoulli(key, 0.5, _lead_shape(pixels.shape[0], opts.per_sample))
        return jnp.where(_per_image(coins), pixels[:, :, ::-1, :], pixels), {"flip": coins}
    return _via_uint8(stats, transform)


@builtin("crop_flip", label="Crop+Flip")
def crop_flip(stats: DatasetStats, opts: Options) -> Callable:
    """RandomCrop(S, padding=S//8, zero fill) then RandomHorizontalFlip(0.5), through uint8; one offset and one
    coin for the batch (or one each per image)."""
    def transform(key, pixels):
        offsets, coins = transforms.draw_crop_flip(key, pixels.shape[0] if opts.per_sample else None, opts.crop_pad)
        out = transforms.apply_crop_flip(pixels, offsets, coins, opts.crop_pad)
        return out, {"offset": offsets, "flip": coins}
    return _via_uint8(stats, transform)


@builtin("cutout", label="Cutout")
def cutout(stats: DatasetStats, opts: Options) -> Callable:
    """One square hole of side ``cutout_size`` (centre uniform over the image, clipped at the border) set to 0
    in normalised space, i.e. the dataset-mean colour. One hole per batch (or per image)."""
    size = opts.cutout_size

    def fn(key, images, labels, score_fn=None):
        del labels, score_fn
        n, h, w, _ = images.shape
        y1, y2, x1, x2 = _centered_box(key, _lead_shape(n, opts.per_sample), h, w, size, size)
        hole = _box_mask(y1, y2, x1, x2, h, w)[..., None]
        out = jnp.where(hole, jnp.zeros((), images.dtype), images)
        return out, {"box": jnp.stack([y1, y2, x1, x2], axis=-1)}
    return fn


@builtin("autoaugment", label="AutoAugment")
def autoaugment_scheme(stats: DatasetStats, opts: Options) -> Callable:
    """torchvision-0.10 AutoAugment through uint8: one sub-policy (with its probabilities and signs) for the
    whole batch (or per image); policy 'cifar10' at 32x32, 'imagenet' at 64x64."""
    from kdjax.augment import autoaugment as autoaugment_ops  # written separately; imported when first needed

    def transform(key, pixels):
        return autoaugment_ops.autoaugment(key, pixels, policy=opts.policy, per_sample=opts.per_sample), {}
    return _via_uint8(stats, transform)


@builtin("mixup", label="Mixup")
def mixup(stats: DatasetStats, opts: Options) -> Callable:
    """x' = lam x + (1 - lam) x[perm] in normalised space; lam ~ Beta(1, 1) = U(0, 1), perm a plain random
    permutation (fixed points allowed, as the original's ``randperm``)."""
    def fn(key, images, labels, score_fn=None):
        del labels, score_fn
        n = images.shape[0]
        key_lam, key_perm = jax.random.split(key)
        lam = jax.random.uniform(key_lam, _lead_shape(n, opts.per_sample), jnp.float32)
        perm = jax.random.permutation(key_perm, n).astype(jnp.int32)
        lam_b = _per_image(lam)
        out = lam_b * images + (1.0 - lam_b) * images[perm]
        return _keep_dtype(out, images), {"lam": lam, "perm": perm}
    return fn


def _cutmix_once(key, images, per_sample: bool):
    """One CutMix draw (docs/fidelity.md, "The nine schemes"): lam ~ U(0, 1), box side 2*(int(S*sqrt(1-lam))//2) around a uniform centre,
    clipped; a derangement; lam recomputed from the clipped area. Returns (mixed, aux)."""
    n, h, w, _ = images.shape
    key_lam, key_box, key_perm = jax.random.split(key, 3)
    shape = _lead_shape(n, per_sample)
    lam = jax.random.uniform(key_lam, shape, jnp.float32)
    ratio = jnp.sqrt(1.0 - lam)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    y1, y2, x1, x2 = _centered_box(key_box, shape, h, w, cut_h, cut_w)
    perm = derangement(key_perm, n)
    inside = _box_mask(y1, y2, x1, x2, h, w)[..., None]
    mixed = jnp.where(inside, images[perm], images)
    area = ((y2 - y1) * (x2 - x1)).astype(jnp.float32)
    lam_area = 1.0 - area / float(h * w)
    return mixed, {"lam": lam_area, "perm": perm, "box": jnp.stack([y1, y2, x1, x2], axis=-1)}


@builtin("cutmix", label="CutMix")
def cutmix(stats: DatasetStats, opts: Options) -> Callable:
    """CutMix with the original's changes: even box side, a permutation without fixed points, lam (in aux) set
    to the kept area fraction 1 - box_area / (H W)."""
    def fn(key, images, labels, score_fn=None):
        del labels, score_fn
        return _cutmix_once(key, images, opts.per_sample)
    return fn


def _cutmix_pick(scorer_name: str) -> Callable:
    """CutMixPick (docs/fidelity.md, "CutMixPick"): ``mix_n_run`` CutMix draws (each its own lam, box and derangement) make a pool of
    mix_n_run * N images in run order; ``score_fn`` scores it; the ``n_pick`` highest scores are kept, in
    ascending score order as the original returns them. ``n_pick`` None means N; it is capped at the pool size.

    aux: 'picked' (indices into the pool), 'scores', 'score_state' (score_fn's new state, e.g. the student's
    BatchNorm statistics), per picked image 'source', 'partner' and 'lam' (so that targets are
    lam * y[source] + (1 - lam) * y[partner]), 'targets' [n_pick, num_classes] when the dataset statistics
    carry num_classes and labels are given, and the pool's draws 'pool_lam', 'pool_perm', 'pool_box'.
    """
    def factory(stats: DatasetStats, opts: Options) -> Callable:
        def fn(key, images, labels, score_fn=None):
            if score_fn is None:
                raise ValueError(f"cutmix_pick by {scorer_name} needs score_fn(pool) -> (scores, new_state): the "
                                 f"{scorer_name}'s per-image score of the pool (kdjax.augment.entropy of its logits)")
            n = images.shape[0]
            runs = [_cutmix_once(k, images, opts.per_sample) for k in jax.random.split(key, opts.mix_n_run)]
            pool = jnp.concatenate([mixed for mixed, _ in runs], axis=0)
            scores, new_state = score_fn(pool)
            scores = jnp.asarray(scores)
            if scores.shape != (pool.shape[0],):
                raise ValueError(f"score_fn must return one score per pool image, shape ({pool.shape[0]},); got "
                                 f"{scores.shape}")
            n_pick = min(opts.n_pick if opts.n_pick is not None else n, pool.shape[0])
            # top_k keeps the highest scores in descending order; reversed, they come in the original's order
            # (ascending sort, last n_pick kept).
            _, top = jax.lax.top_k(scores.astype(jnp.float32), n_pick)
            picked = top[::-1].astype(jnp.int32)
            run_of = picked // n
            source = picked % n
            perms = jnp.stack([aux["perm"] for _, aux in runs])
            lams = jnp.stack([jnp.broadcast_to(aux["lam"], (n,)) for _, aux in runs])
            aux = {
                "picked": picked,
                "scores": scores,
                "score_state": new_state,
                "source": source,                      # batch index of the image outside the box
                "partner": perms[run_of, source],      # batch index of the image pasted inside the box
                "lam": lams[run_of, source],           # kept (source) area fraction of each picked image
                "pool_lam": jnp.stack([aux["lam"] for _, aux in runs]),
                "pool_perm": perms,
                "pool_box": jnp.stack([aux["box"] for _, aux in runs]),
            }
            if stats.num_classes is not None and labels is not None:
                aux["targets"] = transforms.mix_labels(labels, aux["partner"], aux["lam"], stats.num_classes,
                                                       source=aux["source"])
            return pool[picked], aux
        return fn
    return factory


cutmix_pick_s = builtin("cutmix_pick_s", label="CutMixPick (S. ent.)", scorer="student")(_cutmix_pick("student"))
cutmix_pick_t = builtin("cutmix_pick_t", label="CutMixPick (T. ent.)", scorer="teacher")(_cutmix_pick("teacher"))
