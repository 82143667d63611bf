"""T. stddev, the paper's metric: the spread of the teacher's mean probabilities over groups of batches.

``estimator.GroupedStddev`` is the streaming estimator (on device, with a jackknife standard error);
``evaluator.Evaluator`` runs the teacher-only evaluation that feeds it, built on ``kdjax.data.epochs``;
``teacher_metrics.AugmentedMetrics`` accumulates, in the same pass, the teacher-side metrics on x' beside it (ECE,
class-histogram entropy, student agreement).
"""
from kdjax.tstddev.estimator import GroupedStddev  # noqa: F401
from kdjax.tstddev.teacher_metrics import AugmentedMetrics  # noqa: F401
from kdjax.tstddev.evaluator import ENTRIES_PER_GROUP, ENTRIES_PER_STEP, Evaluator, Plan, make_plan  # noqa: F401
