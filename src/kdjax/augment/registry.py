"""Name -> scheme factory registry, filled where each scheme is defined (``@builtin`` in ``schemes``, ``register``
for a user's), the scheme options (declared once, on ``Options``: the ``augment`` config block and its ``--help``
lines derive from them) and ``create``, the one entry point of the augmentation package.

A leaf module: it imports nothing of kdjax, so the scheme modules can import it.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import ml_collections
from ml_collections import config_dict

# The paper's nine schemes in the order of its tables: the one list every task and the sweep use (aug='all'). Named
# here, apart from the registry, so that a scheme added to kdjax never joins "the paper's nine" by being built in.
PAPER_SCHEMES = ("identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix", "cutmix_pick_s",
                 "cutmix_pick_t")

SCORERS = (None, "student", "teacher")
CRITERIA = ("entropy", "kld")
POLICIES = ("cifar10", "imagenet")


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What a scheme needs to know of its data: per-channel mean/std in [0, 1] pixel units, the square image
    side, and (optional) the number of classes, which lets CutMixPick return soft label targets."""
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: int
    num_classes: Optional[int] = None


def _option(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Options:
    """The scheme options, resolved by ``resolve_options`` (``create`` describes them). Each field declared with
    ``_option`` is a config field ``augment.<name>`` of the tasks that run schemes, with this help line."""
    per_sample: bool = _option(False, "each image gets its own draw (the original draws once per batch)")
    cutout_size: Optional[int] = _option(None, "Cutout hole side; unset: image_size // 4 (8 at 32 px)")
    policy: Optional[str] = _option(None, "AutoAugment policy, cifar10 or imagenet; unset: cifar10 below 64 px")
    mix_n_run: int = _option(2, "CutMix draws pooled by CutMixPick")
    n_pick: Optional[int] = _option(None, "images CutMixPick keeps; unset: the batch size, capped at the pool size")
    criterion: str = _option("entropy", "CutMixPick score: 'entropy' (the paper) or 'kld'")
    crop_pad: int = 0  # Crop+Flip's padding, derived from the image size (image_size // 8), not an option


def option_names() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Options) if "help" in f.metadata)


def option_help(name: str) -> str:
    return next((f.metadata["help"] for f in dataclasses.fields(Options) if f.name == name), "")


def config_block(exclude: Tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The ``augment`` group of a task config: every option with its default (unset ones as placeholders)."""
    out = {}
    for f in dataclasses.fields(Options):
        if "help" not in f.metadata or f.name in exclude:
            continue
        kind = {"cutout_size": int, "policy": str, "n_pick": int}.get(f.name, type(f.default))
        out[f.name] = config_dict.placeholder(kind) if f.default is None else f.default
    return ml_collections.ConfigDict(out)


def options_from_config(group, batch_size: int) -> dict:
    """``create``'s options from a config's ``augment`` group: the set fields; ``n_pick`` unset is the
    configured batch size, so a short last batch keeps min(n_pick, pool) images as the original does."""
    options = {k: v for k, v in (group.items() if group is not None else ()) if v is not None}
    options.setdefault("n_pick", int(batch_size))
    return options


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A created scheme: call it as ``scheme(key, images, labels, score_fn=None) -> (images_aug, aux)``.

    ``scorer`` says which model ``score_fn`` must run: None (no score_fn needed), 'student' (the training
    student in train mode, returning its updated BatchNorm statistics as new_state) or 'teacher' (eval mode,
    new_state None). With ``criterion == 'kld'`` the score is ``kld_score(student(pool), teacher(pool))``: both
    models run, the student as for 'student' (``scored_by``).
    """
    name: str
    fn: Callable = dataclasses.field(repr=False)
    stats: DatasetStats
    options: Options
    scorer: Optional[str] = None
    criterion: Optional[str] = None

    @property
    def needs_score_fn(self) -> bool:
        return self.scorer is not None

    @property
    def scored_by(self) -> Optional[str]:
        """The model whose forward a step runs inside ``score_fn``: the scorer, except that the 'kld' criterion
        compares the training student with the teacher and so always needs the student's train-mode pass."""
        if self.scorer is not None and self.criterion == "kld":
            return "student"
        return self.scorer

    def __call__(self, key, images, labels, score_fn=None):
        if images.ndim != 4:
            raise ValueError(f"{self.name}: images must be a normalised float batch [N, H, W, C]; got shape "
                             f"{images.shape}")
        size, channels = self.stats.image_size, len(self.stats.mean)
        if images.shape[1:] != (size, size, channels):
            raise ValueError(f"{self.name}: images have shape {images.shape} but the scheme was created for "
                             f"{size}x{size}x{channels} (dataset_stats.image_size, len(mean)); create it with the "
                             f"matching dataset_stats")
        return self.fn(key, images, labels, score_fn)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable
    scorer: Optional[str] = None
    label: Optional[str] = None  # how tables and plots name the scheme


_BUILTIN: Dict[str, _Entry] = {}
_USER: Dict[str, _Entry] = {}


def builtin(name: str, *, label: str, scorer: Optional[str] = None):
    """Decorator of a built-in scheme's factory, where it is defined (``kdjax.augment.schemes``)."""
    def add(factory: Callable) -> Callable:
        _BUILTIN[name] = _Entry(factory, scorer, label)
        return factory
    return add


def names():
    """The paper's nine in its order, any other built-in scheme, then user-registered ones in registration order."""
    return ([n for n in PAPER_SCHEMES if n in _BUILTIN] + [n for n in _BUILTIN if n not in PAPER_SCHEMES]
            + [n for n in _USER if n not in _BUILTIN])


def label(name: str) -> str:
    """The scheme's name in tables and plots ("CutMixPick (T. ent.)"); a user scheme's own name."""
    entry = _BUILTIN.get(name) or _USER.get(name)
    return entry.label if entry is not None and entry.label else name


def scorer_of(name: str) -> Optional[str]:
    """Which model scores the scheme's pool: None, 'student' (its T. stddev needs a trained student) or 'teacher'."""
    check_name(name)
    return (_BUILTIN.get(name) or _USER[name]).scorer


def check_name(name: str) -> None:
    if name not in _BUILTIN and name not in _USER:
        raise ValueError(f"unknown augmentation {name!r}; valid augmentations: {', '.join(names())}")


def register(name: str, factory: Callable = None, *, scorer: Optional[str] = None):
    """Add a scheme: ``factory(stats: DatasetStats, options: Options) -> fn(key, images, labels, score_fn)``
    returning ``(images_aug, aux)`` on normalised float NHWC batches. ``scorer`` ('student' / 'teacher') if fn
    calls score_fn. Usable as a decorator; re-registering a user name replaces it; built-in names are fixed."""
    if factory is None:
        return lambda fn: register(name, fn, scorer=scorer)
    if not isinstance(name, str) or not name:
        raise ValueError(f"scheme name must be a non-empty string; got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in scheme; register yours under another name")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable(stats, options) -> fn; got {factory!r}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}; got {scorer!r}")
    _USER[name] = _Entry(factory, scorer)
    return factory


def as_stats(dataset_stats) -> DatasetStats:
    """DatasetStats from a kdjax.data Dataset (or any object with mean, std, image_size), or a dict of them."""
    if isinstance(dataset_stats, DatasetStats):
        return dataset_stats
    if isinstance(dataset_stats, dict):
        get = dataset_stats.get
    else:
        def get(field, default=None):
            return getattr(dataset_stats, field, default)
    missing = [f for f in ("mean", "std", "image_size") if get(f) is None]
    if missing:
        raise ValueError(f"dataset_stats needs mean, std (per-channel, [0, 1] pixel units) and image_size; "
                         f"missing {', '.join(missing)} (pass a kdjax.data Dataset or a dict)")
    mean = tuple(float(v) for v in get("mean"))
    std = tuple(float(v) for v in get("std"))
    if len(mean) != len(std) or not mean:
        raise ValueError(f"dataset_stats mean and std need one value per channel each; got {mean} and {std}")
    if not all(v > 0 for v in std):
        raise ValueError(f"dataset_stats std must be positive; got {std}")
    image_size = int(get("image_size"))
    if image_size < 1:
        raise ValueError(f"dataset_stats image_size must be a positive side length; got {image_size}")
    num_classes = get("num_classes")
    return DatasetStats(mean, std, image_size, None if num_classes is None else int(num_classes))


def resolve_options(stats: DatasetStats, per_sample: bool = False, cutout_size: Optional[int] = None,
                    policy: Optional[str] = None, mix_n_run: int = 2, n_pick: Optional[int] = None,
                    criterion: str = "entropy") -> Options:
    """Fill the size-dependent defaults and check every option, each with a one-line error."""
    size = stats.image_size
    if cutout_size is None:
        cutout_size = max(size // 4, 1)  # 8 at 32x32, 16 at 64x64 (56 at 224), the original's choices
    if policy is None:
        policy = "cifar10" if size < 64 else "imagenet"
    if per_sample not in (True, False):
        raise ValueError(f"per_sample must be True or False; got {per_sample!r}")
    if int(cutout_size) < 1 or int(cutout_size) > size:
        raise ValueError(f"cutout_size must be in [1, image_size={size}]; got {cutout_size}")
    if policy not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    if int(mix_n_run) < 2:
        raise ValueError(f"mix_n_run must be >= 2 (CutMixPick picks from several CutMix draws, as the original "
                         f"requires); got {mix_n_run}")
    if n_pick is not None and int(n_pick) < 1:
        raise ValueError(f"n_pick must be a positive number of images or None (= the batch size); got {n_pick}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pick criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    return Options(per_sample=bool(per_sample), cutout_size=int(cutout_size), policy=policy,
                   mix_n_run=int(mix_n_run), n_pick=None if n_pick is None else int(n_pick), criterion=criterion,
                   crop_pad=size // 8)


def create(aug: str, dataset_stats, **options) -> Scheme:
    """Build scheme ``aug``: ``fn(key, images, labels, score_fn=None) -> (images_aug, aux)``.

    ``dataset_stats``: a kdjax.data Dataset or a dict with mean, std (3-tuples in [0, 1] pixel units),
    image_size, and optionally num_classes. Options:
      per_sample=False  draw the scheme's randomness per image instead of once per batch (the original);
      cutout_size       hole side; default image_size // 4 (8 at 32x32, 16 at 64x64);
      policy            AutoAugment policy 'cifar10' / 'imagenet'; default 'cifar10' below 64 px, else 'imagenet';
      mix_n_run=2       CutMix draws pooled by CutMixPick;
      n_pick=None       images CutMixPick keeps; None = the batch size of the call, capped at the pool size
                        (pass the configured batch size so that a short last batch keeps min(n_pick, pool)
                        images, as the original does);
      criterion         CutMixPick score: 'entropy' (T = 1, by the scheme's scorer) or 'kld'.
    The schemes are pure and jittable with static shapes; nothing runs on the host.
    """
    check_name(aug)
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(option_names())}")
    stats = as_stats(dataset_stats)
    opts = resolve_options(stats, **options)
    entry = _BUILTIN.get(aug) or _USER[aug]
    fn = entry.factory(stats, opts)
    if isinstance(fn, Scheme):
        return fn
    if not callable(fn):
        raise ValueError(f"factory of {aug!r} returned {fn!r}; it must return fn(key, images, labels, score_fn)")
    return Scheme(name=aug, fn=fn, stats=stats, options=opts, scorer=entry.scorer,
                  criterion=opts.criterion if entry.scorer is not None else None)

