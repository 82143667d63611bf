"""Teacher-side metrics beside T. stddev, over the augmented data x' (docs/fidelity.md, "Teacher-side metrics").

The T. stddev evaluator adds every augmented batch x' (its teacher probabilities, the dominant labels
``kdjax.augment.transforms.dominant_labels`` and, for CutMixPick (S. ent.), the scoring student's predictions) to an
``AugmentedMetrics`` state, on the device, next to the ``GroupedStddev`` entry of the same rows: no teacher forward of
its own. Only x' counts (the original batches x are not part of "the augmented data"); every real row of every step
weighs the same, and unlike T. stddev nothing is grouped or dropped at the end. From the state come

* ``ece``: the expected calibration error with ``bins`` (15) equal-width confidence bins: a row's confidence is
  its largest probability, it falls in bin b when b / B < confidence <= (b + 1) / B (edges rounded to float32), it
  is correct when its argmax is its dominant label, and ECE = sum_b |sum of confidences in b - correct rows in b| /
  rows, i.e. sum_b (n_b / n) |accuracy_b - mean confidence_b|;
* ``aug_top1``: the teacher's accuracy on x' against the dominant labels (the calibration's reference);
* ``class_histogram_entropy``: the entropy (natural log) of the distribution of the teacher's argmax classes over
  x', -sum_c (n_c / n) log(n_c / n); log C when every class is predicted equally often, 0 for a single class;
* ``agreement``: the fraction of rows of x' where the student's argmax equals the teacher's, where a student was
  given (None otherwise).

Counts are int32 (exact); the per-bin confidence sums are Kahan-compensated float32 (10^6 rows per run), and the
host result is computed in float64.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.tstddev.estimator import host_float64

ECE_BINS = 15


class AugmentedMetricsState(NamedTuple):
    """All arrays; shapes fixed by (num_classes C, bins B)."""
    rows: jax.Array                  # [] int32, real rows of x' seen
    bin_rows: jax.Array              # [B] int32, rows per confidence bin
    bin_correct: jax.Array           # [B] int32, rows per bin whose argmax is their dominant label
    bin_confidence: jax.Array        # [B] sum of the confidences per bin (Kahan-compensated)
    bin_confidence_comp: jax.Array   # [B] the compensation term of bin_confidence
    predicted: jax.Array             # [C] int32, rows per argmax class
    agreement_rows: jax.Array        # [] int32, rows with a student prediction
    agreements: jax.Array            # [] int32, of those, rows where the student's argmax is the teacher's


def bin_edges(bins: int, dtype=np.float32) -> np.ndarray:
    """The B + 1 edges b / B of the confidence bins, rounded once to ``dtype``, as torch.linspace gives them."""
    return np.linspace(0.0, 1.0, bins + 1).astype(dtype)


def confidence_bins(confidence, bins: int):
    """Bin b, edges[b] < confidence <= edges[b + 1] (``bin_edges`` in the confidence's dtype), of each confidence in
    [0, 1] (0 goes to the first bin). Compared with the rounded edges rather than computed as ceil(B c) - 1, whose
    product rounds: float32(0.2) * 15 is 3.0, which would put 0.2000000030 into the bin that ends at 0.2."""
    inner = jnp.asarray(bin_edges(bins, confidence.dtype)[1:-1])
    return (confidence[..., None] > inner).sum(axis=-1, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class AugmentedMetrics:
    """Streaming ECE, class-histogram entropy and student agreement of a sequence of [rows, C] probability batches.

    Args:
      num_classes: C.
      bins: B, the equal-width confidence bins of the ECE.
      dtype: float dtype of the confidence sums.
    """
    num_classes: int
    bins: int = ECE_BINS
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("num_classes", "bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"AugmentedMetrics: {name} must be an integer >= 1, got {value!r}")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"AugmentedMetrics: dtype must be a float dtype such as jnp.float32, got {self.dtype!r}")

    def init(self) -> AugmentedMetricsState:
        b, c, f, i = self.bins, self.num_classes, self.dtype, jnp.int32
        return AugmentedMetricsState(
            rows=jnp.zeros([], i), bin_rows=jnp.zeros([b], i), bin_correct=jnp.zeros([b], i),
            bin_confidence=jnp.zeros([b], f), bin_confidence_comp=jnp.zeros([b], f), predicted=jnp.zeros([c], i),
            agreement_rows=jnp.zeros([], i), agreements=jnp.zeros([], i))

    def update(self, state: AugmentedMetricsState, probs, labels, mask=None, student_pred=None,
               student_mask=None) -> AugmentedMetricsState:
        """Add the rows of ``probs`` [rows, C] with their dominant ``labels`` [rows] where ``mask`` [rows] (padded rows
        may hold anything, even NaN). ``student_pred`` [rows]: the student's argmax class of the same images, counted
        where ``mask & student_mask``."""
        probs, labels = jnp.asarray(probs), jnp.asarray(labels)
        if probs.ndim != 2 or probs.shape[-1] != self.num_classes:
            raise ValueError(f"probs must have shape [rows, C] with C = {self.num_classes}, got {probs.shape}")
        rows = probs.shape[0]
        for name, value in (("labels", labels), ("mask", mask), ("student_pred", student_pred),
                            ("student_mask", student_mask)):
            if value is not None and tuple(jnp.shape(value)) != (rows,):
                raise ValueError(f"{name} must have shape ({rows},) (one per row of probs), got {jnp.shape(value)}")
        mask = jnp.ones([rows], bool) if mask is None else jnp.asarray(mask, bool)
        probs = jnp.where(mask[:, None], probs.astype(self.dtype), 0)
        confidence = probs.max(axis=-1)
        predicted = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        correct = mask & (predicted == labels)
        # one-hot sums, not scatter-adds: reductions are deterministic on every backend, scatters of floats are not
        in_bin = (jax.nn.one_hot(confidence_bins(confidence, self.bins), self.bins, dtype=jnp.int32)
                  * mask[:, None].astype(jnp.int32))
        bin_confidence = (in_bin.astype(self.dtype) * confidence[:, None]).sum(axis=0)
        in_class = jax.nn.one_hot(predicted, self.num_classes, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
        total, comp = _kahan_add(state.bin_confidence, state.bin_confidence_comp, bin_confidence)
        state = state._replace(
            rows=state.rows + mask.sum(dtype=jnp.int32),
            bin_rows=state.bin_rows + in_bin.sum(axis=0),
            bin_correct=state.bin_correct + (in_bin * correct[:, None].astype(jnp.int32)).sum(axis=0),
            bin_confidence=total, bin_confidence_comp=comp,
            predicted=state.predicted + in_class.sum(axis=0))
        if student_pred is None:
            return state
        counted = mask if student_mask is None else mask & jnp.asarray(student_mask, bool)
        agree = counted & (jnp.asarray(student_pred).astype(jnp.int32) == predicted)
        return state._replace(agreement_rows=state.agreement_rows + counted.sum(dtype=jnp.int32),
                              agreements=state.agreements + agree.sum(dtype=jnp.int32))

    def result_arrays(self, state: AugmentedMetricsState) -> dict:
        """Jittable: {ece, aug_top1, class_histogram_entropy, agreement, aug_rows} as scalar arrays (NaN where
        undefined)."""
        return _summary(jnp, state)

    def result(self, state: AugmentedMetricsState) -> dict:
        """Host side: the same as plain Python numbers in float64; ``agreement`` None without student rows."""
        host = host_float64(state)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = _summary(np, host)
        return {"ece": float(out["ece"]), "aug_top1": float(out["aug_top1"]),
                "class_histogram_entropy": float(out["class_histogram_entropy"]),
                "agreement": float(out["agreement"]) if host.agreement_rows > 0 else None,
                "aug_rows": int(out["aug_rows"])}


def _kahan_add(total, comp, value):
    y = value - comp
    new_total = total + y
    return new_total, (new_total - total) - y


def _summary(xp, state: AugmentedMetricsState) -> dict:
    """The result formulas, written once for NumPy (host, float64) and jax.numpy (jittable)."""
    dtype = state.bin_confidence.dtype
    rows = state.rows.astype(dtype)
    nan = xp.asarray(np.nan, dtype)
    some = rows > 0
    per_row = 1 / xp.maximum(rows, 1)
    confidence = state.bin_confidence - state.bin_confidence_comp
    ece = xp.abs(confidence - state.bin_correct.astype(dtype)).sum() * per_row
    top1 = state.bin_correct.sum().astype(dtype) * per_row
    share = state.predicted.astype(dtype) * per_row
    # 0 log 0 = 0; subtracted from 0 so that a single predicted class gives 0.0, not -0.0
    histogram_entropy = 0.0 - (share * xp.log(xp.where(share > 0, share, 1))).sum()
    agreement = state.agreements.astype(dtype) / xp.maximum(state.agreement_rows, 1).astype(dtype)
    return {"ece": xp.where(some, ece, nan), "aug_top1": xp.where(some, top1, nan),
            "class_histogram_entropy": xp.where(some, histogram_entropy, nan),
            "agreement": xp.where(state.agreement_rows > 0, agreement, nan), "aug_rows": state.rows}
