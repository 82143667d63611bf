"""Draw every augmentation scheme on real images into one PNG grid (``kdjax augment_gallery``).

Row 1 shows the test images as stored, row 2 the base training transform x (per-sample crop+flip, as every
step does before its scheme), the other rows x' = A(x) for each scheme, all from the same x. CutMixPick needs a
scoring model; a gallery has no trained one, so it scores the pool by the entropy of a fixed random linear
classifier on the pixels (seeded, never trained) and says so in its row title: the picks show the mechanism,
not what a trained student or teacher would pick.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import augment
from kdjax.augment import transforms
from kdjax.data import load_for

PROXY_NOTE = "scored by entropy of a fixed random linear classifier (untrained proxy)"


def scheme_list(aug) -> list:
    """The schemes of ``aug``: a tuple of names, ``('all',)`` for the paper's nine."""
    wanted = list(augment.PAPER_SCHEMES) if tuple(aug) == ("all",) else list(aug)
    for name in wanted:
        augment.check_name(name)
    if not wanted:
        raise ValueError("aug is empty; give all or a list of schemes, e.g. --config.aug=cutout,mixup")
    return wanted


def proxy_score_fn(seed: int, image_size: int, num_classes: int):
    """score_fn(pool) -> (entropy of a fixed random linear classifier, None); stands in for a trained model."""
    weights = jax.random.normal(jax.random.key(seed), (image_size * image_size * 3, num_classes)) * 0.05

    def score_fn(pool):
        logits = pool.reshape(pool.shape[0], -1) @ weights
        return augment.entropy(logits), None
    return score_fn


def pick_test_images(dataset, count: int, seed: int):
    """``count`` test images, one class after another so that the columns differ."""
    labels = dataset.labels("test")
    rng = np.random.RandomState(seed)
    order = rng.permutation(labels.shape[0])
    chosen, seen = [], set()
    for index in order:  # first one image per class, then fill up
        if labels[index] not in seen:
            chosen.append(index)
            seen.add(labels[index])
        if len(chosen) == count:
            break
    chosen += [i for i in order if i not in set(chosen)][:count - len(chosen)]
    chosen = np.asarray(chosen[:count])
    return dataset.images("test")[chosen], labels[chosen]


def to_display(images_normalized, mean, std) -> np.ndarray:
    return np.clip(np.asarray(transforms.denormalize(jnp.asarray(images_normalized, jnp.float32), mean, std)), 0.0, 1.0)


def render(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(images.shape[0] for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.2 * columns + 2.6, 1.25 * len(rows) + 0.8),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < images.shape[0]:
                ax.imshow(images[c], interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, workdir):
    names = scheme_list(config.aug)
    os.makedirs(workdir, exist_ok=True)
    if int(config.num_images) < 2:
        raise ValueError(f"num_images must be >= 2 (mixing schemes pair images); got {config.num_images}")
    dataset = load_for(config)
    mean, std, size = dataset.mean, dataset.std, dataset.image_size
    images_uint8, labels = pick_test_images(dataset, int(config.num_images), int(config.seed))

    key = jax.random.key(int(config.seed))
    key_base, key_aug = jax.random.split(key)
    x = transforms.base_train_batch(key_base, jnp.asarray(images_uint8), mean, std, transforms.default_pad(size))
    rows = [("original", np.asarray(images_uint8) / 255.0), ("base crop+flip (x)", to_display(x, mean, std))]
    scorers = {"student": proxy_score_fn(1, size, dataset.num_classes),
               "teacher": proxy_score_fn(2, size, dataset.num_classes)}
    summary = {}
    for index, name in enumerate(names):
        scheme = augment.create(name, dataset_stats=dataset, per_sample=bool(config.per_sample))
        score_fn = scorers.get(scheme.scorer)
        run_fn = jax.jit(lambda k, im, lb, scheme=scheme, score_fn=score_fn: scheme(k, im, lb, score_fn))
        out, aux = run_fn(jax.random.fold_in(key_aug, index), x, jnp.asarray(labels))
        label = name + (f"\n(picked {out.shape[0]} of {2 * x.shape[0]},\nproxy score)" if scheme.scorer else "")
        rows.append((label, to_display(out, mean, std)))
        summary[name] = {k: np.asarray(v).tolist() for k, v in aux.items()
                         if k in ("lam", "perm", "box", "offset", "flip", "picked")}

    mode = "per-sample draws" if config.per_sample else "one draw per batch (as the original)"
    title = (f"kdjax.augment on {dataset.name} {size}x{size}, seed {config.seed}, {mode}. "
             f"CutMixPick rows: {PROXY_NOTE}, ascending score order.")
    path = os.path.join(workdir, config.output)
    render(rows, path, title)
    with open(os.path.join(workdir, "augment_gallery.json"), "w") as f:
        json.dump({"task": "augment_gallery", "dataset": dataset.name, "image_size": size, "schemes": names,
                   "labels": np.asarray(labels).tolist(), "params": summary, "png": path}, f, indent=1)
    print(f"wrote {path}")
    return path
