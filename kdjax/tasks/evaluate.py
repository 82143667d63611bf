"""Task 'evaluate': test loss, top-1 and top-5 of a checkpoint (an imported teacher also shows its stored accuracy)."""
import time

from kdjax import models, parallel, runlog, workdir as workdir_lib
from kdjax.checkpoint import CheckpointError
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train.evaluate import eval_batch_size, make_evaluator


def run(config, workdir):
    workdir_lib.check_owner(workdir, "evaluate")  # never into another run's workdir (e.g. the teacher's own)
    if not config.checkpoint:
        raise CheckpointError("give the checkpoint to evaluate: --config.checkpoint=DIR (a workdir or a step dir)")
    variables, meta, model_name = common.load_checkpoint(config.checkpoint, config.model or None, field="checkpoint")
    common.resolve_data(config, meta)
    dtype = common.compute_dtype(config.dtype)
    started = time.time()
    dataset = common.load_dataset(config)
    common.check_against_dataset(meta, config.checkpoint, dataset)
    mesh = parallel.make_mesh()
    data = DeviceDataset.create(dataset, mesh)
    model = models.create(model_name, dataset.num_classes, dataset.image_size, dtype)
    evaluate = make_evaluator(model, dataset.mean, dataset.std,
                              eval_batch_size(int(config.eval_batch_size), mesh.size), dataset.num_test)
    out = evaluate(variables, data)
    results = {"task": "evaluate", "model": model_name, "dataset": dataset.name, **out,
               "wall_s": time.time() - started, "checkpoint": config.checkpoint}
    line = f"[evaluate] {model_name} on {dataset.name}: test_loss {out['test_loss']:.6f} top1 {out['top1']:.4f} " \
           f"top5 {out['top5']:.4f}"
    if meta.get("accuracy") is not None:
        results["stored_accuracy"] = meta["accuracy"]
        line += f" (accuracy stored in the checkpoint: {meta['accuracy']})"
    print(line, flush=True)
    runlog.write_results(workdir, results, config)
    return results
