"""Task 'distill': train a student by KD (or labels only, ``teacher=none``) with one augmentation scheme, optionally
with a distiller beside or instead of KD's KL terms and logit standardisation (``kdjax.train.kd`` assembles it)."""
import dataclasses
from typing import Any, Optional

from kdjax import parallel
from kdjax.checkpoint import (check_against_dataset, fill_data_fields, input_record, load_checkpoint,
                              read_meta)
from kdjax.data import open_for, place
from kdjax.tasks import frame
from kdjax.train import kd, recipe as recipe_lib


def check(config) -> kd.DistillSpec:
    method = kd.validate(config)
    if kd.has_teacher(config):  # the teacher's dataset and size, where the config leaves them unset
        teacher_meta = read_meta(config.teacher_checkpoint)
        fill_data_fields(config, teacher_meta)
        kd.check_feature_shapes(config, method.distiller, int(teacher_meta.get("num_classes", 10)))
    else:
        fill_data_fields(config, None)
    recipe_lib.check_streamed_fields(config)
    return kd.DistillSpec.from_config(config, method)


@dataclasses.dataclass
class Inputs:
    spec: kd.DistillSpec
    dataset: Any
    teacher_vars: Optional[Any] = None
    teacher_meta: Optional[dict] = None


def load(config, spec: kd.DistillSpec) -> Inputs:
    inputs = Inputs(spec, None)
    if spec.has_teacher:
        inputs.teacher_vars, inputs.teacher_meta, _ = load_checkpoint(config.teacher_checkpoint, spec.teacher,
                                                                      "teacher")
    inputs.dataset = open_for(config)
    recipe_lib.check_batches(spec.training, inputs.dataset.num_train)
    if inputs.teacher_meta is not None:
        check_against_dataset(inputs.teacher_meta, config.teacher_checkpoint, inputs.dataset)
        kd.warn_dataset_mismatch(spec.teacher, inputs.teacher_meta, inputs.dataset)
    return inputs


def consumed(config, inputs: Inputs) -> dict:
    return {} if inputs.teacher_meta is None else {
        "teacher": input_record(config.teacher_checkpoint, inputs.teacher_meta)}


def run_student(config, workdir, inputs: Inputs):
    spec, dataset, mesh = inputs.spec, inputs.dataset, parallel.make_mesh()
    out = kd.train_student(spec, workdir, dataset, place(dataset, mesh), mesh, inputs.teacher_vars)
    results = {"task": "distill", "teacher": spec.teacher, "student": spec.student, "dataset": dataset.name,
               "aug": spec.aug, **out["fields"], "inputs": consumed(config, inputs),
               **frame.training_results(out)}
    label = f"{spec.teacher}->{spec.student} {spec.aug}"
    return frame.Outcome(results, frame.training_line("distill", label, dataset.name, out))


TASK = frame.Task("distill", check, load, run_student, consumed=consumed)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)
