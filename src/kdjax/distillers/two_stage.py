"""The two-stage distillers of the original: AB, FT and FSP, an init stage trained before the KD stage.

Each has an init stage (``init_stage_heads`` / ``init_stage_loss``, the original's helper/pretrain.py, run by
``kdjax.train.init_stage``) and a KD stage (``init`` / ``loss``). Checked against the official PyTorch code in
tests/test_distiller_fixtures_two_stage.py. Feature maps are NHWC; the losses compute in float32 and the teacher
side is a constant.

* AB (activation boundaries, ``abound`` in the original): pre-activation features (``preact``) f[1:-1]. Per layer,
  a connector maps the student's map to the teacher's shape: the identity when channels and height already agree,
  else FitNet's ``ConvReg`` without its ReLU (conv, then BatchNorm in train mode). With margin m, the layer's
  loss is the sum over all elements of (s + m)² where s > -m and t <= 0, plus (s - m)² where s <= m and t > 0;
  layer i of n is weighted 2^(i - n + 1) (the deepest layer 1), each divided by the batch size and scaled by
  3 / 1000, and the layers summed. The init stage trains the connectors and the student's feature modules on
  it; the KD stage adds nothing (``stage_term = False``: plain KD).
* FT (factor transfer, ``factor``): a ``Paraphraser`` auto-encoder of the teacher's f[-2] is trained in the init
  stage on the MSE of its reconstruction (the student is not run). In the KD stage it is fixed (kept in the
  non-trainable ``state``) and a trainable ``Translator`` (BatchNorm in train mode, statistics in ``state``)
  encodes the student's f[-2]; the term is the mean absolute difference of the "factors" of both encodings,
  factor(f) = L2-normalise(flatten(channel-mean of f²)), after adaptive pooling of the larger map to the smaller's
  size.
* FSP (flow of solution procedure): the FSP matrix of two consecutive maps (the larger one pooled to the other's
  size) is G[i, j] = mean over positions of top[..., i] * bot[..., j], ``[B, C_top, C_bot]``; the loss sums over
  the consecutive pairs of f[:-1] the mean squared difference of the student's and the teacher's matrices, and
  needs equal channels at every f[:-1]. The init stage trains the student's feature modules on it (no heads);
  the KD stage adds nothing (``stage_term = False``).

Defaults: beta ab 1, ft 200, fsp 50 (RepDistiller's scripts/run_cifar_distill.sh, the script this code derives
from), 30 init epochs (option.py ``--init_epochs``), AB margin 1 and FT k 0.5 (ABLoss, Paraphraser and Translator
defaults), the init stage's learning rate the student's, 0.01 for FT with a CIFAR ResNet/WRN student
(helper/pretrain.py).
"""
import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from kdjax.distillers import heads
from kdjax.distillers.feature import at_map
from kdjax.distillers.interface import (Distiller, apply_bn_head, check_feature_list, match_spatial, shape_of,
                                        student_features, teacher_features)
from kdjax.distillers.registry import option, register

HIGHEST = jax.lax.Precision.HIGHEST

# helper/pretrain.py: the students whose FT init stage runs at lr 0.01 instead of the student's learning rate.
FT_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                  "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")
FT_INIT_LR = 0.01


# ----------------------------------------------------------------------------------------------------------------
# Pure losses (float32 inputs; the teacher side is expected to be a constant already)


def ab_layer_loss(s, t, margin: float = 1.0):
    """One layer of AB: sum of (s + m)² where s > -m and t <= 0, plus (s - m)² where s <= m and t > 0."""
    below = (s > -margin) & (t <= 0)
    above = (s <= margin) & (t > 0)
    return jnp.sum(jnp.where(below, (s + margin) ** 2, 0.0) + jnp.where(above, (s - margin) ** 2, 0.0))


def ab_loss(maps_s, maps_t, margin: float = 1.0):
    """AB over paired lists of maps (the connectors' outputs and the teacher's pre-activation maps): layer i of n
    weighted 2^(i - n + 1), divided by the batch size, times 3 / 1000, summed."""
    n = len(maps_s)
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(maps_s, maps_t)):
        total = total + 2.0 ** (i - n + 1) * ab_layer_loss(s, t, margin) / s.shape[0] / 1000.0 * 3.0
    return total


def fsp_matrix(bot, top):
    """The FSP matrix ``[B, C_top, C_bot]`` of two consecutive maps, the larger pooled to the other's size."""
    bot, top = match_spatial(bot, top)
    positions = bot.shape[1] * bot.shape[2]
    return jnp.einsum("bhwi,bhwj->bij", top, bot, precision=HIGHEST) / positions


def fsp_loss(maps_s, maps_t):
    """FSP over two lists of maps (the original's f[:-1]): for each consecutive pair, the mean squared difference
    of the student's and the teacher's FSP matrices; summed over the pairs."""
    total = jnp.zeros((), jnp.float32)
    for i in range(len(maps_s) - 1):
        g_s = fsp_matrix(maps_s[i], maps_s[i + 1])
        g_t = fsp_matrix(maps_t[i], maps_t[i + 1])
        total = total + jnp.mean((g_s - g_t) ** 2)
    return total


def factor(f, p: float = 2.0):
    """FT's factor: L2-normalised flatten of the channel mean of f**p, ``[B, H*W]`` (AT's attention map)."""
    return at_map(f, p)


def factor_transfer_loss(factor_s, factor_t, p1: float = 2.0, p2: float = 1.0):
    """FT's term between the translator's and the paraphraser's encodings: the mean |difference| (``p2 = 1``; the
    mean of difference**p2 otherwise) of their factors, after matching the sizes."""
    factor_s, factor_t = match_spatial(factor_s, factor_t)
    diff = factor(factor_s, p1) - factor(factor_t, p1)
    return jnp.mean(jnp.abs(diff)) if p2 == 1 else jnp.mean(diff ** p2)


def mse(x, y):
    return jnp.mean((x - y) ** 2)


# ----------------------------------------------------------------------------------------------------------------
# Shape checks


def _channels(feats):
    return [shape_of(f)[-1] for f in feats]


def _check_maps(feats, who: str, what: str):
    for i, f in feats:
        shape = shape_of(f)
        if len(shape) != 4:
            raise ValueError(f"{what} uses {who} feature {i} as an NHWC map but it has shape {shape}; pass the "
                             "list from model.apply(..., features=True)")


def _zoo_pair_hint(name: str) -> str:
    return (f"{name} needs student and teacher feature lists of the same length (the original asserts it); pair "
            "models of one family (e.g. resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2) or use another distiller")


# ----------------------------------------------------------------------------------------------------------------
# Distillers


@dataclasses.dataclass(frozen=True)
class TwoStage(Distiller):
    """Fields and checks shared by the two-stage distillers: ``init_epochs`` (0 skips the init stage) and
    ``init_lr`` (None: the original's rule, ``init_stage_lr``)."""

    init_stage: ClassVar[bool] = True
    uses_features: ClassVar[bool] = True

    init_epochs: int = option(30, "epochs of the init stage before KD (0 skips it)")
    init_lr: Optional[float] = option(None, "constant lr of the init stage (unset: the student's; ft 0.01 on "
                                                  "resnet/wrn)")

    def __post_init__(self):
        if int(self.init_epochs) != self.init_epochs or self.init_epochs < 0:
            raise ValueError(f"init_epochs must be an integer >= 0, got {self.init_epochs!r}")
        if self.init_lr is not None and not self.init_lr > 0:
            raise ValueError(f"init_lr must be > 0 (or None for the original's rule), got {self.init_lr!r}")


@register
@dataclasses.dataclass(frozen=True)
class AB(TwoStage):
    """Activation boundaries over the pre-activation f[1:-1]; init stage only.

    ``init_stage_heads`` = ``{'connector_<i>': ConvReg params}`` for each feature index i whose connector is not
    the identity. The connectors' BatchNorm runs in train mode in the init stage, as the original's; its running
    statistics are not kept, since nothing ever reads them (the KD stage does not use the connectors).
    """

    name: ClassVar[str] = "ab"
    init_trains_student: ClassVar[bool] = True
    preact: ClassVar[bool] = True
    stage_term: ClassVar[bool] = False

    beta: float = 1.0
    margin: float = option(1.0, "margin of the activation-boundary loss")

    def _pairs(self, feats_s, feats_t):
        """``[(i, s_shape, t_shape, ConvReg or None)]`` over f[1:-1]."""
        check_feature_list(feats_s, "student", 3)
        check_feature_list(feats_t, "teacher", 3)
        if len(feats_s) != len(feats_t):
            raise ValueError(_zoo_pair_hint("ab") + f" (got {len(feats_s)} and {len(feats_t)} features)")
        _check_maps(list(enumerate(feats_s))[1:-1], "student", "ab")
        _check_maps(list(enumerate(feats_t))[1:-1], "teacher", "ab")
        out = []
        for i in range(1, len(feats_s) - 1):
            s, t = shape_of(feats_s[i]), shape_of(feats_t[i])
            if s[3] == t[3] and s[1] == t[1]:
                out.append((i, s, t, None))
                continue
            try:
                heads.conv_reg_kind(s, t)
            except ValueError:
                raise ValueError(f"ab cannot connect the student's feature {i} ({s[1]}x{s[2]}) to the teacher's "
                                 f"({t[1]}x{t[2]}): its connector needs H_s = 2 H_t, 2 H_s = H_t or H_s >= H_t; "
                                 "pair models whose maps have such sizes or use another distiller") from None
            out.append((i, s, t, heads.ConvReg(s_shape=s, t_shape=t, use_relu=False)))
        return out

    def check_shapes(self, feats_s, feats_t) -> None:
        self._pairs(feats_s, feats_t)

    def init_stage_heads(self, key, feats_s, feats_t):
        params = {}
        pairs = self._pairs(feats_s, feats_t)
        for k, (i, s, _, module) in zip(jax.random.split(key, len(pairs)), pairs):
            if module is not None:
                params[f"connector_{i}"] = module.init(k, jnp.zeros((1,) + s[1:], jnp.float32),
                                                       train=False)["params"]
        return params

    def connect(self, heads_params, feats_s, feats_t):
        """The connectors' outputs (train-mode BatchNorm) for the student's f[1:-1]."""
        out = []
        for i, _, t, module in self._pairs(feats_s, feats_t):
            f = student_features([feats_s[i]])[0]
            if module is not None:
                c = t[3]
                stats = {"bn": {"mean": jnp.zeros(c, jnp.float32), "var": jnp.ones(c, jnp.float32)}}
                f, _ = module.apply({"params": heads_params[f"connector_{i}"], "batch_stats": stats}, f,
                                    train=True, mutable=["batch_stats"])
            out.append(f)
        return out

    def init_stage_loss(self, heads_params, feats_s, feats_t):
        g_s = self.connect(heads_params, feats_s, feats_t)
        g_t = teacher_features(feats_t[1:-1])
        return ab_loss(g_s, g_t, self.margin)


@register
@dataclasses.dataclass(frozen=True)
class FT(TwoStage):
    """Factor transfer on f[-2].

    Init stage: ``{'paraphraser': ...}`` trained on the teacher's f[-2] alone. KD stage: params
    ``{'translator': ...}``, state ``{'paraphraser': <the init stage's, fixed>, 'batch_stats': {'translator': ...}}``.
    ``init(..., init_heads=None)`` (no init stage ran, e.g. ``init_epochs=0``) starts from a freshly initialised
    paraphraser, as the original would. ``train=False`` runs the translator's BatchNorm on its running statistics.
    """

    name: ClassVar[str] = "ft"

    beta: float = 200.0
    ft_k: float = option(0.5, "factor rate k of the paraphraser and translator (0.5: half the teacher's "
                                 "channels)")

    def _shapes(self, feats_s, feats_t):
        check_feature_list(feats_t, "teacher", 2)
        _check_maps([(len(feats_t) - 2, feats_t[-2])], "teacher", "ft")
        t = shape_of(feats_t[-2])
        if heads.factor_channels(t[3], self.ft_k) < 1:
            raise ValueError(f"ft's factor has int({t[3]} * ft_k={self.ft_k}) = 0 channels; use a larger distill.ft_k")
        if feats_s is None:
            return None, t
        check_feature_list(feats_s, "student", 2)
        _check_maps([(len(feats_s) - 2, feats_s[-2])], "student", "ft")
        return shape_of(feats_s[-2]), t

    def check_shapes(self, feats_s, feats_t) -> None:
        self._shapes(feats_s, feats_t)

    def init_stage_lr(self, student_name: str, student_lr: float) -> float:
        if self.init_lr is not None:
            return float(self.init_lr)
        return FT_INIT_LR if student_name in FT_LR_STUDENTS else float(student_lr)

    def paraphraser(self, feats_t):
        return heads.Paraphraser(channels=shape_of(feats_t[-2])[3], k=self.ft_k)

    def translator(self, feats_s, feats_t):
        return heads.Translator(in_channels=shape_of(feats_s[-2])[3], teacher_channels=shape_of(feats_t[-2])[3],
                                k=self.ft_k)

    def init_stage_heads(self, key, feats_s, feats_t):
        _, t = self._shapes(None, feats_t)
        x = jnp.zeros((1,) + t[1:], jnp.float32)
        return {"paraphraser": self.paraphraser(feats_t).init(key, x)["params"]}

    def init_stage_loss(self, heads_params, feats_s, feats_t):
        """The MSE between the paraphraser's reconstruction of the teacher's f[-2] and f[-2] (``feats_s`` unused:
        the original's FT init stage does not run the student)."""
        f_t = teacher_features([feats_t[-2]])[0]
        _, rec = self.paraphraser(feats_t).apply({"params": heads_params["paraphraser"]}, f_t)
        return mse(rec, f_t)

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None, init_heads=None):
        s, _ = self._shapes(feats_s, feats_t)
        k_p, k_t = jax.random.split(key)
        fresh = jax.eval_shape(lambda: self.init_stage_heads(k_p, None, feats_t))
        if init_heads is None:
            init_heads = self.init_stage_heads(k_p, None, feats_t)
        elif (jax.tree.structure(init_heads) != jax.tree.structure(fresh)
              or any(tuple(a.shape) != tuple(b.shape)
                     for a, b in zip(jax.tree.leaves(init_heads), jax.tree.leaves(fresh)))):
            raise ValueError("ft's init_heads must be the init stage's {'paraphraser': ...} for this teacher's "
                             "f[-2]; rerun the init stage for this teacher")
        variables = self.translator(feats_s, feats_t).init(k_t, jnp.zeros((1,) + s[1:], jnp.float32), train=False)
        paraphraser = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), init_heads["paraphraser"])
        return ({"translator": variables["params"]},
                {"paraphraser": paraphraser, "batch_stats": {"translator": variables["batch_stats"]}})

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        f_s = student_features([feats_s[-2]])[0]
        f_t = teacher_features([feats_t[-2]])[0]
        paraphraser = jax.lax.stop_gradient(state["paraphraser"])  # fixed in the KD stage
        factor_t = jax.lax.stop_gradient(
            self.paraphraser(feats_t).apply({"params": paraphraser}, f_t, is_factor=True))
        factor_s, state = apply_bn_head(self.translator(feats_s, feats_t), params, state, "translator", f_s, train)
        return factor_transfer_loss(factor_s, factor_t), state


@register
@dataclasses.dataclass(frozen=True)
class FSP(TwoStage):
    """FSP matrices over f[:-1]; init stage only (it trains the student's feature modules; no heads)."""

    name: ClassVar[str] = "fsp"
    init_trains_student: ClassVar[bool] = True
    stage_term: ClassVar[bool] = False

    beta: float = 50.0

    def check_shapes(self, feats_s, feats_t) -> None:
        check_feature_list(feats_s, "student", 3)
        check_feature_list(feats_t, "teacher", 3)
        if len(feats_s) != len(feats_t):
            raise ValueError(_zoo_pair_hint("fsp") + f" (got {len(feats_s)} and {len(feats_t)} features)")
        _check_maps(list(enumerate(feats_s))[:-1], "student", "fsp")
        _check_maps(list(enumerate(feats_t))[:-1], "teacher", "fsp")
        c_s, c_t = _channels(feats_s[:-1]), _channels(feats_t[:-1])
        if c_s != c_t:
            raise ValueError(f"fsp needs equal student and teacher channels at every feature f[:-1], got {c_s} and "
                             f"{c_t}; pair models of equal widths (e.g. resnet110 -> resnet20, resnet32x4 -> "
                             "resnet8x4) or use another distiller")

    def init_stage_heads(self, key, feats_s, feats_t):
        self.check_shapes(feats_s, feats_t)
        return {}

    def init_stage_loss(self, heads_params, feats_s, feats_t):
        return fsp_loss(student_features(feats_s[:-1]), teacher_features(feats_t[:-1]))
