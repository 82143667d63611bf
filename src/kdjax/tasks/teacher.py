"""Task 'teacher': train a model with cross-entropy on the base crop+flip, write checkpoints and results.json."""
from kdjax import models, parallel
from kdjax.data import open_for, place
from kdjax.tasks import frame
from kdjax.train import recipe as recipe_lib
from kdjax.train.teacher import train_teacher


def check(config):
    models.check_name(config.model)
    recipe_lib.validate_run(config, config.model)
    recipe_lib.check_streamed_fields(config)


def load(config, _):
    dataset = open_for(config)
    recipe_lib.check_batches(config, dataset.num_train)
    return dataset


def run_teacher(config, workdir, dataset):
    mesh = parallel.make_mesh()
    out = train_teacher(config, workdir, dataset, place(dataset, mesh), mesh)
    results = {"task": "teacher", "model": config.model, "dataset": dataset.name,
               **frame.training_results(out)}
    return frame.Outcome(results, frame.training_line("teacher", config.model, dataset.name, out))


TASK = frame.Task("teacher", check, load, run_teacher)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)
