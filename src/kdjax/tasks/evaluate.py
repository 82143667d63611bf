"""Task 'evaluate': test loss, top-1 and top-5 of a checkpoint (an imported teacher also shows its stored accuracy)."""
import dataclasses
from typing import Any

from kdjax import models
from kdjax.checkpoint import CheckpointError, check_against_dataset, fill_data_fields, load_checkpoint, read_meta
from kdjax.data import open_for
from kdjax.data.placement import check_placement
from kdjax.tasks import frame
from kdjax.train import recipe as recipe_lib
from kdjax.train.evaluate import evaluate_model


def check(config):
    if not config.checkpoint:
        raise CheckpointError("give the checkpoint to evaluate: --config.checkpoint=DIR (a workdir or a step dir)")
    if config.model:
        models.check_name(config.model)
    recipe_lib.compute_dtype(config.dtype)
    fill_data_fields(config, read_meta(config.checkpoint))
    check_placement(config)


@dataclasses.dataclass
class Inputs:
    variables: Any
    meta: dict
    model_name: str
    dataset: Any


def load(config, _) -> Inputs:
    variables, meta, model_name = load_checkpoint(config.checkpoint, config.model or None, field="checkpoint")
    dataset = open_for(config)
    check_against_dataset(meta, config.checkpoint, dataset)
    return Inputs(variables, meta, model_name, dataset)


def run_evaluation(config, workdir, inputs: Inputs):
    dataset = inputs.dataset
    out = evaluate_model(inputs.model_name, inputs.variables, dataset, recipe_lib.compute_dtype(config.dtype),
                         int(config.eval_batch_size))
    results = {"task": "evaluate", "model": inputs.model_name, "dataset": dataset.name, **out,
               "checkpoint": config.checkpoint}
    line = (f"[evaluate] {inputs.model_name} on {dataset.name}: test_loss {out['test_loss']:.6f} top1 "
            f"{out['top1']:.4f} top5 {out['top5']:.4f}")
    stored = inputs.meta.get("accuracy")
    if stored is not None:
        results["stored_accuracy"] = stored
        line += f" (accuracy stored in the checkpoint: {stored})"
    return frame.Outcome(results, line)


TASK = frame.Task("evaluate", check, load, run_evaluation)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)
