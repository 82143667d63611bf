"""Task 'teacher': train a model with cross-entropy on the base crop+flip, write checkpoints and results.json."""
from typing import Any, NamedTuple

from kdjax import models, parallel
from kdjax.data import open_for, place
from kdjax.tasks import frame
from kdjax.train import recipe as recipe_lib
from kdjax.train.teacher import train_teacher


def check(config) -> recipe_lib.TrainingSpec:
    models.check_name(config.model)
    recipe_lib.validate_run(config, config.model)
    recipe_lib.check_streamed_fields(config)
    return recipe_lib.training_spec(config, config.model)


class Inputs(NamedTuple):
    spec: recipe_lib.TrainingSpec
    dataset: Any


def load(config, spec: recipe_lib.TrainingSpec) -> Inputs:
    dataset = open_for(config)
    recipe_lib.check_batches(spec, dataset.num_train)
    return Inputs(spec, dataset)


def run_teacher(config, workdir, inputs: Inputs):
    spec, dataset, mesh = inputs.spec, inputs.dataset, parallel.make_mesh()
    out = train_teacher(spec, workdir, dataset, place(dataset, mesh), mesh)
    results = {"task": "teacher", "model": spec.model, "dataset": dataset.name, **frame.training_results(out)}
    return frame.Outcome(results, frame.training_line("teacher", spec.model, dataset.name, out))


TASK = frame.Task("teacher", check, load, run_teacher)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)
