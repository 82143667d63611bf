"""The ImageNet KD step fed by the streamed source, end to end: images/s of ``kdjax distill`` (resnet34_imagenet ->
resnet18_imagenet, 224 px, batch 256, bfloat16, KD + identity) on synthetic ImageNet-like records, host decode +
RandomResizedCrop + flip in grain's threads overlapping the device step.

    python bench/streamed_kd.py            # the row of bench/device_check.sh (one GPU)
    python bench/streamed_kd.py --quick    # the same path on CPU: resnet8 -> resnet8, 32 px, batch 16

The records: ``--distinct`` JPEGs like bench/input_pipeline.py's (400-600 x 300-450 px, about 110 KB), hard-linked
into an ImageFolder tree of ``--images`` train images over 1000 classes (the KD step's real head size; --quick: 10)
and one test image per class, prepared
with ``kdjax prepare_data``'s code into ArrayRecord shards. Every record is decoded and cropped afresh, so repeating
files costs the host as much as distinct ones (the page cache aside: the dataset is small enough to sit there, as a
local-SSD ImageNet read at this rate would).

The figure is the run's own ``images_per_s`` (results.json: training images over training seconds, compiles left out,
waits for the host pipeline included) over ``--epochs`` epochs; the first epoch's first steps fill the pipeline.
A teacher of random weights is enough: the step's cost does not depend on the values.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from input_pipeline import make_jpeg  # noqa: E402
from results_io import output_path, write_json  # noqa: E402

def write_tree(root: pathlib.Path, images: int, num_classes: int, distinct: int, seed: int = 0) -> dict:
    """``train/<wnid>/`` (``images``) and ``val/<wnid>/`` (one per class) over ``num_classes`` made-up wnids, each
    file a hard link to one of ``distinct`` generated JPEGs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = root / "pool"
    pool.mkdir(parents=True)
    sources = []
    for i in range(distinct):
        path = pool / f"{i}.JPEG"
        path.write_bytes(make_jpeg(rng))
        sources.append(path)
    classes = [f"n{c:08d}" for c in range(num_classes)]
    for split, count in (("train", images), ("val", num_classes)):
        for i in range(count):
            folder = root / split / classes[i % num_classes]
            folder.mkdir(parents=True, exist_ok=True)
            os.link(sources[i % distinct], folder / f"img_{i:07d}.JPEG")
    return {"classes": classes, "mean_kb": float(np.mean([p.stat().st_size for p in sources]) / 1e3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes: resnet8 -> resnet8, 32 px, batch 16")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--student", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--images", type=int, default=None, help="train images (default 16 steps' worth; quick 6)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (quick 1)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct JPEGs behind the records")
    parser.add_argument("--workdir", default=None, help="where the records and the runs go (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    teacher = args.teacher or ("resnet8" if quick else "resnet34_imagenet")
    student = args.student or ("resnet8" if quick else "resnet18_imagenet")
    size = args.image_size or (32 if quick else 224)
    batch = args.batch or (16 if quick else 256)
    dtype = args.dtype or ("float32" if quick else "bfloat16")
    images = args.images or (6 if quick else 16) * batch
    epochs = args.epochs or (1 if quick else 2)
    num_classes = 10 if quick else 1000
    distinct = args.distinct or (8 if quick else 64)

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    base = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="streamed_kd_"))
    try:
        run_bench(base, args, quick, teacher, student, size, batch, dtype, images, epochs, num_classes, distinct)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


def run_bench(base, args, quick, teacher, student, size, batch, dtype, images, epochs, num_classes, distinct):
    import jax

    from kdjax import cli, models
    from kdjax.checkpoint import save_model
    from kdjax.data.streamed import prepare_dataset
    from kdjax.data.streamed.prepare import IMAGENET_MEAN, IMAGENET_STD

    t0 = time.perf_counter()
    tree = write_tree(base / "manual", images, num_classes, distinct)
    # --quick: in-process (a pool of spawned workers costs more than its 100 records)
    prepare_dataset("imagenet", base / "manual", base / "data", classes=tree["classes"], progress_every=0,
                    workers=1 if quick else None)
    prepare_s = time.perf_counter() - t0
    print(f"{images} train records ({distinct} distinct JPEGs, {tree['mean_kb']:.0f} KB mean) prepared in "
          f"{prepare_s:.1f} s", flush=True)

    model = models.create(teacher, num_classes, size)
    variables = model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)), train=False)
    save_model(str(base / "teacher"), jax.device_get(dict(variables)),
               {"model": teacher, "num_classes": num_classes, "image_size": size, "dataset": "imagenet",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    run = base / "student"
    cli.main(["distill", f"--config.student={student}", f"--config.teacher_checkpoint={base / 'teacher'}",
              "--config.aug=identity", f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
              f"--config.epochs={epochs}", f"--config.dtype={dtype}", f"--config.data_dir={base / 'data'}",
              f"--config.image_size={size}", f"--config.checkpoint_every={epochs}",
              f"--config.eval_every={epochs}", f"--workdir={run}"])
    results = json.loads((run / "results.json").read_text())
    device = jax.devices()[0]
    row = {"teacher": teacher, "student": student, "image_size": size, "batch": batch, "dtype": dtype,
           "images": images, "epochs": epochs, "img_per_s": results["images_per_s"],
           "compile_s": results.get("compile_s"), "prepare_s": prepare_s, "host_cores": os.cpu_count()}
    print(f"{teacher}->{student} {size}px batch {batch} {dtype} streamed: {row['img_per_s']:,.0f} img/s "
          f"end to end ({os.cpu_count()} host cores)", flush=True)
    out = {"bench": "streamed_kd", "quick": quick, "device_kind": device.device_kind, "platform": device.platform,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "jax": jax.__version__, "results": [row]}
    write_json(out, args.out or output_path("streamed_kd", device.device_kind, quick))


if __name__ == "__main__":
    main()
