"""T. stddev: the spread of the teacher's mean probabilities over groups of consecutive batches (docs/fidelity.md, "T. stddev").

The original code appends the teacher's softmax (temperature 1) of every batch it sees to a list: per step first
the original batch, then the augmented one. Every ``entries_per_group`` (10) entries the rows of the list are pooled
into one group mean m_g in R^C (every row weighs the same) and the list is emptied; groups therefore run across
epoch boundaries, and a partial group at the end is never used. The metric is

    T. stddev = (1 / C) * sum_c sqrt( sum_g (m_gc - mean_g m_gc)^2 / (G - 1) ),

the unbiased standard deviation over all G completed groups, averaged over classes. The original also prints the
mean per-row entropy -sum_c p_c log p_c of every row seen so far (all entries, including the unfinished group).

``GroupedStddev`` computes both on the accelerator in a fixed-shape pytree state, so a whole evaluation can be one
``lax.scan``. Group means are accumulated with Welford's update into one of ``se_buckets`` buckets (group g goes to
bucket g mod K); the buckets are merged with Chan's formula when the result is read. That two-level scheme keeps
float32 accurate over 10^5 groups (each Welford chain is K times shorter) and the same buckets give the standard
error below.

Standard error: a delete-a-bucket jackknife, computed exactly from the bucket statistics by removing one bucket from
the merged total (Chan's formula in reverse). Why this one:

* it is distribution-free. For a confident teacher the probability of a class over a group is close to a
  Poisson count divided by the group size, so group means are skewed; the normal-theory delta method
  (Var s^2 = 2 sigma^4 / (G - 1)) ignores the excess kurtosis and understates the error.
* it streams in fixed memory (K x C, independent of G, no capacity to choose) and needs no random keys, unlike a
  bootstrap over a buffer of all G group means.
* while G <= K every bucket holds one group, so it *is* the delete-one jackknife; beyond that it is the grouped
  (delete-d) jackknife, which converges to the same value; bucket sizes differ by at most one (round robin).

The jackknife variance of the std is slightly conservative (Efron-Stein), the right side to err on for an error bar.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr


class GroupedStddevState(NamedTuple):
    """All arrays; shapes fixed by (num_classes C, se_buckets K). Floats use the estimator's dtype."""
    group_sum: jax.Array       # [C] row-sum of the probabilities of the group being filled
    group_rows: jax.Array      # [] int32, rows in that group so far
    group_entries: jax.Array   # [] int32, entries in that group so far
    groups: jax.Array          # [] int32, completed groups G
    bucket_count: jax.Array    # [K] int32, groups per bucket
    bucket_mean: jax.Array     # [K, C] Welford mean of the group means of each bucket
    bucket_m2: jax.Array       # [K, C] Welford sum of squared deviations of each bucket
    entropy_sum: jax.Array     # [] sum of per-row entropies (Kahan-compensated: ~10^6 rows per run)
    entropy_comp: jax.Array    # [] the compensation term of entropy_sum
    entropy_rows: jax.Array    # [] int32, rows in entropy_sum


@dataclasses.dataclass(frozen=True)
class GroupedStddev:
    """Streaming T. stddev of a sequence of [rows, C] probability batches ("entries").

    Args:
      num_classes: C.
      entries_per_group: entries pooled into one group (the original: 10 = 5 steps x (original + augmented)).
      se_buckets: K, buckets of the jackknife standard error (and of the two-level accumulation).
      dtype: float dtype of the state; probabilities are cast to it.
    """
    num_classes: int
    entries_per_group: int = 10
    se_buckets: int = 256
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name, low in (("num_classes", 1), ("entries_per_group", 1), ("se_buckets", 2)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"GroupedStddev: {name} must be an integer >= {low}, got {value!r}")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"GroupedStddev: dtype must be a float dtype such as jnp.float32, got {self.dtype!r}")

    def init(self) -> GroupedStddevState:
        c, k, f, i = self.num_classes, self.se_buckets, self.dtype, jnp.int32
        return GroupedStddevState(
            group_sum=jnp.zeros([c], f), group_rows=jnp.zeros([], i), group_entries=jnp.zeros([], i),
            groups=jnp.zeros([], i), bucket_count=jnp.zeros([k], i), bucket_mean=jnp.zeros([k, c], f),
            bucket_m2=jnp.zeros([k, c], f), entropy_sum=jnp.zeros([], f), entropy_comp=jnp.zeros([], f),
            entropy_rows=jnp.zeros([], i))

    def _check_entry(self, probs, mask, leading: tuple) -> None:
        """Static shape checks (run at trace time, so jitted callers get them too)."""
        expected = "[" + ", ".join(leading + ("rows", "C")) + "]"
        if probs.ndim != len(leading) + 2 or probs.shape[-1] != self.num_classes:
            raise ValueError(f"probs must have shape {expected} with C = {self.num_classes}, got {probs.shape}")
        if mask is not None and tuple(mask.shape) != tuple(probs.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(probs.shape[:-1])} (probs without the class axis), "
                             f"got {tuple(mask.shape)}")

    def update(self, state: GroupedStddevState, probs, mask=None) -> GroupedStddevState:
        """Add one entry: ``probs`` [rows, C] (any row count); ``mask`` [rows] bool marks the real rows.

        An entry without any real row is no entry at all (it does not advance the group), so stacks of entries
        may be padded with fully masked ones.
        """
        probs = jnp.asarray(probs)
        mask = None if mask is None else jnp.asarray(mask)
        self._check_entry(probs, mask, ())
        probs = probs.astype(self.dtype)
        mask = jnp.ones(probs.shape[:1], bool) if mask is None else mask.astype(bool)
        # where (not multiply): a padded row may hold garbage, even NaN, and must not leak into the sums.
        probs = jnp.where(mask[:, None], probs, 0)
        rows = mask.sum(dtype=jnp.int32)
        is_entry = rows > 0

        state = self._add_entropy(state, entr(probs).sum(), rows)
        group_sum = state.group_sum + probs.sum(axis=0)
        group_rows = state.group_rows + rows
        group_entries = state.group_entries + is_entry.astype(jnp.int32)
        complete = is_entry & (group_entries == self.entries_per_group)

        group_mean = group_sum / jnp.maximum(group_rows, 1).astype(self.dtype)
        state = self._add_group(state, group_mean, complete)
        keep = jnp.logical_not(complete)
        return state._replace(
            group_sum=jnp.where(keep, group_sum, 0).astype(self.dtype),
            group_rows=jnp.where(keep, group_rows, 0),
            group_entries=jnp.where(keep, group_entries, 0))

    def update_many(self, state: GroupedStddevState, probs_stacked, masks_stacked=None) -> GroupedStddevState:
        """``update`` over the leading axis of ``probs_stacked`` [E, rows, C] (and ``masks_stacked`` [E, rows]), in
        order, as one ``lax.scan``: many entries per dispatch."""
        probs_stacked = jnp.asarray(probs_stacked)
        masks_stacked = None if masks_stacked is None else jnp.asarray(masks_stacked)
        self._check_entry(probs_stacked, masks_stacked, ("E",))
        if masks_stacked is None:
            masks_stacked = jnp.ones(probs_stacked.shape[:2], bool)

        def body(carry, entry):
            return self.update(carry, *entry), None

        state, _ = jax.lax.scan(body, state, (probs_stacked, masks_stacked))
        return state

    def _add_entropy(self, state, entropy, rows):
        # Kahan summation: the run's total grows to ~10^6 while each entry adds ~10, which plain float32 would round.
        y = entropy.astype(self.dtype) - state.entropy_comp
        total = state.entropy_sum + y
        comp = (total - state.entropy_sum) - y
        return state._replace(entropy_sum=total, entropy_comp=comp, entropy_rows=state.entropy_rows + rows)

    def _add_group(self, state, group_mean, complete):
        """Welford update of bucket (G mod K) with one group mean, applied only where ``complete``."""
        b = state.groups % self.se_buckets
        n = state.bucket_count[b] + 1
        mean = state.bucket_mean[b]
        delta = group_mean - mean
        new_mean = mean + delta / n.astype(self.dtype)
        new_m2 = state.bucket_m2[b] + delta * (group_mean - new_mean)
        return state._replace(
            groups=state.groups + complete.astype(jnp.int32),
            bucket_count=state.bucket_count.at[b].set(jnp.where(complete, n, n - 1)),
            bucket_mean=state.bucket_mean.at[b].set(jnp.where(complete, new_mean, mean)),
            bucket_m2=state.bucket_m2.at[b].set(jnp.where(complete, new_m2, state.bucket_m2[b])))

    def result_arrays(self, state: GroupedStddevState) -> dict:
        """Jittable: {tstddev, tstddev_se, groups, mean_entropy} as scalar arrays in the state's dtype (NaN where
        undefined: tstddev needs G >= 2; the standard error needs G >= 3 and at least 2 groups outside each
        bucket)."""
        return _summary(jnp, state)

    def result(self, state: GroupedStddevState) -> dict:
        """Host side: the same dict as plain Python numbers, computed in float64 from the fetched state."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = _summary(np, host_float64(state))
        return {"tstddev": float(out["tstddev"]), "tstddev_se": float(out["tstddev_se"]),
                "groups": int(out["groups"]), "mean_entropy": float(out["mean_entropy"])}


def host_float64(state):
    """A running state fetched to the host with its floating arrays in float64, where the results are computed."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64 if np.issubdtype(a.dtype, np.floating) else a.dtype),
                        jax.device_get(state))


def _summary(xp, state: GroupedStddevState) -> dict:
    """The result formulas, written once for both NumPy (host, float64) and jax.numpy (jittable)."""
    count = state.bucket_count
    dtype = state.bucket_mean.dtype
    n = count.sum().astype(dtype)
    w = count.astype(dtype)[:, None]
    nan = xp.asarray(np.nan, dtype)

    # Chan's merge of all buckets: the mean and M2 of every group mean.
    mean = (w * state.bucket_mean).sum(axis=0) / xp.maximum(n, 1)
    dev = state.bucket_mean - mean
    m2 = state.bucket_m2.sum(axis=0) + (w * dev ** 2).sum(axis=0)
    tstddev = xp.sqrt(m2 / xp.maximum(n - 1, 1)).mean()
    tstddev = xp.where(n >= 2, tstddev, nan)

    # Delete-a-bucket jackknife: remove bucket k from the total (Chan's merge solved for one part).
    n_rest = n - w                                                    # [K, 1]
    m2_rest = m2 - state.bucket_m2 - w * n / xp.maximum(n_rest, 1) * dev ** 2
    m2_rest = xp.maximum(m2_rest, 0)                                  # round-off only
    theta_rest = xp.sqrt(m2_rest / xp.maximum(n_rest - 1, 1)).mean(axis=1)  # [K]
    filled = count > 0
    k = filled.sum().astype(dtype)
    theta_bar = xp.where(filled, theta_rest, 0).sum() / xp.maximum(k, 1)
    var = (k - 1) / xp.maximum(k, 1) * xp.where(filled, (theta_rest - theta_bar) ** 2, 0).sum()
    defined = (k >= 2) & xp.all(xp.where(filled, n_rest[:, 0] >= 2, True))
    tstddev_se = xp.where(defined, xp.sqrt(var), nan)

    rows = state.entropy_rows.astype(dtype)
    mean_entropy = xp.where(rows > 0, (state.entropy_sum - state.entropy_comp) / xp.maximum(rows, 1), nan)
    return {"tstddev": tstddev, "tstddev_se": tstddev_se, "groups": state.groups, "mean_entropy": mean_entropy}
