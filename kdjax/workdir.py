"""A workdir belongs to one run: its config is recorded at the first start and a resume must match it."""
import json
import os
from typing import Iterable

RUN_CONFIG = "run_config.json"
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_FIELDS = ("eval_every", "log_every", "checkpoint_every", "steps_per_dispatch", "keep_checkpoints")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


def claim(workdir: str, config, ignore: Iterable[str] = RESUMABLE_FIELDS) -> None:
    """Record ``config`` in ``workdir``, or check that it equals the one already recorded (same run, resuming).

    Raises ValueError naming every differing field: resuming a different run would mix two experiments.
    """
    path = os.path.join(workdir, RUN_CONFIG)
    current = _flatten(_normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    if os.path.exists(path):
        with open(path) as f:
            recorded = _flatten(json.load(f))
        skip = set(ignore)
        diff = sorted(k for k in set(recorded) | set(current)
                      if k not in skip and recorded.get(k, "<absent>") != current.get(k, "<absent>"))
        if diff:
            details = ", ".join(f"{k}: {recorded.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in diff)
            raise ValueError(f"workdir {workdir} holds a run with a different config ({details}); use a new "
                             f"--workdir, or repeat the recorded config to resume it")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config)), f, indent=1,
                  sort_keys=True)
